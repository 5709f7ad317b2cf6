"""fp8 (e4m3) GEMMs for the SD1.5 UNet's transformer linears on Hopper: time of one compiled
UNet call at the edit's shape (batch 2, 64×64 latents) and the fidelity of its output, against
the float16 UNet it replaces (issue 18: "try fp8 and keep it if it helps"). Random weights of the
full architecture; the activation scales are dynamic (computed in the graph per call), the
weight scales static:

- ``fp16``: the fast path's UNet as it runs today;
- ``fp8-tensor``: one scale per activation tensor and per weight (float16 output);
- ``fp8-row``: one scale per token row and per output channel (bfloat16 output, cast back).

Linears replaced: every ``nn.Linear`` inside the transformer blocks with widths that are
multiples of 16, except the cross-attention key/value projections (77-token text rows, too few
to gain). ``torch._scaled_mm`` is what both variants call.

    python benchmarks/fp8_unet.py --out DIR [--iters 30] [--variants fp16 fp8-row fp8-tensor]
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

E4M3_MAX = 448.0


def fp8_linear_class():
    import torch
    from torch import nn

    class Fp8Linear(nn.Module):
        def __init__(self, lin: nn.Linear, rowwise: bool):
            super().__init__()
            w = lin.weight.detach().float()
            amax = w.abs().amax(dim=1, keepdim=True) if rowwise else w.abs().amax()
            scale = (amax / E4M3_MAX).clamp(min=1e-12)
            self.register_buffer("w8", (w / scale).to(torch.float8_e4m3fn))  # (N, K) row-major
            self.register_buffer("w_scale", scale.reshape(1, -1) if rowwise else scale.reshape(()))
            self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
            self.rowwise, self.n = rowwise, w.shape[0]

        def forward(self, x):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            xf = x2.float()
            amax = xf.abs().amax(dim=1, keepdim=True) if self.rowwise else xf.abs().amax()
            a_scale = (amax / E4M3_MAX).clamp(min=1e-12)
            x8 = (xf / a_scale).to(torch.float8_e4m3fn)
            out_dt = torch.bfloat16 if self.rowwise else x.dtype
            y = torch._scaled_mm(
                x8,
                self.w8.t(),
                scale_a=a_scale if self.rowwise else a_scale.reshape(()),
                scale_b=self.w_scale,
                out_dtype=out_dt,
            )
            if self.bias is not None:
                y = y + self.bias.to(out_dt)
            return y.to(x.dtype).reshape(*shape[:-1], self.n)

    return Fp8Linear


def swap_linears(unet, rowwise: bool) -> int:
    from torch import nn

    cls = fp8_linear_class()
    swapped = 0
    for name, mod in list(unet.named_modules()):
        if "transformer_blocks" not in name:
            continue
        for child_name, child in list(mod.named_children()):
            full = f"{name}.{child_name}"
            if not isinstance(child, nn.Linear) or ".attn2.to_k" in full or ".attn2.to_v" in full:
                continue
            if child.in_features % 16 or child.out_features % 16:
                continue
            setattr(mod, child_name, cls(child, rowwise))
            swapped += 1
    return swapped


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--variants", nargs="+", default=["fp16", "fp8-row", "fp8-tensor"])
    args = ap.parse_args()
    import copy

    import torch
    from diffusers import UNet2DConditionModel

    from icd_edge.export.models import sd15_configs

    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    base = UNet2DConditionModel(**sd15_configs()["unet"]).eval()
    g = torch.Generator().manual_seed(1)
    feeds = [
        (
            torch.randn(2, 4, 64, 64, generator=g),
            torch.full((1,), float(t)),
            torch.randn(2, 77, 768, generator=g),
            torch.randn(2, 512, generator=g),
        )
        for t in (999, 499)
    ]
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    res: dict = {"env": env, "shape": "batch 2, 4x64x64 latents, 77x768 text", "variants": {}}
    ref32 = []
    with torch.inference_mode():
        u32 = copy.deepcopy(base).to(dev)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        for s, t, e, c in feeds:
            ref32.append(u32(s.to(dev), t.to(dev), e.to(dev), timestep_cond=c.to(dev), return_dict=False)[0].float())
        del u32
        torch.backends.cudnn.allow_tf32 = True
    ref16 = None
    for name in args.variants:
        unet = copy.deepcopy(base).to(dev, torch.float16, memory_format=torch.channels_last)
        row: dict = {}
        if name.startswith("fp8"):
            row["linears_fp8"] = swap_linears(unet, rowwise=name == "fp8-row")
            unet = unet.to(dev)
        fn = torch.compile(lambda s, t, e, c, u=unet: u(s, t, e, timestep_cond=c, return_dict=False)[0])
        dfeeds = [
            (
                s.to(dev, torch.float16).to(memory_format=torch.channels_last),
                t.to(dev),
                e.to(dev).half(),
                c.to(dev).half(),
            )
            for s, t, e, c in feeds
        ]
        with torch.inference_mode():
            try:
                t0 = time.perf_counter()
                outs = [fn(*f).float() for f in dfeeds]
                torch.cuda.synchronize()
            except Exception as exc:  # an unsupported _scaled_mm layout on this torch: recorded, not fatal
                row["error"] = repr(exc)[:2000]
                res["variants"][name] = row
                print(name, row["error"][:300], flush=True)
                continue
            row["first_call_s"] = round(time.perf_counter() - t0, 1)
            for _ in range(3):
                fn(*dfeeds[0])
            torch.cuda.synchronize()
            ms = []
            for _ in range(args.iters):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn(*dfeeds[0])
                b.record()
                torch.cuda.synchronize()
                ms.append(a.elapsed_time(b))
            row["median_ms"] = round(statistics.median(ms), 3)
            row["ms"] = [round(m, 3) for m in ms]

            def snr(ref, got):
                err = (ref - got).pow(2).mean()
                return round(float(10 * torch.log10(ref.pow(2).mean() / err.clamp(min=1e-30))), 2)

            row["snr_db_vs_fp32"] = [snr(r, o) for r, o in zip(ref32, outs)]
            if name == "fp16":
                ref16 = outs
            elif ref16 is not None:
                row["snr_db_vs_fp16"] = [snr(r, o) for r, o in zip(ref16, outs)]
        print(name, json.dumps({k: v for k, v in row.items() if k != "ms"}), flush=True)
        res["variants"][name] = row
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fp8_unet.json").write_text(json.dumps(res, indent=1))
        del unet, fn
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
