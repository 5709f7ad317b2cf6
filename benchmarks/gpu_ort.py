"""The onnxruntime CUDA path on one GPU (issue 17): ``bench_gpu.py --phase ort`` runs this.

Each configuration runs in a fresh process that imports no torch (the torch-free runtime as an
app embeds it): open the bundle, first edit (``first_edit_s``: open → first edit done, fused
graphs already in the cache), then ``--iters`` timed edits (invert + edit, 512 px 4+4, P2P +
local blend, the batch-2 edit graph), per-stage times, peak device memory of the process (NVML),
and the host copies of the step loop. One more process profiles the kernels of one edit with
torch.profiler around the onnxruntime calls. The torch fast path and the fp32 reference run
after, in the parent, on the same bundle's torch weights.

    python benchmarks/gpu_ort.py worker --bundle B --config all --out r.json --image img.npy
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EDIT = dict(cross_replace=0.4, self_replace=0.6, amplify={"dog": 2.0}, blend=("cat", "dog"), guidance=19.0, tau=0.8)
EDIT_XL = dict(guidance=19.0, tau=0.7)  # iCD-XL: prompt switch, as bench_gpu.py --model sdxl
SRC, TGT = "a photo of a cat", "a photo of a dog"
# name -> OrtOptions fields
CONFIGS = {
    # the untuned path: the CUDA provider as it comes (cuDNN's default search is exhaustive)
    "plain": dict(cuda_fusions="none", cuda_graph=False, cudnn_conv_algo_search="EXHAUSTIVE"),
    "attention": dict(cuda_fusions="attention", cuda_graph=True, cudnn_conv_algo_search="EXHAUSTIVE"),
    "all": dict(cuda_fusions="all", cuda_graph=True, cudnn_conv_algo_search="EXHAUSTIVE"),
    "all-nograph": dict(cuda_fusions="all", cuda_graph=False, cudnn_conv_algo_search="EXHAUSTIVE"),
    "all-heuristic": dict(cuda_fusions="all", cuda_graph=True, cudnn_conv_algo_search="HEURISTIC"),  # the default
    # provider options tried on top of the default: cuDNN's fused conv+bias, the provider's NHWC layout
    "all-convbias": dict(
        cuda_fusions="all",
        cuda_graph=True,
        cudnn_conv_algo_search="HEURISTIC",
        cuda_provider_options={"fuse_conv_bias": "1"},
    ),
    "all-prefer-nhwc": dict(
        cuda_fusions="all",
        cuda_graph=True,
        cudnn_conv_algo_search="HEURISTIC",
        cuda_provider_options={"prefer_nhwc": "1"},
    ),
}


def log(*a):
    print(*a, flush=True)


class PeakMemory:
    """This process's device memory (NVML), polled every 2 ms on a thread; ``peak_gib``."""

    def __init__(self):
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.peak = 0
        self.base = pynvml.nvmlDeviceGetMemoryInfo(self.handle).used
        self.device_peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()

    def _mine(self) -> int:
        pid = os.getpid()
        try:
            procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except Exception:
            return 0
        return sum(p.usedGpuMemory or 0 for p in procs if p.pid == pid)

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._mine())
            self.device_peak = max(self.device_peak, self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)
            time.sleep(0.002)

    def stop(self) -> dict:
        self._stop.set()
        self._t.join()
        return {
            "process_peak_gib": round(self.peak / 2**30, 3) if self.peak else None,
            "device_used_peak_minus_start_gib": round((self.device_peak - self.base) / 2**30, 3),
        }


def worker(args) -> int:
    import numpy as np

    if args.profile:
        import torch  # noqa: F401  (CUPTI for the kernel profile; loads the CUDA libraries first)
    from icd_edge import Editor
    from icd_edge.export.samples import sample_photo

    try:
        mem = PeakMemory()
    except Exception as exc:  # no NVML here (a CPU smoke run)
        log("no device memory figures:", exc)
        mem = None
    from icd_edge.bundle.store import open_bundle

    manifest = open_bundle(args.bundle, verify=False).manifest
    xl = manifest.family == "sdxl"
    img = sample_photo(manifest.image_hw)
    edit_kw = EDIT_XL if xl else EDIT
    fields = CONFIGS[args.config]
    res: dict = {"config": args.config, "options": fields, "family": manifest.family}
    t0 = time.perf_counter()
    ed = Editor.open(args.bundle, backend="onnxruntime", source_cache="off", verify=False, **fields)

    def edit():
        inv = ed.invert(img, SRC)
        return ed.edit(inv, TGT, output_type="np", **edit_kw)

    out = edit()
    res["first_edit_s"] = round(time.perf_counter() - t0, 2)
    sess = {g: ed.sessions.get(g) for g in ed.sessions.loaded()}
    res["providers"] = {g: s.providers[0] for g, s in sess.items()}
    res["cuda_graph"] = {g: s.cuda_graph for g, s in sess.items()}
    res["fused_ops"] = ed.backend.fused_ops
    if args.image:
        np.save(args.image, np.asarray(out, np.float32))
    if args.profile:
        res["profile"] = kernel_profile(edit)
    else:
        for _ in range(2):
            edit()
        walls = []
        for _ in range(args.iters):
            t = time.perf_counter()
            edit()
            walls.append((time.perf_counter() - t) * 1000)
        res["edit_ms"] = [round(w, 3) for w in walls]
        ed.profile = []
        inv = ed.invert(img, SRC)
        ed.edit(inv, TGT, output_type="np", **edit_kw)
        stages: dict = {}
        for stage, ms in ed.profile:
            stages.setdefault(stage, []).append(round(ms, 3))
        res["stages_ms"] = stages
        ed.profile = None
        res["host_copies_ms"] = host_copies(sess)
    res["memory"] = mem.stop() if mem else None  # the edit's editor alone, before the re-edit one opens
    if args.reedit and not xl:  # SDXL edits by prompt switch: no source cache
        res |= reedits(args.bundle, fields, img, args.iters)
    ed.close()
    Path(args.out).write_text(json.dumps(res, indent=1))
    log(json.dumps({k: v for k, v in res.items() if k not in ("edit_ms", "stages_ms", "profile")}))
    if "edit_ms" in res:
        log("edit ms median", statistics.median(res["edit_ms"]))
    return 0


