"""The TensorRT session's CUDA side on a real GPU with real cuda-python (marker ``gpu``).

TensorRT itself cannot be installed where the project runs its tests, so the engine here is a
stand-in whose ``execute_async_v3`` enqueues a device-to-device copy (``y = x``) on the stream
TensorRT would get. Everything else is real: device and pinned buffers, the stream, the
host<->device copies, CUDA-graph capture and replay, and the fp16 host cast.

Run: ``PYTHONPATH=. python -m pytest -m gpu tests/backends/test_tensorrt_gpu.py`` on a CUDA machine.
"""

from __future__ import annotations

import enum
import types

import numpy as np
import pytest

from icd_edge.bundle.schema import Graph, IOSpec

pytestmark = pytest.mark.gpu
cudart = pytest.importorskip("cuda.bindings.runtime")


def _gpu_count() -> int:
    err, count = cudart.cudaGetDeviceCount()
    return int(count) if err == cudart.cudaError_t.cudaSuccess else 0


if _gpu_count() == 0:
    pytest.skip("no CUDA device", allow_module_level=True)

SHAPE = (1, 4, 8, 8)


def _trt_module():
    trt = types.ModuleType("tensorrt")
    trt.TensorIOMode = enum.Enum("TensorIOMode", {"INPUT": 1, "OUTPUT": 2})
    return trt


class CopyEngine:
    """One input ``x``, one output ``y`` of ``dtype``; executing copies x to y on the given stream."""

    def __init__(self, trt, dtype: str):
        self.trt, self.dtype = trt, dtype
        self.enqueues = 0

    num_io_tensors = 2

    def get_tensor_name(self, i):
        return ("x", "y")[i]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name == "x" else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return types.SimpleNamespace(name={"float32": "FLOAT", "float16": "HALF"}[self.dtype])

    def get_tensor_shape(self, name):
        return SHAPE

    def create_execution_context(self):
        engine = self

        class Context:
            addresses = {}

            def set_input_shape(self, name, shape):
                return True

            def set_tensor_address(self, name, ptr):
                self.addresses[name] = ptr
                return True

            def execute_async_v3(self, stream_handle):
                engine.enqueues += 1
                nbytes = int(np.prod(SHAPE)) * np.dtype(engine.dtype).itemsize
                (err,) = cudart.cudaMemcpyAsync(
                    self.addresses["y"],
                    self.addresses["x"],
                    nbytes,
                    cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                    cudart.cudaStream_t(init_value=stream_handle),
                )
                return err == cudart.cudaError_t.cudaSuccess

        return Context()


ENTRY = Graph("copy", (IOSpec("x", "float32", SHAPE),), (IOSpec("y", "float32", SHAPE),))


def test_cuda_wrapper_reports_the_gpu_and_round_trips():
    from icd_edge.runtimes.trt.cuda import Cuda

    cuda = Cuda()
    gpu = cuda.gpu_info()
    assert gpu.name and "\0" not in gpu.name and gpu.compute_capability.count(".") == 1
    stream = cuda.stream()
    src_ptr, src = cuda.pinned(64, "float32", (16,))
    dst_ptr, dst = cuda.pinned(64, "float32", (16,))
    dev = cuda.malloc(64)
    src[:] = np.arange(16, dtype=np.float32)
    cuda.h2d(dev, src_ptr, 64, stream)
    cuda.d2h(dst_ptr, dev, 64, stream)
    cuda.synchronize(stream)
    np.testing.assert_array_equal(dst, np.arange(16, dtype=np.float32))
    cuda.free(dev)
    cuda.free_host(src_ptr)
    cuda.free_host(dst_ptr)
    cuda.destroy_stream(stream)


@pytest.mark.parametrize("engine_dtype", ["float32", "float16"])
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_session_runs_on_the_gpu(engine_dtype, cuda_graph):
    from icd_edge.runtimes.trt.cuda import Cuda
    from icd_edge.runtimes.trt.session import TrtSession

    trt = _trt_module()
    engine = CopyEngine(trt, engine_dtype)
    sess = TrtSession("copy", engine, ENTRY, trt, Cuda(), cuda_graph=cuda_graph)
    rng = np.random.default_rng(0)
    for _ in range(4):
        x = rng.standard_normal(SHAPE).astype(np.float32)
        y = sess.run({"x": x})["y"]
        assert y.dtype == np.float32
        np.testing.assert_allclose(y, x, rtol=1e-3 if engine_dtype == "float16" else 0)
    # with a CUDA graph the engine is enqueued twice (warm-up, capture) and replayed after
    assert engine.enqueues == (2 if cuda_graph else 4)
    sess.close()
