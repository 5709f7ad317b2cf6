"""Where SDXL's float32 VAE spends its time on a GPU, and what each cheaper precision costs in
fidelity (issue 20: the VAE is 103 of the 267 ms of an iCD-XL edit). The SDXL VAE architecture
with random weights, encode (posterior mean) + decode of one 1024² photo, compiled as the fast
path compiles it (channels_last, torch.compile), in these variants:

- ``fp32-strict``: float32, TF32 off everywhere (the reference output);
- ``fp32``: float32 with cuDNN's TF32 convolutions (torch's default; what the fast path runs);
- ``fp32-tf32-attn``: that, with the mid-block attention as TF32 matmuls + softmax;
- ``fp32-bf16-attn``: float32 convolutions, the attention alone in bfloat16 (flash kernels);
- ``bf16``: the whole VAE in bfloat16 (float32's range, so no overflow);
- ``fp16``: the whole VAE in float16 (what an fp16-safe VAE would run; random weights do not overflow).

    python benchmarks/sdxl_vae.py --out DIR [--iters 10] [--variants ...]
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

VARIANTS = ("fp32-strict", "fp32", "fp32-tf32-attn", "fp32-bf16-attn", "bf16", "fp16")


def explicit_attention():
    """The product's :class:`CastAttnProcessor` in float32 with the attention written as two
    matmuls and a softmax (TF32 when allowed), instead of fused SDPA."""
    import torch

    from icd_edge.graphs.attention import CastAttnProcessor

    class Explicit(CastAttnProcessor):
        @staticmethod
        def attend(q, k, v, heads: int, scale: float):
            b, n, c = q.shape
            q, k, v = (t.view(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))
            o = torch.matmul((torch.matmul(q, k.transpose(-1, -2)) * scale).softmax(-1), v)
            return o.transpose(1, 2).reshape(b, n, c)

    return Explicit(torch.float32)


def kind(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("fmha", "flash", "attention", "sdpa")):
        return "attention"
    if any(s in n for s in ("conv", "xmma", "implicit", "nhwckrsc", "winograd", "dgrad", "fprop")):
        return "conv"
    if "gemm" in n or "cutlass" in n or "sm90_" in n or "ampere" in n:
        return "gemm"
    if "softmax" in n:
        return "softmax"
    if "triton" in n:
        return "triton"
    return "other"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--smoke", action="store_true", help="tiny VAE at 64² on the CPU, no compile: checks the script")
    args = ap.parse_args()
    import torch
    from diffusers import AutoencoderKL

    from icd_edge.export.models import sdxl_configs, tiny_configs
    from icd_edge.export.parity import psnr_db
    from icd_edge.export.samples import sample_photo

    dev = torch.device("cpu" if args.smoke else "cuda")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    base = AutoencoderKL(**(tiny_configs() if args.smoke else sdxl_configs())["vae"]).eval()
    hw = 64 if args.smoke else 1024
    photo = torch.from_numpy(sample_photo(hw)).permute(2, 0, 1)[None].float().div(127.5).sub(1.0).to(dev)
    env = {
        "gpu": torch.cuda.get_device_name() if not args.smoke else "cpu (smoke)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    res: dict = {"env": env, "sdxl_vae": {"variants": {}}}
    sync = torch.cuda.synchronize if not args.smoke else (lambda: None)
    ref = None
    for name in ["fp32-strict", *[v for v in args.variants if v != "fp32-strict"]]:
        import copy

        vae = copy.deepcopy(base)
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name, torch.float32)
        tf32_conv = name != "fp32-strict"
        tf32_mm = name == "fp32-tf32-attn"
        torch.backends.cudnn.allow_tf32 = tf32_conv
        torch.backends.cuda.matmul.allow_tf32 = tf32_mm
        if name == "fp32-bf16-attn":  # what FastOptions(vae_attention="bf16") installs
            from icd_edge.graphs.attention import cast_vae_attention

            cast_vae_attention(vae, torch.bfloat16)
        elif name == "fp32-tf32-attn":
            for mod in vae.modules():
                if type(mod).__name__ == "Attention":
                    mod.set_processor(explicit_attention())
        vae = vae.to(dev, dt, memory_format=torch.channels_last)

        def run(vae=vae, dt=dt):
            z = vae.quant_conv(vae.encoder(photo.to(dt)))[:, :4]
            return vae.decoder(vae.post_quant_conv(z)).float()

        fn = run if name == "fp32-strict" or args.smoke else torch.compile(run)
        row: dict = {}
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = fn()
            sync()
            row["first_call_s"] = round(time.perf_counter() - t0, 1)
            for _ in range(2):
                fn()
            ms = []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                fn()
                sync()
                ms.append((time.perf_counter() - t0) * 1000)  # the GPU is synchronised around: wall = GPU
            row["ms"] = [round(m, 3) for m in ms]
            row["median_ms"] = round(statistics.median(ms), 2)
            img = (out / 2 + 0.5).clamp(0, 1).cpu().numpy()
            if ref is None:
                ref = img
            else:
                row["psnr_db_vs_fp32_strict"] = round(psnr_db(ref, img, peak=1.0), 2)
            row["finite"] = bool(torch.isfinite(out).all())
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU if args.smoke else ProfilerActivity.CUDA]) as prof:
                fn()
                sync()
            kinds: dict = {}
            for e in prof.key_averages():
                t = (getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)) / 1000
                if t:
                    kinds[kind(e.key)] = round(kinds.get(kind(e.key), 0) + t, 3)
            row["kernel_ms_by_kind"] = kinds
            if not args.smoke:
                row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print(name, json.dumps({k: v for k, v in row.items() if k != "ms"}), flush=True)
        res["sdxl_vae"]["variants"][name] = row
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sdxl_vae.json").write_text(json.dumps(res, indent=1))
        del vae, fn
        if not args.smoke:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return 0


if __name__ == "__main__":
    sys.exit(main())
