"""CPU benchmark across precisions and memory policies (issue: fp16/int8, memory, TAESD).

Full SD1.5 architecture with random weights (random-sd15), 512 px, 4+4 steps, P2P + local
blend, on this machine's CPU. Exports the bundles of ``BUNDLES`` (fp32; fp16; fp16 shared-base;
int8 with every UNet and the VAE quantised plus a random-weight TAESD decoder; the same stored
shared-base with an int8 text encoder), then runs one edit per configuration in its own process (per-stage ms,
total, peak RSS) and the torch eager fp32 reference in the same run. Writes
``benchmarks/results/cpu.json`` (with ``summary``) and ``benchmarks/results/cpu.png``.

    python benchmarks/bench_cpu.py [--work benchmarks/work] [--only LABEL ... --out X.json] [--merge X.json]

Bundles of an earlier run in --work are reused when complete (their recorded export time);
delete one to re-time its export.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.bench_cpu_edit import EDIT, machine, timed_edit, timed_reedit  # noqa: E402

INT8_ALL = (
    "--precision",
    "int8",
    "--graph-precision",
    "unet_forward=int8",
    "--graph-precision",
    "vae_encoder=int8",
    "--graph-precision",
    "vae_decoder=int8",
    "--graph-precision",
    "taesd_decoder=int8",
    "--taesd",
    "random",
    "--calibration-count",
    "2",
)
BUNDLES = {  # name → export arguments (random-sd15, --parity none; int8 also --calibration DIR)
    "fp32": (),
    "fp16": ("--precision", "fp16"),
    # the fp16 size configuration: teacher weights once, token embedding as int8 rows
    "fp16-shared": ("--precision", "fp16", "--unet-weights", "shared-base", "--embeddings", "int8"),
    # every UNet and the VAE in static int8 (the speed configuration), with a TAESD decoder
    "int8": INT8_ALL,
    # the same with the teacher's weights stored once and an int8 text encoder (the size configuration)
    "int8-shared": (*INT8_ALL, "--unet-weights", "shared-base", "--graph-precision", "text_encoder=int8"),
}
CONFIGS = [  # (label, bundle, memory, decoder[, backend options]); onnxruntime unless the options say otherwise.
    # onnxruntime fuses plain attention unless the label ends "-explicit-attn"
    ("fp32-resident", "fp32", "resident", "full"),
    ("fp32-sequential", "fp32", "sequential", "full"),
    ("fp16-resident", "fp16", "resident", "full"),
    ("fp16-sequential", "fp16", "sequential", "full"),
    ("fp16-shared-base", "fp16-shared", "shared-base", "full"),
    ("int8-resident", "int8", "resident", "full"),
    ("int8-resident-explicit-attn", "int8", "resident", "full"),  # A/B: attention as exported (MatMul/Softmax)
    ("int8-sequential", "int8", "sequential", "full"),
    ("int8-resident-taesd", "int8", "resident", "taesd"),
    ("int8-sequential-taesd", "int8", "sequential", "taesd"),
    ("int8-shared-base", "int8-shared", "shared-base", "full"),
    ("int8-shared-base-taesd", "int8-shared", "shared-base", "taesd"),
    # the same bundles on OpenVINO (precision auto: fp32 graphs in float32, int8 graphs' float parts in bfloat16)
    ("openvino-fp32-resident", "fp32", "resident", "full", {"backend": "openvino"}),
    ("openvino-fp32-bf16-resident", "fp32", "resident", "full", {"backend": "openvino", "precision": "bf16"}),
    ("openvino-int8-resident", "int8", "resident", "full", {"backend": "openvino"}),
    ("openvino-int8-f32-resident", "int8", "resident", "full", {"backend": "openvino", "precision": "fp32"}),
    ("openvino-int8-sequential", "int8", "sequential", "full", {"backend": "openvino"}),
    ("openvino-int8-resident-taesd", "int8", "resident", "taesd", {"backend": "openvino"}),
    ("openvino-int8-sequential-taesd", "int8", "sequential", "taesd", {"backend": "openvino"}),
    # what `auto` picks on this CPU, per graph (a RoutedBackend where one CPU backend runs some graphs faster)
    ("auto-int8-resident", "int8", "resident", "full", {"backend": "auto"}),
    ("auto-int8-resident-taesd", "int8", "resident", "taesd", {"backend": "auto"}),
]


def backend_of(config: tuple) -> dict:
    """``{"backend": name, **options}`` of a CONFIGS row."""
    extra = dict(config[4]) if len(config) > 4 else {}
    extra.setdefault("backend", "onnxruntime")
    if extra["backend"] == "onnxruntime" and config[0].endswith("-explicit-attn"):
        extra["fuse_attention"] = False
    return extra


def image_file(bundle: Path, config: tuple) -> Path:
    """Where a configuration's worker leaves its edited image (compared with torch afterwards)."""
    return Path(f"{bundle}.{config[0]}.npy")


