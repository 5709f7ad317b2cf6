"""Per-operator time of one bundle graph on OpenVINO's CPU plugin (its performance counters).

    python benchmarks/profile_openvino.py BUNDLE GRAPH [--precision auto|fp32|bf16] [--top 20]

Feeds are random but shaped and typed from the manifest (timestep 519, P2P controls on). Prints
the call time, the time per (operator type, kernel) and the slowest fused subgraphs (attention
appears as ``node_scaled_dot_product_attention*``).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def feeds_for(inputs) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in inputs:
        name, shape, dtype = spec.name, spec.shape, np.dtype(spec.dtype)
        if name == "timestep":
            feeds[name] = np.full(shape, 519.0, dtype)
        elif name == "input_ids":
            feeds[name] = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape) % 1000
        elif name == "token_map":
            feeds[name] = np.eye(shape[0], dtype=dtype)
        elif name in ("refine_alpha", "equalizer", "cross_alpha", "self_flag"):
            feeds[name] = np.ones(shape, dtype)
        else:
            feeds[name] = (rng.standard_normal(shape) * 0.5).astype(dtype)
    return feeds


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("graph")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    import openvino

    from icd_edge.bundle.store import open_bundle
    from icd_edge.runtimes.openvino import OpenVinoBackend

    bundle = open_bundle(args.bundle, verify=False)
    backend = OpenVinoBackend(precision=args.precision, cache_dir="")
    art = bundle.artifact(args.graph, "onnx")
    config = {**backend.compile_config(art.precision), "PERF_COUNT": True}
    compiled = openvino.Core().compile_model(str(bundle.path(art.file)), "CPU", config)
    request = compiled.create_infer_request()
    feeds = feeds_for(bundle.graphs[args.graph].inputs)
    request.infer(feeds)  # first call: allocations
    t0 = time.perf_counter()
    request.infer(feeds)
    print(f"{args.graph}: {(time.perf_counter() - t0) * 1e3:.0f} ms a call ({config['INFERENCE_PRECISION_HINT']})")
    per_kind, count = collections.defaultdict(float), collections.Counter()
    for p in request.profiling_info:
        per_kind[(p.node_type, p.exec_type)] += p.real_time.total_seconds() * 1e3
        count[(p.node_type, p.exec_type)] += 1
    total = sum(per_kind.values())
    for (kind, kernel), ms in sorted(per_kind.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{ms:8.1f} ms {100 * ms / total:5.1f} %  x{count[(kind, kernel)]:<4d} {kind} ({kernel})")
    subgraphs = sorted(
        ((p.real_time.total_seconds() * 1e3, p.node_name) for p in request.profiling_info if p.node_type == "Subgraph"),
        reverse=True,
    )
    print("slowest subgraphs:")
    for ms, name in subgraphs[:8]:
        print(f"{ms:8.1f} ms {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
