"""The fast torch path for iCD-XL: one SDXL edit (invert + prompt-switch decode) on the device.

As :class:`icd_edge.fast.editor.FastEditor`: fp16 (or bf16) channels_last UNets under
``torch.compile``, the whole edit captured as one CUDA graph with static buffers, float32
consistency steps, no host sync inside. SDXL's VAE stays float32 (it overflows in float16; the
official code upcasts it too). The loops are :mod:`icd_edge.edit.loop`'s; the host side
(tokenizers, the two seeded draws, guidance embeddings) is done before the launch.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from icd_edge import precision
from icd_edge.edit import loop
from icd_edge.edit.validate import check_prompt, check_range, check_rng, check_seed
from icd_edge.errors import BackendUnavailable, InputError
from icd_edge.fast.editor import DTYPES, FastOptions, TorchOps, host_noise, launch, require_device
from icd_edge.graphs.wrappers import TextEncoderXLGraph, UNetXLGraph, VaeDecoderGraph, VaeEncoderXLGraph
from icd_edge.image import image_to_uint8, load_image
from icd_edge.tokenizer import ClipTokenizer


class FastXLEditor:
    """iCD-XL edits on one device, one photo at a time.

    Args:
        bundle: an opened SDXL bundle (constants, tokenizers, schedule).
        text_encoder, text_encoder_2, vae, unet_forward, unet_reverse: fused fp32 torch modules
            (from a bundle's ``torch/`` weights via :meth:`from_bundle`, or built in memory).
        options: :class:`~icd_edge.fast.editor.FastOptions`.
    """

    def __init__(
        self,
        bundle,
        text_encoder,
        text_encoder_2,
        vae,
        unet_forward,
        unet_reverse,
        options: FastOptions | None = None,
    ):
        options = options or FastOptions()
        m = bundle.manifest
        if m.family != "sdxl":
            raise InputError(f"FastXLEditor runs SDXL bundles; {bundle.root} is {m.family} (use FastEditor)")
        require_device(options.device)
        dtype = precision.canonical(options.dtype, tuple(DTYPES), "dtype", param="dtype")
        self.opt, self.bundle = options, bundle
        if options.device.startswith("cuda"):
            torch.backends.cudnn.benchmark = options.cudnn_benchmark
        self.c = loop.Constants.from_manifest(m)
        self.tokenizer = ClipTokenizer(bundle.path(m.tokenizer_file))
        self.tokenizer_2 = ClipTokenizer(bundle.path(m.tokenizer_2_file), pad_token=m.tokenizer_2_pad)
        self.dev, self.dt, self.h = torch.device(options.device), DTYPES[dtype], m.latent_hw
        self._mf = torch.channels_last if options.channels_last else torch.contiguous_format
        self._round = m.vae_to_uint8 == "round"
        self.text_1 = TextEncoderXLGraph(text_encoder).to(self.dev, self.dt).eval()
        self.text_2 = TextEncoderXLGraph(text_encoder_2, pooled=True).to(self.dev, self.dt).eval()
        self.vae_dt = DTYPES[precision.canonical(options.vae_dtype or "fp32", tuple(DTYPES), "vae_dtype")]
        vae = vae.to(self.dev, self.vae_dt, memory_format=self._mf).eval()
        if options.vae_attention not in ("auto", "fp32", "bf16"):
            raise InputError(
                f"vae_attention must be 'auto', 'fp32' or 'bf16', got {options.vae_attention!r}",
                param="vae_attention",
            )
        attn = options.vae_attention
        if attn == "auto":  # bfloat16 matmuls are native on the GPUs the fast path targets, emulated on CPUs
            attn = "bf16" if self.dev.type == "cuda" else "fp32"
        # what the VAE's attention computes in (a float16 VAE keeps its own dtype)
        self.vae_attention = (
            attn if self.vae_dt == torch.float32 else precision.canonical(options.vae_dtype, tuple(DTYPES), "vae_dtype")
        )
        if self.vae_attention == "bf16":
            from icd_edge.graphs.attention import cast_vae_attention

            cast_vae_attention(vae, torch.bfloat16)
        self.vae_enc, self.vae_dec = VaeEncoderXLGraph(vae), VaeDecoderGraph(vae)
        self.unet_f = UNetXLGraph(unet_forward.to(self.dev, self.dt, memory_format=self._mf)).eval()
        self.unet_r = UNetXLGraph(unet_reverse.to(self.dev, self.dt, memory_format=self._mf)).eval()
        self.vae_enc_c, self.vae_dec_c, self.unet_f_c, self.unet_r_c = (
            self.vae_enc,
            self.vae_dec,
            self.unet_f,
            self.unet_r,
        )
        if options.compile:
            comp = lambda mod: torch.compile(mod, mode=options.compile_mode)  # noqa: E731
            self.vae_enc_c, self.vae_dec_c = comp(self.vae_enc), comp(self.vae_dec)
            self.unet_f_c, self.unet_r_c = comp(self.unet_f), comp(self.unet_r)
        self._ops = TorchOps(
            {st.t: torch.full((1,), float(st.t), device=self.dev) for st in self.c.forward + self.c.reverse}
        )
        self._bufs: dict | None = None
        self._graphs: dict = {}
        self._lock = threading.Lock()

    @classmethod
    def from_bundle(cls, path, **options) -> "FastXLEditor":
        """Load the fused torch weights of an SDXL bundle exported with ``--targets onnx,torch``,
        read straight onto the device in the dtypes they run in (:mod:`icd_edge.fast.weights`)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        from icd_edge.bundle.store import open_bundle
        from icd_edge.fast.weights import load_module

        opts = FastOptions(**options)
        require_device(opts.device)  # before any weights move
        dt = DTYPES[precision.canonical(opts.dtype, tuple(DTYPES), "dtype", param="dtype")]
        vae_dt = DTYPES[precision.canonical(opts.vae_dtype or "fp32", tuple(DTYPES), "vae_dtype")]
        b = open_bundle(path)
        names = ("text_encoder", "text_encoder_2", "vae_encoder", "unet_forward", "unet_reverse")
        art = {g: b.artifact(g, "torch") for g in names if g in b.graphs}
        if len(art) != len(names) or any(a is None for a in art.values()):
            raise BackendUnavailable(f"bundle {b.root} has no SDXL torch weights; re-export with --targets onnx,torch")
        load = lambda cls_, g, d=dt: load_module(cls_, b.path(art[g].dir), opts.device, d)  # noqa: E731
        return cls(
            b,
            load(CLIPTextModel, "text_encoder"),
            load(CLIPTextModelWithProjection, "text_encoder_2"),
            load(AutoencoderKL, "vae_encoder", vae_dt),
            load(UNet2DConditionModel, "unet_forward"),
            load(UNet2DConditionModel, "unet_reverse"),
            opts,
        )

    # ----------------------------------------------------------------- device side
    def _run(self, graph: str, stage: str, **f) -> dict:
        unet = self.unet_f_c if graph == "unet_forward" else self.unet_r_c
        eps = unet(
            f["sample"].to(self.dt, memory_format=self._mf),
            f["timestep"],
            f["encoder_hidden_states"],
            f["timestep_cond"],
            f["text_embeds"],
            f["time_ids"],
        )
        return {"eps": eps}

    def _text(self, ids_1, ids_2):
        hidden_2, pooled = self.text_2(ids_2)
        return torch.cat([self.text_1(ids_1), hidden_2], dim=-1), pooled

    def _edit_fn(self, s: dict, tau: float) -> None:
        e_src, p_src = self._text(s["ids_src"], s["ids2_src"])
        e_tgt, p_tgt = self._text(s["ids_tgt"], s["ids2_tgt"])
        # the photo travels as uint8 and is normalised here, the same float32 ops as image_to_tensor
        pixels = s["pixels"].permute(0, 3, 1, 2).float() / 127.5 - 1.0
        mean, logvar = (t.float() for t in self.vae_enc_c(pixels.to(self.vae_dt)))
        z0 = (mean + torch.exp(0.5 * logvar) * s["noise"][0:1]) * self.c.vae_scale
        added = {"text_embeds": p_src, "time_ids": s["time_ids"]}
        x = loop.invert(self._run, self.c, z0, s["noise"][1:2], e_src, s["w0"], ops=self._ops, extra=added)
        s["latent"].copy_(x)
        x = loop.edit_switch(
            self._run, self.c, x, e_src, e_tgt, p_tgt, s["time_ids"], s["w0"], s["wg"], tau, ops=self._ops
        )
        img = self.vae_dec_c((x / self.c.vae_scale).to(self.vae_dt, memory_format=self._mf)).float()
        s["image"].copy_((img / 2 + 0.5).clamp(0, 1))
        # the PIL output's pixels as array_to_pil makes them (a quarter of the bytes to copy back)
        scaled = s["image"] * 255.0
        s["image_u8"].copy_((scaled.round() if self._round else scaled).to(torch.uint8).permute(0, 2, 3, 1))

    def _buffers(self) -> dict:
        if self._bufs is None:
            d, h, dt = self.dev, self.h, self.dt
            ids = lambda: torch.zeros(1, 77, dtype=torch.long, device=d)  # noqa: E731
            self._bufs = {
                "ids_src": ids(),
                "ids2_src": ids(),
                "ids_tgt": ids(),
                "ids2_tgt": ids(),
                "pixels": torch.zeros(1, 8 * h, 8 * h, 3, dtype=torch.uint8, device=d),
                "noise": torch.zeros(2, 4, h, h, device=d),
                "w0": torch.zeros(1, 512, device=d, dtype=dt),
                "wg": torch.zeros(1, 512, device=d, dtype=dt),
                "time_ids": torch.zeros(1, 6, device=d, dtype=dt),
                "latent": torch.zeros(1, 4, h, h, device=d),
                "image": torch.zeros(1, 3, 8 * h, 8 * h, device=d),
                "image_u8": torch.zeros(1, 8 * h, 8 * h, 3, dtype=torch.uint8, device=d),
            }
        return self._bufs

    def _launch(self, tau: float, bufs: dict) -> None:
        # which steps run under which prompt is decided on the host: one graph per pattern
        key = tuple(st.t <= 1000.0 * tau for st in self.c.reverse)
        capture = self.opt.cuda_graphs and self.dev.type == "cuda"
        launch(self._graphs, key, lambda b: self._edit_fn(b, tau), bufs, capture)

    # ----------------------------------------------------------------- public API
    def _prepare(self, image, source_prompt, target_prompt, seed, guidance, tau, rng) -> dict:
        check_range(guidance, 0.0, self.c.max_guidance, "guidance")
        check_range(tau, 0.0, 1.0, "tau")
        check_prompt(source_prompt, "source prompt")
        check_prompt(target_prompt, "target prompt")
        shape = (1, 4, self.h, self.h)
        seed, rng = check_seed(seed), check_rng(rng)
        if rng == "torch":
            n1, n2 = host_noise([shape, shape], seed, rng)
        else:
            from icd_edge.edit.xl import _draws

            n1, n2 = _draws(shape, seed, rng)
        b = self.bundle
        return {
            "ids_src": self.tokenizer(source_prompt).ids[None],
            "ids2_src": self.tokenizer_2(source_prompt).ids[None],
            "ids_tgt": self.tokenizer(target_prompt).ids[None],
            "ids2_tgt": self.tokenizer_2(target_prompt).ids[None],
            "pixels": image_to_uint8(load_image(image), 8 * self.h)[None],
            "noise": np.concatenate([n1, n2]),
            "w0": b.guidance_embedding(0.0)[None],
            "wg": b.guidance_embedding(guidance)[None],
            "time_ids": np.asarray(b.manifest.time_ids, np.float32)[None],
        }

    @torch.inference_mode()
    def edit_image(
        self,
        image,
        source_prompt: str,
        target_prompt: str,
        *,
        seed: int = 0,
        guidance: float = 19.0,
        tau: float = 0.7,
        output_type: str = "pil",
        rng: str = "torch",
    ):
        """Invert and edit one photo (the 8-UNet-call edit the benchmark times); the same draws
        and math as :class:`icd_edge.edit.xl.XLEditor`'s invert + edit."""
        arrays = self._prepare(image, source_prompt, target_prompt, seed, guidance, tau, rng)
        with self._lock:
            bufs = self._buffers()
            pin = self.dev.type == "cuda"
            for k, a in arrays.items():
                t = torch.from_numpy(np.require(a, requirements=["C", "W"]))  # copies read-only arrays
                bufs[k].copy_(t.pin_memory() if pin else t, non_blocking=pin)
            self._launch(float(tau), bufs)
            if output_type == "np":
                out = bufs["image"][0].permute(1, 2, 0)
                return out.cpu().numpy() if pin else out.numpy().copy()  # a CPU result is no buffer view
            from PIL import Image

            return Image.fromarray(bufs["image_u8"][0].cpu().numpy(), "RGB")

    def captured_graphs(self) -> list:
        """The prompt-switch patterns captured as CUDA graphs so far."""
        return list(self._graphs)
