"""The ``onnxruntime`` backend: CPU everywhere, CUDA / CoreML execution providers when present."""

from __future__ import annotations

import importlib.util
import logging
import platform
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from icd_edge import runtimes
from icd_edge.bundle.spec import check_feeds, check_graph_io
from icd_edge.errors import BackendUnavailable, BundleError
from icd_edge.memory import trim_heap
from icd_edge.runtimes import Availability, build_options, warn_if_int8_saturates

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


class OrtSession:
    def __init__(self, graph: str, path, inputs, outputs, options: OrtOptions, initializers: list | None = None):
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
        model = str(path)
        self.fused_attention = 0
        if options.fuse_attention and providers == ["CPUExecutionProvider"]:
            model = self._fused(path, so)
        try:
            self._sess = ort.InferenceSession(model, sess_options=so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise BundleError(
                f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}. The file may be corrupt; "
                "re-export the bundle."
            ) from exc
        self.providers = self._sess.get_providers()
        self._out_names = [o.name for o in outputs]
        check_graph_io(graph, path, {a.name: a.shape for a in self._sess.get_inputs()}, inputs)
        check_graph_io(graph, path, {a.name: a.shape for a in self._sess.get_outputs()}, outputs)
        use_binding = (
            options.io_binding if options.io_binding is not None else self.providers[0] == "CUDAExecutionProvider"
        )
        self._binding = _Binding(self._sess, outputs, self.providers[0]) if use_binding else None

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
        if self._binding is not None:
            return self._binding.run(feeds)
        outs = self._sess.run(self._out_names, dict(feeds))
        return dict(zip(self._out_names, outs))

    def close(self) -> None:
        self._sess = None  # the session and its arena go now
        trim_heap()


class _Binding:
    """IO binding: outputs pre-allocated once on the provider's device (fixed shapes), inputs
    copied in per run, no per-run output allocation. On CUDA this avoids the implicit copies
    and allocations of ``InferenceSession.run``; the code path also runs on the CPU provider."""

    def __init__(self, sess, outputs: list[dict], provider: str):
        import onnxruntime as ort

        self._sess = sess
        self._io = sess.io_binding()
        self._device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
        self._outputs = {}
        for o in outputs:
            value = ort.OrtValue.ortvalue_from_shape_and_type(list(o.shape), np.dtype(o.dtype).type, self._device, 0)
            self._io.bind_ortvalue_output(o.name, value)
            self._outputs[o.name] = value

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, arr in feeds.items():
            self._io.bind_cpu_input(name, np.ascontiguousarray(arr))
        self._sess.run_with_iobinding(self._io)
        # copies: the bound buffers are overwritten by the next run
        return {name: np.array(value.numpy(), copy=True) for name, value in self._outputs.items()}


class OrtBackend:
    name = "onnxruntime"
    fmt = "onnx"
    Options = OrtOptions
    memory_policies = ("resident", "sequential", "shared-base")

    def __init__(self, options: OrtOptions | None = None, **fields):
        if fields.get("providers") is not None:
            fields["providers"] = tuple(fields["providers"])
        self.options = build_options(OrtOptions, options, fields, self.name)
        self._shared_values: dict[tuple, object] = {}

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

    def runs_on_cpu(self) -> bool:
        chosen = self.options.providers
        first = (
            chosen[0]
            if chosen
            else "CUDAExecutionProvider"
            if runtimes.onnxruntime_has_gpu()
            else "CPUExecutionProvider"
        )
        return first == "CPUExecutionProvider"

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
        return OrtSession(graph, bundle.path(art.file), entry.inputs, entry.outputs, self.options, initializers)

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
