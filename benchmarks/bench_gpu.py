"""GPU benchmark of the fast torch path (issue 4): full SD1.5 architecture, random weights,
512 px, 4+4 edit with Prompt-to-Prompt and local blend, on one CUDA GPU.

Phases (each fits one device command):
  latency     fp32 eager reference image; eager fp16 edit (compile and CUDA graphs off) with
              per-stage CUDA-event times; fast edit (fp16, channels_last, fused-attention P2P,
              torch.compile, CUDA graphs) median of many; P2P overhead (edit UNet vs plain
              batch-2 UNet, both compiled + graphed); FLOP count and share of the compute floor.
  throughput  batched edits (N photos in one call): edits/s.
  host        issue 18 part 3: wall minus GPU time of one fast edit (PIL and float output) only.
  sdxl        iCD-XL (issue 20): full SDXL architecture, random weights, 1024 px, 4+4 prompt-switch edit:
              fp32 eager reference, eager fp16 edit, the fast edit (fp16 UNets, fp32 VAE, compile, one
              CUDA graph) median of many, PSNR vs the reference, peak device memory.
              (`--model sdxl` picks it.)
  reedit      re-edits (issue 19): the fast full edit and, in the same process, the source cache of
              one inversion and its re-edits (target rows only), one target and N targets a batch;
              PSNR vs the fp32 eager batch-2 edit; peak device memory; then edits and re-edits
              decoded by TAESD (edit_ms_taesd, reedit_ms_taesd; --skip-taesd leaves them out).
  firstedit   issue 18 parts 1-2 (`--bundle`, exported with --targets onnx,torch): `icd-edge prepare
              --fast` timed in its own process, then a fresh process timed from its start to its
              first edit done with that cache (and an empty Inductor folder: every kernel comes from
              the entry), its warm edits and the device memory of one edit.
Writes <out>/gpu_<phase>.json; `--merge A B` joins phase files into benchmarks/results/gpu.json.

    python benchmarks/bench_gpu.py --phase latency --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

EDIT = dict(cross_replace=0.4, self_replace=0.6, amplify={"dog": 2.0}, blend=("cat", "dog"), guidance=19.0, tau=0.8)
SRC, TGT = "a photo of a cat", "a photo of a dog"


def log(*a):
    print(*a, flush=True)


def build(work: Path, model: str = "random-sd15"):
    """Random modules of ``model`` + an in-memory bundle (manifest constants and tokenizers)."""
    from icd_edge.export.pipeline import memory_bundle

    t0 = time.perf_counter()
    src, bundle = memory_bundle(model, 0, work)
    log(f"built {model} in {time.perf_counter() - t0:.1f}s")
    return src, bundle


def synthetic(n: int):
    import numpy as np

    from icd_edge.export.samples import sample_photo

    base = sample_photo(512)
    return [np.roll(base, 37 * i, axis=1) for i in range(n)]


def cuda_ms(fn, iters: int, warmup: int = 2) -> list[float]:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        out.append(s.elapsed_time(e))
    return out


def wall_ms(fn, iters: int, warmup: int = 2) -> list[float]:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def peak_tflops() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    ms = statistics.median(cuda_ms(lambda: a @ b, 10, 3))
    return 2 * 8192**3 / (ms / 1000) / 1e12


def phase_latency(args, src, bundle) -> dict:
    import copy

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from icd_edge.export.parity import max_abs_err, psnr_db
    from icd_edge.fast.editor import FastEditor, FastOptions

    img = synthetic(1)[0]
    mods = [src.text_encoder, src.vae, src.unet_forward, src.unet_reverse]
    res = {}
    # fp32 eager reference (TF32 off): the ground truth for the fp16 paths
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref_ed = FastEditor(
        bundle,
        *copy.deepcopy(mods),
        FastOptions(dtype="float32", channels_last=False, compile=False, cuda_graphs=False),
    )
    ref = ref_ed.edit_image(img, SRC, TGT, output_type="np", **EDIT)
    res["reference_fp32_eager_ms"] = statistics.median(
        wall_ms(lambda: ref_ed.edit_image(img, SRC, TGT, output_type="np", **EDIT), 3, 1)  # noqa: F821 (del below)
    )
    del ref_ed
    torch.cuda.empty_cache()
    torch.backends.cudnn.allow_tf32 = True
    log("reference done", res)

    eager = FastEditor(bundle, *copy.deepcopy(mods), FastOptions(compile=False, cuda_graphs=False))
    run_eager = lambda: eager.edit_image(img, SRC, TGT, output_type="np", **EDIT)  # noqa: E731, F821 (del below)
    res["eager_ms"] = wall_ms(run_eager, args.iters_eager)
    eager.events = {}
    run_eager()
    torch.cuda.synchronize()
    res["eager_stages_ms"] = {k: round(sum(s.elapsed_time(e) for s, e in v), 3) for k, v in eager.events.items()}
    eager.events = None
    with FlopCounterMode(display=False) as fc:
        run_eager()
    res["flop_per_edit"] = fc.get_total_flops()
    res["flop_by_kind"] = flop_by_kind(fc)
    e_img = run_eager()
    res["eager_vs_ref"] = {"psnr_db": round(psnr_db(ref, e_img, peak=1.0), 2), "max_abs_err": max_abs_err(ref, e_img)}
    del eager
    torch.cuda.empty_cache()
    log("eager done", {k: v for k, v in res.items() if k != "eager_ms"})

    fast = FastEditor(bundle, *mods, FastOptions(compile_mode=args.compile_mode))
    t0 = time.perf_counter()
    f_img = fast.edit_image(img, SRC, TGT, output_type="np", **EDIT)
    res["fast_first_call_s"] = round(time.perf_counter() - t0, 1)  # compile + capture
    res["fast_vs_ref"] = {"psnr_db": round(psnr_db(ref, f_img, peak=1.0), 2), "max_abs_err": max_abs_err(ref, f_img)}
    run_fast = lambda: fast.edit_image(img, SRC, TGT, output_type="np", **EDIT)  # noqa: E731
    res["fast_ms"] = wall_ms(run_fast, args.iters)
    # GPU-only time of the two graph replays (no host preparation)
    ed_b = fast._buffers[("edit", 1)]
    g_inv = fast._graphs[("invert", 1)]
    g_ed = next(g for key, g in fast._graphs.items() if key[0] != "invert")
    res["edit_step_flags"] = [list(f) for f in ed_b["flags"]]
    res["fast_gpu_ms"] = cuda_ms(lambda: (g_inv.replay(), g_ed.replay()), args.iters)
    res["fast_invert_gpu_ms"] = statistics.median(cuda_ms(g_inv.replay, args.iters))
    res["fast_edit_gpu_ms"] = statistics.median(cuda_ms(g_ed.replay, args.iters))
    log("fast done", res["fast_first_call_s"], statistics.median(res["fast_ms"]))

    # P2P overhead: compiled + graphed single UNet calls, edit (P2P) vs plain, batch 2
    with torch.inference_mode():
        x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
        t = torch.full((1,), 779.0, device="cuda")
        text = torch.randn(2, 77, 768, device="cuda", dtype=torch.float16)
        cond = ed_b["cond"][1]
        ctl = [ed_b[k] for k in ("token_map", "refine_alpha", "equalizer")] + [
            ed_b["cross_alpha"][0],
            ed_b["self_flag"][0],
        ]

        graph_of = _graph_of
        g_edit = graph_of(lambda: fast.unet_e_c(x, t, text, cond, *ctl, True, True))
        g_edit_off = graph_of(lambda: fast.unet_e_c(x, t, text, cond, *ctl, False, False))
        g_plain = graph_of(lambda: fast.unet_r_c(x, t, text, cond))
        g_fwd = graph_of(lambda: fast.unet_f_c(x[:1], t, text[:1], cond[:1]))
        res["unet_edit_b2_ms"] = statistics.median(cuda_ms(g_edit.replay, 50, 5))  # cross edit + injection on
        res["unet_edit_b2_controls_off_ms"] = statistics.median(cuda_ms(g_edit_off.replay, 50, 5))  # blend maps only
        res["unet_plain_b2_ms"] = statistics.median(cuda_ms(g_plain.replay, 50, 5))
        res["unet_b1_ms"] = statistics.median(cuda_ms(g_fwd.replay, 50, 5))
    res["peak_fp16_tflops"] = round(peak_tflops(), 1)
    try:
        res["profile"] = profile_edit(g_inv, g_ed, res["peak_fp16_tflops"], res["flop_by_kind"])
    except Exception as exc:  # the profile explains; it must not lose the timings above
        res["profile"] = {"error": f"{type(exc).__name__}: {exc}"}
    return res


KINDS = (  # kernel name fragments → kind (first match wins)
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("conv", ("fprop", "conv", "implicit", "dgrad", "wgrad")),
    ("gemm", ("gemm", "nvjet", "cutlass", "sm90_", "sm80_", "ampere_", "cublas")),
    ("triton_reduction", ("triton_red", "triton_per")),
    ("triton_pointwise", ("triton_poi", "triton_")),
    ("copy", ("memcpy", "memset", "copy")),
)
FLOP_KINDS = {
    "convolution": "conv",
    "mm": "gemm",
    "addmm": "gemm",
    "bmm": "gemm",
    "baddbmm": "gemm",
    "_scaled_dot_product_flash_attention": "attention",
    "_scaled_dot_product_efficient_attention": "attention",
    "_scaled_dot_product_cudnn_attention": "attention",
}


REEDIT_TARGETS = ["a photo of a dog", "a photo of a big dog", "a photo of a dog in a hat", "a painting of a dog"]


def phase_reedit(args, src, bundle) -> dict:
    import copy

    import torch

    from icd_edge.export.parity import psnr_db
    from icd_edge.fast.editor import FastEditor, FastOptions

    img = synthetic(1)[0]
    mods = [src.text_encoder, src.vae, src.unet_forward, src.unet_reverse]
    res: dict = {}

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}

    def save():  # partial results survive a command killed at its time limit
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_reedit.partial.json").write_text(json.dumps({"env": env, "reedit": res}, indent=1))

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    eager32 = FastOptions(dtype="float32", channels_last=False, compile=False, cuda_graphs=False)
    ref_ed = FastEditor(bundle, *copy.deepcopy(mods), eager32)
    ref = ref_ed.edit_image(img, SRC, TGT, output_type="np", **EDIT)  # the batch-2 edit, fp32 eager
    del ref_ed
    torch.cuda.empty_cache()
    torch.backends.cudnn.allow_tf32 = True

    fast = FastEditor(bundle, *mods, FastOptions(compile_mode=args.compile_mode))
    full = None
    if not args.skip_full:  # the full edit of the same run, for the side-by-side ratio
        t0 = time.perf_counter()
        full = fast.edit_image(img, SRC, TGT, output_type="np", **EDIT)
        res["fast_first_call_s"] = round(time.perf_counter() - t0, 1)
        res["fast_vs_ref_psnr_db"] = round(psnr_db(ref, full, peak=1.0), 2)
        res["fast_ms"] = wall_ms(lambda: fast.edit_image(img, SRC, TGT, output_type="np", **EDIT), args.iters)
        log("full edit", res["fast_first_call_s"], statistics.median(res["fast_ms"]))
        save()
        # issue 18's host overhead in the same process: wall minus GPU, then where the host time goes
        try:
            res["host"] = host_timings(fast, img, args.iters)
            res["host"]["split"] = host_split(fast, img, args.iters)
            log("host", res["host"]["host_overhead_ms_np"], res["host"]["split"]["median_ms"])
        except Exception as exc:  # a diagnostic: the re-edit figures below still matter
            res["host_error"] = repr(exc)
        save()

    lat = fast.invert_batch([img], [SRC], [0])
    t0 = time.perf_counter()
    source = fast.source_cache(lat, SRC)
    torch.cuda.synchronize()
    res["source_first_call_s"] = round(time.perf_counter() - t0, 1)
    res["source_ms"] = wall_ms(lambda: fast.source_cache(lat, SRC), args.iters)
    res["source_cache_mib"] = {**source.size_report(), "held_mib": round(source.nbytes / 2**20, 1)}
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    one = fast.reedit_batch(lat, source, SRC, [TGT], **EDIT)
    res["reedit_first_call_s"] = round(time.perf_counter() - t0, 1)
    res["reedit_vs_ref_psnr_db"] = round(psnr_db(ref, one[0], peak=1.0), 2)
    if full is not None:
        res["reedit_vs_fast_edit_psnr_db"] = round(psnr_db(full, one[0], peak=1.0), 2)
    res["reedit_ms"] = wall_ms(lambda: fast.reedit_batch(lat, source, SRC, [TGT], **EDIT), args.iters)
    g = next(g for key, g in fast._graphs.items() if key[0][0] == "reedit" and key[1] == 1)
    res["reedit_gpu_ms"] = cuda_ms(g.replay, args.iters)
    res["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    res["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    log("re-edit", res["reedit_first_call_s"], statistics.median(res["reedit_ms"]), res["reedit_vs_ref_psnr_db"])
    save()

    n = len(REEDIT_TARGETS)
    t0 = time.perf_counter()
    many = fast.reedit_batch(lat, source, SRC, REEDIT_TARGETS, **EDIT)
    res[f"reedit_batch{n}_first_call_s"] = round(time.perf_counter() - t0, 1)
    res[f"reedit_batch{n}_row0_vs_ref_psnr_db"] = round(psnr_db(ref, many[0], peak=1.0), 2)  # row 0 is TGT
    res[f"reedit_batch{n}_ms"] = wall_ms(lambda: fast.reedit_batch(lat, source, SRC, REEDIT_TARGETS, **EDIT), 10)
    log("batch", n, statistics.median(res[f"reedit_batch{n}_ms"]))
    save()
    if not args.skip_taesd:  # the same edits decoded by TAESD (its architecture, random weights)
        from icd_edge.export.taesd import load_taesd

        opts = FastOptions(compile_mode=args.compile_mode, decoder="taesd")
        tiny = FastEditor(bundle, *mods, opts, taesd=load_taesd("random", seed=0))
        run = lambda: tiny.edit_image(img, SRC, TGT, output_type="np", **EDIT)  # noqa: E731
        t0 = time.perf_counter()
        run()
        res["taesd_first_call_s"] = round(time.perf_counter() - t0, 1)
        res["edit_ms_taesd"] = wall_ms(run, args.iters)
        lat_t = tiny.invert_batch([img], [SRC], [0])
        source_t = tiny.source_cache(lat_t, SRC)
        res["reedit_ms_taesd"] = wall_ms(lambda: tiny.reedit_batch(lat_t, source_t, SRC, [TGT], **EDIT), args.iters)
        log("taesd", statistics.median(res["edit_ms_taesd"]), statistics.median(res["reedit_ms_taesd"]))
        save()
    return res


def phase_sdxl(args, src, bundle) -> dict:
    import copy
    import gc

    import torch

    from icd_edge.export.samples import sample_photo
    from icd_edge.fast.editor import FastOptions
    from icd_edge.fast.xl import FastXLEditor

    img = sample_photo(bundle.manifest.image_hw)
    mods = [src.text_encoder, src.text_encoder_2, src.vae, src.unet_forward, src.unet_reverse]
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    res: dict = {"steps": [len(bundle.manifest.schedule.forward), len(bundle.manifest.schedule.reverse)]}
    edit = dict(guidance=19.0, tau=0.7)
    steps = set(args.sdxl_steps)

    def save():  # partial results survive a command killed at its time limit
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_sdxl.partial.json").write_text(json.dumps({"env": env, "sdxl": res}, indent=1))

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    eager32 = FastOptions(dtype="float32", channels_last=False, compile=False, cuda_graphs=False)
    ref_ed = FastXLEditor(bundle, *copy.deepcopy(mods), eager32)
    ref = ref_ed.edit_image(img, SRC, TGT, output_type="np", **edit)
    res["reference_fp32_eager_ms"] = wall_ms(lambda: ref_ed.edit_image(img, SRC, TGT, **edit), 2, warmup=0)
    ref_ed = None  # its fp32 copies leave the device before the next editor loads
    gc.collect()
    torch.cuda.empty_cache()
    torch.backends.cudnn.allow_tf32 = True
    log("fp32 reference", statistics.median(res["reference_fp32_eager_ms"]))
    save()
    if "eager" in steps:
        eager_step(res, bundle, mods, ref, img, edit, args)
        log("eager fp16", statistics.median(res["eager_ms"]))
        save()
    if "fast" not in steps:  # the variants are compared with the default fast edit of the same run
        return res
    return sdxl_fast(args, res, bundle, mods, ref, img, edit, steps, save)


def eager_step(res, bundle, mods, ref, img, edit, args):
    import copy
    import gc

    import torch

    from icd_edge.export.parity import psnr_db
    from icd_edge.fast.editor import FastOptions
    from icd_edge.fast.xl import FastXLEditor

    eager = FastXLEditor(bundle, *copy.deepcopy(mods), FastOptions(compile=False, cuda_graphs=False))
    res["eager_ms"] = wall_ms(lambda: eager.edit_image(img, SRC, TGT, **edit), args.iters_eager)
    eager_img = eager.edit_image(img, SRC, TGT, output_type="np", **edit)
    res["eager_vs_ref_psnr_db"] = round(psnr_db(ref, eager_img, peak=1.0), 2)
    eager = None
    gc.collect()
    torch.cuda.empty_cache()


def sdxl_variant(args, res, bundle, mods, ref, img, edit, name, options):
    """One opt-in FastOptions variant of the compiled SDXL edit: first call, PSNR against the fp32
    reference, wall and graph-replay ms (keys ``{name}_...``); the editor is freed afterwards."""
    import gc

    import torch

    from icd_edge.export.parity import psnr_db
    from icd_edge.fast.xl import FastXLEditor

    ed = FastXLEditor(bundle, *mods, options)
    t0 = time.perf_counter()
    got = ed.edit_image(img, SRC, TGT, output_type="np", **edit)
    res[f"{name}_first_call_s"] = round(time.perf_counter() - t0, 1)
    res[f"{name}_vs_ref_psnr_db"] = round(psnr_db(ref, got, peak=1.0), 2)
    res[f"{name}_ms"] = wall_ms(lambda: ed.edit_image(img, SRC, TGT, **edit), args.iters)
    (graph,) = ed._graphs.values()
    res[f"{name}_gpu_ms"] = cuda_ms(graph.replay, args.iters)
    log(name, statistics.median(res[f"{name}_ms"]), "gpu", statistics.median(res[f"{name}_gpu_ms"]))
    graph = ed = None
    gc.collect()
    torch.cuda.empty_cache()


def sdxl_fast(args, res, bundle, mods, ref, img, edit, steps, save) -> dict:
    import copy
    import gc

    import torch

    from icd_edge.export.parity import psnr_db
    from icd_edge.fast.editor import FastOptions
    from icd_edge.fast.xl import FastXLEditor

    torch.cuda.reset_peak_memory_stats()
    fast = FastXLEditor(bundle, *mods, FastOptions(compile_mode=args.compile_mode))
    t0 = time.perf_counter()
    got = fast.edit_image(img, SRC, TGT, output_type="np", **edit)
    res["fast_first_call_s"] = round(time.perf_counter() - t0, 1)
    res["fast_vs_ref_psnr_db"] = round(psnr_db(ref, got, peak=1.0), 2)
    log("fast first call", res["fast_first_call_s"], "s, vs ref", res["fast_vs_ref_psnr_db"], "dB")
    save()
    res["fast_ms"] = wall_ms(lambda: fast.edit_image(img, SRC, TGT, **edit), args.iters)
    (graph,) = fast._graphs.values()
    res["fast_gpu_ms"] = cuda_ms(graph.replay, args.iters)
    graph = None
    res["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    res["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    log("fast", statistics.median(res["fast_ms"]), "gpu", statistics.median(res["fast_gpu_ms"]))
    save()
    # where the GPU time goes: the compiled parts alone, with the edit's shapes and layouts
    h, cl, dt, dev = fast.h, fast._mf, fast.dt, fast.dev
    with torch.inference_mode():
        sample = torch.randn(1, 4, h, h, device=dev).to(dt, memory_format=cl)
        args_u = (
            sample,
            torch.full((1,), 499.0, device=dev),
            torch.randn(1, 77, bundle.dims["D"], device=dev, dtype=dt),
            torch.randn(1, 512, device=dev, dtype=dt),
            torch.randn(1, bundle.dims["P"], device=dev, dtype=dt),
            torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]], device=dev, dtype=dt),
        )
        lat = torch.randn(1, 4, h, h, device=dev).to(memory_format=cl)
        u8 = torch.zeros(1, 8 * h, 8 * h, 3, dtype=torch.uint8, device=dev)
        pix = u8.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        res["part_ms"] = {
            "unet": statistics.median(cuda_ms(lambda: fast.unet_r_c(*args_u), 10)),
            "vae_encoder": statistics.median(cuda_ms(lambda: fast.vae_enc_c(pix), 5)),
            "vae_decoder": statistics.median(cuda_ms(lambda: fast.vae_dec_c(lat), 5)),
        }
    log("parts", res["part_ms"])
    save()
    fast = None  # the variants below compile their own editors
    gc.collect()
    torch.cuda.empty_cache()
    for step, attn in (("bf16-attn", "bf16"), ("fp32-attn", "fp32")):  # the VAE's attention pinned (the
        # default "auto" is bf16 on CUDA); it swaps the VAE's processors in place: on a copy
        if step in steps:
            variant = FastOptions(compile_mode=args.compile_mode, vae_attention=attn)
            sdxl_variant(args, res, bundle, copy.deepcopy(mods), ref, img, edit, f"{attn}_vae_attn", variant)
            save()
    if "fp16-vae" in steps:
        # the opt-in deviation: an fp16-safe VAE (--vae at export) lets the VAE run in float16; the same
        # random weights stand in for it here (the UNets recompile, mostly from inductor's cache)
        variant = FastOptions(compile_mode=args.compile_mode, vae_dtype="fp16")
        sdxl_variant(args, res, bundle, mods, ref, img, edit, "fp16_vae", variant)
        save()
    return res


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for k, frags in KINDS if any(f in low for f in frags)), "other")


def flop_by_kind(fc) -> dict:
    """FLOPs per kernel kind (conv / gemm / attention) from a FlopCounterMode."""
    out: dict = {}
    for op, n in fc.get_flop_counts().get("Global", {}).items():
        name = str(op).split(".")[1] if "." in str(op) else str(op)
        k = FLOP_KINDS.get(name, "other")
        out[k] = out.get(k, 0) + n
    return out


def profile_edit(g_inv, g_ed, peak: float, flops: dict) -> dict:
    """Kernel-level profile of one fast edit (both CUDA-graph replays): time per kernel kind,
    achieved TFLOP/s per kind against the FLOPs counted on the eager path, GPU idle share, top kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g_inv.replay()
        g_ed.replay()
        e.record()
        torch.cuda.synchronize()
    span_ms = s.elapsed_time(e)
    per_kind: dict = {}
    kernels = []
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None)
        if us is None:
            us = getattr(ev, "self_cuda_time_total", 0)
        if not us or ev.key.startswith(("cudaGraph", "cudaEvent", "cudaDevice", "cudaStream")):
            continue
        k = kind_of(ev.key)
        per_kind[k] = per_kind.get(k, 0.0) + us / 1000
        kernels.append((us / 1000, ev.count, k, ev.key[:120]))
    busy = sum(per_kind.values())
    kinds = {}
    for k, ms in sorted(per_kind.items(), key=lambda kv: -kv[1]):
        row = {"ms": round(ms, 3), "share": round(ms / busy, 3) if busy else None}
        if flops.get(k):
            row["tflop"] = round(flops[k] / 1e12, 3)
            row["tflop_per_s"] = round(flops[k] / 1e12 / (ms / 1000), 1)
            row["pct_of_peak"] = round(100 * flops[k] / 1e12 / (ms / 1000) / peak, 1)
            row["floor_ms"] = round(flops[k] / (peak * 1e12) * 1000, 3)
        kinds[k] = row
    kernels.sort(reverse=True)
    return {
        "span_ms": round(span_ms, 3),
        "kernel_ms": round(busy, 3),
        "idle_share": round(1 - busy / span_ms, 3) if span_ms else None,
        "kinds": kinds,
        "top_kernels": [{"ms": round(ms, 3), "calls": c, "kind": k, "name": n} for ms, c, k, n in kernels[:25]],
    }


