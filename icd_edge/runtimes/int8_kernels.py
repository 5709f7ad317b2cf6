"""Are this machine's int8 kernels exact for a bundle's weights? One-node graphs, worst-case values.

An int8 bundle multiplies u8 activations (0..255) by s8 weights. CPUs with VNNI or AMX accumulate
those products in 32 bits. AVX2-only x86 CPUs (and AVX-512 ones without VNNI) use ``vpmaddubsw``,
which adds two products in a signed 16-bit lane first: 2·255·127 = 64770 saturates at 32767,
so full-range weights give wrong sums (off by half on these graphs), while weights in [-64, 64]
(2·255·64 = 32640) never saturate. ONNX Runtime's CPU provider and OpenVINO's CPU plugin both
behave so.

The graphs are the forms the bundle's int8 graphs take: Q/DQ MatMul (ONNX Runtime fuses it into an
integer matmul with a float output), Q/DQ 1×1 and 3×3 Conv with a requantised output
(``QLinearConv``) and ``MatMulInteger`` (what ``int8-dynamic`` graphs run). Every input is the
activation maximum 255; the weights are ±max, alternating and ramps, so every 16-bit pair is at
its largest. ``python -m icd_edge.runtimes.int8_kernels [--json]`` prints the check for both
weight ranges on every installed CPU backend.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from dataclasses import dataclass

import numpy as np

WEIGHT_MAXES = (64, 127)  # the export's 7-bit and 8-bit ranges (export.quant.policy.INT8_WEIGHT_RANGES)
BACKENDS = ("onnxruntime", "openvino")


@dataclass(frozen=True)
class Probe:
    name: str
    model: object  # onnx.ModelProto
    feed: dict
    expected: np.ndarray
    unit: float  # one step of the output (requantised graphs), 1 for integer or float sums


def _weights(rows: int, k: int, wmax: int) -> np.ndarray:
    """Worst cases for the 16-bit pair sums: all +max, all -max, alternating, a ramp to max."""
    w = np.empty((rows, k), np.int64)
    patterns = [
        np.full(k, wmax),
        np.full(k, -wmax),
        np.where(np.arange(k) % 2, -wmax, wmax),
        np.where(np.arange(k) % 4 < 2, wmax, -wmax),
        np.arange(k) % (wmax + 1),
        -(np.arange(k) % (wmax + 1)),
    ]
    for r in range(rows):
        w[r] = patterns[r % len(patterns)]
    return w


def probes(wmax: int) -> list[Probe]:
    """The one-node graphs for weights in [-wmax, wmax], with their exact results."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    def model(nodes, inputs, outputs, inits):
        g = helper.make_graph(
            nodes, "int8_probe", inputs, outputs, [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()]
        )
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    def vi(name, dtype, shape):
        return helper.make_tensor_value_info(name, dtype, shape)

    out = []
    k, n = 64, 12
    w = _weights(n, k, wmax)
    x = np.full((1, k), 255.0, np.float32)
    act = {"sx": np.float32(1.0), "zx": np.uint8(0)}
    exact = x.astype(np.int64) @ w.T
    out.append(
        Probe(
            "qdq_matmul",
            model(
                [
                    helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
                    helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
                    helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=1),
                    helper.make_node("MatMul", ["xd", "wd"], ["y"]),
                ],
                [vi("x", T.FLOAT, [1, k])],
                [vi("y", T.FLOAT, [1, n])],
                {**act, "wq": w.T.astype(np.int8), "sw": np.ones(n, np.float32), "zw": np.zeros(n, np.int8)},
            ),
            {"x": x},
            exact.astype(np.float64),
            1.0,
        )
    )

    out.append(
        Probe(
            "matmul_integer",
            model(
                [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
                [vi("a", T.UINT8, [4, k])],
                [vi("y", T.INT32, [4, n])],
                {"b": w.T.astype(np.int8)},
            ),
            {"a": np.full((4, k), 255, np.uint8)},
            np.repeat(exact, 4, axis=0).astype(np.float64),
            1.0,
        )
    )

    for ksize, cin in ((1, 64), (3, 16)):
        wc = _weights(n, cin * ksize * ksize, wmax).reshape(n, cin, ksize, ksize)
        xc = np.full((1, cin, ksize, ksize), 255.0, np.float32)  # one output pixel, every tap at 255
        sums = (255 * wc.reshape(n, -1).sum(axis=1)).astype(np.float64)
        ys = float(np.abs(sums).max()) / 127.0  # the exact sums span the u8 output around its zero point 128
        q = np.clip(np.round(sums / ys) + 128, 0, 255)
        out.append(
            Probe(
                f"qdq_conv{ksize}x{ksize}",
                model(
                    [
                        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
                        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
                        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=0),
                        helper.make_node("Conv", ["xd", "wd"], ["c"]),
                        helper.make_node("QuantizeLinear", ["c", "sy", "zy"], ["cq"]),
                        helper.make_node("DequantizeLinear", ["cq", "sy", "zy"], ["y"]),
                    ],
                    [vi("x", T.FLOAT, [1, cin, ksize, ksize])],
                    [vi("y", T.FLOAT, [1, n, 1, 1])],
                    {
                        **act,
                        "wq": wc.astype(np.int8),
                        "sw": np.ones(n, np.float32),
                        "zw": np.zeros(n, np.int8),
                        "sy": np.float32(ys),
                        "zy": np.uint8(128),
                    },
                ),
                {"x": xc},
                ((q - 128) * ys).reshape(1, n, 1, 1),
                ys,
            )
        )
    return out


