"""The ``onnxruntime`` backend: CPU everywhere, CUDA / CoreML execution providers when present."""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.util
import logging
import platform
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from icd_edge import runtimes
from icd_edge.bundle.spec import check_feeds, check_graph_io
from icd_edge.errors import BackendUnavailable, BundleError, InputError
from icd_edge.memory import trim_heap
from icd_edge.runtimes import Availability, build_options, warn_if_int8_saturates
from icd_edge.runtimes.ort import cuda

logger = logging.getLogger(__name__)


def choose_providers(available: list[str], system: str | None = None) -> list[str]:
    """Preferred execution providers among ``available``: CUDA, then CoreML on macOS, then CPU."""
    system = system or platform.system()
    chosen = []
    if "CUDAExecutionProvider" in available:
        chosen.append("CUDAExecutionProvider")
    if system == "Darwin" and "CoreMLExecutionProvider" in available:
        chosen.append("CoreMLExecutionProvider")
    chosen.append("CPUExecutionProvider")
    return chosen


IMAGE_GRAPHS = ("vae_encoder", "vae_decoder", "taesd_decoder")  # activations at image resolution
# read-only feeds at least this large stay on the device between runs (CUDA; see _Binding)
RESIDENT_MIN_BYTES = 8 * 2**20
RESIDENT_BYTES = 2**30  # at most this much of them per graph: three inversions' source caches at 512 px


@dataclass(frozen=True)
class OrtOptions:
    """Options only this backend understands.

    Attributes:
        providers: execution providers in order; None picks with :func:`choose_providers`.
        intra_op_threads: 0 lets onnxruntime use every core.
    """

    providers: tuple[str, ...] | None = None
    intra_op_threads: int = 0
    io_binding: bool | None = None  # None: on when the session runs on the CUDA provider
    share_weights: bool = False  # shared-base bundles: map each shared initializer once for all sessions
    low_memory: bool = False  # the sequential policy's sessions: lowest peak memory (see OrtSession)
    fuse_attention: bool = True  # CPU: plain attention as com.microsoft MultiHeadAttention (ort_attention)
    # the CUDA provider (icd_edge.runtimes.ort.cuda)
    cuda_fusions: str = "all"  # all | attention | none: fused copies for the CUDA provider, made once and cached
    cuda_graph: bool = True  # capture each graph once with fixed device buffers, replay per run
    # HEURISTIC: as fast as EXHAUSTIVE on the iCD graphs (H200) and 2 s quicker to the first edit
    cudnn_conv_algo_search: str = "HEURISTIC"  # HEURISTIC | EXHAUSTIVE | DEFAULT
    device_id: int = 0
    # more CUDA provider options, as onnxruntime names them (("prefer_nhwc", "1"), ...); they win
    cuda_provider_options: tuple[tuple[str, str], ...] = ()
    cache_dir: str | None = None  # the fused graphs' cache; None: $ICD_EDGE_CACHE/ort-cuda


