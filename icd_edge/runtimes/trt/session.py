"""TensorRT sessions: one execution context, device buffers bound by manifest names, one stream.

:class:`TrtSession` runs one engine. :class:`SharedBase` holds one refittable UNet engine
for ``unet_forward`` and ``unet_reverse`` and refits it when the other graph is asked for;
:class:`SharedBaseSession` is the per-graph view the editor sees.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Mapping

import numpy as np

from icd_edge.bundle.spec import check_feeds
from icd_edge.errors import BackendUnavailable
from icd_edge.runtimes.trt.plan import TRT_DTYPES, binding_plan
from icd_edge.runtimes.trt.refit import differing, load_weights

logger = logging.getLogger(__name__)


def engine_io(trt, engine) -> dict[str, tuple[bool, str, tuple[int, ...]]]:
    """``name -> (is_input, numpy dtype name, shape)`` for every I/O tensor of an engine."""
    out = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = engine.get_tensor_dtype(name)
        out[name] = (
            engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
            TRT_DTYPES.get(getattr(dtype, "name", str(dtype)), str(dtype)),
            tuple(int(d) for d in engine.get_tensor_shape(name)),
        )
    return out


def stream_handle(stream) -> int:
    """The integer handle TensorRT's ``execute_async_v3`` takes from a cuda-python stream."""
    try:
        return int(stream)
    except TypeError:
        return int(stream.getPtr())


class TrtSession:
    """Runs one engine: pinned host staging buffers, device buffers, one stream.

    Args:
        graph: graph name (messages, feed validation).
        engine: a deserialized ``ICudaEngine``.
        entry: ``manifest["graphs"][graph]`` (names, dtypes, shapes).
        trt: the tensorrt module.
        cuda: a :class:`~icd_edge.runtimes.trt.cuda.Cuda`.
        cuda_graph: capture H2D copies + enqueue + D2H copies as one CUDA graph on the first run
            and replay it afterwards.
    """

    def __init__(self, graph: str, engine, entry: dict, trt, cuda, cuda_graph: bool = False):
        self.graph = graph
        self.engine = engine
        self._inputs = entry.inputs
        self._cuda = cuda
        self.cuda_graph = cuda_graph
        io = engine_io(trt, engine)
        self.bindings = binding_plan(entry, {name: v[1] for name, v in io.items()})
        self._context = engine.create_execution_context()
        if self._context is None:
            raise BackendUnavailable(f"TensorRT could not create an execution context for {graph} (out of GPU memory?)")
        self._stream = cuda.stream()
        self._dev: dict[str, int] = {}
        self._host: dict[str, np.ndarray] = {}
        self._host_ptr: dict[str, int] = {}
        self._graph_exec = None
        self._lock = threading.Lock()  # one set of buffers: runs on one session are serialized
        try:
            for b in self.bindings:
                self._dev[b.name] = cuda.malloc(b.nbytes)
                self._host_ptr[b.name], self._host[b.name] = cuda.pinned(b.nbytes, b.engine_dtype, b.shape)
                if b.is_input and -1 in io[b.name][2] and not self._context.set_input_shape(b.name, b.shape):
                    raise BackendUnavailable(f"{graph}: TensorRT refused input shape {b.shape} for {b.name}")
                if not self._context.set_tensor_address(b.name, self._dev[b.name]):
                    raise BackendUnavailable(f"{graph}: TensorRT refused the device address of {b.name}")
        except BaseException:
            self.close()
            raise

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.graph, dict(feeds), self._inputs)
        with self._lock:
            if self._stream is None:
                raise BackendUnavailable(f"the TensorRT session for {self.graph} is closed")
            for b in self.bindings:
                if b.is_input:
                    np.copyto(self._host[b.name], feeds[b.name], casting="same_kind")
            if not self.cuda_graph:
                self._enqueue()
            elif self._graph_exec is None:
                self._enqueue()  # TensorRT wants one plain enqueue before capture; its results are this run's
                self._cuda.synchronize(self._stream)
                self._capture()
            else:
                self._cuda.launch(self._graph_exec, self._stream)
            self._cuda.synchronize(self._stream)
            return {b.name: self._host[b.name].astype(b.dtype, copy=True) for b in self.bindings if not b.is_input}

    def _enqueue(self) -> None:
        for b in self.bindings:
            if b.is_input:
                self._cuda.h2d(self._dev[b.name], self._host_ptr[b.name], b.nbytes, self._stream)
        if not self._context.execute_async_v3(stream_handle(self._stream)):
            raise BackendUnavailable(f"TensorRT execution of {self.graph} failed (see the TensorRT log)")
        for b in self.bindings:
            if not b.is_input:
                self._cuda.d2h(self._host_ptr[b.name], self._dev[b.name], b.nbytes, self._stream)

    def _capture(self) -> None:
        self._cuda.begin_capture(self._stream)
        try:
            self._enqueue()
        finally:
            graph_exec = self._cuda.end_capture(self._stream)
        self._graph_exec = graph_exec

    def invalidate_graph(self) -> None:
        """Drop the captured CUDA graph (after a refit); the next run captures again."""
        if self._graph_exec is not None:
            self._cuda.destroy_graph_exec(self._graph_exec)
            self._graph_exec = None

    def close(self) -> None:
        self.invalidate_graph()
        for ptr in self._dev.values():
            self._cuda.free(ptr)
        for ptr in self._host_ptr.values():
            self._cuda.free_host(ptr)
        self._dev.clear()
        self._host_ptr.clear()
        self._host.clear()
        if self._stream is not None:
            self._cuda.destroy_stream(self._stream)
            self._stream = None
        self._context = None


