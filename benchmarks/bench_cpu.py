"""CPU benchmark across precisions and memory policies (issue: fp16/int8, memory, TAESD).

Full SD1.5 architecture with random weights (random-sd15), 512 px, 4+4 steps, P2P + local
blend, on this machine's CPU. Exports fp32, fp16 and int8 bundles (int8 with a random-weight
TAESD decoder too), then runs one edit per configuration in its own process (per-stage ms,
total, peak RSS) and the torch eager fp32 reference in the same run. Writes
``benchmarks/results/cpu.json`` (with ``summary``) and ``benchmarks/results/cpu.png``.

    python benchmarks/bench_cpu.py [--work benchmarks/work]
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
from benchmarks.bench_cpu_edit import EDIT, machine, timed_edit  # noqa: E402

CONFIGS = [  # (label, precision, memory, decoder)
    ("fp32-resident", "fp32", "resident", "full"),
    ("fp32-sequential", "fp32", "sequential", "full"),
    ("fp16-resident", "fp16", "resident", "full"),
    ("fp16-sequential", "fp16", "sequential", "full"),
    ("int8-resident", "int8", "resident", "full"),
    ("int8-sequential", "int8", "sequential", "full"),
    ("int8-sequential-taesd", "int8", "sequential", "taesd"),
]
# --no-int8: the full-size int8 export did not fit 24 GB here (the export process holds the fp32
# torch UNets while ONNX Runtime's static quantiser calibrates); measure fp32/fp16 only.


def worker(bundle: str, memory: str, decoder: str, runs: int) -> dict:
    import numpy as np
    import skimage.data

    from icd_edge.editor import Editor

    photo = skimage.data.chelsea()
    ed = Editor.open(bundle, backend="onnxruntime", verify=False, memory=memory, decoder=decoder)
    out = []
    for r in range(runs):
        img, rec = timed_edit(ed, photo)
        out.append({"run": r, **rec})
    np.save(f"{bundle}.{memory}.{decoder}.npy", img)
    return {"runs": out, "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def export(out: Path, *args: str) -> float:
    """Export (timed), or reuse a complete bundle of an earlier run (its recorded export time)."""
    if (out / "manifest.json").is_file():
        m = json.loads((out / "manifest.json").read_text())
        if m.get("complete") and m["export"]["config"]["model"] == "random-sd15":
            return m["export"]["timings"]["total_s"]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "icd_edge.export", "--model", "random-sd15", "--out", str(out), "--parity", "none",
                    "--no-progress", *args], check=True, cwd=ROOT)
    return round(time.perf_counter() - t0, 1)


def size_gb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != "manifest.json") / 1e9, 3)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work")
    ap.add_argument("--worker", nargs=3, metavar=("BUNDLE", "MEMORY", "DECODER"))
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--skip-export", action="store_true")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 bundle and its configurations")
    ap.add_argument("--add-shared", action="store_true", help="export a shared-base fp32 bundle, run it, merge into cpu.json")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, runs=args.runs)))
        return 0
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.add_shared:
        return add_shared(work)
    report = {"machine": machine(), "model": "random-sd15 (SD1.5 architecture, random weights), 512 px, 4+4 steps, P2P + blend",
              "edit": {k: list(v) if isinstance(v, tuple) else v for k, v in EDIT.items()}, "exports": {}, "runs": {}}
    precisions = ("fp32", "fp16") if args.no_int8 else ("fp32", "fp16", "int8")
    bundles = {p: work / f"sd15-{p}.bundle" for p in precisions}
    configs = [c for c in CONFIGS if c[1] in precisions]
    calib = work / "calibration"
    if not args.skip_export:
        import skimage.data
        from PIL import Image

        calib.mkdir(exist_ok=True)
        Image.fromarray(skimage.data.astronaut()).save(calib / "astronaut.png")
        Image.fromarray(skimage.data.coffee()).save(calib / "coffee.png")
        (calib / "prompts.json").write_text(json.dumps({"astronaut.png": ["a photo of an astronaut", "a photo of a robot"],
                                                        "coffee.png": ["a cup of coffee", "a cup of tea"]}))
        report["exports"]["fp32"] = {"export_s": export(bundles["fp32"])}
        report["exports"]["fp16"] = {"export_s": export(bundles["fp16"], "--precision", "fp16")}
        if "int8" in bundles:
            report["exports"]["int8"] = {"export_s": export(bundles["int8"], "--precision", "int8", "--calibration", str(calib),
                                                            "--calibration-count", "2", "--taesd", "random")}
    for p, b in bundles.items():
        report["exports"].setdefault(p, {})["bundle_gb"] = size_gb(b)
        m = json.loads((b / "manifest.json").read_text())
        report["exports"][p]["timings"] = m["export"]["timings"]
    for label, precision, memory, decoder in configs:
        proc = subprocess.run([sys.executable, __file__, "--runs", "2" if memory == "resident" else "1", "--worker",
                               str(bundles[precision]), memory, decoder], capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            report["runs"][label] = {"error": proc.stderr[-2000:]}
            print(label, "FAILED", proc.stderr[-500:], flush=True)
            continue
        report["runs"][label] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(label, json.dumps(report["runs"][label])[:300], flush=True)
    # torch eager fp32 reference, same machine, same run (from bench_cpu_edit's worker)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cpu_edit.py"), "--runs", "1", "--worker", "torch",
                           str(bundles["fp32"]), str(work / "edit_torch.png")], capture_output=True, text=True, cwd=ROOT)
    report["runs"]["torch-reference"] = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": proc.stderr[-2000:]}
    import numpy as np

    from icd_edge.export.parity import psnr_db

    ref = np.load(work / "edit_torch.npy")
    for label, precision, memory, decoder in configs:
        f = Path(f"{bundles[precision]}.{memory}.{decoder}.npy")
        if f.exists() and "runs" in report["runs"].get(label, {}):
            report["runs"][label]["psnr_db_vs_torch_fp32"] = round(psnr_db(ref, np.load(f), peak=1.0), 2)

    def best(label):
        r = report["runs"].get(label, {})
        return min(x["edit_s"] for x in r["runs"]) if "runs" in r else None

    torch_s = min(x["edit_s"] for x in report["runs"]["torch-reference"]["runs"]) if "runs" in report["runs"]["torch-reference"] else None
    rss = [r["peak_rss_gb"] for r in report["runs"].values() if "peak_rss_gb" in r and r is not report["runs"].get("torch-reference")]
    report["summary"] = {
        "machine": f'{report["machine"]["cpu"]}, {report["machine"]["cores"]} cores',
        "edit_s_fp32": best("fp32-resident"),
        "edit_s_fp16": best("fp16-resident"),
        "edit_s_int8": best("int8-resident"),
        "edit_s_int8_taesd": best("int8-sequential-taesd"),
        "edit_s_torch_reference": torch_s,
        "speedup_vs_reference_int8": round(torch_s / best("int8-resident"), 2) if torch_s and best("int8-resident") else None,
        "speedup_vs_reference_fp32": round(torch_s / best("fp32-resident"), 2) if torch_s and best("fp32-resident") else None,
        "peak_rss_gb_min": min(rss) if rss else None,
        "bundle_gb_fp32": report["exports"]["fp32"]["bundle_gb"],
        "bundle_gb_fp16": report["exports"]["fp16"]["bundle_gb"],
        "bundle_gb_int8": report["exports"].get("int8", {}).get("bundle_gb"),
        "export_s": report["exports"]["fp16"].get("export_s"),
    }
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    out = ROOT / "benchmarks" / "results" / "cpu.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    _chart(report, ROOT / "benchmarks" / "results" / "cpu.png")
    print(json.dumps(report["summary"], indent=1))
    return 0


def add_shared(work: Path) -> int:
    """The shared-base policy (its own bundle layout), merged into an existing cpu.json."""
    out = ROOT / "benchmarks" / "results" / "cpu.json"
    report = json.loads(out.read_text())
    bundle = work / "sd15-fp32-shared.bundle"
    report["exports"]["fp32-shared-base"] = {"export_s": export(bundle, "--unet-weights", "shared-base"),
                                             "bundle_gb": size_gb(bundle)}
    for label, memory in (("fp32-shared-base", "shared-base"), ("fp32-shared-bundle-resident", "resident")):
        proc = subprocess.run([sys.executable, __file__, "--runs", "2", "--worker", str(bundle), memory, "full"],
                              capture_output=True, text=True, cwd=ROOT)
        report["runs"][label] = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": proc.stderr[-2000:]}
        print(label, json.dumps(report["runs"][label])[:300], flush=True)
    import numpy as np

    from icd_edge.export.parity import psnr_db

    ref = np.load(work / "edit_torch.npy")
    for label, memory in (("fp32-shared-base", "shared-base"), ("fp32-shared-bundle-resident", "resident")):
        f = Path(f"{bundle}.{memory}.full.npy")
        if f.exists() and "runs" in report["runs"][label]:
            report["runs"][label]["psnr_db_vs_torch_fp32"] = round(psnr_db(ref, np.load(f), peak=1.0), 2)
    rss = [r["peak_rss_gb"] for k, r in report["runs"].items() if "peak_rss_gb" in r and k != "torch-reference"]
    report["summary"]["peak_rss_gb_min"] = min(rss)
    report["summary"]["bundle_gb_fp32_shared_base"] = report["exports"]["fp32-shared-base"]["bundle_gb"]
    out.write_text(json.dumps(report, indent=1) + "\n")
    _chart(report, ROOT / "benchmarks" / "results" / "cpu.png")
    print(json.dumps(report["summary"], indent=1))
    return 0


def _chart(report: dict, path: Path) -> None:
    """A small bar chart of edit time and peak RSS per configuration (Pillow only)."""
    from PIL import Image, ImageDraw

    rows = [(k, min(x["edit_s"] for x in v["runs"]), v["peak_rss_gb"]) for k, v in report["runs"].items() if "runs" in v]
    if not rows:
        return
    w, h, pad = 900, 60 + 40 * len(rows), 230
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), f"512 px iCD edit on {report['summary']['machine']} (seconds, peak RSS)", fill="black")
    top = max(r[1] for r in rows)
    for i, (label, sec, rss) in enumerate(rows):
        y = 40 + 40 * i
        d.text((10, y + 8), label, fill="black")
        d.rectangle([pad, y, pad + int((w - pad - 150) * sec / top), y + 28], fill=(70, 110, 200))
        d.text((w - 140, y + 8), f"{sec:.1f} s  {rss:.1f} GB", fill="black")
    img.save(path)


if __name__ == "__main__":
    sys.exit(main())
