"""Each graph of a bundle on onnxruntime and on OpenVINO (CPU), one graph at a time, the two
backends' runs interleaved so that the VM's drift falls on both: the evidence behind
``INT8_CPU_GRAPH_BACKEND`` (which graphs ``auto`` sends to the other CPU backend per ISA class).

    python benchmarks/cpu_graph_backends.py BUNDLE [--graphs G ...] [--repeats 5] [--out FILE.json]

Inputs are random of the recorded shapes (timestep 499, token ids 0): the int8 kernels' speed
does not depend on the values. Each session's first run (compilation, buffer planning) is not timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.bench_cpu_edit import machine  # noqa: E402

BACKENDS = ("onnxruntime", "openvino")


def feeds(graph) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    out = {}
    for spec in graph.inputs:
        if spec.dtype.startswith("int"):
            out[spec.name] = np.zeros(spec.shape, spec.dtype)
        elif spec.name == "timestep":
            out[spec.name] = np.full(spec.shape, 499.0, spec.dtype)
        else:
            out[spec.name] = (0.5 * rng.standard_normal(spec.shape)).astype(spec.dtype)
    return out


def open_backend(name: str, threads: int, cache: Path):
    if name == "onnxruntime":
        from icd_edge.runtimes.ort import OrtBackend

        return OrtBackend(providers=("CPUExecutionProvider",), intra_op_threads=threads)
    from icd_edge.runtimes.openvino import OpenVinoBackend

    return OpenVinoBackend(threads=threads, cache_dir=str(cache))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--graphs", nargs="+", help="default: every graph stored in int8, and the text encoder")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="0: each backend's default (every core)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu_graph_backends.json")
    args = ap.parse_args()

    from icd_edge.bundle.store import open_bundle
    from icd_edge.precision import is_int8

    bundle = open_bundle(args.bundle, verify=False)
    graphs = args.graphs or [g for g in bundle.graphs if is_int8(bundle.precision(g)) or g == "text_encoder"]
    # OpenVINO's compiled graphs (GBs for full-size UNets) go beside the benchmark bundles, not the results
    cache = ROOT / "benchmarks" / "work" / "openvino-cache-graphs"
    backends = {name: open_backend(name, args.threads, cache) for name in BACKENDS}
    for b in backends.values():
        b.configure(bundle, "resident")
    report = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "bundle": {"path": str(args.bundle), "bundle_id": bundle.bundle_id, "model": bundle.manifest.model},
        "repeats": args.repeats,
        "threads": args.threads,
        "graphs": {},
    }
    for g in graphs:
        x = feeds(bundle.graphs[g])
        sessions, rec = {}, {"precision": bundle.precision(g)}
        for name, b in backends.items():
            t0 = time.perf_counter()
            sessions[name] = b.open_session(bundle, g)
            sessions[name].run(x)
            rec[f"{name}_load_and_first_s"] = round(time.perf_counter() - t0, 3)
        times = {name: [] for name in backends}
        for r in range(args.repeats):
            order = BACKENDS if r % 2 == 0 else BACKENDS[::-1]  # neither backend always runs second
            for name in order:
                t0 = time.perf_counter()
                sessions[name].run(x)
                times[name].append(round(time.perf_counter() - t0, 4))
        for name, s in sessions.items():
            s.close()
            rec[f"{name}_s"] = times[name]
            rec[f"{name}_median_s"] = round(statistics.median(times[name]), 4)
        rec["faster"] = min(BACKENDS, key=lambda n: rec[f"{n}_median_s"])
        rec["openvino_vs_onnxruntime"] = round(rec["openvino_median_s"] / rec["onnxruntime_median_s"], 3)
        report["graphs"][g] = rec
        print(g, json.dumps(rec), flush=True)
    report["summary"] = {
        "machine": f"{report['machine']['cpu']}, {report['machine']['cores']} cores",
        "isa": report["machine"].get("isa"),
        "faster": {g: r["faster"] for g, r in report["graphs"].items()},
        "openvino_vs_onnxruntime": {g: r["openvino_vs_onnxruntime"] for g, r in report["graphs"].items()},
        "median_s": {g: {n: r[f"{n}_median_s"] for n in BACKENDS} for g, r in report["graphs"].items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
