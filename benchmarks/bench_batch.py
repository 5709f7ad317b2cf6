"""Edits per minute of ``icd-edge batch`` with 1 and with 2 local worker processes, on one bundle
(issue 21): a JOBS file of scikit-image's photos, two targets each, each run into a fresh folder,
the two runs interleaved ``--repeat`` times. The CLI's own ``--json`` summary gives the edit time
(bundle opening and worker start excluded: those are in ``wall_s``).

    python benchmarks/bench_batch.py BUNDLE [--rows 6] [--repeat 1] [--out results/batch_ISA.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

PHOTOS = [  # scikit-image's bundled photos with a prompt each: (name, source, targets, blend)
    ("chelsea", "a photo of a cat", ["a photo of a dog", "a photo of a tiger"], None),
    ("astronaut", "a photo of a woman", ["a photo of a man", "a painting of a woman"], None),
    ("coffee", "a photo of a cup of coffee", ["a photo of a cup of tea", "a photo of a cup of milk"], None),
    ("rocket", "a photo of a rocket", ["a photo of a tower", "a drawing of a rocket"], None),
    ("cat", "a photo of a cat", ["a photo of a fox", "a photo of a lion"], None),
    ("hubble_deep_field", "a photo of galaxies", ["a painting of galaxies", "a photo of stars"], None),
]


def gpu_name() -> str | None:
    """The GPU's name when the host has one (nvidia-smi), else None."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--rows", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--backend", default="auto", help="the batch's --backend (auto: the CUDA provider on a GPU host)")
    args = ap.parse_args()
    import numpy as np
    from bench_cpu_edit import machine
    from PIL import Image
    from skimage import data

    runs: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        rows = []
        for i in range(args.rows):
            name, src, tgts, _ = PHOTOS[i % len(PHOTOS)]
            img = np.asarray(getattr(data, name)())
            if img.ndim == 2:
                img = np.stack([img] * 3, -1)
            Image.fromarray(img[..., :3]).save(work / f"{name}.png")
            rows.append({"id": f"{i:02d}_{name}", "image": f"{name}.png", "source": src, "target": tgts, "seed": i})
        jobs = work / "jobs.jsonl"
        jobs.write_text("".join(json.dumps(r) + "\n" for r in rows))
        for rep in range(args.repeat):
            for workers in (1, 2):
                out = work / f"out_{workers}_{rep}"
                cmd = [sys.executable, "-m", "icd_edge", "batch", str(jobs), "--bundle", str(args.bundle)]
                cmd += [
                    "--out-dir",
                    str(out),
                    "--workers",
                    str(workers),
                    "--json",
                    "--no-verify",
                    "--backend",
                    args.backend,
                ]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if proc.returncode:
                    raise SystemExit(f"batch failed ({proc.returncode}): {proc.stderr[-2000:]}")
                s = json.loads(proc.stdout.strip().splitlines()[-1])
                s["wall_s"] = round(wall, 2)
                runs[workers].append(s)
                print(workers, "workers:", s["edits_per_minute"], "edits/min", s["seconds"], "s", flush=True)
    med = {w: statistics.median(r["edits_per_minute"] for r in rs) for w, rs in runs.items()}
    result = {
        "machine": machine(),
        "gpu": gpu_name(),
        "backend": args.backend,
        "bundle": str(args.bundle),
        "rows": args.rows,
        "edits": 2 * args.rows,
        "runs": runs,
        "summary": {
            "edits_per_min_1_worker": med[1],
            "edits_per_min_2_workers": med[2],
            "two_vs_one": round(med[2] / med[1], 3),
        },
    }
    print(json.dumps(result["summary"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