def _run(backend: str, probe: Probe) -> np.ndarray:
    if backend == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(probe.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return sess.run(None, probe.feed)[0]
    if backend == "openvino":
        import openvino as ov

        core = ov.Core()
        # f32 float parts: a bf16 hint would round the float outputs, not change the integer sums
        compiled = core.compile_model(
            core.read_model(probe.model.SerializeToString(), b""), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
        )
        return np.asarray(compiled(probe.feed)[0])
    raise ValueError(f"no int8 kernel check for backend {backend!r}")


def errors(backend: str, wmax: int) -> dict[str, float]:
    """Largest error of each probe on ``backend``, in output steps (0: exact)."""
    return {
        p.name: float(np.abs(_run(backend, p).astype(np.float64) - p.expected).max() / p.unit) for p in probes(wmax)
    }


def exact(errs: dict[str, float]) -> bool:
    """Exact up to the requantisation's rounding (at most one output step)."""
    return all(e <= 1.0 for e in errs.values())


def installed_backends() -> list[str]:
    return [b for b in BACKENDS if importlib.util.find_spec({"onnxruntime": "onnxruntime", "openvino": "openvino"}[b])]


@functools.lru_cache(maxsize=None)
def saturates(backend: str, wmax: int) -> bool | None:
    """Whether ``backend``'s int8 kernels get these weights wrong here (measured once a process);
    None where it cannot be checked (no such CPU backend, or onnx missing)."""
    if backend not in BACKENDS or importlib.util.find_spec("onnx") is None:
        return None
    try:
        return not exact(errors(backend, wmax))
    except Exception:  # a backend that cannot build the probe says nothing about saturation
        return None


def report() -> dict:
    from icd_edge.cpu import info

    return {"cpu": info(), "results": {b: {str(w): errors(b, w) for w in WEIGHT_MAXES} for b in installed_backends()}}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rep = report()
    if "--json" in argv:
        print(json.dumps(rep))
        return 0
    print(f"cpu: {rep['cpu']['model']} ({rep['cpu']['isa']})")
    for backend, by_w in rep["results"].items():
        for w, errs in by_w.items():
            state = "exact" if exact(errs) else "SATURATES (max error " + f"{max(errs.values()):g} steps)"
            print(f"{backend}: int8 weights in [-{w}, {w}]: {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