def phase_knobs(args, src, bundle) -> dict:
    """Compiler settings A/B on one forward UNet call (batch 1, CUDA graph replay)."""
    import torch
    import torch._inductor.config as ic

    from icd_edge.graphs.wrappers import UNetGraph

    torch.backends.cudnn.benchmark = True
    unet = UNetGraph(src.unet_forward.to("cuda", torch.float16, memory_format=torch.channels_last)).eval()
    x = torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    t = torch.full((1,), 779.0, device="cuda")
    text = torch.randn(1, 77, 768, device="cuda", dtype=torch.float16)
    w = torch.randn(1, 512, device="cuda", dtype=torch.float16)
    configs = {
        "default": ({}, None),
        "conv1x1_mm+coord_descent": (
            {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "epilogue_fusion": False},
            None,
        ),
        "max-autotune-no-cudagraphs": ({}, "max-autotune-no-cudagraphs"),
    }
    res = {}
    for name in args.knobs:
        flags, mode = configs[name]
        torch._dynamo.reset()
        saved = {k: getattr(ic, k) for k in flags}
        for k, v in flags.items():
            setattr(ic, k, v)
        try:
            f = torch.compile(unet, mode=mode)
            t0 = time.perf_counter()
            with torch.inference_mode():
                f(x, t, text, w)
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - t0
                g = _graph_of(lambda: f(x, t, text, w))
                res[name] = {
                    "unet_b1_ms": round(statistics.median(cuda_ms(g.replay, 50, 5)), 3),
                    "compile_s": round(compile_s, 1),
                }
        except Exception as exc:
            res[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        finally:
            for k, v in saved.items():
                setattr(ic, k, v)
        log("knob", name, res[name])
    return res


def _graph_of(fn):
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def phase_host(args, src, bundle) -> dict:
    """Issue 18 part 3: wall minus GPU time of one fast SD1.5 edit (PIL and float output), nothing else."""
    import torch

    from icd_edge.fast.editor import FastEditor, FastOptions

    img = synthetic(1)[0]
    res: dict = {}
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    torch.backends.cudnn.allow_tf32 = True
    fast = FastEditor(bundle, src.text_encoder, src.vae, src.unet_forward, src.unet_reverse, FastOptions())
    t0 = time.perf_counter()
    fast.edit_image(img, SRC, TGT, **EDIT)
    res["fast_first_call_s"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_host.partial.json").write_text(json.dumps({"env": env, "host": res}, indent=1))
    res |= host_timings(fast, img, args.iters)
    res["split"] = host_split(fast, img, args.iters)
    log("host", res["host_overhead_ms_pil"], res["host_overhead_ms_np"], "gpu", statistics.median(res["fast_gpu_ms"]))
    log("split", res["split"]["median_ms"])
    return res


def host_timings(fast, img, iters: int) -> dict:
    """Wall time of a compiled fast edit (PIL and float output), the GPU time of its two graph
    replays, and their difference: the host overhead."""
    res = {
        "fast_ms_pil": wall_ms(lambda: fast.edit_image(img, SRC, TGT, **EDIT), iters),
        "fast_ms_np": wall_ms(lambda: fast.edit_image(img, SRC, TGT, output_type="np", **EDIT), iters),
    }
    g_inv = fast._graphs[("invert", 1)]
    g_ed = next(g for key, g in fast._graphs.items() if key[0] != "invert")
    res["fast_gpu_ms"] = cuda_ms(lambda: (g_inv.replay(), g_ed.replay()), iters)
    gpu = statistics.median(res["fast_gpu_ms"])
    res["host_overhead_ms_pil"] = round(statistics.median(res["fast_ms_pil"]) - gpu, 2)
    res["host_overhead_ms_np"] = round(statistics.median(res["fast_ms_np"]) - gpu, 2)
    return res


def host_split(fast, img, iters: int) -> dict:
    """One fast edit taken apart (the steps of ``edit_image``, in its order): host time of each
    step (perf_counter) and the GPU's view (CUDA events recorded between the steps; the GPU is
    idle at the first one, so its clock starts with the host's). Medians over ``iters``."""
    import torch

    keys = ("prepare", "stage_invert", "launch_invert", "stage_edit", "launch_edit", "fetch")
    gpu_keys = ("gpu_wait_before_invert", "invert_gpu", "gpu_gap_between", "edit_gpu")
    rows = {k: [] for k in (*keys, *gpu_keys, "wall", "after_gpu")}
    with torch.inference_mode():
        for _ in range(iters + 2):
            torch.cuda.synchronize()
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
            t = [time.perf_counter()]
            ev[0].record()
            inv = fast._prepare_invert([img], [SRC], [0], "torch")
            arrays, flags = fast._prepare_edit(1, [SRC], [TGT], **EDIT)
            t.append(time.perf_counter())
            b = fast._buffers_for("invert", 1)
            fast._stage_in(b, inv)
            t.append(time.perf_counter())
            ev[1].record()
            fast._launch("invert", 1, fast._invert_fn, b)
            ev[2].record()
            t.append(time.perf_counter())
            be = fast._buffers_for("edit", 1)
            be["latent"].copy_(b["latent"])
            fast._stage_in(be, arrays)
            be["flags"] = flags
            t.append(time.perf_counter())
            ev[3].record()
            fast._launch(("edit", flags), 1, fast._edit_fn, be)
            ev[4].record()
            t.append(time.perf_counter())
            fast._fetch(be, "np")
            t.append(time.perf_counter())
            torch.cuda.synchronize()
            for i, k in enumerate(keys):
                rows[k].append((t[i + 1] - t[i]) * 1000)
            for i, k in enumerate(gpu_keys):
                rows[k].append(ev[i].elapsed_time(ev[i + 1]))
            rows["wall"].append((t[-1] - t[0]) * 1000)
            rows["after_gpu"].append(rows["wall"][-1] - ev[0].elapsed_time(ev[4]))
    rows = {k: v[2:] for k, v in rows.items()}
    return {"median_ms": {k: round(statistics.median(v), 3) for k, v in rows.items()}, "ms": rows}


FIRST_EDIT = """
import time
t0 = time.perf_counter()
import json, statistics, sys
import torch, diffusers, transformers
t_import = time.perf_counter() - t0
from icd_edge.export.samples import sample_photo
from icd_edge.fast.editor import FastEditor
EDIT = json.loads(sys.argv[2])
f = FastEditor.from_bundle(sys.argv[1], **json.loads(sys.argv[4]))
t_open = time.perf_counter() - t0
img = sample_photo(f.c.image_hw)
run = lambda: f.edit_image(img, "a photo of a cat", "a photo of a dog", output_type="np", **EDIT)
t = time.perf_counter()
f.invert_batch([img], ["a photo of a cat"], [0])
torch.cuda.synchronize()
t_invert = time.perf_counter() - t
run()
torch.cuda.synchronize()
first = time.perf_counter() - t0
walls = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter()
    run()
    torch.cuda.synchronize()
    walls.append((time.perf_counter() - t) * 1000)
weights = torch.cuda.memory_allocated()
torch.cuda.reset_peak_memory_stats()
run()
torch.cuda.synchronize()
print(json.dumps({
    "loaded": f.compile_cache_loaded, "import_s": round(t_import, 2), "open_s": round(t_open, 2),
    "startup": f.startup, "aot_graphs": len(f._aot.models) if f._aot is not None else None,
    "aot_missed": sorted(g for g, _ in f._aot.missed) if f._aot is not None else None,
    "first_invert_s": round(t_invert, 2), "first_edit_s": round(first, 2),
    "edit_ms": [round(w, 3) for w in walls],
    "allocated_between_edits_gib": round(weights / 2**30, 3),
    "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
    "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
}))
"""


def phase_firstedit(args, src=None, bundle=None) -> dict:
    """Issue 18: build the compile cache of ``--bundle`` with the CLI, then time a fresh process
    from its start to its first edit done (cache loaded, Inductor's own folder empty)."""
    import os
    import subprocess

    work = args.ort_work / "firstedit"
    env = {**os.environ, "ICD_EDGE_CACHE": str(work / "cache")}
    res: dict = {"bundle": str(args.bundle)}

    def timed(cmd, inductor: str) -> tuple[float, str]:
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**env, "TORCHINDUCTOR_CACHE_DIR": str(work / inductor)}
        )
        if proc.returncode:
            raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}): {proc.stderr[-3000:]}")
        return round(time.perf_counter() - t0, 1), proc.stdout

    # prepare verifies the bundle as a user's would, so the fresh processes find its hash record
    prep = [sys.executable, "-m", "icd_edge", "prepare", str(args.bundle), "--fast", "--json"]
    if not args.skip_full:
        res["prepare_s"], out = timed(prep, "i1")
        res["prepare"] = json.loads(out.strip().splitlines()[-1])
        log("prepare --fast", res["prepare_s"])
    if args.firstedit_aot:  # AOTInductor packages: their own entry, then fresh processes opened with aot=True
        res["prepare_aot_s"], out = timed([*prep, "--aot"], "i_aot")
        res["prepare_aot"] = json.loads(out.strip().splitlines()[-1])
        log("prepare --fast --aot", res["prepare_aot_s"])
    # two fresh processes (the spread); --firstedit-cudnn adds one without cuDNN's per-shape
    # algorithm timing, to see its share of the first edit (same cache entry; if Inductor keys
    # its kernels on that flag too, that process compiles: minutes)
    variants = [("fresh_0", {}), ("fresh_1", {})]
    if args.firstedit_cudnn:
        variants.append(("fresh_no_cudnn_benchmark", {"cudnn_benchmark": False}))
    if args.firstedit_aot:
        variants += [("fresh_aot_0", {"aot": True}), ("fresh_aot_1", {"aot": True})]
    for n, (name, opts) in enumerate(variants):
        seconds, out = timed(
            [sys.executable, "-c", FIRST_EDIT, str(args.bundle), json.dumps(EDIT), str(args.iters), json.dumps(opts)],
            f"fresh{n}",
        )
        run = json.loads(out.strip().splitlines()[-1])
        run["process_s"] = seconds
        res[name] = run
        log(name, run["first_edit_s"], statistics.median(run["edit_ms"]), run["peak_allocated_gib"])
    return res


