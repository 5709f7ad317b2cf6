"""The few CUDA runtime calls the TensorRT backend needs, through cuda-python (no torch).

Device buffers, pinned host staging buffers, one stream, and CUDA-graph capture. cuda-python's
runtime module is ``cuda.bindings.runtime`` (cuda-python >= 12.6) or ``cuda.cudart`` (older);
every call returns ``(error, value...)`` and is checked here.
"""

from __future__ import annotations

import ctypes
import importlib

import numpy as np

from icd_edge.errors import BackendUnavailable
from icd_edge.runtimes.trt.plan import GpuInfo

CUDA_PYTHON_HINT = "pip install cuda-python (the CUDA runtime bindings; match your driver's CUDA major)"


def import_cudart():
    """cuda-python's runtime module, or raise BackendUnavailable naming the install command."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise BackendUnavailable(f"the tensorrt backend needs cuda-python for device memory: {CUDA_PYTHON_HINT}")


class Cuda:
    """Checked wrappers around cuda-python calls on one device."""

    def __init__(self, cudart=None, device: int = 0):
        self.rt = cudart or import_cudart()
        self.device = device
        self.check(self.rt.cudaSetDevice(device), f"cudaSetDevice({device})")

    def check(self, result, what: str):
        """Raise on a CUDA error; return the call's value (None, one value, or a tuple)."""
        if not isinstance(result, tuple):
            result = (result,)
        err, values = result[0], result[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            name = self.rt.cudaGetErrorName(err)
            name = name[1].decode() if isinstance(name, tuple) and isinstance(name[1], bytes) else str(err)
            raise BackendUnavailable(f"CUDA {what} failed: {name}")
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    def gpu_info(self) -> GpuInfo:
        prop = self.check(self.rt.cudaGetDeviceProperties(self.device), "cudaGetDeviceProperties")
        name = prop.name.split(b"\0", 1)[0].decode() if isinstance(prop.name, bytes) else str(prop.name)
        return GpuInfo(name.strip(), f"{prop.major}.{prop.minor}")

    def stream(self):
        return self.check(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def synchronize(self, stream) -> None:
        self.check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(max(nbytes, 1)), f"cudaMalloc({nbytes})"))

    def pinned(self, nbytes: int, dtype: str, shape: tuple[int, ...]) -> tuple[int, np.ndarray]:
        """A page-locked host buffer and a numpy view of it (needed for async copies in a CUDA graph)."""
        ptr = int(self.check(self.rt.cudaMallocHost(max(nbytes, 1)), f"cudaMallocHost({nbytes})"))
        raw = (ctypes.c_uint8 * max(nbytes, 1)).from_address(ptr)
        view = np.frombuffer(raw, dtype=np.uint8, count=nbytes).view(np.dtype(dtype)).reshape(shape)
        return ptr, view

    def h2d(self, dst: int, src: int, nbytes: int, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.check(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream), "cudaMemcpyAsync(host->device)")

    def d2h(self, dst: int, src: int, nbytes: int, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.check(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream), "cudaMemcpyAsync(device->host)")

    def begin_capture(self, stream) -> None:
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self.check(self.rt.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")

    def end_capture(self, stream):
        graph = self.check(self.rt.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
        try:
            result = self.check(self.rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        finally:
            self.rt.cudaGraphDestroy(graph)
        # cuda-python 11.x returned (exec, error_node, ...); 12+ returns exec alone.
        return result[0] if isinstance(result, tuple) else result

    def launch(self, graph_exec, stream) -> None:
        self.check(self.rt.cudaGraphLaunch(graph_exec, stream), "cudaGraphLaunch")

    def free(self, ptr: int) -> None:
        self.rt.cudaFree(ptr)

    def free_host(self, ptr: int) -> None:
        self.rt.cudaFreeHost(ptr)

    def destroy_stream(self, stream) -> None:
        self.rt.cudaStreamDestroy(stream)

    def destroy_graph_exec(self, graph_exec) -> None:
        self.rt.cudaGraphExecDestroy(graph_exec)


def device_count(cudart) -> tuple[int, str]:
    """(number of CUDA devices, reason when 0) without raising."""
    try:
        result = cudart.cudaGetDeviceCount()
    except Exception as exc:  # the bindings raise RuntimeError when libcuda is missing
        return 0, f"CUDA driver not usable ({exc})"
    err, count = result[0], result[1]
    if err != cudart.cudaError_t.cudaSuccess:
        return 0, f"no CUDA device reachable ({getattr(err, 'name', err)})"
    return int(count), "" if count else "no CUDA device reachable"
