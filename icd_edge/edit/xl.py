"""iCD-XL editing: the :class:`~icd_edge.edit.editor.Editor` API on an SDXL bundle.

SDXL edits without Prompt-to-Prompt: the reverse pass runs one row and switches prompts (steps
with t > 1000·τ under the source prompt at w = 0, the others under the target at w). Its text
condition comes from two encoders (hidden states concatenated, the second's pooled projection
as the added ``text_embeds``), and its VAE encodes a *sample* of the posterior: the seeded
generator draws that sample first and the t = 19 noise next, as the official code does.

``Editor(bundle, ...)`` and ``Editor.open`` return an :class:`XLEditor` for SDXL bundles.
"""

from __future__ import annotations

import numpy as np

from icd_edge.edit import loop
from icd_edge.edit.editor import Editor, ImageOut, _source_cache_mode
from icd_edge.edit.inversion import Inversion
from icd_edge.edit.validate import check_prompt, check_range
from icd_edge.errors import InputError
from icd_edge.tokenizer import ClipTokenizer, Tokens

# the SD1.5 editor's Prompt-to-Prompt and re-edit parameters, refused here with the reason
P2P_PARAMS = ("cross_replace", "self_replace", "amplify", "blend", "mode")
_NO_P2P = "SDXL bundles edit by switching prompts, without Prompt-to-Prompt"


