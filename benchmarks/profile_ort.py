"""Per-operator time of one bundle graph in ONNX Runtime (CPU), from ORT's own profiler.

    python benchmarks/profile_ort.py BUNDLE GRAPH [--runs 2] [--fuse-attention] [--model X.onnx] [--out FILE.json]

Feeds are random (shape and dtype from the manifest): the cost of a dense graph does not depend on
the values. The first run is a warm-up and is left out; the table sums the kernel time per operator
type over the remaining runs (averaged), with the share of the total and the node count.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def profile(
    bundle_dir: Path, graph: str, runs: int, threads: int = 0, model: Path | None = None, fuse: bool = False
) -> dict:
    import numpy as np
    import onnxruntime as ort

    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    entry = manifest["graphs"][graph]
    art = entry["artifacts"]["onnx"]
    rng = np.random.default_rng(0)
    feeds = {i["name"]: rng.standard_normal(i["shape"]).astype(i["dtype"]) for i in entry["inputs"]}
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = os.path.join(tmp, "prof")
        path = Path(model or bundle_dir / art["file"])
        source, fused = str(path), 0
        if fuse:  # what the runtime does for the CPU provider
            from icd_edge.runtimes.ort.attention import fused_source

            source, fused = fused_source(path, so)
        t0 = time.perf_counter()
        sess = ort.InferenceSession(source, sess_options=so, providers=["CPUExecutionProvider"])
        load_s = time.perf_counter() - t0
        walls = []
        for _ in range(runs + 1):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            walls.append(time.perf_counter() - t0)
        events = json.loads(Path(sess.end_profiling()).read_text())
    # kernel events of each run, in order; the first run (warm-up) is dropped
    run_starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    cut = run_starts[1] if len(run_starts) > 1 else 0
    per_op = collections.defaultdict(lambda: [0.0, 0])
    per_node = collections.defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < cut:
            continue
        op = e.get("args", {}).get("op_name", "?")
        per_op[op][0] += e["dur"] / 1e3 / runs
        per_op[op][1] += 1
        per_node[(op, e["name"][: -len("_kernel_time")])] += e["dur"] / 1e3 / runs
    total = sum(v[0] for v in per_op.values())
    table = sorted(((op, ms, n // runs) for op, (ms, n) in per_op.items()), key=lambda r: -r[1])
    top = sorted(per_node.items(), key=lambda kv: -kv[1])[:25]
    return {
        "bundle": str(bundle_dir),
        "model": str(model or art["file"]),
        "graph": graph,
        "precision": art.get("precision"),
        "fused_attention": fused,
        "load_s": round(load_s, 2),
        "run_s": [round(w, 3) for w in walls[1:]],
        "kernel_ms": round(total, 1),
        "ops": [{"op": op, "ms": round(ms, 1), "share": round(ms / total, 3), "nodes": n} for op, ms, n in table],
        "top_nodes": [{"op": op, "node": node, "ms": round(ms, 1)} for (op, node), ms in top],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("graph")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--fuse-attention", action="store_true", help="fuse plain attention as the runtime does on CPU")
    ap.add_argument("--model", type=Path, help="profile this .onnx instead of the bundle's (same I/O)")
    a = ap.parse_args(argv)
    res = profile(a.bundle, a.graph, a.runs, a.threads, a.model, a.fuse_attention)
    print(
        f"{a.graph} ({res['precision']}, {res['fused_attention']} attention layers fused): load {res['load_s']} s, "
        f"runs {res['run_s']} s, kernels {res['kernel_ms']} ms"
    )
    for r in res["ops"][:20]:
        print(f"  {r['op']:<24} {r['ms']:>9.1f} ms  {100 * r['share']:5.1f} %  {r['nodes']:>5} nodes")
    if a.out:
        a.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
