"""Fast torch path for NVIDIA GPUs: the whole edit on the device.

fp16 (bf16 optional) weights, channels_last UNets, Prompt-to-Prompt on fused attention
(:class:`~icd_edge.graphs.attention.FusedP2PAttnProcessor`), ``torch.compile`` of the UNets and
CUDA graphs over the fixed-shape invert and edit loops with static buffers. Consistency steps
and local blend run on the device in float32; nothing synchronises with the host inside a loop.
N photos (or N target prompts) run as one batch. The loops are :mod:`icd_edge.edit.loop`'s, run
with torch ops; host-side work (tokenizer, P2P controls, validation) is the edit layer's, as for
:class:`icd_edge.edit.editor.Editor`. Needs the ``export`` extra and CUDA;
runs on the CPU too (``device="cpu"``, no compile/graphs), which the tests use.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from icd_edge import precision
from icd_edge.bundle.schema import Step
from icd_edge.edit import loop, p2p
from icd_edge.edit.inversion import SourceCache
from icd_edge.edit.validate import check_prompt, check_range, check_rng, check_seed
from icd_edge.errors import BackendUnavailable, InputError
from icd_edge.graphs.attention import FusedP2PAttnProcessor
from icd_edge.graphs.wrappers import (
    TextEncoderGraph,
    UNetEditGraph,
    UNetGraph,
    UNetSourceGraph,
    UNetTargetGraph,
    VaeDecoderGraph,
    VaeEncoderGraph,
)
from icd_edge.image import photo_uint8
from icd_edge.rng import noise as make_noise
from icd_edge.tokenizer import ClipTokenizer

logger = logging.getLogger(__name__)

DTYPES = {precision.FP16: torch.float16, precision.BF16: torch.bfloat16, precision.FP32: torch.float32}


def blend_mask(acc: torch.Tensor, tokens: torch.Tensor, latent_hw: int, threshold: float) -> torch.Tensor:
    """The device twin of :func:`icd_edge.edit.p2p.blend_mask` for N photos at once (no host sync):
    acc (2, N, Q, 77), tokens (N, 2, 77) → (N, 1, h, h) float mask, source OR target."""
    m = int(round(acc.shape[2] ** 0.5))
    g = torch.einsum("rnqt,nrt->nrq", acc, tokens).reshape(-1, 2, m, m)
    g = torch.nn.functional.max_pool2d(g, 3, 1, 1)
    g = torch.nn.functional.interpolate(g, size=(latent_hw, latent_hw), mode="nearest")
    g = g / g.amax(dim=(-2, -1), keepdim=True)
    return (g > threshold).any(dim=1, keepdim=True).float()


class TorchOps:
    """:class:`icd_edge.edit.loop.Ops` on device tensors: float32 steps, no host sync."""

    def __init__(self, timesteps: dict):
        self._t = timesteps

    def timestep(self, t: int):
        return self._t[t]

    @staticmethod
    def start(z0, noise, a: float, sigma: float):
        return a * z0 + sigma * noise

    @staticmethod
    def step(x, eps, st: Step):
        return st.c1 * x + st.c2 * eps.float()

    @staticmethod
    def pair(latent):
        return torch.cat([latent, latent])

    @staticmethod
    def accumulate(acc, maps):
        return maps if acc is None else acc + maps

    @staticmethod
    def blend(x, mask, n: int):
        return torch.cat([x[:n], x[:n] + mask * (x[n:] - x[:n])])

    @staticmethod
    def blend_with(x, x_src, mask):
        return x_src + mask * (x - x_src)  # x_src (1, ...) broadcast over the N targets

    @staticmethod
    def cat(a, b):
        """Source maps (1, Q, 77) and N targets' (N, Q, 77) → (2, N, Q, 77), :func:`blend_mask`'s layout."""
        return torch.stack([a.expand_as(b), b])

    @staticmethod
    def stack_into(rows: list):
        return torch.stack(rows)


def require_device(device: str) -> None:
    """The fast path's one refusal of a CUDA device on a machine without a CUDA GPU."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailable("the fast torch path needs a CUDA GPU (torch.cuda.is_available() is False)")


def host_noise(shapes, seed: int, rng: str) -> list[np.ndarray]:
    """Consecutive draws of ``shapes`` from one generator seeded with ``seed``: torch's own here
    (torch is loaded; icd_edge.rng reproduces it bit for bit without torch, more slowly), or
    :func:`icd_edge.rng.noise` for ``numpy`` (one shape)."""
    if rng == "torch":
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(tuple(sh), generator=g).numpy() for sh in shapes]
    return [make_noise(shapes[0], seed, rng)]


