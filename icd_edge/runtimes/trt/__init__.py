"""The ``tensorrt`` backend: engines from the bundle's ONNX graphs, built or cached per device.

For each graph the backend works out the engine it needs (precision plan, fixed-shape profile,
key over the ONNX sha256s + GPU name + compute capability + TensorRT version, see
:mod:`icd_edge.runtimes.trt.plan`) and then uses, in this order:

1. the engine recorded under ``artifacts["tensorrt"]`` in the bundle, if its key matches;
2. the engine in the cache folder (``engine_cache``, default ``~/.cache/icd_edge/trt``), if its
   metadata matches the key, its size and sha256 match the metadata, TensorRT deserializes it
   and its I/O matches the manifest;
3. otherwise it builds the engine on this device (``build=True``, the default), atomically,
   reusing one timing cache per (GPU, TensorRT version), and uses that.

A stale engine is never used silently: the reason is logged, and with ``build=False`` it is an
error. No part of this module has been executed against a real TensorRT by the project's tests
(see docs/tensorrt.md); the tests drive it with a fake ``tensorrt`` module.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from icd_edge.atomic import write_bytes_atomic
from icd_edge.bundle.store import sha256_file
from icd_edge.errors import BackendUnavailable, InputError
from icd_edge.precision import canonical
from icd_edge.runtimes import Availability, build_options
from icd_edge.runtimes.trt.build import BuildRequest, build_engine
from icd_edge.runtimes.trt.plan import (
    PRECISIONS,
    Source,
    default_cache_dir,
    describe_difference,
    engine_filename,
    engine_io_problems,
    engine_key,
    key_material,
    meta_path,
    plan_precision,
    profile_shapes,
    read_meta,
    source_digests,
    stale_reason,
    timing_cache_name,
    version_problem,
)
from icd_edge.runtimes.trt.session import SharedBase, SharedBaseSession, TrtSession, engine_io

logger = logging.getLogger(__name__)

SHARED_GRAPHS = {"unet_forward": "forward", "unet_reverse": "reverse"}


@dataclass(frozen=True)
class TrtOptions:
    """Options only this backend understands (``Editor.open(b, backend="tensorrt", options=TrtOptions(...))``).

    Attributes:
        precision: ``auto`` (fp16 where this TensorRT can build it, else fp32), ``fp32``, ``fp16``
            or ``int8`` (needs Q/DQ ONNX graphs in the bundle).
        engine_cache: folder for engines built here and the timing cache.
        build: build missing or stale engines on this device; False makes that an error.
        workspace_mb: builder workspace limit (``MemoryPoolType.WORKSPACE``); None: TensorRT's default.
        cuda_graph: capture each graph's copies + enqueue as a CUDA graph and replay it.
        shared_base: one refittable engine for ``unet_forward`` and ``unet_reverse``, refitted
            between them (refit times in ``backend.refit_log``); set by the shared-base memory policy.
        device: CUDA device index.
    """

    precision: str = "auto"
    engine_cache: Path | None = None
    build: bool = True
    workspace_mb: int | None = None
    cuda_graph: bool = False
    shared_base: bool = False
    device: int = 0

    def __post_init__(self):
        object.__setattr__(self, "precision", canonical(self.precision, PRECISIONS, "tensorrt precision"))
        if self.engine_cache is not None:
            object.__setattr__(self, "engine_cache", Path(self.engine_cache).expanduser())
        if self.workspace_mb is not None and (not isinstance(self.workspace_mb, int) or self.workspace_mb <= 0):
            raise InputError(f"workspace_mb must be a positive integer (MiB), got {self.workspace_mb!r}")
        if not isinstance(self.device, int) or self.device < 0:
            raise InputError(f"device must be a CUDA device index >= 0, got {self.device!r}")


class TensorRTBackend:
    name = "tensorrt"
    # The backend runs from the bundle's ONNX graphs (building engines lazily on this device)
    # and uses prebuilt engines from artifacts["tensorrt"] only when their key matches.
    # select_backend() requires the bundle to hold `fmt`, so that format is "onnx".
    fmt = "onnx"

    Options = TrtOptions
    memory_policies = ("resident", "sequential", "shared-base")

    def __init__(self, options: TrtOptions | None = None, **fields):
        self.options = build_options(TrtOptions, options, fields, self.name)
        self.refit_log: list[dict] = []
        self.built: list[str] = []  # engine files built by this backend instance
        self._rt = None
        self._shared: dict[str, SharedBase] = {}
        self._lock = threading.Lock()

    @staticmethod
    def auto_skip(bundle, memory: str) -> str | None:
        if memory == "shared-base":
            return "auto runs shared-base bundles on onnxruntime; ask for tensorrt by name to refit one engine"
        return None

    def configure(self, bundle, memory: str) -> None:
        if memory == "shared-base":
            import dataclasses

            self.options = dataclasses.replace(self.options, shared_base=True)

    # ------------------------------------------------------------------ availability
    def probe(self) -> Availability:
        if importlib.util.find_spec("tensorrt") is None:
            return Availability(False, "not installed")
        try:
            trt = importlib.import_module("tensorrt")
        except Exception as exc:  # a broken install raises ImportError/OSError for missing libnvinfer
            return Availability(False, f"tensorrt is installed but cannot be imported ({exc})")
        problem = version_problem(str(getattr(trt, "__version__", "unknown")))
        if problem:
            return Availability(False, problem)
        from icd_edge.runtimes.trt.cuda import device_count, import_cudart

        try:
            cudart = import_cudart()
        except BackendUnavailable as exc:
            return Availability(False, str(exc))
        count, reason = device_count(cudart)
        if count <= self.options.device:
            return Availability(False, reason or f"CUDA device {self.options.device} not found ({count} present)")
        try:
            gpu = self._runtime()["gpu"]
        except BackendUnavailable as exc:
            return Availability(False, str(exc))
        return Availability(
            True, f"TensorRT {trt.__version__}, {gpu.name} (compute capability {gpu.compute_capability})"
        )

    def _runtime(self) -> dict:
        """tensorrt module, logger, Runtime, CUDA wrapper and GPU info, created once."""
        with self._lock:
            if self._rt is None:
                trt = importlib.import_module("tensorrt")
                from icd_edge.runtimes.trt.cuda import Cuda

                cuda = Cuda(device=self.options.device)
                trt_logger = trt.Logger(trt.Logger.WARNING)
                self._rt = {
                    "trt": trt,
                    "logger": trt_logger,
                    "runtime": trt.Runtime(trt_logger),
                    "cuda": cuda,
                    "gpu": cuda.gpu_info(),
                    "version": str(trt.__version__),
                }
            return self._rt

    # ------------------------------------------------------------------ sessions
    def open_session(self, bundle, graph: str):
        avail = self.probe()
        if not avail.ok:
            raise BackendUnavailable(f"tensorrt: {avail.reason}")
        rt = self._runtime()
        if bundle.artifact(graph, "onnx") is None:  # also refuses unknown graph names
            raise BackendUnavailable(f"bundle {bundle.root} has no ONNX graph for {graph}")
        entry = bundle.graphs[graph]
        if self.options.shared_base and graph in SHARED_GRAPHS:
            return SharedBaseSession(graph, self._shared_base(bundle), SHARED_GRAPHS[graph], entry)
        engine = self.engine_for(bundle, graph)
        return TrtSession(graph, engine, entry, rt["trt"], rt["cuda"], self.options.cuda_graph)

    def _shared_base(self, bundle) -> SharedBase:
        from icd_edge.runtimes.trt.refit import refit_weight_map

        root = str(Path(bundle.root).resolve())
        with self._lock:
            base = self._shared.get(root)
        if base is not None:
            return base
        rt = self._runtime()
        fwd, rev = bundle.artifact("unet_forward", "onnx"), bundle.artifact("unet_reverse", "onnx")
        if fwd is None or rev is None:
            raise BackendUnavailable("shared_base needs the unet_forward and unet_reverse ONNX graphs in the bundle")
        if importlib.util.find_spec("onnx") is None:
            raise BackendUnavailable("shared_base reads the ONNX initializers once: pip install onnx")
        files = bundle.manifest.files
        map_key = engine_key(
            {"refit_map": 1, "forward": source_digests(files, _src(fwd)), "reverse": source_digests(files, _src(rev))}
        )
        map_path = self._cache_dir() / f"refit-map.{map_key[:16]}.json"
        refit_map = read_meta(map_path)
        if refit_map is None or refit_map.get("key") != map_key:
            refit_map = {**refit_weight_map(bundle.root, fwd.file, rev.file), "key": map_key}
            map_path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(map_path, json.dumps(refit_map).encode())
        engine = self.engine_for(bundle, "unet_forward", refit=True)
        session = TrtSession(
            "unet_forward", engine, bundle.graphs["unet_forward"], rt["trt"], rt["cuda"], self.options.cuda_graph
        )
        base = SharedBase(
            session,
            rt["trt"],
            rt["logger"],
            bundle.root,
            refit_map,
            self.refit_log,
            on_close=lambda: self._shared.pop(root, None),
        )
        with self._lock:
            self._shared[root] = base
        return base

    def prepare(self, bundle, graphs=None) -> list[str]:
        """Load or build the engine of every graph now (e.g. once after installing on a Jetson).

        Returns the engine files built by this call (empty when all were cached or prebuilt).
        """
        avail = self.probe()
        if not avail.ok:
            raise BackendUnavailable(f"tensorrt: {avail.reason}")
        before = len(self.built)
        for graph in graphs or bundle.graphs:
            if self.options.shared_base and graph in SHARED_GRAPHS:
                self.engine_for(bundle, "unet_forward", refit=True)
            else:
                self.engine_for(bundle, graph)
        return self.built[before:]

    # ------------------------------------------------------------------ engines
    def _cache_dir(self) -> Path:
        return self.options.engine_cache or default_cache_dir()

    def engine_for(self, bundle, graph: str, refit: bool = False):
        """The deserialized engine for ``graph``: from the bundle, the cache, or a fresh build."""
        rt = self._runtime()
        trt, entry = rt["trt"], bundle.graphs[graph]
        plan = plan_precision(graph, entry, self.options.precision, rt["version"], refit=refit)
        profile = profile_shapes(entry)
        material = key_material(
            graph, source_digests(bundle.manifest.files, plan.source), plan, profile, rt["gpu"], rt["version"]
        )
        key = engine_key(material)

        prebuilt = entry.artifacts.get("tensorrt")
        if prebuilt is not None and not refit:
            if prebuilt.details.get("key") == key:
                engine, problem = self._load(bundle.path(prebuilt.file), entry)
                if engine is not None:
                    return engine
                logger.warning(
                    "bundle engine %s is not usable here (%s); using the engine cache", prebuilt.file, problem
                )
            else:
                logger.info(
                    "bundle engine %s was built for other inputs (%s); using the engine cache",
                    prebuilt.file,
                    describe_difference(prebuilt.details.get("material") or {}, material),
                )

        path = self._cache_dir() / engine_filename(graph, plan.precision, key)
        reason = stale_reason(read_meta(meta_path(path)), material, path, sha256_file)
        if reason is None:
            engine, reason = self._load(path, entry)
            if engine is not None:
                return engine
        if not self.options.build:
            raise BackendUnavailable(
                f"no usable TensorRT engine for {graph} in {path.parent} ({reason}); allow building "
                "(build=True) or export with --targets onnx,tensorrt on this kind of GPU"
            )
        logger.warning(
            "%s TensorRT engine %s: %s (this takes minutes for a full-size UNet)",
            "building" if reason == "no engine file" else "rebuilding stale",
            path.name,
            reason,
        )
        build_engine(
            trt,
            BuildRequest(
                graph,
                bundle.path(plan.source.file),
                plan,
                profile,
                material,
                path,
                self._cache_dir() / timing_cache_name(rt["gpu"], rt["version"]),
                (self.options.workspace_mb or 0) * (1 << 20) or None,
            ),
            rt["logger"],
        )
        self.built.append(path.name)
        engine, problem = self._load(path, entry)
        if engine is None:
            raise BackendUnavailable(f"the TensorRT engine just built for {graph} is not usable: {problem}")
        return engine

    def _load(self, path: Path, entry: dict):
        """(engine, None) or (None, why not)."""
        rt = self._runtime()
        engine = rt["runtime"].deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            return None, "TensorRT could not deserialize it (other TensorRT version or GPU?)"
        problems = engine_io_problems(entry, engine_io(rt["trt"], engine))
        if problems:
            return None, "its I/O does not match the manifest: " + "; ".join(problems)
        return engine, None


def _src(art: dict) -> Source:
    return Source("onnx", art.file, art.weights, art.precision)


BACKEND = TensorRTBackend
