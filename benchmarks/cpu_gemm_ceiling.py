"""The CPU's GEMM ceilings on ONNX Runtime: one-node fp32 MatMul and int8 (u8 × s8) MatMulInteger
graphs at UNet-like sizes, in GOP/s (one multiply-add = 2 ops). It tells how far below the
kernels' own speed a whole int8 edit runs, and how much int8 buys over fp32 on this ISA class
(on CPUs without VNNI the u8·s8 products go through 16-bit pair sums, so int8 gains much less).

    python benchmarks/cpu_gemm_ceiling.py [--threads 0] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (M, K, N): a 64×64-latent conv as im2col (4096 rows, 3×3×320 = 2880), a transformer linear at
# 64×64 (320 → 1280), a 32×32 conv (1024 rows, 3×3×640), and the square reference size
SHAPES = [(4096, 2880, 320), (4096, 320, 1280), (1024, 5760, 640), (2048, 2048, 2048)]


def graph(op: str, m: int, k: int, n: int):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if op == "fp32":
        w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        x_t, y_t, inits = TensorProto.FLOAT, TensorProto.FLOAT, [w]
    else:
        w = numpy_helper.from_array(rng.integers(-64, 65, (k, n), dtype=np.int8), "w")
        zx = numpy_helper.from_array(np.array(128, np.uint8), "zx")
        zw = numpy_helper.from_array(np.array(0, np.int8), "zw")
        node = helper.make_node("MatMulInteger", ["x", "w", "zx", "zw"], ["y"])
        x_t, y_t, inits = TensorProto.UINT8, TensorProto.INT32, [w, zx, zw]
    g = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", x_t, [m, k])],
        [helper.make_tensor_value_info("y", y_t, [m, n])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def gops(op: str, m: int, k: int, n: int, threads: int, seconds: float = 2.0) -> float:
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(graph(op, m, k, n).SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    x = rng.standard_normal((m, k)).astype(np.float32) if op == "fp32" else rng.integers(0, 256, (m, k), np.uint8)
    sess.run(None, {"x": x})
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        sess.run(None, {"x": x})
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best / 1e9


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: every core)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import onnxruntime as ort

    from benchmarks.bench_cpu_edit import machine

    rows = []
    for m, k, n in SHAPES:
        f, i = gops("fp32", m, k, n, args.threads), gops("int8", m, k, n, args.threads)
        rows.append(
            {
                "m": m,
                "k": k,
                "n": n,
                "fp32_gops": round(f, 1),
                "int8_gops": round(i, 1),
                "int8_vs_fp32": round(i / f, 2),
            }
        )
        print(rows[-1], flush=True)
    mach = machine()
    report = {
        "machine": mach,
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "rows": rows,
        "summary": {
            "isa": mach["isa"],
            "fp32_gops_best": max(r["fp32_gops"] for r in rows),
            "int8_gops_best": max(r["int8_gops"] for r in rows),
            "int8_vs_fp32_median": sorted(r["int8_vs_fp32"] for r in rows)[len(rows) // 2],
        },
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["summary"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
