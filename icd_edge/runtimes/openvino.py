"""The ``openvino`` backend: the bundle's ONNX graphs compiled by OpenVINO for the CPU.

It runs the same ``onnx`` artifacts as onnxruntime (no extra export). On x86 CPUs OpenVINO
brings kernels onnxruntime's CPU provider lacks: int8 convolutions and matmuls on AMX where the
CPU has it, fused scaled-dot-product attention, and, by default on CPUs with native bfloat16
(AMX / AVX512-BF16), the graph's float parts in bfloat16. ``precision="fp32"`` keeps them in
float32 (closest to the torch reference, slower). The default, ``auto``, follows the bundle:
graphs exported in fp32 or fp16 run in float32 (x86 CPUs have no fast float16), graphs exported in
int8 run their remaining float parts (attention, normalisation) in bfloat16 where the CPU has it
natively, since they already trade fidelity for speed. ``benchmarks/bench_cpu.py`` records the
end-to-end PSNR against torch fp32 of each choice.

Compiled graphs are cached (OpenVINO's ``CACHE_DIR``, keyed by the graph's content and the
compile options), so a bundle compiles once per machine and later sessions load compiled graphs.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from icd_edge import precision, runtimes
from icd_edge.bundle.spec import check_feeds, check_graph_io
from icd_edge.cache import cache_dir
from icd_edge.errors import BackendUnavailable, BundleError, InputError, NumericsError
from icd_edge.runtimes import Availability, build_options, edit_unet_precision, warn_if_int8_saturates

logger = logging.getLogger(__name__)

PRECISIONS = (precision.AUTO, *precision.FLOATS)
_CAPABILITY = {"f32": "FP32", "bf16": "BF16", "f16": "FP16"}  # OPTIMIZATION_CAPABILITIES entry each hint needs


def default_cache_dir() -> Path:
    """``$ICD_EDGE_CACHE/openvino``, else the user cache (see :mod:`icd_edge.cache`)."""
    return cache_dir("openvino")


@dataclass(frozen=True)
class OvOptions:
    """Options only this backend understands.

    Attributes:
        precision: the float parts' precision: ``auto`` (see :func:`hint_for`), ``fp32``,
            ``bf16`` or ``fp16``; the int8 parts of an int8 graph stay int8 whatever this says.
        threads: 0 lets OpenVINO choose (one per physical core).
        cache_dir: compiled-graph cache; ``None`` means :func:`default_cache_dir`, ``""`` no cache.
    """

    precision: str = "auto"
    threads: int = 0
    cache_dir: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "precision", precision.canonical(self.precision, PRECISIONS, "openvino precision"))
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise InputError(
                f"threads must be an integer >= 0 (0: OpenVINO chooses), got {self.threads!r}", param="threads"
            )
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", str(self.cache_dir))


class OvSession:
    def __init__(self, core, graph: str, path: Path, inputs, outputs, config: dict):
        self.graph = graph
        self._inputs = inputs
        try:
            model = core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with C++ traces
            raise BundleError(
                f"OpenVINO cannot read {path}: {_first_line(exc)}. The file may be corrupt; re-export the bundle."
            ) from exc
        check_graph_io(graph, path, {p.get_any_name(): _dims(p) for p in model.inputs}, inputs)
        check_graph_io(graph, path, {p.get_any_name(): _dims(p) for p in model.outputs}, outputs)
        try:
            self._compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:
            raise BundleError(f"OpenVINO cannot compile {path.name} for the CPU: {_first_line(exc)}") from exc
        del model
        hint = self._compiled.get_property("INFERENCE_PRECISION_HINT")  # what the plugin chose: f32, bf16, f16
        # reported in icd_edge's vocabulary (fp32, bf16, fp16)
        self.precision = precision.from_library(hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint))
        self._request = self._compiled.create_infer_request()
        self._ports = {o.name: self._compiled.output(o.name) for o in outputs}
        self._lock = threading.Lock()  # one infer request: runs from several threads take turns

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.graph, dict(feeds), self._inputs)
        with self._lock:
            result = self._request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
            # copies: the request's output buffers are overwritten by the next run
            out = {name: np.array(result[port], copy=True) for name, port in self._ports.items()}
        for name, value in out.items():
            # bfloat16 float parts can overflow where float32 does not: say so instead of decoding NaN
            if not np.isfinite(value).all():
                raise NumericsError(
                    f"OpenVINO's {self.graph} gave NaN/inf in {name!r} running in {self.precision}; "
                    "run with --ov-precision fp32 (precision='fp32') or on onnxruntime"
                )
        return out

    def close(self) -> None:
        from icd_edge.memory import trim_heap

        # the output ports hold the compiled model too: drop them, or its memory outlives close()
        self._request = self._compiled = self._ports = None
        trim_heap()


def hint_for(requested: str, graph_precision: str, capabilities) -> str:
    """OpenVINO's inference precision hint for a graph exported in ``graph_precision`` (``fp32``,
    ``fp16``, ``int8``, ``int8-dynamic``) when the user asked for ``requested``.

    ``auto``: float32, except int8 graphs on a CPU with native bfloat16 (``BF16`` among the CPU
    plugin's ``OPTIMIZATION_CAPABILITIES``), whose float parts run in bfloat16.
    """
    if requested != precision.AUTO:
        return precision.OPENVINO[requested]
    return "bf16" if precision.is_int8(graph_precision) and "BF16" in capabilities else "f32"


def _dims(port) -> list:
    return [d.get_length() if d.is_static else None for d in port.get_partial_shape()]


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


class OpenVinoBackend:
    name = "openvino"
    fmt = "onnx"
    Options = OvOptions
    memory_policies = ("resident", "sequential")

    def __init__(self, options: OvOptions | None = None, **fields):
        self.options = build_options(OvOptions, options, fields, self.name)
        self._core = None

    @staticmethod
    def auto_skip(bundle, memory: str) -> str | None:
        """Why auto prefers onnxruntime for this bundle (None: it does not)."""
        if not precision.is_int8(edit_unet_precision(bundle)):
            return "onnxruntime is faster for fp32/fp16 UNets on the CPU"
        if memory == "sequential":
            return "onnxruntime has the lower peak memory in the sequential policy"
        if runtimes.onnxruntime_has_gpu():  # looked up on the module: tests stand in for the machine
            return "onnxruntime runs on a GPU here"
        isa = runtimes.isa_class()
        if runtimes.int8_cpu_backend(isa) != "openvino":
            return f"onnxruntime runs int8 faster on this CPU class ({isa})"
        return None

    def configure(self, bundle, memory: str) -> None:
        warn_if_int8_saturates(bundle, self.name)

    def probe(self) -> Availability:
        if importlib.util.find_spec("openvino") is None:
            return Availability(False, "not installed (pip install 'icd_edge[openvino]')")
        try:
            core = self._get_core()
            caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        except Exception as exc:  # a broken install or a CPU OpenVINO does not support
            return Availability(False, f"OpenVINO cannot use this CPU: {_first_line(exc)}")
        import openvino

        return Availability(True, f"openvino {openvino.__version__.split('-')[0]}, CPU ({', '.join(caps)})")

    def _get_core(self):
        if self._core is None:
            import openvino

            self._core = openvino.Core()
        return self._core

    def capabilities(self) -> list[str]:
        """The CPU plugin's OPTIMIZATION_CAPABILITIES (FP32, BF16, INT8, ...)."""
        return list(self._get_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))

    def compile_config(self, graph_precision: str = "fp32") -> dict:
        """The CPU plugin configuration a graph exported in ``graph_precision`` is compiled with."""
        config = {"PERFORMANCE_HINT": "LATENCY"}
        caps = self._get_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        hint = hint_for(self.options.precision, graph_precision, caps)
        if _CAPABILITY[hint] not in caps:
            raise BackendUnavailable(
                f"this CPU has no native {hint} for OpenVINO (it offers: {', '.join(caps)}); "
                "use --ov-precision auto or fp32"
            )
        config["INFERENCE_PRECISION_HINT"] = hint
        if self.options.threads:
            config["INFERENCE_NUM_THREADS"] = self.options.threads
        return config

    def cache_dir(self) -> Path | None:
        if self.options.cache_dir == "":
            return None
        return Path(self.options.cache_dir) if self.options.cache_dir else default_cache_dir()

    def open_session(self, bundle, graph: str) -> OvSession:
        art = bundle.artifact(graph, self.fmt)
        if art is None:
            raise BackendUnavailable(f"bundle {bundle.root} has no ONNX graph for {graph}")
        entry = bundle.graphs[graph]
        core = self._get_core()
        config = self.compile_config(art.precision)
        cache = self.cache_dir()
        if cache is not None:
            try:
                cache.mkdir(parents=True, exist_ok=True)
                config["CACHE_DIR"] = str(cache)
            except OSError as exc:  # a read-only home: compile every time rather than fail
                logger.warning("OpenVINO cache %s is not writable (%s); graphs compile on every load", cache, exc)
        return OvSession(core, graph, bundle.path(art.file), entry.inputs, entry.outputs, config)


BACKEND = OpenVinoBackend
