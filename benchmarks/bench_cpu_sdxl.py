"""The SDXL CPU row (issue 20): one iCD-XL edit (1024², 4+4 prompt switch) of an int8 bundle on
each CPU backend, each in its own process, with its peak RSS; the best backend gives the summary.

Exporting a full-size SDXL bundle needs more memory than the 24 GB dev VM has (two fused 10.3 GB
fp32 UNets and their traces), so the full-size row runs where the export fits, e.g. the GPU host,
with ``--threads 2`` for the dev VM's core count; ``--model tiny-xl`` checks the script anywhere.

    python benchmarks/bench_cpu_sdxl.py --work DIR [--model random-sdxl] [--threads 2]
        [--backends onnxruntime openvino] [--out results/cpu_sdxl_ISA.json]

Summary keys: ``sdxl_edit_s_int8`` (best backend), ``sdxl_edit_s_int8_backend``,
``sdxl_peak_rss_gb`` (that worker's ru_maxrss, GB = 10^9 bytes), ``isa``, ``threads``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SOURCE, TARGET = "a photo of a cat", "a photo of a dog"


def export(bundle: Path, model: str, calib: Path) -> float | None:
    """Export the int8 bundle (timed), or reuse a complete one (None)."""
    if (bundle / "manifest.json").is_file() and json.loads((bundle / "manifest.json").read_text()).get("complete"):
        return None
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "icd_edge.export", "--model", model, "--precision", "int8", "--parity", "none"]
    cmd += ["--targets", "onnx", "--calibration", str(calib), "--calibration-count", "2", "--out", str(bundle)]
    subprocess.run(cmd + ["--no-progress"], check=True)
    return round(time.perf_counter() - t0, 1)


def worker(bundle: str, backend: str, runs: int, threads: int) -> dict:
    """One process on ``threads`` cores (affinity: the dev VM's core count on a bigger host): open
    the bundle on ``backend``, invert + edit ``runs`` times (the first also builds the backend's
    compiled graphs), per-stage ms of the last run, peak RSS."""
    import skimage.data

    from icd_edge.edit.editor import Editor

    cores = sorted(os.sched_getaffinity(0))
    if threads < len(cores):
        os.sched_setaffinity(0, cores[:threads])
    photo = skimage.data.chelsea()
    t0 = time.perf_counter()
    opts = {"onnxruntime": {"intra_op_threads": threads}, "openvino": {"threads": threads}}.get(backend, {})
    ed = Editor.open(bundle, verify=False, backend=backend, **opts)
    out = {"open_s": round(time.perf_counter() - t0, 2), "edit_s": []}
    for _ in range(runs):
        ed.profile = []
        t0 = time.perf_counter()
        inv = ed.invert(photo, SOURCE, seed=0)
        ed.edit(inv, TARGET, guidance=19.0, tau=0.7, output_type="np")
        out["edit_s"].append(round(time.perf_counter() - t0, 2))
    stages: dict[str, float] = {}
    for stage, ms in ed.profile:
        stages[stage] = round(stages.get(stage, 0.0) + ms, 1)
    out["stages_ms"] = stages
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True, help="folder for the bundle and the calibration photos")
    ap.add_argument("--model", default="random-sdxl", choices=("random-sdxl", "tiny-xl"))
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of each backend (OMP/ORT/OpenVINO)")
    ap.add_argument("--backends", nargs="+", default=["onnxruntime", "openvino"])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", nargs=2, metavar=("BUNDLE", "BACKEND"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.runs, args.threads)))
        return 0
    import skimage.data
    from PIL import Image

    from benchmarks.bench_cpu_edit import machine

    args.work.mkdir(parents=True, exist_ok=True)
    calib = args.work / "calibration"
    calib.mkdir(exist_ok=True)
    Image.fromarray(skimage.data.astronaut()).save(calib / "astronaut.png")
    Image.fromarray(skimage.data.coffee()).save(calib / "coffee.png")
    prompts = {
        "astronaut.png": ["a photo of an astronaut", "a photo of a robot"],
        "coffee.png": ["a cup of coffee", "a cup of tea"],
    }
    (calib / "prompts.json").write_text(json.dumps(prompts))
    bundle = args.work / f"{args.model}-int8.bundle"
    export_s = export(bundle, args.model, calib)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    rows = {}
    for backend in args.backends:
        cmd = [sys.executable, __file__, "--worker", str(bundle), backend, "--runs", str(args.runs), "--work", "."]
        cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            rows[backend] = {"error": proc.stderr[-2000:]}
        else:
            rows[backend] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(backend, json.dumps(rows[backend])[:400], flush=True)
    ok = {b: r for b, r in rows.items() if "edit_s" in r}
    best = min(ok, key=lambda b: min(ok[b]["edit_s"]), default=None)
    m = machine()
    result = {
        "machine": m,
        "model": args.model,
        "threads": args.threads,
        "export_s": export_s,
        "bundle": str(bundle),
        "rows": rows,
        "summary": {
            "isa": m.get("isa"),
            "threads": args.threads,
            "model": args.model,
            "sdxl_edit_s_int8": min(ok[best]["edit_s"]) if best else None,
            "sdxl_edit_s_int8_backend": best,
            "sdxl_peak_rss_gb": ok[best]["peak_rss_gb"] if best else None,
        },
    }
    print(json.dumps(result["summary"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