def launch(graphs: dict, key, fn, bufs: dict, capture: bool) -> None:
    """Run ``fn(bufs)``: eagerly, or (``capture``) as the CUDA graph ``graphs[key]``, captured on
    first use after two warm-up runs (compile and autotune happen outside the capture)."""
    if not capture:
        fn(bufs)
        return
    if key not in graphs:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(bufs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(bufs)
        graphs[key] = graph
    graphs[key].replay()


@dataclass(frozen=True)
class FastOptions:
    """Options of the fast path (this backend only)."""

    device: str = "cuda"
    dtype: str = "fp16"  # fp16, bf16 or fp32 (float16/bfloat16/float32 are accepted)
    channels_last: bool = True
    compile: bool = True
    cuda_graphs: bool = True
    compile_mode: str | None = None  # torch.compile mode, e.g. "max-autotune-no-cudagraphs"
    cudnn_benchmark: bool = True  # let cuDNN time its convolution algorithms for the fixed shapes
    # SDXL only: the VAE's dtype (None: fp32, as SDXL's VAE overflows in float16); "fp16" for a
    # bundle exported with an fp16-safe VAE (--vae), a deviation from the released model
    vae_dtype: str | None = None
    # SDXL only: "bf16" computes the float32 VAE's two attentions in bfloat16 (flash kernels, float32's
    # range), a precision choice like TF32: on an H200 the edit went from 266.4 to 247.4 ms at 61.15 dB
    # against the fp32 reference (60.52 dB with float32 attention). "auto" (default): bf16 on CUDA,
    # fp32 elsewhere; "fp32" keeps them float32
    vae_attention: str = "auto"
    # keep the compiled kernels between processes (icd_edge.fast.compile_cache); None: the default
    # folder $ICD_EDGE_CACHE/torch-compile, "" : off
    compile_cache: str | None = None
    # with the cache on: False keeps torch.compile's cache artifacts (a later process re-traces),
    # True AOTInductor packages of the graphs (icd_edge.fast.aot: loaded without tracing; opt-in,
    # as loading them crashed on the H200's torch 2.11 + CUDA 13)
    aot: bool = False
    # final images: "full" (the SD VAE) or "taesd" (the tiny decoder of a bundle exported with
    # --taesd and --targets onnx,torch; the same decoder as Editor(decoder="taesd"))
    decoder: str = "full"


class FastEditor:
    """Batched iCD editing on one device.

    Args:
        bundle: an opened bundle (constants, tokenizer, schedule).
        text_encoder, vae, unet_forward, unet_reverse: fused fp32 torch modules (from the
            bundle's ``torch/`` weights via :meth:`from_bundle`, or built in memory).
        options: :class:`FastOptions`.
        taesd: the bundle's TAESD (a diffusers ``AutoencoderTiny``), needed for
            ``decoder="taesd"``.
    """

    def __init__(
        self,
        bundle,
        text_encoder,
        vae,
        unet_forward,
        unet_reverse,
        options: FastOptions = FastOptions(),
        taesd=None,
    ):
        if options.decoder not in ("full", "taesd"):
            raise InputError(f"decoder must be 'full' or 'taesd', got {options.decoder!r}", param="decoder")
        if options.decoder == "taesd" and taesd is None:
            raise InputError(
                "decoder='taesd' needs the bundle's TAESD decoder (FastEditor.from_bundle loads it from a bundle "
                "exported with --taesd and --targets onnx,torch)",
                param="decoder",
            )
        require_device(options.device)
        dtype = precision.canonical(options.dtype, tuple(DTYPES), "dtype", param="dtype")
        self.opt = options
        if options.device.startswith("cuda"):
            torch.backends.cudnn.benchmark = options.cudnn_benchmark  # process-wide, like every torch knob
        self.bundle = bundle
        self.c = loop.Constants.from_manifest(bundle.manifest)
        self.tokenizer = ClipTokenizer(bundle.path(bundle.manifest.tokenizer_file))
        self.dev = torch.device(options.device)
        self.dt = DTYPES[dtype]
        dims = bundle.dims
        self.h, self.q = dims["h"], dims["Q"]
        mf = torch.channels_last if options.channels_last else torch.contiguous_format
        self.text = TextEncoderGraph(text_encoder).to(self.dev, self.dt).eval()
        self.vae = vae.to(self.dev, self.dt).eval()
        self.unet_f = UNetGraph(unet_forward.to(self.dev, self.dt, memory_format=mf)).eval()
        self.unet_e = UNetEditGraph(
            unet_reverse.to(self.dev, self.dt, memory_format=mf),
            (self.h // 2) ** 2,
            self.q,
            FusedP2PAttnProcessor(),
            pairs=True,
        ).eval()
        self.unet_r = UNetGraph(unet_reverse).eval()  # plain batch (shares the weights; P2P processors defer)
        # re-edits: the source row once per photo, then N targets of it per batch (same weights)
        self.unet_s = UNetSourceGraph(unet_reverse, (self.h // 2) ** 2, self.q).eval()
        self.unet_t = UNetTargetGraph(unet_reverse, (self.h // 2) ** 2, self.q).eval()
        self.vae_enc, self.vae_dec = VaeEncoderGraph(self.vae), VaeDecoderGraph(self.vae)
        self.vae_enc_c, self.vae_dec_c = self.vae_enc, self.vae_dec
        self.taesd_dec = self.taesd_dec_c = None
        if options.decoder == "taesd":
            from icd_edge.graphs.taesd import TaesdDecoderGraph

            self.taesd_dec = TaesdDecoderGraph(taesd.to(self.dev, self.dt, memory_format=mf)).eval()
            self.taesd_dec_c = self.taesd_dec
        self._compile_cache = self._compile_material = self._aot = None
        self.compile_cache_loaded = False
        if options.compile and options.compile_cache != "":
            from icd_edge.fast.compile_cache import CompileCache, key_material

            self._compile_cache = CompileCache(options.compile_cache or None)
            self._compile_material = key_material(
                bundle.bundle_id,
                options.device,
                {
                    "dtype": dtype,
                    "channels_last": options.channels_last,
                    "compile_mode": options.compile_mode,
                    # another set of compiled modules (keys of full-decoder entries stay as they were)
                    **({"decoder": options.decoder} if options.decoder != "full" else {}),
                    **({"format": "aoti"} if options.aot else {}),
                },
            )
            if not options.aot:
                # before anything compiles: torch then finds the kernels of an earlier process ready
                self.compile_cache_loaded = self._compile_cache.load(self._compile_material)
                if not self.compile_cache_loaded:
                    self._warn_compiles()
        if options.compile:
            self.vae.to(memory_format=mf)
            comp = lambda m: torch.compile(m, mode=options.compile_mode)  # noqa: E731
            self.vae_enc_c, self.vae_dec_c = comp(self.vae_enc), comp(self.vae_dec)
            if self.taesd_dec is not None:
                self.taesd_dec_c = comp(self.taesd_dec)
            self.unet_f_c, self.unet_e_c, self.unet_r_c = comp(self.unet_f), comp(self.unet_e), comp(self.unet_r)
            self.unet_s_c, self.unet_t_c = comp(self.unet_s), comp(self.unet_t)
            if self._compile_cache is not None and options.aot:
                from icd_edge.fast.aot import AotGraphs

                self._aot = AotGraphs(
                    self._compile_cache.entry(self._compile_material),
                    self._compile_material,
                    self.dev,
                    record=FastEditor._recording,
                )
                for graph, attr, module in self._aot_modules():
                    setattr(self, attr, self._aot.wrap(graph, module, getattr(self, attr)))
        else:
            self.unet_f_c, self.unet_e_c, self.unet_r_c = self.unet_f, self.unet_e, self.unet_r
            self.unet_s_c, self.unet_t_c = self.unet_s, self.unet_t
        self._ops = TorchOps(
            {st.t: torch.full((1,), float(st.t), device=self.dev) for st in self.c.forward + self.c.reverse}
        )
        self._buffers: dict = {}
        self._graphs: dict = {}
        self._lock = threading.Lock()
        # host work of an edit, kept small (it is time the GPU waits): token ids and P2P controls
        # of recent prompts, and pinned twins of the input buffers (copied from without blocking)
        self._ids_cache: dict = {}
        self._controls_cache: dict = {}
        self._pinned: dict = {}
        self._staged: torch.cuda.Event | None = None
        self.events: dict | None = None  # set to {} to record per-stage CUDA-event times (eager only)
        if self._aot is not None and not self._aot.record:
            # last: the packages read the parameters in place, so no .to() may replace them after
            self.compile_cache_loaded = self._aot.load({g: m for g, _, m in self._aot_modules()})
            if not self.compile_cache_loaded:
                self._warn_compiles()

    _recording = False  # prepare: the calls run eagerly and are recorded for compiling

    def _aot_modules(self):
        """(graph, attribute of its compiled callable, module) of everything the fast path compiles."""
        rows = [
            ("vae_encoder", "vae_enc_c", self.vae_enc),
            ("vae_decoder", "vae_dec_c", self.vae_dec),
            ("unet_forward", "unet_f_c", self.unet_f),
            ("unet_reverse_edit", "unet_e_c", self.unet_e),
            ("unet_reverse", "unet_r_c", self.unet_r),
            ("unet_reverse_source", "unet_s_c", self.unet_s),
            ("unet_reverse_target", "unet_t_c", self.unet_t),
        ]
        return rows + ([("taesd_decoder", "taesd_dec_c", self.taesd_dec)] if self.taesd_dec is not None else [])

    @staticmethod
    def _warn_compiles() -> None:
        logger.warning(
            "no compiled graphs cached for this GPU, torch and bundle: the first edit compiles the "
            "UNets (minutes); FastEditor.prepare(bundle) or `icd-edge prepare --fast BUNDLE` builds "
            "them ahead for later processes"
        )

    @classmethod
    def from_bundle(cls, path, **options) -> "FastEditor":
        """Load the fused torch weights of a bundle exported with ``--targets onnx,torch``, read
        straight onto the device in the dtype they run in (:mod:`icd_edge.fast.weights`)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        from icd_edge.bundle.store import open_bundle
        from icd_edge.fast.weights import load_module

        opts = FastOptions(**options)
        require_device(opts.device)  # before any weights move
        dtype = DTYPES[precision.canonical(opts.dtype, tuple(DTYPES), "dtype", param="dtype")]
        t0 = time.perf_counter()
        b = open_bundle(path)
        t_bundle = time.perf_counter() - t0
        art = {g: b.artifact(g, "torch") for g in ("text_encoder", "vae_encoder", "unet_forward", "unet_reverse")}
        if any(a is None for a in art.values()):
            raise BackendUnavailable(f"bundle {b.root} has no torch weights; re-export with --targets onnx,torch")
        taesd = None
        if opts.decoder == "taesd":
            t_art = b.artifact("taesd_decoder", "torch") if "taesd_decoder" in b.graphs else None
            if t_art is None:
                raise BackendUnavailable(
                    f"bundle {b.root} has no torch weights for its TAESD decoder; re-export with --taesd and "
                    "--targets onnx,torch (or use decoder='full')"
                )
            from diffusers import AutoencoderTiny

            taesd = load_module(AutoencoderTiny, b.path(t_art.dir), opts.device, dtype)
        load = lambda cls, g: load_module(cls, b.path(art[g].dir), opts.device, dtype)  # noqa: E731
        parts = (
            load(CLIPTextModel, "text_encoder"),
            load(AutoencoderKL, "vae_encoder"),
            load(UNet2DConditionModel, "unet_forward"),
            load(UNet2DConditionModel, "unet_reverse"),
        )
        t_weights = time.perf_counter() - t0 - t_bundle
        fast = cls(b, *parts, opts, taesd=taesd)
        # where a start's seconds go (the benchmark reports them)
        fast.startup = {
            "bundle_s": round(t_bundle, 3),
            "weights_s": round(t_weights, 3),
            "build_s": round(time.perf_counter() - t0 - t_bundle - t_weights, 3),
            "graphs_s": fast._aot.load_s if fast._aot is not None else None,  # part of build_s
        }
        return fast

    @classmethod
    def prepare(cls, path, progress: bool = True, **options) -> dict:
        """Compile every specialisation an edit session uses (invert, edit with P2P and local
        blend, an edit with the default controls, source pass and re-edit) once and save the kernels, so that a later
        process's first edit loads them instead of compiling. Returns ``{"seconds", "entry"}``.
        With ``aot=True`` the passes run eagerly and each call signature they made is compiled
        into an AOTInductor package (:mod:`icd_edge.fast.aot`) instead."""
        from tqdm import tqdm

        require_device(FastOptions(**options).device)
        t0 = time.perf_counter()
        level = logger.level
        logger.setLevel(logging.ERROR)  # "the first edit compiles": what prepare is here to do
        cls._recording = FastOptions(**options).aot
        try:
            fast = cls.from_bundle(path, **options)
        finally:
            logger.setLevel(level)
            cls._recording = False
        if fast._compile_cache is None:
            raise InputError("prepare needs compile=True and a compile cache (compile_cache is off)")
        hw = fast.c.image_hw  # any photo compiles the same kernels: a gradient
        ramp = np.linspace(0, 255, hw, dtype=np.float32)
        img = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 255 - ramp[None, :]), -1).astype(np.uint8)
        src, tgt = "a photo of a cat", "a photo of a dog"
        steps = [
            (
                "invert + edit",
                lambda: fast.edit_image(img, src, tgt, cross_replace=0.4, self_replace=0.6, blend=("cat", "dog")),
            ),
            ("plain edit", lambda: fast.edit_image(img, src, tgt)),
            ("re-edit", lambda: _reedit_once(fast, img, src, tgt)),
        ]
        desc = "recording" if fast._aot is not None else "compiling"
        with tqdm(total=len(steps), desc=desc, unit="pass", disable=not progress, file=sys.stderr) as bar:
            for name, step in steps:
                bar.set_postfix_str(name)
                step()
                bar.update(1)
        # AOT: every call signature the passes made, exported and compiled once each
        entry = fast._aot.build(progress) if fast._aot is not None else fast.save_compile_cache()
        return {"seconds": round(time.perf_counter() - t0, 1), "entry": str(entry) if entry else None}

    def save_compile_cache(self):
        """Save what this process has compiled as the cache entry of this GPU, torch and bundle
        (the folder, or None when nothing was compiled or the cache is off)."""
        if self._compile_cache is None:
            return None
        return self._compile_cache.save(self._compile_material)

    # ----------------------------------------------------------------- device functions
    def _stage(self, name):
        import contextlib

        if self.events is None or self.opt.cuda_graphs or self.dev.type != "cuda":
            return contextlib.nullcontext()
        ev = self.events

        @contextlib.contextmanager
        def cm():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            ev.setdefault(name, []).append((start, end))

        return cm()

    def _run(self, graph: str, stage: str, **f) -> dict:
        """The loops' model call: the compiled module of ``graph`` with the bundle's feed names."""
        with self._stage(stage):
            sample = f["sample"].to(self.dt, memory_format=self._mf)
            if graph == "unet_forward":
                return {"eps": self.unet_f_c(sample, f["timestep"], f["encoder_hidden_states"], f["timestep_cond"])}
            if graph == "unet_reverse_edit":
                eps, maps = self.unet_e_c(
                    sample,
                    f["timestep"],
                    f["encoder_hidden_states"],
                    f["timestep_cond"],
                    f["token_map"],
                    f["refine_alpha"],
                    f["equalizer"],
                    f["cross_alpha"],
                    f["self_flag"],
                    f["cross_on"],
                    f["self_on"],
                )
                return {"eps": eps, "blend_maps": maps.float()}
            if graph == "unet_reverse_source":
                eps, maps, packed = self.unet_s_c(sample, f["timestep"], f["encoder_hidden_states"], f["timestep_cond"])
                return {"eps": eps, "blend_maps": maps.float(), "source_cache": packed}
            if graph == "unet_reverse_target":
                eps, maps = self.unet_t_c(
                    sample,
                    f["timestep"],
                    f["encoder_hidden_states"],
                    f["timestep_cond"],
                    f["token_map"],
                    f["refine_alpha"],
                    f["equalizer"],
                    f["cross_alpha"],
                    f["self_flag"],
                    f["source_text"],
                    f["source_cache"],
                    f["cross_on"],
                    f["self_on"],
                )
                return {"eps": eps, "blend_maps": maps.float()}
        raise InputError(f"the fast path runs no graph {graph!r}")

    def _invert_fn(self, s: dict) -> None:
        with self._stage("text_encoder"):
            e_src = self.text(s["ids_src"])
        with self._stage("vae_encoder"):
            # the photos travel as uint8 and are normalised here, the same float32 ops as image_to_tensor
            pixels = (s["pixels"].permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(self.dt)
            z0 = self.vae_enc_c(pixels).float() * self.c.vae_scale
        s["latent"].copy_(loop.invert(self._run, self.c, z0, s["noise"], e_src, s["w0"], ops=self._ops))

    @property
    def _mf(self):
        return torch.channels_last if self.opt.channels_last else torch.contiguous_format

    def _edit_fn(self, s: dict) -> None:
        n = s["latent"].shape[0]
        with self._stage("text_encoder"):
            text = self.text(torch.cat([s["ids_src"], s["ids_tgt"]]))

        feeds, blend = self._step_feeds(s), self._blend_fn(s)
        x = loop.edit(self._run, self.c, s["latent"], text, s["cond"], feeds, blend, ops=self._ops)
        self._to_image(s, self._decode(x[n:]))

    def _source_fn(self, s: dict) -> None:
        with self._stage("text_encoder"):
            e_src = self.text(s["ids_src"])
        lat, maps, packed = loop.source_pass(self._run, self.c, s["latent"], e_src, s["w0"], ops=self._ops)
        s["src_latents"].copy_(lat)
        s["src_maps"].copy_(maps)
        s["src_tensors"].copy_(packed)

    def _reedit_fn(self, s: dict) -> None:
        n = s["ids_tgt"].shape[0]
        with self._stage("text_encoder"):
            text = self.text(s["ids_tgt"])
            source_text = self.text(s["ids_src"][:1])
        feeds = self._step_feeds(s)
        source = SourceCache(s["src_latents"], s["src_maps"], s["src_tensors"])
        conds = [c[n:] for c in s["cond"]]  # the target rows' guidance
        x = loop.edit_cached(
            self._run,
            self.c,
            s["latent"].expand(n, -1, -1, -1),
            source,
            text,
            source_text,
            conds,
            feeds,
            self._blend_fn(s),
            ops=self._ops,
        )
        self._to_image(s, self._decode(x))

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        """Final latents (UNet space) → images in [-1, 1], float32: the SD VAE, or TAESD (which
        takes the latents unscaled, like the bundle's taesd_decoder graph)."""
        if self.taesd_dec_c is not None:
            with self._stage("taesd_decoder"):
                return self.taesd_dec_c(x.to(self.dt)).float()
        with self._stage("vae_decoder"):
            return self.vae_dec_c((x / self.c.vae_scale).to(self.dt)).float()

    @staticmethod
    def _to_image(s: dict, img: torch.Tensor) -> None:
        """The decoded batch as [0, 1] floats and as the uint8 pixels of array_to_pil (truncated, as
        the official SD1.5 decoder does): PIL output copies a quarter of the bytes back."""
        s["image"].copy_((img / 2 + 0.5).clamp(0, 1))
        s["image_u8"].copy_((s["image"] * 255.0).to(torch.uint8).permute(0, 2, 3, 1))

    def _step_feeds(self, s: dict):
        def step_feeds(k: int) -> dict:
            cross_on, self_on = s["flags"][k]  # host-known 0/1 schedules, baked into the graph
            return {
                "token_map": s["token_map"],
                "refine_alpha": s["refine_alpha"],
                "equalizer": s["equalizer"],
                "cross_alpha": s["cross_alpha"][k],
                "self_flag": s["self_flag"][k],
                "cross_on": cross_on,
                "self_on": self_on,
            }

        return step_feeds

    def _blend_fn(self, s: dict):
        def blend(acc):
            mask = self._blend_mask(acc, s["blend_tokens"])
            return torch.where(s["blend_on"] > 0, mask, torch.ones_like(mask))

        return blend

    def _blend_mask(self, acc: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return blend_mask(acc, tokens, self.h, self.c.blend_threshold)

    # ----------------------------------------------------------------- buffers and graphs
    def _buffers_for(self, kind: str, n: int) -> dict:
        key = (kind, n)
        if key not in self._buffers:
            d, h, k = self.dev, self.h, len(self.c.reverse)
            b = {"ids_src": torch.zeros(n, 77, dtype=torch.long, device=d), "latent": torch.zeros(n, 4, h, h, device=d)}
            if kind in ("source", "reedit"):
                # the source tensors of one photo: what _source_fn writes and _reedit_fn reads
                s_len = self.bundle.dims.get("S") or self._source_length()
                b |= {
                    "src_latents": torch.zeros(k, 1, 4, h, h, device=d),
                    "src_maps": torch.zeros(k, 1, self.q, 77, device=d),
                    "src_tensors": torch.zeros(k, 1, s_len, device=d, dtype=self.dt),
                }
                b["latent"] = torch.zeros(1, 4, h, h, device=d)
            if kind == "source":
                b["w0"] = torch.zeros(1, 512, device=d, dtype=self.dt)
            elif kind == "invert":
                b |= {
                    "pixels": torch.zeros(n, 8 * h, 8 * h, 3, device=d, dtype=torch.uint8),
                    "noise": torch.zeros(n, 4, h, h, device=d),
                    "w0": torch.zeros(n, 512, device=d, dtype=self.dt),
                }
            else:
                b |= {
                    "ids_tgt": torch.zeros(n, 77, dtype=torch.long, device=d),
                    "cond": torch.zeros(k, 2 * n, 512, device=d, dtype=self.dt),
                    "token_map": torch.zeros(n, 77, 77, device=d),
                    "refine_alpha": torch.zeros(n, 77, device=d),
                    "equalizer": torch.zeros(n, 77, device=d),
                    "cross_alpha": torch.zeros(k, n, 77, device=d),
                    "self_flag": torch.zeros(k, n, 1, device=d),
                    "blend_tokens": torch.zeros(n, 2, 77, device=d),
                    "blend_on": torch.zeros(n, 1, 1, 1, device=d),
                    "image": torch.zeros(n, 3, 8 * h, 8 * h, device=d),
                    "image_u8": torch.zeros(n, 8 * h, 8 * h, 3, device=d, dtype=torch.uint8),
                }
            self._buffers[key] = b
        return self._buffers[key]

    def _source_length(self) -> int:
        """S for this UNet (bundles without the re-edit graphs do not record it)."""
        if not hasattr(self, "_s_len"):
            h = self.h
            with torch.inference_mode():
                _, _, packed = self.unet_s(
                    torch.zeros(1, 4, h, h, device=self.dev, dtype=self.dt).to(memory_format=self._mf),
                    torch.full((1,), 999.0, device=self.dev),
                    torch.zeros(1, 77, self.text.text_encoder.config.hidden_size, device=self.dev, dtype=self.dt),
                    torch.zeros(1, 512, device=self.dev, dtype=self.dt),
                )
            self._s_len = int(packed.shape[1])
        return self._s_len

    def _launch(self, kind, n: int, fn, bufs: dict) -> None:
        launch(self._graphs, (kind, n), fn, bufs, self.opt.cuda_graphs and self.dev.type == "cuda")

    # ----------------------------------------------------------------- public API
    def _stage_in(self, bufs: dict, arrays: dict) -> None:
        """Copy host arrays into the static buffers without blocking the host: from pageable
        memory a copy waits for the stream (the previous loop), so stage through pinned memory,
        one pinned twin per buffer, reused once the previous upload from it has run."""
        if self.dev.type != "cuda":
            for k, a in arrays.items():
                bufs[k].copy_(torch.from_numpy(np.ascontiguousarray(a)))
            return
        if self._staged is not None:
            self._staged.synchronize()  # the last uploads have left the pinned twins
        for k, a in arrays.items():
            key = (id(bufs), k)
            host = self._pinned.get(key)
            if host is None:
                host = self._pinned[key] = torch.empty(bufs[k].shape, dtype=bufs[k].dtype, pin_memory=True)
            if host.dtype == torch.bfloat16:  # no numpy twin: torch casts
                host.copy_(torch.from_numpy(np.require(a, requirements=["C", "W"])))
            else:
                host.numpy()[...] = a  # the same round-to-nearest casts as torch's copy_
            bufs[k].copy_(host, non_blocking=True)
        self._staged = torch.cuda.Event()
        self._staged.record()

    def _ids(self, prompt: str) -> np.ndarray:
        """Token ids of a prompt (the tokenizer's), from a small cache of recent prompts."""
        ids = self._ids_cache.get(prompt)
        if ids is None:
            if len(self._ids_cache) >= 256:
                self._ids_cache.pop(next(iter(self._ids_cache)))
            ids = self._ids_cache[prompt] = self.tokenizer(prompt).ids
            ids.setflags(write=False)
        return ids

    def _controls(self, source: str, target: str, k: int, **kw):
        """:func:`icd_edge.edit.p2p.build_controls`, from a small cache keyed by every argument
        (the controls are a pure function of them; the cached arrays are read-only)."""
        try:
            key = (source, target, k, _frozen(kw))
            hash(key)
        except TypeError:  # an unhashable control value: built (and validated) every time
            return p2p.build_controls(self.tokenizer, source, target, k, **kw)
        ctl = self._controls_cache.get(key)
        if ctl is None:
            ctl = p2p.build_controls(self.tokenizer, source, target, k, **kw)
            for v in vars(ctl).values():
                if isinstance(v, np.ndarray):
                    v.setflags(write=False)
            if len(self._controls_cache) >= 64:
                self._controls_cache.pop(next(iter(self._controls_cache)))
            self._controls_cache[key] = ctl
        return ctl

    def _prepare_invert(self, images: list, source_prompts: list[str], seeds: list[int], rng: str = "torch") -> dict:
        n = len(images)
        if not (n == len(source_prompts) == len(seeds)) or n == 0:
            raise InputError("invert_batch needs as many prompts and seeds as images (at least one)")
        rng = check_rng(rng)
        # per photo the same noise as Editor.invert with that seed (one (1, 4, h, h) draw each)
        return {
            "pixels": np.stack([photo_uint8(im, 8 * self.h) for im in images]),
            "noise": np.concatenate([host_noise([(1, 4, self.h, self.h)], check_seed(s), rng)[0] for s in seeds]),
            "ids_src": np.stack([self._ids(check_prompt(p, "source prompt")) for p in source_prompts]),
            "w0": np.repeat(self._wemb(0.0), n, 0),
        }

    def _wemb(self, w: float) -> np.ndarray:
        return self.bundle.guidance_embedding(w)[None]

    def _prepare_edit(
        self,
        n: int,
        source_prompts: list[str],
        target_prompts: list[str],
        *,
        cross_replace: float = 0.2,
        self_replace: float = 0.2,
        amplify: dict | None = None,
        blend=None,
        guidance: float = 19.0,
        tau: float = 0.8,
        mode: str = "auto",
    ) -> tuple[dict, tuple]:
        """Host side of an edit (tokens, P2P controls, guidance embeddings) → (arrays, step flags)."""
        if not (n == len(source_prompts) == len(target_prompts)):
            raise InputError("edit_batch needs one source and one target prompt per latent")
        guidance = check_range(guidance, 0.0, self.c.max_guidance, "guidance")
        tau = check_range(tau, 0.0, 1.0, "tau")
        k = len(self.c.reverse)
        ctls = [
            self._controls(
                s,
                check_prompt(t, "target prompt"),
                k,
                cross_replace=cross_replace,
                self_replace=self_replace,
                amplify=amplify,
                blend=blend,
                mode=mode,
            )
            for s, t in zip(source_prompts, target_prompts)
        ]
        w0 = self._wemb(0.0)
        cond = np.stack(
            [
                np.concatenate([np.repeat(w0, n, 0), np.repeat(self._wemb(w), n, 0)])
                for w in self.c.guided_w(guidance, tau)
            ]
        )
        arrays = {
            "ids_src": np.stack([self._ids(p) for p in source_prompts]),
            "ids_tgt": np.stack([self._ids(p) for p in target_prompts]),
            "cond": cond,
            "token_map": np.stack([c.token_map for c in ctls]),
            "refine_alpha": np.stack([c.refine_alpha for c in ctls]),
            "equalizer": np.stack([c.equalizer for c in ctls]),
            "cross_alpha": np.stack([c.cross_alpha for c in ctls], axis=1),
            "self_flag": np.stack([c.self_flag for c in ctls], axis=1),
            "blend_tokens": np.stack(
                [c.blend_tokens if c.blend_tokens is not None else np.zeros((2, 77), np.float32) for c in ctls]
            ),
            "blend_on": np.array([float(c.blend_tokens is not None) for c in ctls], np.float32).reshape(n, 1, 1, 1),
        }
        # The step schedules are host-known 0/1 flags: bake them in (one graph per pattern).
        flags = tuple((bool(ctls[0].cross_alpha[i].any()), bool(ctls[0].self_flag[i].any())) for i in range(k))
        return arrays, flags

    def _run_invert(self, arrays: dict) -> torch.Tensor:
        b = self._buffers_for("invert", arrays["pixels"].shape[0])
        self._stage_in(b, arrays)
        self._launch("invert", arrays["pixels"].shape[0], self._invert_fn, b)
        return b["latent"]

    def _fetch(self, b: dict, output: str = "np", copy: bool = True) -> np.ndarray:
        """The images of the last launch: (N, H, W, 3) float32 in [0, 1], or uint8 (``output="u8"``).
        On a GPU they come back through a pinned twin (faster than pageable memory; one per buffer,
        not one per call: pinned memory is scarce and slow to allocate), then into an array of the
        caller's (``copy=False``: a view of the twin, for a caller that copies it at once)."""
        src = b["image_u8"] if output == "u8" else b["image"].permute(0, 2, 3, 1)
        if self.dev.type != "cuda":
            return src.numpy().copy()  # not a view of the static buffer the next launch overwrites
        key = (id(b), output)
        host = self._pinned.get(key)
        if host is None:
            host = self._pinned[key] = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        host.copy_(src, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        return host.numpy().copy() if copy else host.numpy()

    def _run_edit(
        self, latents: torch.Tensor, arrays: dict, flags: tuple, output: str = "np", copy: bool = True
    ) -> np.ndarray:
        n = latents.shape[0]
        b = self._buffers_for("edit", n)
        b["latent"].copy_(latents)
        self._stage_in(b, arrays)
        b["flags"] = flags
        self._launch(("edit", flags), n, self._edit_fn, b)
        return self._fetch(b, output, copy)

    def _run_source(self, latent: torch.Tensor, ids_src: np.ndarray) -> SourceCache:
        b = self._buffers_for("source", 1)
        b["latent"].copy_(latent)
        self._stage_in(b, {"ids_src": ids_src, "w0": self._wemb(0.0)})
        self._launch("source", 1, self._source_fn, b)
        return SourceCache(b["src_latents"].clone(), b["src_maps"].clone(), b["src_tensors"].clone())

    def _run_reedit(self, latent: torch.Tensor, source: SourceCache, arrays: dict, flags: tuple) -> np.ndarray:
        n = arrays["ids_tgt"].shape[0]
        b = self._buffers_for("reedit", n)
        b["latent"].copy_(latent)
        b["src_latents"].copy_(source.latents)
        b["src_maps"].copy_(source.maps)
        b["src_tensors"].copy_(source.tensors)
        self._stage_in(b, arrays)
        b["flags"] = flags
        self._launch(("reedit", flags), n, self._reedit_fn, b)
        return self._fetch(b)

    def captured_graphs(self) -> list:
        """The keys of the loops captured as CUDA graphs so far: ("invert", n), (("edit", flags), n),
        ("source", 1) and (("reedit", flags), n)."""
        return list(self._graphs)

    @torch.inference_mode()
    def invert_batch(
        self, images: list, source_prompts: list[str], seeds: list[int], rng: str = "torch"
    ) -> torch.Tensor:
        """Invert N photos; returns x_999 latents (N, 4, h, h) float32 on the device."""
        arrays = self._prepare_invert(images, source_prompts, seeds, rng)
        with self._lock:
            return self._run_invert(arrays).clone()

    @torch.inference_mode()
    def edit_batch(
        self,
        latents: torch.Tensor,
        source_prompts: list[str],
        target_prompts: list[str],
        *,
        cross_replace: float = 0.2,
        self_replace: float = 0.2,
        amplify: dict | None = None,
        blend=None,
        guidance: float = 19.0,
        tau: float = 0.8,
        mode: str = "auto",
    ) -> np.ndarray:
        """Edit N inversions (one target prompt each); returns (N, H, W, 3) float32 in [0, 1]."""
        arrays, flags = self._prepare_edit(
            latents.shape[0],
            source_prompts,
            target_prompts,
            cross_replace=cross_replace,
            self_replace=self_replace,
            amplify=amplify,
            blend=blend,
            guidance=guidance,
            tau=tau,
            mode=mode,
        )
        with self._lock:
            return self._run_edit(latents, arrays, flags)

    @torch.inference_mode()
    def source_cache(self, latent: torch.Tensor, source_prompt: str) -> SourceCache:
        """The source branch of every edit of one inversion (``latent`` (1, 4, h, h) on the
        device), as device tensors: computed once, then every :meth:`reedit_batch` runs the
        target rows alone."""
        if tuple(latent.shape) != (1, 4, self.h, self.h):
            raise InputError(f"source_cache takes one latent (1, 4, {self.h}, {self.h}), got {tuple(latent.shape)}")
        ids = self.tokenizer(check_prompt(source_prompt, "source prompt")).ids[None]
        with self._lock:
            return self._run_source(latent, ids)

    @torch.inference_mode()
    def reedit_batch(
        self,
        latent: torch.Tensor,
        source: SourceCache,
        source_prompt: str,
        target_prompts: list[str],
        *,
        cross_replace: float = 0.2,
        self_replace: float = 0.2,
        amplify: dict | None = None,
        blend=None,
        guidance: float = 19.0,
        tau: float = 0.8,
        mode: str = "auto",
    ) -> np.ndarray:
        """N target prompts of one inversion in one batch, from its :meth:`source_cache`: the
        same images as :meth:`edit_batch` of N copies of the latent, at the target rows' cost.
        Returns (N, H, W, 3) float32 in [0, 1]."""
        if isinstance(target_prompts, str) or not target_prompts:
            raise InputError("reedit_batch takes a non-empty list of target prompts")
        n = len(target_prompts)
        arrays, flags = self._prepare_edit(
            n,
            [source_prompt] * n,
            list(target_prompts),
            cross_replace=cross_replace,
            self_replace=self_replace,
            amplify=amplify,
            blend=blend,
            guidance=guidance,
            tau=tau,
            mode=mode,
        )
        with self._lock:
            return self._run_reedit(latent, source, arrays, flags)

    @torch.inference_mode()
    def edit_image(
        self,
        image,
        source_prompt: str,
        target_prompt: str,
        *,
        seed: int = 0,
        output_type: str = "pil",
        rng: str = "torch",
        **kw,
    ):
        """Invert and edit one photo (the 8-UNet-call edit the benchmark times). The inversion is
        launched as soon as its inputs are ready; the edit's controls are built while it runs."""
        if output_type not in ("pil", "np"):
            raise InputError(f"output_type must be 'pil' or 'np', got {output_type!r}", param="output_type")
        check_prompt(target_prompt, "target prompt")
        for name in ("guidance", "tau"):  # cheap checks first: nothing runs for a bad value
            if name in kw:
                check_range(kw[name], 0.0, self.c.max_guidance if name == "guidance" else 1.0, name)
        inv = self._prepare_invert([image], [source_prompt], [seed], rng)
        with self._lock:
            latent = self._run_invert(inv)
            # the P2P controls' own checks (blend/amplify words) can still refuse here: the
            # inversion then ran for nothing, but nothing is written or returned
            arrays, flags = self._prepare_edit(1, [source_prompt], [target_prompt], **kw)
            if output_type == "np":
                return self._run_edit(latent, arrays, flags, "np")[0]
            from PIL import Image

            # PIL copies the pixels out of the pinned twin, inside the lock (the next edit reuses it)
            return Image.fromarray(self._run_edit(latent, arrays, flags, "u8", copy=False)[0], "RGB")


def _reedit_once(fast: "FastEditor", img, src: str, tgt: str) -> None:
    latent = fast.invert_batch([img], [src], [0])
    fast.reedit_batch(latent, fast.source_cache(latent, src), src, [tgt], cross_replace=0.4, self_replace=0.6)


def _frozen(x):
    """A hashable twin of control arguments (dicts, lists, tuples, scalars)."""
    if isinstance(x, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_frozen(v) for v in x)
    return x
