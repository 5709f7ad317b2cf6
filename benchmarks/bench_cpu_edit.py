"""Full-size SD1.5 iCD edit on the CPU: ONNX Runtime vs the torch reference, same run.

SD1.5 architecture with random weights (no downloads here), 512 px, 4 forward + 4 reverse
steps with Prompt-to-Prompt and local blend. Exports a ``random-sd15`` bundle, then times
one edit per backend in its own process (per stage, total, peak RSS) and compares the two
edited images. Writes ``benchmarks/results/cpu_edit_fp32.json``.

    python benchmarks/bench_cpu_edit.py [--work benchmarks/work] [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EDIT = dict(
    source="a photo of a cat",
    target="a photo of a dog",
    cross_replace=0.4,
    self_replace=0.6,
    amplify={"dog": 2.0},
    blend=("cat", "dog"),
    guidance=19.0,
    tau=0.8,
    seed=0,
)


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from icd_edge.cpu import info

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    isa = info()  # int8 speed and results depend on it: every CPU figure names the class
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "isa": isa["isa"],
        "cpu_features": isa["features"],
        "ram_gib": round(mem, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
    }


def timed_edit(ed, photo) -> tuple:
    """One invert + edit of EDIT with per-stage timings: (image array, {edit_s, load_s, stages_ms})."""
    ed.profile = []
    t0 = time.perf_counter()
    inv = ed.invert(photo, EDIT["source"], seed=EDIT["seed"])
    img = ed.edit(
        inv,
        EDIT["target"],
        cross_replace=EDIT["cross_replace"],
        self_replace=EDIT["self_replace"],
        amplify=EDIT["amplify"],
        blend=EDIT["blend"],
        guidance=EDIT["guidance"],
        tau=EDIT["tau"],
        output_type="np",
    )
    total = time.perf_counter() - t0
    stages: dict[str, float] = {}
    for stage, ms in ed.profile:
        stages[stage] = round(stages.get(stage, 0.0) + ms, 1)
    load = sum(v for k, v in stages.items() if k.startswith("load:"))
    return img, {"edit_s": round(total, 2), "load_s": round(load / 1000, 2), "stages_ms": stages}


REEDIT_TARGET = ("a photo of a lion", ("cat", "lion"))  # a second prompt for the same photo


def _stages(profile) -> dict[str, float]:
    stages: dict[str, float] = {}
    for stage, ms in profile:
        stages[stage] = round(stages.get(stage, 0.0) + ms, 1)
    return stages


def _reverse_ms(stages: dict, prefix: str) -> float:
    return round(sum(v for k, v in stages.items() if k.startswith(prefix)), 1)


def timed_reedit(ed, batch2, photo) -> dict:
    """Re-edits (the source cache): invert (its source pass timed apart), the first edit, a
    re-edit with another prompt, and the batch-2 edit of the same inversion on ``batch2`` (an
    editor without the cache on the same backend). Stage sums in ms; the ``reverse`` figures are
    the UNet steps of the decode: target rows only (re-edit) vs source + target (batch-2)."""
    if ed.source_cache == "off":
        return {"reedit": "not run: this editor has no source cache (bundle without the graphs, or sequential)"}
    common = {k: EDIT[k] for k in ("cross_replace", "self_replace", "guidance", "tau")}
    ed.profile = []
    t0 = time.perf_counter()
    inv = ed.invert(photo, EDIT["source"], seed=EDIT["seed"])
    invert_s = time.perf_counter() - t0
    inv_stages = _stages(ed.profile)
    ed.profile = []
    t0 = time.perf_counter()
    ed.edit(inv, EDIT["target"], amplify=EDIT["amplify"], blend=EDIT["blend"], output_type="np", **common)
    first_s = time.perf_counter() - t0
    first = _stages(ed.profile)
    ed.profile = []
    t0 = time.perf_counter()
    ed.edit(inv, REEDIT_TARGET[0], blend=REEDIT_TARGET[1], output_type="np", **common)
    reedit_s = time.perf_counter() - t0
    re_stages = _stages(ed.profile)
    # the high-water mark before the batch-2 comparison loads its edit graph: the re-edit editor's own
    rss_gb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2)
    batch2.profile = []
    t0 = time.perf_counter()
    batch2.edit(inv, EDIT["target"], amplify=EDIT["amplify"], blend=EDIT["blend"], output_type="np", **common)
    batch2_s = time.perf_counter() - t0
    b2 = _stages(batch2.profile)
    reedit_rev, batch2_rev = _reverse_ms(re_stages, "target_"), _reverse_ms(b2, "reverse_edit_")
    return {
        "invert_with_source_s": round(invert_s, 2),
        "source_pass_ms": _reverse_ms(inv_stages, "source_"),
        "first_edit_s": round(first_s, 2),
        "reedit_s": round(reedit_s, 2),
        "batch2_edit_s": round(batch2_s, 2),
        "reedit_reverse_ms": reedit_rev,
        "batch2_reverse_ms": batch2_rev,
        "reedit_vs_edit_reverse": round(reedit_rev / batch2_rev, 3) if batch2_rev else None,
        "source_cache_mib": inv.source.size_report(),
        "peak_rss_gb_before_batch2": rss_gb,
        "reedit_stages_ms": {"invert": inv_stages, "first_edit": first, "reedit": re_stages, "batch2_edit": b2},
    }


def worker(backend: str, bundle: str, out_png: str, runs: int) -> dict:
    """Runs in a child process: one backend, ``runs`` full edits, per-stage timings."""
    import numpy as np
    import skimage.data

    from icd_edge.bundle.store import open_bundle
    from icd_edge.edit.editor import Editor

    photo = skimage.data.chelsea()
    t0 = time.perf_counter()
    b = open_bundle(bundle, verify=False)
    if backend == "torch":
        import tempfile

        import torch

        from icd_edge.export.models import build_random
        from icd_edge.graphs.wrappers import build_graphs
        from icd_edge.runtimes.torch_ref import TorchBackend

        torch.set_num_threads(os.cpu_count())
        seed = b.manifest.info["sources"]["seed"]
        with tempfile.TemporaryDirectory() as work:
            src = build_random("random-sd15", seed, Path(work))
        graphs = build_graphs(src.text_encoder, src.vae, src.unet_forward, src.unet_reverse, b.dims)
        ed = Editor(b, TorchBackend(graphs), source_cache="off")  # the reference: batch-2, as the official code
    else:
        ed = Editor(b, __import__("icd_edge.runtimes", fromlist=["select_backend"]).select_backend(backend, b))
    setup_s = time.perf_counter() - t0
    results = []
    for r in range(runs):
        img, rec = timed_edit(ed, photo)
        results.append({"run": r, **rec})
    np.save(out_png.replace(".png", ".npy"), img)
    from icd_edge.image import array_to_pil

    array_to_pil(img).save(out_png)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB → GB (10^9 bytes, like bundle sizes)
    return {"backend": backend, "setup_s": round(setup_s, 2), "runs": results, "peak_rss_gb": round(peak, 2)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--skip-export", action="store_true")
    ap.add_argument("--bundle", type=Path, help="an existing complete random-sd15 bundle (implies --skip-export)")
    ap.add_argument("--worker", nargs=3, metavar=("BACKEND", "BUNDLE", "OUT"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, runs=args.runs)))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or args.work / "random-sd15.bundle"
    args.skip_export = args.skip_export or args.bundle is not None
    report = {
        "machine": machine(),
        "model": "SD1.5 architecture, random weights (random-sd15), 512 px, 4+4 steps, P2P + local blend",
        "edit": {k: list(v) if isinstance(v, tuple) else v for k, v in EDIT.items()},
    }
    if not args.skip_export:
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "icd_edge.export",
                "--model",
                "random-sd15",
                "--out",
                str(bundle),
                "--parity",
                "none",
                "--no-progress",
            ],
            check=True,
        )
        report["export_s"] = round(time.perf_counter() - t0, 1)
    report["bundle_gb"] = round(sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) / 1e9, 3)
    for backend in ("onnxruntime", "torch"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--runs",
                str(args.runs),
                "--worker",
                backend,
                str(bundle),
                str(args.work / f"edit_{backend}.png"),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        report[backend] = json.loads(out.stdout.strip().splitlines()[-1])
        print(backend, json.dumps(report[backend])[:400], flush=True)
    import numpy as np

    from icd_edge.export.parity import max_abs_err, psnr_db

    a = np.load(args.work / "edit_onnxruntime.npy")
    b = np.load(args.work / "edit_torch.npy")
    ort_s = min(r["edit_s"] for r in report["onnxruntime"]["runs"])
    torch_s = min(r["edit_s"] for r in report["torch"]["runs"])
    report["summary"] = {
        "edit_s_onnxruntime_fp32": ort_s,
        "edit_s_torch_reference_fp32": torch_s,
        "speedup_vs_reference": round(torch_s / ort_s, 2),
        "peak_rss_gb_onnxruntime": report["onnxruntime"]["peak_rss_gb"],
        "peak_rss_gb_torch": report["torch"]["peak_rss_gb"],
        "e2e_psnr_db_ort_vs_torch": round(psnr_db(b, a, peak=1.0), 2),
        "e2e_max_abs_err": max_abs_err(b, a),
        "bundle_gb_fp32": report["bundle_gb"],
        "export_s": report.get("export_s")
        or json.loads((bundle / "manifest.json").read_text())["export"]["timings"]["total_s"],
    }
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    out = ROOT / "benchmarks" / "results" / "cpu_edit_fp32.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