class OrtSession:
    """One graph's onnxruntime session.

    ``model`` replaces the bundle's file (the CUDA provider's fused copy); on the CUDA provider
    every input and output has a fixed device buffer and, unless ``options.cuda_graph`` is off or
    the graph cannot be captured, the session replays one CUDA graph per run."""

    def __init__(
        self,
        graph: str,
        path,
        inputs,
        outputs,
        options: OrtOptions,
        initializers: list | None = None,
        model=None,
    ):
        import onnxruntime as ort

        self.graph = graph
        self._inputs, self._outputs = inputs, outputs
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if options.low_memory:
            # the allocation planner chains each resolution's buffers from the UNet's down path to
            # its up path, keeping them all allocated; without it the arena recycles as it goes
            # (about half the peak at the same speed; docs/running.md has the figures)
            so.enable_mem_reuse = False
            so.enable_mem_pattern = False
            if graph in IMAGE_GRAPHS:
                # image-resolution activations fragment the arena; the lean policy trades some
                # decode time for a lower peak here
                so.enable_cpu_mem_arena = False
        for name, value in initializers or ():
            so.add_initializer(name, value)
        if initializers:
            # Python has no pre-packed weights container: prepacking would copy each shared weight
            # into every session, defeating the sharing.
            so.add_session_config_entry("session.disable_prepacking", "1")
        self._shared = initializers  # OrtValues must outlive the session
        providers = list(options.providers or choose_providers(ort.get_available_providers()))
        self.fused_attention = 0
        self.cuda_graph = False
        source = str(model or path)
        if options.fuse_attention and providers == ["CPUExecutionProvider"] and model is None:
            source = self._fused(path, so)
        on_cuda = providers[0] == cuda.PROVIDER
        if on_cuda:
            cuda.preload()
        want_graph = on_cuda and options.cuda_graph
        self._model_source = source
        self._sess = self._create(path, source, so, providers, options, want_graph)
        if want_graph and self._sess is None:
            self._sess = self._create(path, source, so, providers, options, False)
        else:
            self.cuda_graph = want_graph
        self.providers = self._sess.get_providers()
        if on_cuda and cuda.PROVIDER not in self.providers:
            # onnxruntime falls back to the CPU silently when the CUDA libraries are missing
            reason = cuda.explain_missing(cuda.missing_library(self._log), cuda.cuda_version())
            if options.providers:
                raise BackendUnavailable(f"{graph}: {reason}")
            _warn_once("cpu-fallback", "%s; running on the CPU", reason)
            self.cuda_graph = False
        self._out_names = [o.name for o in outputs]
        check_graph_io(graph, path, {a.name: a.shape for a in self._sess.get_inputs()}, inputs)
        check_graph_io(graph, path, {a.name: a.shape for a in self._sess.get_outputs()}, outputs)
        use_binding = options.io_binding if options.io_binding is not None else self.providers[0] == cuda.PROVIDER
        device = "cuda" if self.providers[0] == cuda.PROVIDER else "cpu"
        resident = RESIDENT_MIN_BYTES if device == "cuda" and importlib.util.find_spec("onnx") else None
        self._binding = (
            _Binding(self._sess, inputs, outputs, device, options.device_id, resident_min=resident)
            if use_binding
            else None
        )
        self._first_run = self.cuda_graph

    def _create(self, path, source, so, providers, options: OrtOptions, cuda_graph: bool):
        """The InferenceSession; None when CUDA-graph capture was asked and the graph cannot be
        captured (some node outside the CUDA provider), so the caller retries without it."""
        import onnxruntime as ort

        chosen = [
            (
                p,
                cuda.provider_options(
                    options.device_id, options.cudnn_conv_algo_search, cuda_graph, options.cuda_provider_options
                ),
            )
            if p == cuda.PROVIDER
            else p
            for p in providers
        ]
        self._log = ""
        try:
            with cuda.captured_stderr() if cuda.PROVIDER in providers else contextlib.nullcontext([]) as log:
                sess = ort.InferenceSession(source, sess_options=so, providers=chosen)
            self._log = "".join(log)
            return sess
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if cuda_graph and cuda.graph_unsupported(str(exc)):
                logger.info("%s runs without CUDA graph capture: %s", self.graph, first)
                return None
            raise BundleError(
                f"onnxruntime cannot load {path}: {first}. The file may be corrupt; re-export the bundle."
            ) from exc

    def _fused(self, path, so):
        """The graph with its plain attention fused, or the path itself when nothing matched or
        onnx is not installed (see :mod:`icd_edge.runtimes.ort.attention`)."""
        try:
            from icd_edge.runtimes.ort.attention import fused_source

            source, self.fused_attention = fused_source(path, so)
        except ImportError:
            logger.info("onnx is not installed: %s keeps its explicit attention (pip install onnx)", self.graph)
            return str(path)
        except Exception:  # let ONNX Runtime report an unreadable file with its own message
            return str(path)
        logger.debug("%s: %d attention layers fused", self.graph, self.fused_attention)
        return source

    @property
    def io_binding(self) -> bool:
        """Whether runs bind inputs and outputs to device buffers (the CUDA provider's default)."""
        return self._binding is not None

    @property
    def session_options(self):
        """The onnxruntime SessionOptions this graph runs with (memory reuse, arena, threads)."""
        return self._sess.get_session_options()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.graph, dict(feeds), self._inputs)
        if self._binding is None:
            outs = self._sess.run(self._out_names, dict(feeds))
            return dict(zip(self._out_names, outs))
        if not self._first_run:
            return self._binding.run(feeds)
        # the first run captures the CUDA graph: a capture failure is reported here, not at load
        self._first_run = False
        try:
            return self._binding.run(feeds)
        except Exception as exc:
            if not cuda.graph_unsupported(str(exc)):
                raise
            logger.info("%s runs without CUDA graph capture: %s", self.graph, str(exc).splitlines()[0])
            self._reopen_without_graph()
            return self._binding.run(feeds)

    def _reopen_without_graph(self) -> None:
        import onnxruntime as ort

        so, providers = self._sess.get_session_options(), self._sess.get_providers()
        options = self._sess.get_provider_options().get(cuda.PROVIDER, {})
        options = {**options, "enable_cuda_graph": "0"}
        model = self._model_source
        self._sess = ort.InferenceSession(
            model, sess_options=so, providers=[(p, options) if p == cuda.PROVIDER else p for p in providers]
        )
        self._binding = self._binding.rebind(self._sess)
        self.cuda_graph = False

    def close(self) -> None:
        self._sess = None  # the session and its arena go now
        self._binding = None
        trim_heap()