def phase_ort(args, src=None, bundle=None) -> dict:
    """Issue 17: the onnxruntime CUDA path of an exported fp16 bundle (``--bundle``, exported with
    ``--targets onnx,torch``; its fused graphs prepared with ``icd-edge prepare``), each
    configuration in a fresh torch-free process (benchmarks/gpu_ort.py), then in this process the
    fp32 eager reference and the compiled torch fast path on the same bundle's torch weights.

    ``--ort-steps`` picks steps (configs, ref, fast) so that one lease can run them in two
    commands; results accumulate in ``--ort-work`` (kept between commands on one machine)."""
    import numpy as np
    import torch
    from gpu_ort import run_configs

    from icd_edge.export.parity import psnr_db
    from icd_edge.fast.editor import FastEditor

    work = args.ort_work
    work.mkdir(parents=True, exist_ok=True)
    store = work / "result.json"
    res: dict = json.loads(store.read_text()) if store.is_file() else {"bundle": str(args.bundle)}
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    args.out.mkdir(parents=True, exist_ok=True)

    def save():  # partial results survive a command killed at its time limit
        store.write_text(json.dumps(res, indent=1))
        (args.out / "gpu_ort.partial.json").write_text(json.dumps({"env": env, "ort": res}, indent=1))

    steps = set(args.ort_steps)
    if "configs" in steps:
        res["configs"] = run_configs(args.bundle, args.ort_configs, args.iters, work)
        save()
    from icd_edge.bundle.store import open_bundle

    if open_bundle(args.bundle, verify=False).manifest.family == "sdxl":
        # the torch side of SDXL is bench_gpu.py --model sdxl (its own build of the same architecture)
        log("SDXL bundle: onnxruntime configurations only; the fp32 reference and fast path are the sdxl phase")
        return res
    img = synthetic(1)[0]
    if "ref" in steps or "fast" in steps:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        ref_ed = FastEditor.from_bundle(
            args.bundle, dtype="float32", channels_last=False, compile=False, cuda_graphs=False
        )
        ref = ref_ed.edit_image(img, SRC, TGT, output_type="np", **EDIT)
        del ref_ed
        torch.cuda.empty_cache()
        torch.backends.cudnn.allow_tf32 = True
        for name in res.get("configs", {}):
            f = work / f"ort_{name}.npy"
            if f.is_file():
                res["configs"][name]["vs_ref_psnr_db"] = round(psnr_db(ref, np.load(f), peak=1.0), 2)
        log("psnr", {n: c.get("vs_ref_psnr_db") for n, c in res.get("configs", {}).items()})
        save()
    if "fast" in steps:
        torch.cuda.reset_peak_memory_stats()
        fast = FastEditor.from_bundle(args.bundle)
        t0 = time.perf_counter()
        f_img = fast.edit_image(img, SRC, TGT, output_type="np", **EDIT)
        res["torch_fast_first_call_s"] = round(time.perf_counter() - t0, 1)
        res["torch_fast_compile_cache_loaded"] = fast.compile_cache_loaded  # then the first call compiled nothing
        res["torch_fast_vs_ref_psnr_db"] = round(psnr_db(ref, f_img, peak=1.0), 2)
        res |= {f"torch_{k}": v for k, v in host_timings(fast, img, args.iters).items()}
        res["torch_fast_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        res["torch_fast_peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        log("torch fast", res["torch_fast_first_call_s"], statistics.median(res["torch_fast_ms_np"]))
        save()
    return res


def phase_throughput(args, src, bundle) -> dict:
    import torch

    from icd_edge.fast.editor import FastEditor, FastOptions

    fast = FastEditor(
        bundle,
        src.text_encoder,
        src.vae,
        src.unet_forward,
        src.unet_reverse,
        FastOptions(compile_mode=args.compile_mode),
    )
    res = {}
    for n in args.batches:
        imgs = synthetic(n)
        tgts = [TGT if i % 2 == 0 else "a photo of a tiger" for i in range(n)]

        def run():
            lat = fast.invert_batch(imgs, [SRC] * n, list(range(n)))
            return fast.edit_batch(lat, [SRC] * n, tgts, cross_replace=0.4, self_replace=0.6)

        t0 = time.perf_counter()
        run()
        first = time.perf_counter() - t0
        ms = statistics.median(wall_ms(run, args.iters, 1))
        res[str(n)] = {
            "batch_ms": round(ms, 2),
            "edits_per_s": round(n / (ms / 1000), 2),
            "first_call_s": round(first, 1),
        }
        log("batch", n, res[str(n)])
        torch.cuda.empty_cache()
    return res


def ort_sdxl_ms(ort_sdxl: dict | None, default: str = "all-heuristic") -> float | None:
    """iCD-XL on onnxruntime's CUDA provider (``--phase ort`` on an SDXL bundle): median edit."""
    runs = ((ort_sdxl or {}).get("configs", {}).get(default) or {}).get("edit_ms")
    return round(statistics.median(runs), 2) if runs else None


def ort_summary(ort: dict, gpu: str, default: str = "all-heuristic") -> dict:
    """The issue-17 keys: the default configuration (fusions all + CUDA graphs, cuDNN heuristic
    algorithm choice) against the torch fast path of the same run."""
    cfg = ort["configs"][default]
    ort_ms = statistics.median(cfg["edit_ms"])
    # float output, as the ORT configurations time it ("torch_fast_ms" in the 2026-12-02 raw file)
    torch_runs = ort.get("torch_fast_ms_np", ort.get("torch_fast_ms"))
    torch_ms = statistics.median(torch_runs) if torch_runs else None
    plain = ort["configs"].get("plain", {})
    return {
        "ort_gpu": gpu,
        "ort_edit_ms": round(ort_ms, 2),
        "torch_fast_edit_ms": round(torch_ms, 2) if torch_ms else None,
        "ort_vs_torch_fast": round(ort_ms / torch_ms, 3) if torch_ms else None,
        "ort_first_edit_s": cfg["first_edit_s"],
        "ort_peak_gib": cfg["memory"]["process_peak_gib"],
        "ort_vs_ref_psnr_db": cfg.get("vs_ref_psnr_db"),
        "ort_untuned_edit_ms": round(statistics.median(plain["edit_ms"]), 2) if "edit_ms" in plain else None,
        "ort_prepare_s": ort.get("prepare", {}).get("all", {}).get("seconds"),
        # issue 19 on this path: re-edits of one inversion (source cache on), the target row alone
        "ort_reedit_ms": round(statistics.median(cfg["reedit_ms"]), 2) if "reedit_ms" in cfg else None,
        "torch_fast_first_call_s_same_run": ort.get("torch_fast_first_call_s"),
        "torch_fast_compile_cache_loaded": ort.get("torch_fast_compile_cache_loaded"),
        "torch_host_overhead_ms_pil": ort.get("torch_host_overhead_ms_pil"),
        "torch_host_overhead_ms_np": ort.get("torch_host_overhead_ms_np"),
    }


def merge(paths: list[Path]) -> int:
    import torch  # noqa: F401 (only for the device name when merging on the device)

    data = {}
    for p in paths:
        part = json.loads(Path(p).read_text())
        env = part.pop("env", None)
        if env is not None and data.get("env") not in (None, env):  # another machine or run: keep its own env
            for phase in part:
                data[f"{phase}_env"] = env
        elif env is not None:
            data["env"] = env
        data.update(part)
    sdxl = data.get("sdxl")
    lat = data["latency"]
    fast_ms = statistics.median(lat["fast_ms"])
    eager_ms = statistics.median(lat["eager_ms"])
    best_tp = max(data.get("throughput", {}).values(), key=lambda r: r["edits_per_s"], default=None)
    floor_ms = lat["flop_per_edit"] / (lat["peak_fp16_tflops"] * 1e12) * 1000
    data["summary"] = {
        "gpu": data["env"]["gpu"],
        "edit_ms": round(fast_ms, 2),
        "edit_gpu_ms": round(statistics.median(lat["fast_gpu_ms"]), 2),
        "eager_edit_ms": round(eager_ms, 2),
        "speedup_vs_eager": round(eager_ms / fast_ms, 2),
        "p2p_overhead": round(lat["unet_edit_b2_ms"] / lat["unet_plain_b2_ms"], 3),
        "p2p_overhead_controls_off": round(lat["unet_edit_b2_controls_off_ms"] / lat["unet_plain_b2_ms"], 3),
        "edits_per_s": best_tp["edits_per_s"] if best_tp else None,
        "tflop_per_edit": round(lat["flop_per_edit"] / 1e12, 2),
        "floor_ms": round(floor_ms, 2),
        "pct_of_floor": round(100 * floor_ms / fast_ms, 1),
        "fast_vs_fp32_reference_psnr_db": lat["fast_vs_ref"]["psnr_db"],
    }
    re = data.get("reedit")
    if re:  # issue 19: the re-edit figures and the full edit of the same run beside them
        n = len(REEDIT_TARGETS)
        data["summary"] |= {
            "reedit_gpu": data.get("reedit_env", data["env"])["gpu"],
            "reedit_ms": round(statistics.median(re["reedit_ms"]), 2),
            "reedit_gpu_ms": round(statistics.median(re["reedit_gpu_ms"]), 2),
            "reedit_full_edit_ms_same_run": round(statistics.median(re["fast_ms"]), 2) if "fast_ms" in re else None,
            "reedit_ms_per_target_batch": round(statistics.median(re[f"reedit_batch{n}_ms"]) / n, 2)
            if f"reedit_batch{n}_ms" in re
            else None,
            "reedit_ms_taesd": round(statistics.median(re["reedit_ms_taesd"]), 2) if "reedit_ms_taesd" in re else None,
            "edit_ms_taesd": round(statistics.median(re["edit_ms_taesd"]), 2) if "edit_ms_taesd" in re else None,
            "reedit_vs_fp32_reference_psnr_db": re["reedit_vs_ref_psnr_db"],
            "source_ms": round(statistics.median(re["source_ms"]), 2),
            "reedit_peak_allocated_gib": re.get("peak_allocated_gib"),
        }
        if "host" in re:  # issue 18's host overhead, measured in the same process as the full edit
            data["summary"] |= {
                "host_overhead_ms": re["host"]["host_overhead_ms_np"],
                "host_overhead_ms_pil": re["host"]["host_overhead_ms_pil"],
                "host_overhead_gpu": data.get("reedit_env", data["env"])["gpu"],
            }
    if sdxl:  # issue 20: iCD-XL, 1024 px 4+4 prompt switch (the onnxruntime CUDA path is not built yet)
        data["summary"] |= {
            "sdxl_gpu": data.get("sdxl_env", data["env"])["gpu"],
            "sdxl_edit_ms": round(statistics.median(sdxl["fast_ms"]), 2),
            "sdxl_edit_gpu_ms": round(statistics.median(sdxl["fast_gpu_ms"]), 2),
            "sdxl_eager_ms": round(statistics.median(sdxl["eager_ms"]), 2),
            "sdxl_speedup_vs_eager": round(statistics.median(sdxl["eager_ms"]) / statistics.median(sdxl["fast_ms"]), 2),
            "sdxl_fast_vs_fp32_reference_psnr_db": sdxl["fast_vs_ref_psnr_db"],
            "sdxl_first_call_s": sdxl["fast_first_call_s"],
            "sdxl_peak_allocated_gib": sdxl["peak_allocated_gib"],
            # the fp32 VAE's encode + decode alone (compiled, outside the graph): the edit's largest part
            "sdxl_vae_fp32_ms": round(sdxl["part_ms"]["vae_encoder"] + sdxl["part_ms"]["vae_decoder"], 1)
            if "part_ms" in sdxl
            else None,
            "sdxl_ort_edit_ms": ort_sdxl_ms(data.get("ort_sdxl")),
            # opt-in deviation (an fp16-safe VAE, --vae at export): the VAE in float16
            "sdxl_edit_ms_fp16_vae": round(statistics.median(sdxl["fp16_vae_ms"]), 2)
            if "fp16_vae_ms" in sdxl
            else None,
            "sdxl_fp16_vae_vs_fp32_reference_psnr_db": sdxl.get("fp16_vae_vs_ref_psnr_db"),
            "sdxl_edit_ms_fp32_vae_attn": round(statistics.median(sdxl["fp32_vae_attn_ms"]), 2)
            if "fp32_vae_attn_ms" in sdxl
            else None,
        }
    attn = data.get("sdxl_attn")
    if attn:  # a run from before vae_attention="auto": its fast edit had float32 attention, the variant bf16
        data["summary"] |= {
            "sdxl_edit_ms": round(statistics.median(attn["bf16_vae_attn_ms"]), 2),
            "sdxl_edit_gpu_ms": round(statistics.median(attn["bf16_vae_attn_gpu_ms"]), 2),
            "sdxl_fast_vs_fp32_reference_psnr_db": attn["bf16_vae_attn_vs_ref_psnr_db"],
            "sdxl_edit_ms_fp32_vae_attn": round(statistics.median(attn["fast_ms"]), 2),
            "sdxl_fp32_vae_attn_vs_fp32_reference_psnr_db": attn["fast_vs_ref_psnr_db"],
            "sdxl_edit_ms_from": "sdxl_attn (bf16 VAE attention, the default); eager and fp16-VAE keys: the sdxl run",
        }
    fp8 = data.get("fp8_unet")
    if fp8:  # issue 18's fp8 trial (benchmarks/fp8_unet.py): one UNet call at the edit's shape, not kept
        v = fp8["variants"]
        data["summary"] |= {
            "fp8_unet_ms": {k: r["median_ms"] for k, r in v.items()},
            "fp8_unet_snr_db_vs_fp16": {k: min(r["snr_db_vs_fp16"]) for k, r in v.items() if "snr_db_vs_fp16" in r},
        }
    vae = data.get("sdxl_vae")
    if vae:  # issue 20: SDXL's VAE alone (encode + decode, 1024², compiled) per precision variant
        data["summary"]["sdxl_vae_ms"] = {k: v["median_ms"] for k, v in vae["variants"].items()}
        data["summary"]["sdxl_vae_psnr_db_vs_fp32_strict"] = {
            k: v["psnr_db_vs_fp32_strict"] for k, v in vae["variants"].items() if "psnr_db_vs_fp32_strict" in v
        }
    ort = data.get("ort")
    if ort:  # issue 17: the onnxruntime CUDA path; the default configuration is what users get
        data["summary"] |= ort_summary(ort, data.get("ort_env", data["env"])["gpu"])
    first = data.get("firstedit")
    if first:  # issue 18: a fresh process with the compile cache present (the faster of two)
        runs = [first[k] for k in ("fresh_0", "fresh_1") if k in first]
        best = min(runs, key=lambda r: r["first_edit_s"])
        data["summary"] |= {
            "fast_first_edit_gpu": data.get("firstedit_env", data["env"])["gpu"],
            "fast_first_edit_s": best["first_edit_s"],
            "fast_first_edit_s_runs": [r["first_edit_s"] for r in runs],
            "fast_cache_loaded": all(r["loaded"] for r in runs),
            "fast_prepare_s": first.get("prepare_s"),
            "fast_peak_gib": max(r["peak_allocated_gib"] for r in runs),
            "fast_edit_ms_fresh_process": round(statistics.median(best["edit_ms"]), 2),
        }
        aot = [first[k] for k in ("fresh_aot_0", "fresh_aot_1") if k in first]
        if aot:  # the same with AOTInductor packages (--firstedit-aot)
            data["summary"] |= {
                "fast_first_edit_s_aot": min(r["first_edit_s"] for r in aot),
                "fast_prepare_s_aot": first.get("prepare_aot_s"),
                "fast_aot_loaded": all(r["loaded"] and not r.get("aot_missed") for r in aot),
            }
    out = ROOT / "benchmarks" / "results" / "gpu.json"
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(data["summary"], indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--phase",
        choices=("latency", "throughput", "knobs", "reedit", "sdxl", "host", "ort", "firstedit"),
        default="latency",
    )
    ap.add_argument("--bundle", type=Path, help="ort phase: an fp16 bundle exported with --targets onnx,torch")
    ap.add_argument("--ort-configs", nargs="+", default=["plain", "attention", "all", "all-nograph", "all-heuristic"])
    ap.add_argument("--ort-steps", nargs="+", default=["configs", "ref", "fast"], choices=("configs", "ref", "fast"))
    ap.add_argument("--ort-work", type=Path, default=Path("/tmp/icd_ort_work"))
    ap.add_argument("--model", choices=("sd15", "sdxl"), default="sd15", help="sdxl: the sdxl phase")
    ap.add_argument("--sdxl-model", default="random-sdxl", help="sdxl phase: random-sdxl, or tiny-xl for a smoke run")
    ap.add_argument(
        "--sdxl-steps",
        nargs="+",
        default=["eager", "fast", "fp16-vae", "fp32-attn"],
        choices=("eager", "fast", "fp16-vae", "bf16-attn", "fp32-attn"),
        help="sdxl phase: what to time after the fp32 reference (bf16-/fp32-attn: the VAE's attention pinned)",
    )
    ap.add_argument("--knobs", nargs="+", default=["default", "conv1x1_mm+coord_descent", "max-autotune-no-cudagraphs"])
    ap.add_argument("--compile-mode", help="torch.compile mode of the fast path (latency/throughput phases)")
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--iters-eager", type=int, default=5)
    ap.add_argument(
        "--skip-full", action="store_true", help="reedit: leave out the full edit (its compile); firstedit: the prepare"
    )
    ap.add_argument("--firstedit-cudnn", action="store_true", help="firstedit: also a process with cudnn_benchmark off")
    ap.add_argument(
        "--firstedit-aot",
        action="store_true",
        help="firstedit: also prepare --aot and two fresh processes with FastOptions(aot=True)",
    )
    ap.add_argument("--skip-taesd", action="store_true", help="reedit phase: leave out the TAESD-decoded edits")
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--merge", nargs="+", type=Path)
    args = ap.parse_args()
    if args.model == "sdxl":
        args.phase = "sdxl"
    if args.merge:
        return merge(args.merge)
    import torch

    env = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "capability": list(torch.cuda.get_device_capability()),
    }
    if args.phase == "firstedit":
        if args.bundle is None:
            ap.error("--phase firstedit needs --bundle")
        result = {"env": env, "firstedit": phase_firstedit(args)}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_firstedit.json").write_text(json.dumps(result, indent=1))
        return 0
    if args.phase == "ort":
        if args.bundle is None:
            ap.error("--phase ort needs --bundle")
        from icd_edge.bundle.store import open_bundle

        key = "ort_sdxl" if open_bundle(args.bundle, verify=False).manifest.family == "sdxl" else "ort"
        result = {"env": env, key: phase_ort(args)}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"gpu_{key}.json").write_text(json.dumps(result, indent=1))
        return 0
    with tempfile.TemporaryDirectory() as work:
        src, bundle = build(Path(work), args.sdxl_model if args.phase == "sdxl" else "random-sd15")
        phases = {"latency": phase_latency, "throughput": phase_throughput, "knobs": phase_knobs}
        phase = {**phases, "reedit": phase_reedit, "sdxl": phase_sdxl, "host": phase_host}[args.phase]
        result = {"env": env, args.phase: phase(args, src, bundle)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gpu_{args.phase}.json").write_text(json.dumps(result, indent=1))
    log(
        json.dumps(
            {
                k: (statistics.median(v) if isinstance(v, list) and v and isinstance(v[0], (int, float)) else v)
                for k, v in result[args.phase].items()
            },
            indent=0,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