def worker(label: str, bundle: str, runs: int, cache_dir: str, threads: int = 0, reedit: bool = True) -> dict:
    """One configuration's edits in this process; ``threads`` > 0: pinned to that many cores with as
    many backend threads (a bigger host standing in for a smaller CPU); ``reedit``: each run also
    times the re-edit comparison (three more edits)."""
    import numpy as np
    import skimage.data

    from icd_edge.edit.editor import Editor
    from icd_edge.runtimes import describe_backend
    from icd_edge.runtimes.openvino import OvOptions
    from icd_edge.runtimes.ort import OrtOptions

    config = next(c for c in CONFIGS if c[0] == label)
    options = backend_of(config)
    if threads:
        cores = sorted(os.sched_getaffinity(0))
        if threads > len(cores):
            raise SystemExit(f"--threads {threads}: this process may use only {len(cores)} cores")
        os.sched_setaffinity(0, cores[:threads])
    if options["backend"] == "auto":  # typed options, each taken by its own backend
        options["options"] = (OrtOptions(intra_op_threads=threads), OvOptions(threads=threads, cache_dir=cache_dir))
    elif options["backend"] == "openvino":
        options["cache_dir"] = cache_dir
    if threads and options["backend"] != "auto":
        options["intra_op_threads" if options["backend"] == "onnxruntime" else "threads"] = threads
    photo = skimage.data.chelsea()
    ed = Editor.open(bundle, verify=False, memory=config[2], decoder=config[3], **options)
    batch2 = Editor(ed.bundle, ed.backend, memory=config[2], decoder=config[3], source_cache="off")
    batch2.sessions = ed.sessions  # one pool: the comparison adds only the batch-2 edit graph's session
    out = []
    for r in range(runs):
        img, rec = timed_edit(ed, photo)
        out.append({"run": r, **rec, **(timed_reedit(ed, batch2, photo) if reedit else {})})
    if not threads:  # the PSNR against torch comes from the default (all-core) run
        np.save(image_file(Path(bundle), config), img)
    # ru_maxrss is in KiB; reported in GB (10^9 bytes), the unit of the bundle sizes and the targets
    chosen = describe_backend(ed.backend)
    return {
        "runs": out,
        "chosen_backend": chosen,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2),
    }


EXPORT_TIMED = "the whole command, timed in this run"
EXPORT_REUSED = "the exporter's own total recorded in a reused bundle (no interpreter start)"


def export(out: Path, *args: str) -> tuple[float, str]:
    """Export (timed), or reuse a complete bundle of an earlier run (its recorded export time);
    returns the seconds and what they measure."""
    if (out / "manifest.json").is_file():
        m = json.loads((out / "manifest.json").read_text())
        if m.get("complete") and _same_config(m["export"]["config"], args):
            return m["export"]["timings"]["total_s"], EXPORT_REUSED
        print(f"re-exporting {out.name}: no complete bundle of these arguments", flush=True)
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "icd_edge.export",
            "--model",
            "random-sd15",
            "--out",
            str(out),
            "--parity",
            "none",
            "--no-progress",
            *args,
        ],
        check=True,
        cwd=ROOT,
    )
    return round(time.perf_counter() - t0, 1), EXPORT_TIMED