_WARNED_ONCE: set[str] = set()


def _warn_once(key: str, msg: str, *args) -> None:
    if key not in _WARNED_ONCE:
        _WARNED_ONCE.add(key)
        logger.warning(msg, *args)


class _Binding:
    """IO binding with fixed buffers: every input and output has one OrtValue on the provider's
    device, allocated once (the graphs have fixed shapes); a run copies the feeds into the input
    buffers and the outputs out of theirs. No per-run allocation, and the addresses never change,
    which CUDA-graph replay needs. The same code path runs on the CPU provider (tests).

    Large read-only feeds (the re-edit source cache: 86 MB a step at 512 px) are uploaded to the
    device once and kept (up to ``resident_bytes``, least recently used out first); a later run
    with the same host buffer copies device to device into the bound input instead of crossing
    PCIe again. Read-only is the contract: the arrays of a source cache are never written."""

    def __init__(
        self,
        sess,
        inputs: list,
        outputs: list,
        device: str,
        device_id: int = 0,
        resident_min: int = RESIDENT_MIN_BYTES,
        resident_bytes: int = RESIDENT_BYTES,
    ):
        import onnxruntime as ort

        self._device, self._device_id = device, device_id
        self._inputs = {i.name: (tuple(i.shape), np.dtype(i.dtype)) for i in inputs}
        self._in = {
            name: ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dt.type, device, device_id)
            for name, (shape, dt) in self._inputs.items()
        }
        self._out = {
            o.name: ort.OrtValue.ortvalue_from_shape_and_type(list(o.shape), np.dtype(o.dtype).type, device, device_id)
            for o in outputs
        }
        self._resident_min, self._resident_cap = resident_min, resident_bytes
        self._resident: collections.OrderedDict = collections.OrderedDict()  # key -> (host owner, OrtValue)
        self._copier = None
        self.uploads = 0  # feeds copied from host memory, for tests and benchmarks
        self.rebind(sess)

    def rebind(self, sess) -> "_Binding":
        """Bind the same buffers to ``sess`` (a session re-created with other options)."""
        self._sess = sess
        self._io = sess.io_binding()
        for name, value in self._in.items():
            self._io.bind_ortvalue_input(name, value)
        for name, value in self._out.items():
            self._io.bind_ortvalue_output(name, value)
        return self

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, arr in feeds.items():
            shape, dt = self._inputs[name]
            arr = np.asarray(arr)
            if self._keep_resident(arr, dt):
                self._copy_resident(name, arr)
                continue
            self._in[name].update_inplace(np.ascontiguousarray(arr.reshape(shape), dtype=dt))
            self.uploads += 1
        self._sess.run_with_iobinding(self._io)
        if self._device == "cpu":  # views of the bound buffers, which the next run overwrites
            return {name: np.array(value.numpy(), copy=True) for name, value in self._out.items()}
        return {name: value.numpy() for name, value in self._out.items()}  # device → fresh host arrays

    def _keep_resident(self, arr: np.ndarray, dt: np.dtype) -> bool:
        return (
            self._resident_min is not None
            and arr.nbytes >= self._resident_min
            and arr.nbytes <= self._resident_cap
            and not arr.flags.writeable
            and arr.flags.c_contiguous
            and arr.dtype == dt == np.float32  # what the copy graph is typed for
        )

    def _copy_resident(self, name: str, arr: np.ndarray) -> None:
        import onnxruntime as ort

        # the host buffer's address and extent identify it; holding its owner keeps the address
        # from being reused by another array while the entry lives
        key = (name, arr.__array_interface__["data"][0], arr.nbytes)
        hit = self._resident.get(key)
        if hit is None:
            value = ort.OrtValue.ortvalue_from_numpy(arr.reshape(self._inputs[name][0]), self._device, self._device_id)
            self.uploads += 1
            owner = arr.base if arr.base is not None else arr
            self._resident[key] = hit = (owner, value)
            while sum(v.tensor_size_in_bytes() for _, v in self._resident.values()) > self._resident_cap:
                self._resident.popitem(last=False)
        self._resident.move_to_end(key)
        self._device_copy(hit[1], self._in[name])

    def _device_copy(self, src, dst) -> None:
        """dst ← src on the device: an Identity graph run with both buffers bound (ONNX Runtime's
        Identity kernel copies into a bound output with one device-to-device copy)."""
        import onnxruntime as ort

        if self._copier is None:
            providers = self._sess.get_providers()
            options = self._sess.get_provider_options()
            chosen = [(p, {**options.get(p, {}), "enable_cuda_graph": "0"}) if p in options else p for p in providers]
            self._copier = ort.InferenceSession(_identity_model(), providers=chosen)
        io = self._copier.io_binding()
        io.bind_ortvalue_input("x", src)
        io.bind_ortvalue_output("y", dst)
        self._copier.run_with_iobinding(io)


