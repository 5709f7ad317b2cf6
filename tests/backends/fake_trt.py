"""A fake ``tensorrt`` and a fake cuda-python runtime, for driving the TensorRT backend in CI.

Neither is TensorRT: they implement the documented Python API surface the backend calls
(names and signatures of TensorRT 10/11 and cuda-python 12+), record every call, and compute
something checkable so data paths can be asserted:

* the parser reads the real ONNX file's inputs/outputs (with onnx) into the fake network;
* an "engine" is JSON: its I/O, flags and source ONNX; deserializing it loads the ONNX
  initializers as the engine's weights;
* executing writes each output as ``2 * first_input + c`` when the shapes agree (else
  ``sum(first_input) + c``), where ``c`` is a checksum of the engine's current weights, so a
  refit shows in the outputs;
* device memory is a dict of bytearrays; copies, enqueues and graph launches honour stream capture.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import json
import sys
import types

import numpy as np


def weights_checksum(arrays) -> float:
    """What a fake engine adds to its outputs: the sum of its float weights, each clipped to
    +-1e4 (masks hold float32 min, whose sums would overflow float32 outputs)."""
    return float(
        sum(
            float(np.clip(np.asarray(a, np.float64), -1e4, 1e4).sum())
            for a in arrays
            if np.issubdtype(np.asarray(a).dtype, np.floating)
        )
    )


class Recorder:
    """Shared state of one fake install: call log, device memory, knobs for failure modes."""

    def __init__(self, version: str = "10.8.0.43", gpu: str = "NVIDIA Fake GPU", cc=(8, 9)):
        self.version, self.gpu, self.cc = version, gpu, cc
        self.calls: list[tuple] = []
        self.device: dict[int, bytearray] = {}
        self.pinned: dict[int, object] = {}
        self.capturing: dict[int, list | None] = {}
        self.next_ptr = 0x7000_0000
        self.builds = 0
        self.enqueues = 0
        self.launches = 0
        self.fail_build = False
        self.dynamic_inputs: set[str] = set()
        self.folded: set[str] = set()  # weights a refittable engine does not expose
        self.combined: dict[str, str] = {}  # setting key makes value "missing" until set too

    def log(self, *call):
        self.calls.append(call)

    def named(self, name: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == name]

    def submit(self, stream, fn) -> None:
        ops = self.capturing.get(int(stream))
        if ops is not None:
            ops.append(fn)
        else:
            fn()


# ---------------------------------------------------------------------------------- tensorrt
class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    INT32 = "int32"
    INT64 = "int64"
    BOOL = "bool"


_ONNX_TO_TRT = {1: DataType.FLOAT, 10: DataType.HALF, 6: DataType.INT32, 7: DataType.INT64, 9: DataType.BOOL}


def make_tensorrt(rec: Recorder, fp16_flag: bool | None = None) -> types.ModuleType:
    """A module object named ``tensorrt``; TensorRT >= 11 fakes have no FP16/INT8 builder flags."""
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.__version__ = rec.version
    major = int(rec.version.split(".")[0])
    weak = major < 11 if fp16_flag is None else fp16_flag
    trt.DataType = DataType
    trt.NetworkDefinitionCreationFlag = enum.IntEnum(
        "NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
    )
    flags = {"REFIT": 4, "TF32": 6} | ({"FP16": 0, "INT8": 1} if weak else {})
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", flags)
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
    trt.TensorIOMode = enum.Enum("TensorIOMode", {"INPUT": 1, "OUTPUT": 2})

    class Logger:
        WARNING = 2

        def __init__(self, severity=2):
            self.severity = severity

    class Weights:
        def __init__(self, arr):
            self.array = np.asarray(arr)

    class Tensor:
        def __init__(self, name, dtype, shape):
            self.name, self.dtype, self.shape = name, dtype, tuple(shape)

    class Network:
        def __init__(self, flags):
            self.flags = flags
            self.inputs: list[Tensor] = []
            self.outputs: list[Tensor] = []
            self.onnx = None

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network
            self.errors: list[str] = []

        def parse_from_file(self, path):
            import onnx

            rec.log("parse_from_file", path)
            if rec.fail_build == "parse":
                self.errors = ["In node 3 (Conv): UNSUPPORTED_NODE"]
                return False
            g = onnx.load(path, load_external_data=False).graph
            self.network.onnx = path
            for vi, dest in ((g.input, self.network.inputs), (g.output, self.network.outputs)):
                for v in vi:
                    t = v.type.tensor_type
                    shape = [d.dim_value for d in t.shape.dim]
                    if v.name in rec.dynamic_inputs:
                        shape[0] = -1
                    dest.append(Tensor(v.name, _ONNX_TO_TRT[t.elem_type], shape))
            return True

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class TimingCache:
        def __init__(self, data: bytes):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"|timing"

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, min, opt, max):  # noqa: A002 - TensorRT's keyword names
            rec.log("set_shape", name, tuple(min), tuple(opt), tuple(max))
            self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

    class Config:
        def __init__(self):
            self.flags: set = set()
            self.cache = None
            self.profiles = []

        def set_flag(self, flag):
            rec.log("set_flag", flag.name)
            self.flags.add(flag.name)

        def set_memory_pool_limit(self, pool, size):
            rec.log("set_memory_pool_limit", pool.name, size)

        def add_optimization_profile(self, profile):
            rec.log("add_optimization_profile", dict(profile.shapes))
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            rec.log("create_timing_cache", bytes(data))
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            rec.log("set_timing_cache", ignore_mismatch)
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            rec.log("create_network", flags)
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            rec.log("build_serialized_network", network.onnx)
            if rec.fail_build is True:
                return None
            rec.builds += 1
            io = [[t.name, True, t.dtype.value, list(t.shape)] for t in network.inputs]
            io += [[t.name, False, t.dtype.value, list(t.shape)] for t in network.outputs]
            return json.dumps(
                {
                    "fake_trt": rec.version,
                    "gpu": rec.gpu,
                    "io": io,
                    "onnx": network.onnx,
                    "refit": "REFIT" in config.flags,
                    "flags": sorted(config.flags),
                    "strongly_typed": bool(network.flags),
                }
            ).encode()

    class Engine:
        def __init__(self, desc):
            import onnx
            from onnx import numpy_helper

            self.desc = desc
            self.io = desc["io"]
            model = onnx.load(desc["onnx"], load_external_data=True)
            self.weights = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}

        def checksum(self):
            return weights_checksum(self.weights.values())

        @property
        def num_io_tensors(self):
            return len(self.io)

        def get_tensor_name(self, i):
            return self.io[i][0]

        def _t(self, name):
            return next(t for t in self.io if t[0] == name)

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if self._t(name)[1] else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return DataType(self._t(name)[2])

        def get_tensor_shape(self, name):
            return tuple(self._t(name)[3])

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine = engine
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name, shape):
            rec.log("set_input_shape", name, tuple(shape))
            return True

        def set_tensor_address(self, name, ptr):
            rec.log("set_tensor_address", name, ptr)
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream_handle):
            rec.log("execute_async_v3", stream_handle)
            rec.enqueues += 1
            rec.submit(stream_handle, self._compute)
            return True

        def _compute(self):
            ins = [t for t in self.engine.io if t[1]]
            first = ins[0]
            x = np.frombuffer(bytes(rec.device[self.addresses[first[0]]]), dtype=first[2]).reshape(first[3])
            c = self.engine.checksum()
            for name, is_input, dtype, shape in self.engine.io:
                if is_input:
                    continue
                y = x * 2 + c if list(shape) == list(first[3]) else np.full(shape, float(x.sum()) + c)
                rec.device[self.addresses[name]][:] = np.ascontiguousarray(y, dtype=dtype).tobytes()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            rec.log("deserialize_cuda_engine", len(data))
            try:
                desc = json.loads(bytes(data))
            except ValueError:
                return None
            if desc.get("fake_trt") != rec.version or desc.get("gpu") != rec.gpu:
                return None  # engines do not load across TensorRT versions or GPUs
            return Engine(desc)

    class Refitter:
        def __init__(self, engine, logger):
            rec.log("Refitter")
            self.engine = engine
            self.pending: dict[str, np.ndarray] = {}

        def get_all_weights(self):
            if not self.engine.desc["refit"]:
                return []
            return [n for n in self.engine.weights if n not in rec.folded]

        def set_named_weights(self, name, weights):
            rec.log("set_named_weights", name)
            cur = self.engine.weights.get(name)
            if cur is None or cur.size != weights.array.size or name in rec.folded:
                return False
            self.pending[name] = weights.array.reshape(cur.shape).copy()
            return True

        def get_missing_weights(self):
            return [b for a, b in rec.combined.items() if a in self.pending and b not in self.pending]

        def refit_cuda_engine(self):
            rec.log("refit_cuda_engine", sorted(self.pending))
            if self.get_missing_weights():
                return False
            self.engine.weights.update(self.pending)
            return True

    for cls in (Logger, Weights, Builder, OnnxParser, Runtime, Refitter):
        setattr(trt, cls.__name__, cls)
    return trt


# ---------------------------------------------------------------------------------- cudart
class _Err(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1


class _Stream:
    def __init__(self, handle):
        self.handle = handle

    def __int__(self):
        return self.handle


def make_cudart(rec: Recorder) -> types.ModuleType:
    rt = types.ModuleType("cuda.bindings.runtime")
    rt.cudaError_t = _Err
    rt.cudaMemcpyKind = enum.IntEnum("cudaMemcpyKind", {"cudaMemcpyHostToDevice": 1, "cudaMemcpyDeviceToHost": 2})
    rt.cudaStreamCaptureMode = enum.IntEnum("cudaStreamCaptureMode", {"cudaStreamCaptureModeThreadLocal": 1})
    ok = _Err.cudaSuccess

    def alloc_ptr():
        rec.next_ptr += 0x1000
        return rec.next_ptr

    def cudaMalloc(n):
        p = alloc_ptr()
        rec.device[p] = bytearray(n)
        return ok, p

    def cudaMallocHost(n):
        buf = (ctypes.c_uint8 * n)()
        addr = ctypes.addressof(buf)
        rec.pinned[addr] = buf
        return ok, addr

    def cudaMemcpyAsync(dst, src, n, kind, stream):
        def do():
            if kind == rt.cudaMemcpyKind.cudaMemcpyHostToDevice:
                rec.device[dst][:n] = ctypes.string_at(src, n)
            else:
                ctypes.memmove(dst, bytes(rec.device[src][:n]), n)

        rec.submit(stream, do)
        return (ok,)

    def cudaStreamBeginCapture(stream, mode):
        rec.capturing[int(stream)] = []
        return (ok,)

    def cudaStreamEndCapture(stream):
        ops = rec.capturing.pop(int(stream))
        return ok, list(ops)

    def cudaGraphLaunch(graph_exec, stream):
        rec.launches += 1
        for op in graph_exec:
            op()
        return (ok,)

    class Prop:
        name = rec.gpu.encode() + b"\0" * 8
        major, minor = rec.cc

    funcs = {
        "cudaSetDevice": lambda d: (ok,),
        "cudaGetDeviceCount": lambda: (ok, 1),
        "cudaGetDeviceProperties": lambda d: (ok, Prop()),
        "cudaGetErrorName": lambda e: (ok, _Err(e).name.encode()),
        "cudaStreamCreate": lambda: (ok, _Stream(alloc_ptr())),
        "cudaStreamSynchronize": lambda s: (ok,),
        "cudaStreamDestroy": lambda s: rec.log("cudaStreamDestroy") or (ok,),
        "cudaMalloc": cudaMalloc,
        "cudaMallocHost": cudaMallocHost,
        "cudaFree": lambda p: rec.device.pop(p) and (ok,),
        "cudaFreeHost": lambda p: rec.pinned.pop(p) and (ok,),
        "cudaMemcpyAsync": cudaMemcpyAsync,
        "cudaStreamBeginCapture": cudaStreamBeginCapture,
        "cudaStreamEndCapture": cudaStreamEndCapture,
        "cudaGraphInstantiate": lambda g, flags: (ok, g),
        "cudaGraphDestroy": lambda g: (ok,),
        "cudaGraphExecDestroy": lambda g: rec.log("cudaGraphExecDestroy") or (ok,),
        "cudaGraphLaunch": cudaGraphLaunch,
    }
    for name, fn in funcs.items():
        setattr(rt, name, fn)
    return rt


def install(monkeypatch, rec: Recorder, **kw):
    """Put the fakes into ``sys.modules`` for one test (monkeypatch undoes it)."""
    trt = make_tensorrt(rec, **kw)
    rt = make_cudart(rec)
    cuda_pkg = types.ModuleType("cuda")
    cuda_pkg.__path__ = []
    bindings = types.ModuleType("cuda.bindings")
    bindings.__path__ = []
    bindings.runtime = rt
    cuda_pkg.bindings = bindings
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda", cuda_pkg)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", rt)
    return trt