def _same_config(recorded: dict, args: tuple) -> bool:
    """Whether a bundle's recorded export config is the one ``args`` would produce."""
    from icd_edge.export.__main__ import build_parser

    want = vars(build_parser().parse_args(["--out", "x", "--model", "random-sd15", *args]))
    keys = (
        "precision",
        "unet_weights",
        "embeddings",
        "taesd",
        "resolution",
        "seed",
        "opset",
        "int8_weights",
        "lora_rounding",
    )
    # bundles exported before a flag existed: what the export did then
    defaults = {"unet_weights": "fused", "embeddings": "float", "int8_weights": "8bit", "lora_rounding": "none"}
    same = all(recorded.get(k, defaults.get(k)) == want[k] for k in keys)
    same &= sorted(map(tuple, recorded.get("graph_precision", []))) == sorted(
        tuple(v.split("=")) for v in want["graph_precision"]
    )
    # recorded as a list and a bool; bundles from before these flags were quantised with the defaults
    same &= tuple(recorded.get("int8_ops", ("Conv", "MatMul"))) == want["int8_ops"]
    same &= recorded.get("int8_per_channel", True) == (want["int8_per_channel"] == "on")
    if want["precision"].startswith("int8"):
        same &= recorded.get("calibration_count") == want["calibration_count"]
    return same