class XLEditor(Editor):
    """Invert / edit (prompt switch) / reconstruct / generate on an SDXL bundle.

    Defaults follow the official iCD-XL settings: edit guidance 19 with τ = 0.7 (only t = 999 runs
    under the source prompt), generation w = 7 at every step. ``decoder`` must be ``full`` and
    ``source_cache`` ``off`` (or ``auto``): an SDXL edit has no source branch to cache.
    """

    def __init__(
        self,
        bundle,
        backend,
        progress: bool = False,
        memory: str = "resident",
        decoder: str = "full",
        source_cache: str = "auto",
    ):
        if decoder != "full":
            raise InputError(
                "SDXL bundles decode with their full VAE only (TAESD is for SD1.5 bundles); use decoder full",
                param="decoder",
            )
        _source_cache_mode(source_cache, bundle, memory)  # refuses the SD1.5 re-edit modes
        super().__init__(bundle, backend, progress=progress, memory=memory, decoder="full", source_cache="off")
        m = bundle.manifest
        self.tokenizer_2 = ClipTokenizer(bundle.path(m.tokenizer_2_file), pad_token=m.tokenizer_2_pad)
        self.time_ids = np.asarray(m.time_ids, np.float32)[None]
        self._pooled: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ prompts
    def encode_prompt(self, prompt: str) -> tuple[Tokens, np.ndarray]:
        """(tokens of the first tokenizer, (1, 77, D1 + D2) embedding); cached per prompt. The
        pooled embedding is :meth:`pooled_prompt`."""
        with self._lock:
            hit = self._prompt_cache.get(prompt)
        if hit is not None:
            return hit
        tokens = self.tokenizer(prompt)
        tokens_2 = self.tokenizer_2(prompt)
        h1 = self.sessions.run("text_encoder", "text_encoder", input_ids=tokens.ids[None])["hidden_states"]
        out = self.sessions.run("text_encoder_2", "text_encoder_2", input_ids=tokens_2.ids[None])
        emb = np.concatenate([h1, out["hidden_states"]], axis=-1).astype(np.float32)
        with self._lock:
            if len(self._prompt_cache) > 64:
                self._prompt_cache.clear()
                self._pooled.clear()
            self._prompt_cache[prompt] = (tokens, emb)
            self._pooled[prompt] = out["text_embeds"].astype(np.float32)
        return tokens, emb

    def pooled_prompt(self, prompt: str) -> np.ndarray:
        """The (1, P) pooled embedding of ``prompt`` (the second encoder's projection)."""
        self.encode_prompt(prompt)
        with self._lock:
            pooled = self._pooled.get(prompt)
        if pooled is None:  # evicted by another thread between the two calls
            self._prompt_cache.pop(prompt, None)
            self.encode_prompt(prompt)
            pooled = self._pooled[prompt]
        return pooled

    def _added_cond(self, prompt: str) -> dict:
        return {"text_embeds": self.pooled_prompt(prompt), "time_ids": self.time_ids}

    # ------------------------------------------------------------------ public API
    def _noise_shape(self) -> tuple[int, ...]:
        return (2, 4, self.constants.latent_hw, self.constants.latent_hw)

    def start_latent(self, pixels: np.ndarray, seed: int, rng: str, noise=None) -> tuple[np.ndarray, np.ndarray]:
        """(z0, ε) of :meth:`invert`: z0 is a sample of the VAE posterior, (mean + std·n₁)·scale,
        and ε = n₂ the t = 19 noise, where n₁ and n₂ are consecutive draws of one generator seeded
        with ``seed`` (the official code seeds it with the image's index): ``rng="torch"`` gives
        ``torch.randn``'s draws bit for bit. ``noise``: both draws given, shape (2, 4, h, h) (row 0
        the posterior sample's, row 1 the start noise); ``seed`` and ``rng`` are then unused."""
        c = self.constants
        out = self.sessions.run("vae_encoder", "vae_encoder", image=pixels)
        n1, n2 = (noise[0:1], noise[1:2]) if noise is not None else _draws((1, *self._noise_shape()[1:]), seed, rng)
        std = np.exp(np.float32(0.5) * out["latent_logvar"]).astype(np.float32)
        return ((out["latent_mean"] + std * n1) * np.float32(c.vae_scale)).astype(np.float32), n2

    def edit_controls(self, source_prompt: str, target_prompt: str, **controls):
        raise InputError(f"{_NO_P2P}: there are no edit controls to build", param="controls")

    def check_edit(
        self,
        source_prompt: str,
        target_prompt: str,
        *,
        guidance: float = 19.0,
        tau: float = 0.7,
        output_type: str = "pil",
        **p2p,
    ) -> tuple[None, float, float]:
        """Validate every parameter of :meth:`edit` without running a model (see
        :meth:`Editor.check_edit`). Returns (None, guidance, tau)."""
        _refuse_p2p(p2p)
        self._check_output_type(output_type)
        check_prompt(source_prompt, "source prompt")
        check_prompt(target_prompt, "target prompt")
        guidance = check_range(
            guidance, 0.0, self.constants.max_guidance, "guidance", " (the students were trained up to 19)"
        )
        return None, guidance, check_range(tau, 0.0, 1.0, "tau")

    def edit(
        self,
        inv: Inversion,
        target_prompt: str,
        *,
        guidance: float = 19.0,
        tau: float = 0.7,
        output_type: str = "pil",
        keep_size: bool = False,
        callback=None,
        preview=None,
        return_source: bool = False,
        **p2p,
    ) -> ImageOut | tuple[ImageOut, ImageOut]:
        """Decode an inversion under ``target_prompt`` with a prompt switch: steps with
        t > 1000·τ under the source prompt at w = 0, the others under the target at ``guidance``;
        the pooled condition is the target's throughout, as in the official code.

        ``return_source``: also return the unguided reconstruction (:meth:`reconstruct`), one
        more reverse pass. The other arguments as in :meth:`Editor.edit`."""
        self._check_inversion(inv)
        _, guidance, tau = self.check_edit(
            inv.source_prompt, target_prompt, guidance=guidance, tau=tau, output_type=output_type, **p2p
        )
        c = self.constants
        with self._bar(len(c.reverse) + 2, "edit") as bar:
            _, e_src = self.encode_prompt(inv.source_prompt)
            _, e_tgt = self.encode_prompt(target_prompt)
            pooled = self.pooled_prompt(target_prompt)
            bar.update(1)

            def on_step(k, x_before, eps, st):
                if preview is not None:
                    self._preview(preview, k, x_before, eps, st.t)
                bar.update(1)
                if callback is not None:
                    callback(k + 1, len(c.reverse))

            x = loop.edit_switch(
                self.sessions.run,
                c,
                np.array(inv.latent),
                e_src,
                e_tgt,
                pooled,
                self.time_ids,
                self._wemb(0.0),
                self._wemb(guidance),
                tau,
                on_step=on_step,
            )
            fit = inv.fit if keep_size else None
            result = self._decode(x, output_type, fit)
            bar.update(1)
        if return_source:
            result = (result, self.reconstruct(inv, output_type=output_type, keep_size=keep_size))
        return result


def _refuse_p2p(params: dict) -> None:
    p2p = [k for k in params if k in P2P_PARAMS]
    if p2p:
        raise InputError(f"{', '.join(p2p)}: {_NO_P2P}", param=p2p[0])
    if params:
        raise InputError(f"unknown edit parameters {', '.join(sorted(params))}", param=sorted(params)[0])


def _draws(shape, seed: int, rng: str) -> tuple[np.ndarray, np.ndarray]:
    """The posterior sample's noise and the start noise: consecutive draws of one generator."""
    if rng == "torch":
        from icd_edge.rng import torch_randn_sequence

        n1, n2 = torch_randn_sequence([shape, shape], seed)
        return n1, n2
    both = np.random.default_rng(seed).standard_normal((2, *shape), dtype=np.float32)
    return both[0], both[1]