@functools.lru_cache(maxsize=1)
def _identity_model() -> bytes:
    """``y = Identity(x)`` for any float32 tensor: the device-to-device copy of :class:`_Binding`."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "copy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


class OrtBackend:
    name = "onnxruntime"
    fmt = "onnx"
    Options = OrtOptions
    memory_policies = ("resident", "sequential", "shared-base")

    def __init__(self, options: OrtOptions | None = None, **fields):
        if fields.get("providers") is not None:
            fields["providers"] = tuple(fields["providers"])
        extra = fields.get("cuda_provider_options")
        if extra is not None:  # a mapping or pairs; kept as sorted pairs (the options stay hashable)
            pairs = extra.items() if hasattr(extra, "items") else extra
            fields["cuda_provider_options"] = tuple(sorted((str(k), str(v)) for k, v in pairs))
        self.options = build_options(OrtOptions, options, fields, self.name)
        self._shared_values: dict[tuple, object] = {}
        self.fused_ops: dict[str, dict] = {}  # graph -> ONNX Runtime's fused operator counts (CUDA)

    @staticmethod
    def auto_skip(bundle, memory: str) -> str | None:
        return None

    def configure(self, bundle, memory: str) -> None:
        """sequential: sessions without planned buffer reuse (lower peak, see :class:`OrtSession`);
        shared-base: each shared initializer mapped once for all sessions."""
        import dataclasses

        if memory == "sequential":
            self.options = dataclasses.replace(self.options, low_memory=True)
        elif memory == "shared-base":
            self.options = dataclasses.replace(self.options, share_weights=True)
        if self.runs_on_cpu():  # the int8 check is of the CPU kernels
            warn_if_int8_saturates(bundle, self.name)

    def first_provider(self) -> str:
        """The provider sessions run on first: the user's list, else CUDA where installed."""
        chosen = self.options.providers
        if chosen:
            return chosen[0]
        return cuda.PROVIDER if runtimes.onnxruntime_has_gpu() else "CPUExecutionProvider"

    def runs_on_cpu(self) -> bool:
        return self.first_provider() == "CPUExecutionProvider"

    def probe(self) -> Availability:
        if importlib.util.find_spec("onnxruntime") is None:
            return Availability(False, "not installed (pip install 'icd_edge[onnxruntime]')")
        import onnxruntime as ort

        providers = choose_providers(ort.get_available_providers())
        return Availability(True, f"onnxruntime {ort.__version__}, providers {', '.join(providers)}")

    def open_session(self, bundle, graph: str) -> OrtSession:
        art = bundle.artifact(graph, self.fmt)
        if art is None:
            raise BackendUnavailable(f"bundle {bundle.root} has no ONNX graph for {graph}")
        entry = bundle.graphs[graph]
        initializers = None
        if self.options.share_weights:
            table = bundle.manifest.info.get("shared_initializers")
            if table is None:
                raise BundleError(
                    f"bundle {bundle.root} stores fused UNets; memory policy shared-base needs a bundle "
                    "exported with --unet-weights shared-base"
                )
            initializers = [
                (name, self._shared_value(bundle, f, off, n, dt, dims))
                for name, f, off, n, dt, dims in table.get(graph, [])
            ]
        model = None
        if self.runs_on_cuda() and self.options.cuda_fusions != "none" and initializers is None:
            model = self._fused_for_cuda(bundle, graph)
        path = bundle.path(art.file)
        try:
            return OrtSession(graph, path, entry.inputs, entry.outputs, self.options, initializers, model=model)
        except BundleError:
            if model is None:
                raise
            # a damaged cache entry: make it again from the bundle, once
            logger.warning("the fused CUDA graph %s did not load; rebuilding it", model)
            self._cuda_cache().remove(model)
            model = self._fused_for_cuda(bundle, graph)
            return OrtSession(graph, path, entry.inputs, entry.outputs, self.options, initializers, model=model)

    def runs_on_cuda(self) -> bool:
        return self.first_provider() == cuda.PROVIDER

    def _cuda_cache(self):
        from pathlib import Path

        return cuda.FusedGraphCache(Path(self.options.cache_dir) if self.options.cache_dir else None)

    def _fused_for_cuda(self, bundle, graph: str):
        """The cached fused copy of ``graph`` (made now if needed); None when the optimizer is not
        installed (the session then runs the bundle's graph)."""
        import onnxruntime as ort

        if self.options.cuda_fusions not in cuda.FUSIONS:
            raise InputError(
                f"cuda_fusions must be one of {', '.join(cuda.FUSIONS)}, not {self.options.cuda_fusions!r}",
                param="cuda_fusions",
            )
        try:
            import onnx  # noqa: F401  (the optimizer's dependency, not the runtime's)
            import onnxruntime.transformers.optimizer  # noqa: F401
        except ImportError as exc:
            _warn_once(
                "no-optimizer",
                "onnxruntime's graph optimizer needs %s: the CUDA provider runs the unfused graphs (pip install onnx)",
                exc.name or "onnx",
            )
            return None
        model, meta = self._cuda_cache().get(bundle, graph, ort.__version__, self.options.cuda_fusions)
        self.fused_ops[graph] = meta.get("fused", {})
        return model

    def _shared_value(self, bundle, rel: str, offset: int, length: int, dtype: str, dims: list):
        """One read-only memory map per shared tensor, reused by every session that names it.

        Keyed by shape and dtype too: the weight store deduplicates by content, so equal bytes
        can back tensors of different shapes (all-ones norm scales of (320,) and (320, 1, 1)),
        and a value of the wrong shape fails at run time with a broadcast error."""
        import onnxruntime as ort

        key = (rel, offset, length, dtype, tuple(dims))
        if key not in self._shared_values:
            raw = np.memmap(bundle.path(rel), dtype=np.uint8, mode="r", offset=offset, shape=(length,))
            self._shared_values[key] = ort.OrtValue.ortvalue_from_numpy(raw.view(np.dtype(dtype)).reshape(dims))
        return self._shared_values[key]


BACKEND = OrtBackend
