"""Where the fast path's start goes before anything compiles (issue 18, first edit): opening the
bundle (sha256 of every file, or the verified stamps of an earlier open) and reading the torch
weights (``from_pretrained`` on the CPU then ``.to(device, dtype)``, as before, against
:func:`icd_edge.fast.weights.load_module`: meta-built modules, safetensors read straight to the
device in the run dtype). Every measure runs in a fresh process; both weight paths alternate.

    python benchmarks/fast_open.py BUNDLE [--device cuda] [--dtype fp16] [--repeats 2] --out FILE
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel
t_import = time.perf_counter() - t0
from icd_edge.bundle.store import open_bundle
what, root, device, dtype = sys.argv[1], sys.argv[2], sys.argv[3], getattr(torch, sys.argv[4])
t = time.perf_counter()
b = open_bundle(root, verify=what == "open")
res = {"import_s": round(t_import, 3), "open_s": round(time.perf_counter() - t, 3)}
if what != "open":
    parts = [(CLIPTextModel, "text_encoder"), (AutoencoderKL, "vae_encoder"),
             (UNet2DConditionModel, "unet_forward"), (UNet2DConditionModel, "unet_reverse")]
    t = time.perf_counter()
    for cls, g in parts:
        path = b.path(b.artifact(g, "torch").dir)
        if what == "pretrained":
            m = cls.from_pretrained(path, use_safetensors=True).to(device, dtype)
        else:
            from icd_edge.fast.weights import load_module
            m = load_module(cls, path, device, dtype)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    res["weights_s"] = round(time.perf_counter() - t, 3)
print(json.dumps(res))
"""


def child(what: str, args, env: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, what, str(args.bundle), args.device, args.torch_dtype],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode:
        raise SystemExit(f"{what} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.torch_dtype = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[args.dtype]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.bench_cpu_edit import machine

    size = sum(p.stat().st_size for p in args.bundle.rglob("*") if p.is_file())
    torch_size = sum(p.stat().st_size for p in (args.bundle / "torch").rglob("*") if p.is_file())
    runs: dict = {"open_hash": [], "open_stamped": [], "pretrained": [], "direct": []}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "ICD_EDGE_CACHE": cache}
        # warm the page cache once so that every measure reads from memory alike
        child("open", args, {**env, "ICD_EDGE_VERIFY": "full"})
        for _ in range(args.repeats):
            runs["open_hash"].append(child("open", args, {**env, "ICD_EDGE_VERIFY": "full"})["open_s"])
            runs["open_stamped"].append(child("open", args, env)["open_s"])
            for what in ("pretrained", "direct"):
                runs[what].append(child(what, args, env)["weights_s"])
                print(what, runs[what][-1], flush=True)
    med = {k: round(statistics.median(v), 3) for k, v in runs.items()}
    host = machine()
    gpu = None
    if args.device.startswith("cuda"):
        import torch

        gpu = torch.cuda.get_device_name()
    out = {
        "summary": {
            "machine": f"{host['cpu']} ({host.get('isa')}), {host['cores']} cores",
            "gpu": gpu,
            "device": args.device,
            "dtype": args.dtype,
            "bundle_gb": round(size / 1e9, 2),
            "torch_weights_gb": round(torch_size / 1e9, 2),
            "bundle_open_hash_s": med["open_hash"],
            "bundle_open_stamped_s": med["open_stamped"],
            "weights_from_pretrained_s": med["pretrained"],
            "weights_direct_s": med["direct"],
            "weights_speedup": round(med["pretrained"] / med["direct"], 2),
        },
        "runs": runs,
        "host": host,
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(out["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