def size_gb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != "manifest.json") / 1e9, 3)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work")
    ap.add_argument("--worker", nargs=2, metavar=("LABEL", "BUNDLE"))
    ap.add_argument("--ov-cache", default="", help="worker: OpenVINO's compiled-graph cache ('' none)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        metavar="N",
        help="also run each configuration pinned to N cores with N backend threads (runs keyed LABEL@Nt); "
        "summary: edit_s_int8_N_cores",
    )
    ap.add_argument(
        "--only",
        nargs="+",
        metavar="LABEL",
        help="run only these configurations (and the reference) into --out; add them to cpu.json with --merge",
    )
    ap.add_argument("--export-only", action="store_true", help="export (or reuse) the bundles, run nothing")
    ap.add_argument("--no-reedit", action="store_true", help="time edits only, not the re-edit comparison")
    ap.add_argument(
        "--no-reference",
        action="store_true",
        help="no torch reference (nor its fp32 bundle): no speed-up or PSNR figures (a bigger host's thread scaling)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu.json")
    ap.add_argument(
        "--merge",
        type=Path,
        metavar="JSON",
        help="add the configuration runs of a later (--only) report to --out and recompute its summary",
    )
    ap.add_argument("--merge-labels", nargs="+", metavar="LABEL", help="--merge only these configurations")
    args = ap.parse_args()
    if args.worker:
        threads = args.threads[0] if args.threads else 0
        rec = worker(*args.worker, runs=args.runs, cache_dir=args.ov_cache, threads=threads, reedit=not args.no_reedit)
        print(json.dumps(rec))
        return 0
    if args.merge:
        report = json.loads(args.out.read_text())
        merge(report, json.loads(args.merge.read_text()), labels=args.merge_labels)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        _chart(report, args.out.with_suffix(".png"))
        print(json.dumps(report["summary"], indent=1))
        return 0
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    report = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "model": "random-sd15 (SD1.5 architecture, random weights), 512 px, 4+4 steps, P2P + blend",
        "edit": {k: list(v) if isinstance(v, tuple) else v for k, v in EDIT.items()},
        "exports": {},
        "runs": {},
    }
    configs = [c for c in CONFIGS if not args.only or c[0] in args.only]
    # fp32 carries the torch reference; fp16 is the export-time row of the summary (full runs only)
    reference = set() if args.no_reference else {"fp32"}
    names = sorted({c[1] for c in configs} | reference | (set() if args.only else {"fp16"}))
    bundles = {n: work / f"sd15-{n}.bundle" for n in names}
    calib = work / "calibration"
    import skimage.data
    from PIL import Image

    calib.mkdir(exist_ok=True)
    Image.fromarray(skimage.data.astronaut()).save(calib / "astronaut.png")
    Image.fromarray(skimage.data.coffee()).save(calib / "coffee.png")
    (calib / "prompts.json").write_text(
        json.dumps(
            {
                "astronaut.png": ["a photo of an astronaut", "a photo of a robot"],
                "coffee.png": ["a cup of coffee", "a cup of tea"],
            }
        )
    )
    for n, b in bundles.items():
        extra = ("--calibration", str(calib)) if "int8" in BUNDLES[n] else ()
        seconds, measured = export(b, *BUNDLES[n], *extra)
        report["exports"][n] = {
            "args": list(BUNDLES[n]),
            "export_s": seconds,
            "export_s_measures": measured,
            "bundle_gb": size_gb(b),
        }
        m = json.loads((b / "manifest.json").read_text())
        report["exports"][n]["timings"] = m["export"]["timings"]
        report["exports"][n]["precision"] = m["precision"]["graphs"] if "precision" in m else None
        print("bundle", n, report["exports"][n]["bundle_gb"], "GB", report["exports"][n]["export_s"], "s", flush=True)
    if args.export_only:
        return 0
    # OpenVINO compiles each graph once per machine (a cache keyed by content and options): emptied here,
    # so the first configuration of a bundle and precision compiles and the later ones load compiled graphs
    ov_cache = work / "openvino-cache"
    shutil.rmtree(ov_cache, ignore_errors=True)
    for config, threads in [(c, 0) for c in configs] + [(c, n) for n in args.threads or () for c in configs]:
        label, bundle, memory = config[:3]
        key = f"{label}@{threads}t" if threads else label
        # resident: the first edit loads (OpenVINO: compiles) the graphs, the best later one counts; three edits on
        # OpenVINO, whose 15 s edits vary by 10-20 % on this VM; sequential reloads every edit: one
        # (auto may route graphs to OpenVINO); with --no-reedit a run is one edit and three fit everywhere
        three = backend_of(config)["backend"] in ("openvino", "auto") or args.no_reedit
        runs = "1" if memory == "sequential" else "3" if three else "2"
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--runs",
                runs,
                "--ov-cache",
                str(ov_cache),
                *(("--threads", str(threads)) if threads else ()),
                *(("--no-reedit",) if args.no_reedit else ()),
                "--worker",
                label,
                str(bundles[bundle]),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if proc.returncode:
            report["runs"][key] = {"error": proc.stderr[-2000:]}
            print(key, "FAILED", proc.stderr[-500:], flush=True)
            continue
        run = {"backend": backend_of(config), **json.loads(proc.stdout.strip().splitlines()[-1])}
        report["runs"][key] = {**run, "threads": threads} if threads else run
        print(key, json.dumps(report["runs"][key])[:300], flush=True)
        # a long run (a bigger host's thread scaling) cut short still leaves every finished configuration
        args.out.with_suffix(".partial.json").write_text(json.dumps(report, indent=1) + "\n")
    if args.no_reference:
        return finish(report, bundles, args.out)
    # torch eager fp32 reference, same machine, same run (from bench_cpu_edit's worker)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_cpu_edit.py"),
            "--runs",
            "1",
            "--worker",
            "torch",
            str(bundles["fp32"]),
            str(work / "edit_torch.png"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    report["runs"]["torch-reference"] = (
        json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": proc.stderr[-2000:]}
    )
    import numpy as np

    from icd_edge.export.parity import psnr_db

    ref = np.load(work / "edit_torch.npy")
    for config in configs:
        label, f = config[0], image_file(bundles[config[1]], config)
        if f.exists() and "runs" in report["runs"].get(label, {}):
            img = np.load(f)
            if np.isfinite(img).all():
                report["runs"][label]["psnr_db_vs_torch_fp32"] = round(psnr_db(ref, img, peak=1.0), 2)
            else:  # strict JSON has no NaN; the backend raises NumericsError on such outputs since
                report["runs"][label]["psnr_db_vs_torch_fp32"] = None
                report["runs"][label]["nonfinite_image"] = True

    return finish(report, bundles, args.out)


def finish(report: dict, bundles: dict, out: Path) -> int:
    """What auto picks for the int8 bundle, the summary; writes ``out`` and its chart."""
    if "int8" in bundles and (bundles["int8"] / "manifest.json").is_file():
        from icd_edge.bundle.store import open_bundle
        from icd_edge.runtimes import describe_backend, select_backend

        chosen = select_backend("auto", open_bundle(bundles["int8"], verify=False))
        report["auto_backend_int8"] = describe_backend(chosen)
    report["summary"] = summarize(report)
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    _chart(report, out.with_suffix(".png"))
    print(json.dumps(report["summary"], indent=1))
    return 0


def summarize(report: dict) -> dict:
    """The issue's summary keys from ``report`` (runs of every configuration it holds)."""
    configs = [c for c in CONFIGS if c[0] in report["runs"]]
    bundles = {c[1] for c in configs}

    def best(label):
        r = report["runs"].get(label, {})
        return min(x["edit_s"] for x in r["runs"]) if "runs" in r else None

    def fastest(prefix, taesd):
        vals = [
            (best(c[0]), c[0]) for c in configs if c[1].startswith(prefix) and (c[3] == "taesd") == taesd and best(c[0])
        ]
        return min(vals) if vals else (None, None)

    ref = report["runs"].get("torch-reference", {})
    torch_s = min(x["edit_s"] for x in ref["runs"]) if "runs" in ref else None
    rss = sorted(
        (r["peak_rss_gb"], k)
        for k, r in report["runs"].items()
        if "peak_rss_gb" in r and k != "torch-reference" and not r.get("threads")
    )
    int8_s, int8_label = fastest("int8", False)
    taesd_s, taesd_label = fastest("int8", True)

    def psnr(label):
        return report["runs"].get(label, {}).get("psnr_db_vs_torch_fp32")

    ran = {c[1] for c in configs if "runs" in report["runs"].get(c[0], {})}  # a bundle counts only if it ran
    int8_sizes = sorted((report["exports"][n]["bundle_gb"], n) for n in bundles if n.startswith("int8") and n in ran)
    fp16_sizes = sorted((report["exports"][n]["bundle_gb"], n) for n in bundles if n.startswith("fp16") and n in ran)

    def best_reedit(taesd):
        """(re-edit s, config, its run) of the fastest int8 re-edit (full VAE or TAESD)."""
        rows = []
        for c in configs:
            if c[1].startswith("int8") and (c[3] == "taesd") == taesd:
                for run in report["runs"].get(c[0], {}).get("runs", []):
                    if "reedit_s" in run:
                        rows.append((run["reedit_s"], c[0], run))
        return min(rows, key=lambda r: r[0]) if rows else (None, None, {})

    by_threads: dict[str, dict] = {}  # --threads runs: the fastest int8 full-VAE edit per core count
    by_threads_default = any(r.get("threads") for r in report["runs"].values())
    cores = report["machine"]["cores"]
    for key, r in report["runs"].items():
        if key != "torch-reference" and "runs" in r and (r.get("threads") or by_threads_default):
            label = key.rsplit("@", 1)[0]
            config = next(c for c in CONFIGS if c[0] == label)
            if config[1].startswith("int8") and config[3] == "full":
                s = min(x["edit_s"] for x in r["runs"])
                n = str(r.get("threads") or cores)  # a default run uses every core of the machine
                if n not in by_threads or s < by_threads[n]["edit_s"]:
                    by_threads[n] = {"edit_s": s, "config": label}
    re_s, re_label, re_run = best_reedit(False)
    re_t, re_t_label, re_t_run = best_reedit(True)
    return {
        "machine": f"{report['machine']['cpu']}, {report['machine']['cores']} cores",
        "reedit_s_int8": re_s,
        "reedit_s_int8_config": re_label,
        "reedit_s_int8_taesd": re_t,
        "reedit_s_int8_taesd_config": re_t_label,
        # the same run as reedit_s_int8: its re-edit's UNet steps over the batch-2 edit's
        "reedit_vs_edit_reverse": re_run.get("reedit_vs_edit_reverse"),
        "reedit_first_edit_s_int8_taesd": re_t_run.get("first_edit_s"),
        "reedit_invert_with_source_s_int8_taesd": re_t_run.get("invert_with_source_s"),
        "source_cache_mib": re_run.get("source_cache_mib"),
        "isa": report["machine"].get("isa"),
        "int8_psnr_db_vs_torch_fp32": psnr(int8_label),
        "auto_backend_int8": report.get("auto_backend_int8"),
        "edit_s_fp32": best("fp32-resident"),
        "edit_s_fp16": best("fp16-resident"),
        "edit_s_int8": int8_s,
        "edit_s_int8_config": int8_label,
        "edit_s_int8_psnr_db_vs_torch_fp32": psnr(int8_label),
        "edit_s_int8_taesd": taesd_s,
        "edit_s_int8_taesd_config": taesd_label,
        "edit_s_int8_taesd_psnr_db_vs_torch_fp32": psnr(taesd_label),
        "edit_s_torch_reference": torch_s,
        "speedup_vs_reference_int8": round(torch_s / int8_s, 2) if torch_s and int8_s else None,
        "speedup_vs_reference_fp32": round(torch_s / best("fp32-resident"), 2)
        if torch_s and best("fp32-resident")
        else None,
        "peak_rss_gb_min": rss[0][0] if rss else None,
        "peak_rss_gb_min_config": rss[0][1] if rss else None,
        "bundle_gb_fp32": report["exports"].get("fp32", {}).get("bundle_gb"),
        "bundle_gb_fp16": fp16_sizes[0][0] if fp16_sizes else None,
        "bundle_gb_fp16_config": fp16_sizes[0][1] if fp16_sizes else None,
        "bundle_gb_int8": int8_sizes[0][0] if int8_sizes else None,
        "bundle_gb_int8_config": int8_sizes[0][1] if int8_sizes else None,
        # the full SD1.5 fp16 export (issue target); --only runs do not export it
        "export_s": report["exports"].get("fp16", {}).get("export_s"),
        "export_s_measures": report["exports"].get("fp16", {}).get("export_s_measures", EXPORT_REUSED),
        **{f"edit_s_int8_{n}_cores": v["edit_s"] for n, v in sorted(by_threads.items(), key=lambda kv: int(kv[0]))},
        **({"edit_s_int8_by_cores": by_threads} if by_threads else {}),
        "notes": "Random weights: PSNR figures are not quality figures. GB are 10^9 bytes (sizes and the worker's peak "
        "RSS, ru_maxrss). Runs marked separate_run come from a later --only run merged in (their own torch "
        "reference beside them); ratios use this report's reference.",
    }


def merge(report: dict, other: dict, labels=None) -> None:
    """Add ``other``'s configuration runs (a later ``--only`` run; ``labels``: only these) to
    ``report``; the summary's speed-ups stay against ``report``'s torch reference, the other run's
    is kept beside its runs."""
    ref = other["runs"].get("torch-reference", {})
    for label, run in other["runs"].items():
        if label == "torch-reference" or (labels and label not in labels):
            continue
        report["runs"][label] = {
            **run,
            "separate_run": {
                "started": other.get("started"),
                "torch_reference_edit_s": min((x["edit_s"] for x in ref.get("runs", [])), default=None),
            },
        }
    for name, exp in other[
        "exports"
    ].items():  # a bundle exported again (in that run or before it) replaces the earlier one's figures
        if (
            name not in report["exports"]
            or exp.get("export_s_measures") == EXPORT_TIMED
            or exp.get("timings") != report["exports"][name].get("timings")
        ):
            report["exports"][name] = exp
    report["summary"] = summarize(report)


def _chart(report: dict, path: Path) -> None:
    """A small bar chart of edit time and peak RSS per configuration (Pillow only)."""
    from PIL import Image, ImageDraw

    rows = [
        (k, min(x["edit_s"] for x in v["runs"]), v["peak_rss_gb"]) for k, v in report["runs"].items() if "runs" in v
    ]
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