class SharedBase:
    """One refittable UNet engine serving ``unet_forward`` and ``unet_reverse``.

    The engine is built from ``unet_forward`` (so it starts with the forward weights). Asking
    for the other side refits every weight that differs (plus any TensorRT reports missing)
    and records the refit time in ``refit_log`` (list of ``{"to", "weights", "ms"}``).
    """

    def __init__(
        self, session: TrtSession, trt, trt_logger, bundle_root, refit_map: dict, refit_log: list, on_close=None
    ):
        self.session = session
        self.users = 0
        self._on_close = on_close
        self._trt, self._trt_logger = trt, trt_logger
        self._root = bundle_root
        self._map = refit_map
        self._names = differing(refit_map)
        self.refit_log = refit_log
        self.active = "forward"
        self._lock = threading.Lock()
        self._checked = False

    def run(self, side: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Refit to ``side`` if needed and run; atomic with respect to other threads."""
        with self._lock:
            self._activate(side)
            return self.session.run(feeds)

    def _activate(self, side: str) -> None:
        if side == self.active:
            return
        trt = self._trt
        t0 = time.perf_counter()
        refitter = trt.Refitter(self.session.engine, self._trt_logger)
        if not self._checked:
            refittable = set(refitter.get_all_weights())
            folded = [n for n in self._names if n not in refittable]
            if folded:
                raise BackendUnavailable(
                    f"{len(folded)} weights that differ between unet_forward and unet_reverse are not refittable in "
                    f"this engine (TensorRT folded them), e.g. {folded[:3]}; use shared_base=False"
                )
            self._checked = True
        arrays = load_weights(self._root, self._map, side, self._names)
        self._set(refitter, arrays)
        missing = list(refitter.get_missing_weights())
        if missing:  # weights TensorRT combined with the ones we changed: supply this side's values too
            extra = load_weights(self._root, self._map, side, missing)
            self._set(refitter, extra)
            arrays.update(extra)
        still = list(refitter.get_missing_weights())
        if still:
            raise BackendUnavailable(f"TensorRT still misses weights {still[:3]} for the refit; use shared_base=False")
        if not refitter.refit_cuda_engine():
            raise BackendUnavailable("TensorRT refit of the shared UNet engine failed; use shared_base=False")
        del arrays  # TensorRT copied them; the numpy buffers had to live until here
        ms = (time.perf_counter() - t0) * 1000.0
        self.session.invalidate_graph()
        self.active = side
        self.refit_log.append({"to": side, "weights": len(self._names) + len(missing), "ms": round(ms, 2)})
        logger.info(
            "refitted the shared UNet engine to %s weights (%d tensors) in %.1f ms",
            side,
            len(self._names) + len(missing),
            ms,
        )

    def _set(self, refitter, arrays: dict[str, np.ndarray]) -> None:
        for name, arr in arrays.items():
            if not refitter.set_named_weights(name, self._trt.Weights(arr)):
                raise BackendUnavailable(
                    f"TensorRT rejected refit weight {name!r} {arr.dtype}{arr.shape}; use shared_base=False"
                )

    def release(self) -> None:
        """One view closed; the engine and its buffers go with the last one."""
        with self._lock:
            self.users -= 1
            if self.users > 0:
                return
            self.session.close()
        if self._on_close is not None:
            self._on_close()


class SharedBaseSession:
    """``unet_forward`` or ``unet_reverse`` on a :class:`SharedBase` engine."""

    def __init__(self, graph: str, base: SharedBase, side: str, entry: dict):
        self.graph = graph
        self._base, self._side = base, side
        self._inputs = entry.inputs
        self._open = True
        base.users += 1

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.graph, dict(feeds), self._inputs)
        return self._base.run(self._side, feeds)

    def close(self) -> None:
        if self._open:
            self._open = False
            self._base.release()