def reedits(bundle, fields: dict, img, iters: int) -> dict:
    """Re-edits (issue 19) on this configuration: the source branch computed once by invert,
    then every edit of that inversion runs the target row alone (batch 1)."""
    from icd_edge import Editor

    out: dict = {}
    with Editor.open(bundle, backend="onnxruntime", source_cache="invert", verify=False, **fields) as ed:
        t = time.perf_counter()
        inv = ed.invert(img, SRC)
        out["reedit_invert_with_source_ms"] = round((time.perf_counter() - t) * 1000, 2)
        for _ in range(3):
            ed.edit(inv, TGT, output_type="np", **EDIT)
        walls = []
        for _ in range(iters):
            t = time.perf_counter()
            ed.edit(inv, TGT, output_type="np", **EDIT)
            walls.append((time.perf_counter() - t) * 1000)
        out["reedit_ms"] = [round(w, 3) for w in walls]
        out["reedit_graphs_captured"] = {g: ed.sessions.get(g).cuda_graph for g in ed.sessions.loaded()}
    return out


def host_copies(sessions: dict) -> dict:
    """Per graph: the time of one run's copies alone (feeds into the bound device buffers, outputs
    back), i.e. what keeping the step math on the host costs per run."""
    import numpy as np

    out = {}
    for g, s in sessions.items():
        b = getattr(s, "_binding", None)
        if b is None:
            continue
        feeds = {n: np.zeros(shape, dt) for n, (shape, dt) in b._inputs.items()}
        ts = []
        for _ in range(20):
            t = time.perf_counter()
            for n, arr in feeds.items():
                b._in[n].update_inplace(arr)
            for v in b._out.values():
                v.numpy()
            ts.append((time.perf_counter() - t) * 1000)
        out[g] = round(statistics.median(ts), 4)
    return out


def kernel_profile(edit) -> dict:
    """torch.profiler (CUPTI) around one onnxruntime edit: device time per kernel kind."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_gpu import kind_of

    edit()
    torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        edit()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t) * 1000
    per_kind: dict = {}
    kernels = []
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
        if not us or ev.key.startswith(("cuda", "Memcpy", "Memset")) and "kernel" not in ev.key.lower():
            continue
        k = kind_of(ev.key)
        per_kind[k] = per_kind.get(k, 0.0) + us / 1000
        kernels.append((us / 1000, ev.count, k, ev.key[:120]))
    kernels.sort(reverse=True)
    busy = sum(per_kind.values())
    return {
        "wall_ms_profiled": round(wall, 2),
        "kernel_ms": round(busy, 3),
        "kinds": {k: round(v, 3) for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"ms": round(ms, 3), "calls": c, "kind": k, "name": n} for ms, c, k, n in kernels[:30]],
    }


def run_configs(bundle: Path, configs: list[str], iters: int, work: Path, timeout: int = 240) -> dict:
    """Each configuration in a fresh process; then one profiling process of the first that ran."""
    import subprocess

    out: dict = {}
    for cfg in configs + ["profile"]:
        name = cfg
        argv = [sys.executable, __file__, "worker", "--bundle", str(bundle), "--iters", str(iters)]
        if cfg == "profile":
            ok = [c for c in configs if "edit_ms" in out.get(c, {})]
            if not ok:
                break
            cfg = min(ok, key=lambda c: statistics.median(out[c]["edit_ms"]))
            argv += ["--profile"]
        if cfg == "all-heuristic" and name != "profile":  # the default configuration: its re-edits too
            argv += ["--reedit"]
        argv += ["--config", cfg, "--out", str(work / f"ort_{name}.json"), "--image", str(work / f"ort_{name}.npy")]
        t = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        log(f"[{name}] rc={proc.returncode} {time.perf_counter() - t:.1f}s", proc.stdout[-1500:], proc.stderr[-3000:])
        if proc.returncode == 0:
            out[name] = json.loads((work / f"ort_{name}.json").read_text())
            out[name]["process_s"] = round(time.perf_counter() - t, 1)
        else:
            out[name] = {"error": proc.stderr[-3000:]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--bundle", type=Path, required=True)
    w.add_argument("--config", choices=list(CONFIGS), default="all")
    w.add_argument("--iters", type=int, default=20)
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--image", type=Path)
    w.add_argument("--profile", action="store_true")
    w.add_argument("--reedit", action="store_true", help="also time re-edits (source cache on)")
    args = ap.parse_args()
    return worker(args)


if __name__ == "__main__":
    sys.exit(main())
