"""The public editing API: validation, prompts, decoding; the loops are :mod:`icd_edge.edit.loop`.

>>> editor = Editor.open("bundle")
>>> inv = editor.invert("cat.png", "a photo of a cat", seed=0)
>>> dog = editor.edit(inv, "a photo of a dog", blend=("cat", "dog"))
"""

from __future__ import annotations

import inspect
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

from icd_edge.bundle.store import Bundle, open_bundle
from icd_edge.edit import loop, p2p
from icd_edge.edit.inversion import Inversion, SourceCache
from icd_edge.edit.sessions import ALWAYS_KEPT, MEMORY_POLICIES, SessionPool
from icd_edge.edit.validate import check_array, check_prompt, check_range, check_rng, check_seed
from icd_edge.errors import InputError, NumericsError
from icd_edge.image import array_to_pil, fit_square, image_to_tensor, load_image, restore_fit, tensor_to_array
from icd_edge.rng import noise as make_noise
from icd_edge.tokenizer import ClipTokenizer, Tokens

if TYPE_CHECKING:
    from PIL.Image import Image

    from icd_edge.runtimes import Session

ImageOut = Union["Image", np.ndarray]  # a PIL image, or (H, W, 3) float32 in [0, 1] with output_type="np"
logger = logging.getLogger(__name__)
MODES = p2p.MODES
UNET_GRAPHS = ("unet_forward", "unet_reverse", "unet_reverse_edit", "unet_reverse_source", "unet_reverse_target")
__all__ = ["ALWAYS_KEPT", "MEMORY_POLICIES", "MODES", "Editor", "Inversion", "SourceCache"]


class Editor:
    """Runs invert / edit / reconstruct / generate from one bundle on one backend.

    Sessions open lazily on first use and stay open per the memory policy; the object is safe to
    share between threads (sessions are created under a lock and runs are independent).

    Args:
        bundle: an opened :class:`~icd_edge.bundle.store.Bundle`.
        backend: a backend instance (see :func:`icd_edge.runtimes.select_backend`).
        progress: show a progress bar on calls that take more than a second.
        memory: ``resident``, ``sequential`` or ``shared-base`` (see :mod:`icd_edge.edit.sessions`).
        decoder: ``full`` (the SD VAE, default) or ``taesd`` (the tiny decoder, bundles exported
            with ``--taesd``) for final images; previews use TAESD when the bundle has it.
        source_cache: re-edits (see :class:`~icd_edge.edit.inversion.SourceCache`): ``invert``
            (the source branch is computed during :meth:`invert`, so every edit runs the target row
            alone), ``edit`` (computed by the first edit of an inversion), ``off`` (every edit runs
            the batch-2 source + target decode), or ``auto``: ``invert`` when the bundle has the
            re-edit graphs and the memory policy is not ``sequential``, else ``off``.
    """

    def __new__(cls, bundle=None, *args, **kwargs):
        # an SDXL bundle gets the prompt-switch editor (same API, no Prompt-to-Prompt)
        if cls is Editor and getattr(getattr(bundle, "manifest", None), "family", "sd15") == "sdxl":
            from icd_edge.edit.xl import XLEditor

            return super().__new__(XLEditor)
        return super().__new__(cls)

    def __init__(
        self,
        bundle: Bundle,
        backend,
        progress: bool = False,
        memory: str = "resident",
        decoder: str = "full",
        source_cache: str = "auto",
    ):
        if decoder not in ("full", "taesd"):
            raise InputError(f"decoder must be 'full' or 'taesd', got {decoder!r}")
        if decoder == "taesd" and "taesd_decoder" not in bundle.graphs:
            raise InputError("this bundle has no TAESD decoder; re-export it with --taesd (or use decoder='full')")
        if memory not in MEMORY_POLICIES:
            raise InputError(f"memory must be one of {', '.join(MEMORY_POLICIES)}, got {memory!r}")
        _check_policy_fits_bundle(memory, bundle)
        self.source_cache = _source_cache_mode(source_cache, bundle, memory)
        self.decoder = decoder
        self.bundle = bundle
        self.backend = backend
        self.progress = progress
        self.memory = memory
        self.constants = loop.Constants.from_manifest(bundle.manifest)
        self.tokenizer = ClipTokenizer(bundle.path(bundle.manifest.tokenizer_file))
        backend.configure(bundle, memory)  # the backend's own reading of the policy, and its checks of the bundle
        from icd_edge.runtimes import describe_backend

        logger.info("backend: %s", describe_backend(backend))
        self.sessions = SessionPool(bundle, backend, memory)
        self._lock = threading.Lock()
        self._prompt_cache: dict[str, tuple[Tokens, np.ndarray]] = {}

    @classmethod
    def open(
        cls,
        bundle: str | Path | Bundle,
        backend: str = "auto",
        *,
        verify: bool = True,
        progress: bool = False,
        memory: str = "resident",
        decoder: str = "full",
        source_cache: str = "auto",
        options=(),
        **backend_options,
    ) -> "Editor":
        """Open a bundle folder and pick a backend (``"auto"``, ``"onnxruntime"``, ``"openvino"``, ...).

        ``options``: typed backend options (e.g. ``OvOptions(precision="fp32")``, or several for
        ``auto``, each used by its own backend); keyword options are the named backend's
        option fields (``threads=2``)."""
        from icd_edge.runtimes import select_backend

        if memory not in MEMORY_POLICIES:
            raise InputError(f"memory must be one of {', '.join(MEMORY_POLICIES)}, got {memory!r}")
        b = bundle if isinstance(bundle, Bundle) else open_bundle(bundle, verify=verify)
        _check_policy_fits_bundle(memory, b)
        _source_cache_mode(source_cache, b, memory)  # a bad value fails before a backend loads
        chosen = select_backend(backend, b, memory=memory, options=options, **backend_options)
        return cls(b, chosen, progress=progress, memory=memory, decoder=decoder, source_cache=source_cache)

    # ------------------------------------------------------------------ sessions
    @property
    def profile(self) -> list[tuple[str, float]] | None:
        """Set to ``[]`` to record ``(stage, ms)`` of every graph load and run."""
        return self.sessions.profile

    @profile.setter
    def profile(self, value) -> None:
        self.sessions.profile = value

    def loaded_graphs(self) -> tuple[str, ...]:
        """The graphs whose sessions are open now."""
        return self.sessions.loaded()

    def session(self, graph: str) -> Session:
        """The backend session of ``graph`` (opened now if needed)."""
        return self.sessions.get(graph)

    def release(self, graph: str) -> None:
        """Close one graph's session (it reopens on next use)."""
        self.sessions.release(graph)

    def close(self) -> None:
        """Close every session; the Editor cannot be used afterwards."""
        self.sessions.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, delay=1.0, disable=not self.progress, leave=False)

    def encode_prompt(self, prompt: str) -> tuple[Tokens, np.ndarray]:
        """(tokens, (1, 77, D) embedding); cached per prompt."""
        with self._lock:
            hit = self._prompt_cache.get(prompt)
        if hit is not None:
            return hit
        tokens = self.tokenizer(prompt)
        emb = self.sessions.run("text_encoder", "text_encoder", input_ids=tokens.ids[None])["last_hidden_state"]
        with self._lock:
            if len(self._prompt_cache) > 64:
                self._prompt_cache.clear()
            self._prompt_cache[prompt] = (tokens, emb)
        return tokens, emb

    def _wemb(self, w: float) -> np.ndarray:
        return self.bundle.guidance_embedding(w)[None]

    def _decode(self, latent: np.ndarray, output_type: str, fit: tuple | None = None, fast: bool = False):
        if self.decoder == "taesd" or (fast and "taesd_decoder" in self.bundle.graphs):
            if not fast:
                self.sessions.before_final_decode("taesd_decoder")
            img = self.sessions.run("taesd_decoder", "taesd_decoder", latent=latent.astype(np.float32))["image"]
        else:
            img = self.sessions.run(
                "vae_decoder", "vae_decoder", latent=(latent / np.float32(self.constants.vae_scale)).astype(np.float32)
            )["image"]
        arr = tensor_to_array(img)
        rounding = self.bundle.manifest.vae_to_uint8
        if fit is not None:  # keep_size: back to the input's geometry
            restored = restore_fit(array_to_pil(arr, rounding), fit)
            return np.asarray(restored, dtype=np.float32) / 255.0 if output_type == "np" else restored
        return arr if output_type == "np" else array_to_pil(arr, rounding)

    def _check_inversion(self, inv) -> None:
        if not isinstance(inv, Inversion):
            raise InputError(f"expected an Inversion from Editor.invert, got {type(inv).__name__}")
        if inv.bundle_id != self.bundle.bundle_id:
            raise InputError("this inversion was made with another bundle; invert the photo again with this editor")
        if not np.isfinite(inv.latent).all():
            raise NumericsError(
                "the inversion's latent holds NaN or infinity; invert the photo again "
                "(with an fp32 bundle if a reduced precision overflowed)"
            )

    @staticmethod
    def _check_output_type(output_type: str) -> None:
        if output_type not in ("pil", "np"):
            raise InputError(f"output_type must be 'pil' or 'np', got {output_type!r}")

    # ------------------------------------------------------------------ public API
    def invert(
        self, image, source_prompt: str, *, seed: int = 0, fit: str = "stretch", rng: str = "torch", noise=None
    ) -> Inversion:
        """Encode a photo to x_999 with the forward model under the source prompt (w = 0).

        Args:
            image: a path, bytes, binary file, PIL image or array; resized to the bundle's side.
            source_prompt: what the photo shows.
            seed: seed of the noise added to the photo's latent at t = 19 (official default 0).
            fit: ``stretch`` (the official loader's bicubic resize), ``crop`` or ``pad``.
            rng: ``torch`` (default, as the official code: ``torch.randn`` on the CPU, bit for bit,
                see :mod:`icd_edge.rng`) or ``numpy`` (PCG64).
            noise: the t = 19 noise itself, shape (1, 4, h, h) (or (4, h, h)); ``seed`` and
                ``rng`` are then unused. SDXL bundles: both of its draws, see
                :meth:`icd_edge.edit.xl.XLEditor.start_latent`.
        """
        check_prompt(source_prompt, "source prompt")
        seed = check_seed(seed)
        rng = check_rng(rng)
        c = self.constants
        given = None if noise is None else check_array(noise, self._noise_shape(), "noise")
        img = load_image(image)
        square, fit_info = fit_square(img, c.image_hw, fit)
        eager = self.source_cache == "invert"
        with self._bar(2 + len(c.forward) + (len(c.reverse) if eager else 0), "invert") as bar:
            _, emb = self.encode_prompt(source_prompt)
            z0, eps0 = self.start_latent(image_to_tensor(square, c.image_hw), seed, rng, given)
            bar.update(2)
            x = loop.invert(
                self.sessions.run,
                c,
                z0,
                eps0,
                emb,
                self._wemb(0.0),
                on_step=lambda i: bar.update(1),
                extra=self._added_cond(source_prompt),
            )
            self.sessions.after_invert()
            x.setflags(write=False)
            source = self._source_pass(x, emb, on_step=lambda k: bar.update(1)) if eager else None
        return Inversion(
            x,
            source_prompt,
            None if given is not None else seed,
            img.size,
            self.bundle.bundle_id,
            fit_info,
            "array" if given is not None else rng,
            source,
        )

    def _noise_shape(self) -> tuple[int, ...]:
        return (1, 4, self.constants.latent_hw, self.constants.latent_hw)

    def start_latent(self, pixels: np.ndarray, seed: int, rng: str, noise=None) -> tuple[np.ndarray, np.ndarray]:
        """(z0, ε): the photo's scaled latent (the posterior mean) and the t = 19 noise of ``seed``
        (or ``noise`` as given)."""
        c = self.constants
        z0 = self.sessions.run("vae_encoder", "vae_encoder", image=pixels)["latent_mean"] * np.float32(c.vae_scale)
        return z0, noise if noise is not None else make_noise(z0.shape, seed, rng)

    def _source_pass(self, latent: np.ndarray, emb: np.ndarray, on_step=None) -> SourceCache:
        """The source branch of every edit of ``latent`` (see :class:`SourceCache`)."""
        arrays = loop.source_pass(self.sessions.run, self.constants, latent, emb, self._wemb(0.0), on_step=on_step)
        for a in arrays:
            a.setflags(write=False)
        return SourceCache(*arrays)

    def source_for(self, inv: Inversion) -> SourceCache:
        """``inv``'s source cache: the one it holds, else computed now and kept by ``inv``."""
        self._check_inversion(inv)
        if self.source_cache == "off":
            raise InputError("this editor runs without a source cache (source_cache='off')", param="source_cache")
        cache = inv.source
        if cache is not None and not self._fits(cache):
            logger.warning("the inversion's source cache does not fit this bundle's graphs; computing it again")
            cache = None
        if cache is None:
            _, emb = self.encode_prompt(inv.source_prompt)
            cache = self._source_pass(inv.latent, emb)
            with self._lock:
                inv._attach_source(cache)
        return cache

    def _fits(self, cache: SourceCache) -> bool:
        c, dims = self.constants, self.bundle.dims
        want = (
            (len(c.reverse), 1, 4, c.latent_hw, c.latent_hw),
            (len(c.reverse), 1, dims["Q"], 77),
            (len(c.reverse), 1, dims.get("S", -1)),
        )
        arrays = (cache.latents, cache.maps, cache.tensors)
        return tuple(tuple(a.shape) for a in arrays) == want and all(a.dtype == np.float32 for a in arrays)

    def inversion_from_latent(
        self, latent, source_prompt: str, *, image_size: tuple[int, int] | None = None
    ) -> Inversion:
        """An :class:`Inversion` from a known x_999 (e.g. one made by another implementation of the
        same model), shape (1, 4, h, h) or (4, h, h); ``image_size`` defaults to the bundle's side."""
        check_prompt(source_prompt, "source prompt")
        hw = self.constants.latent_hw
        x = check_array(latent, (1, 4, hw, hw), "latent")
        size = image_size or (self.constants.image_hw, self.constants.image_hw)
        if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            raise InputError(f"image_size must be (width, height) in pixels, got {image_size!r}", param="image_size")
        x.setflags(write=False)
        return Inversion(x, source_prompt, None, tuple(size), self.bundle.bundle_id, ("stretch", *size), "latent")

    def edit_controls(
        self,
        source_prompt: str,
        target_prompt: str,
        *,
        cross_replace: float = 0.2,
        self_replace: float = 0.2,
        amplify: dict | None = None,
        blend=None,
        mode: str = "auto",
    ) -> p2p.EditControls:
        """The Prompt-to-Prompt inputs for an edit (validated)."""
        return p2p.build_controls(
            self.tokenizer,
            source_prompt,
            target_prompt,
            len(self.constants.reverse),
            cross_replace=cross_replace,
            self_replace=self_replace,
            amplify=amplify,
            blend=blend,
            mode=mode,
        )

    def check_edit(
        self,
        source_prompt: str,
        target_prompt: str,
        *,
        cross_replace: float = 0.2,
        self_replace: float = 0.2,
        amplify: dict | None = None,
        blend=None,
        guidance: float = 19.0,
        tau: float = 0.8,
        mode: str = "auto",
        output_type: str = "pil",
    ) -> tuple[p2p.EditControls, float, float]:
        """Validate every parameter of :meth:`edit` without running a model: call it before a
        slow :meth:`invert` so that a bad parameter fails first. Returns (controls, guidance, tau)."""
        self._check_output_type(output_type)
        ctl = self.edit_controls(
            source_prompt,
            target_prompt,
            cross_replace=cross_replace,
            self_replace=self_replace,
            amplify=amplify,
            blend=blend,
            mode=mode,
        )
        guidance = check_range(
            guidance, 0.0, self.constants.max_guidance, "guidance", " (the students were trained up to 19)"
        )
        return ctl, guidance, check_range(tau, 0.0, 1.0, "tau")

    def check_reconstruct(
        self, *, guidance: float = 0.0, tau: float = 0.8, output_type: str = "pil"
    ) -> tuple[float, float]:
        """Validate :meth:`reconstruct`'s parameters without running a model; returns (guidance, tau)."""
        self._check_output_type(output_type)
        return check_range(guidance, 0.0, self.constants.max_guidance, "guidance"), check_range(tau, 0.0, 1.0, "tau")

    def edit(
        self,
        inv: Inversion,
        target_prompt: str,
        *,
        cross_replace: float = 0.2,
        self_replace: float = 0.2,
        amplify: dict | None = None,
        blend=None,
        guidance: float = 19.0,
        tau: float = 0.8,
        mode: str = "auto",
        output_type: str = "pil",
        keep_size: bool = False,
        callback=None,
        preview=None,
        return_source: bool = False,
    ) -> ImageOut | tuple[ImageOut, ImageOut]:
        """Decode an inversion under ``target_prompt`` with Prompt-to-Prompt control.

        The defaults are the official editing settings for SD1.5 (cross and self replacement 0.2,
        guidance 19 in code units, τ = 0.8, no amplification, no local blend).

        Args:
            cross_replace: fraction c of steps with cross-attention replacement (k < ⌊c·(N+1)⌋).
            self_replace: fraction s of steps with self-attention injection (k < ⌊s·N⌋).
            amplify: ``{target_word: factor}`` attention re-weighting.
            blend: ``(source_word, target_word)`` local blend: only the region of these words changes.
            guidance: w of the target row on guided steps, in [0, 19] (code units, paper w − 1).
            tau: dynamic guidance: the target row is guided iff t ≤ 1000·τ.
            mode: "refine" (token alignment), "replace" (word swap), "auto" (replace iff same word count).
            output_type: "pil" or "np" (H, W, 3) float32 in [0, 1].
            keep_size: map the result back to the input photo's geometry (see ``fit``).
            callback: called as ``callback(step, total)`` after each reverse step.
            preview: called as ``preview(step, total, image)`` after each reverse step with the
                target row's current clean estimate x̂0 decoded to a PIL image (TAESD when the
                bundle has it, else the full VAE).
            return_source: also return the source row decoded (the reconstruction the edit is
                made against, as the official runner returns both): ``(target, source)``.
        """
        self._check_inversion(inv)
        ctl, guidance, tau = self.check_edit(
            inv.source_prompt,
            target_prompt,
            cross_replace=cross_replace,
            self_replace=self_replace,
            amplify=amplify,
            blend=blend,
            guidance=guidance,
            tau=tau,
            mode=mode,
            output_type=output_type,
        )
        c = self.constants
        with self._bar(len(c.reverse) + 2, "edit") as bar:
            _, e_src = self.encode_prompt(inv.source_prompt)
            _, e_tgt = self.encode_prompt(target_prompt)
            bar.update(1)
            w0 = self._wemb(0.0)
            conds = [np.concatenate([w0, self._wemb(w)]) for w in c.guided_w(guidance, tau)]
            blend_fn = None
            if ctl.blend_tokens is not None:

                def blend_fn(acc):
                    return p2p.blend_mask(acc, ctl.blend_tokens, c.latent_hw, c.blend_threshold)

            def on_step(k, x_before, eps, st):
                if preview is not None:
                    self._preview(preview, k, x_before[-1:], eps[-1:], st.t)
                bar.update(1)
                if callback is not None:
                    callback(k + 1, len(c.reverse))

            if self.source_cache != "off":
                source = self.source_for(inv)
                x_tgt = loop.edit_cached(
                    self.sessions.run,
                    c,
                    inv.latent,
                    source,
                    e_tgt,
                    e_src,
                    [cond[1:] for cond in conds],
                    ctl.step_feeds,
                    blend_fn,
                    on_step=on_step,
                )
                x_src = source.latents[-1]
            else:
                x = loop.edit(
                    self.sessions.run,
                    c,
                    inv.latent,
                    np.concatenate([e_src, e_tgt]),
                    conds,
                    ctl.step_feeds,
                    blend_fn,
                    on_step=on_step,
                )
                x_src, x_tgt = x[0:1], x[1:2]
            fit = inv.fit if keep_size else None
            result = self._decode(x_tgt, output_type, fit)
            if return_source:
                result = (result, self._decode(np.array(x_src), output_type, fit))
            bar.update(1)
        return result

    def edit_many(self, inv: Inversion, target_prompts, **controls) -> list[ImageOut]:
        """:meth:`edit` for each of ``target_prompts`` (same controls), one image each, in order.

        Every parameter is checked for every target before the first model call. The source
        branch is computed once (see :class:`~icd_edge.edit.inversion.SourceCache`)."""
        if isinstance(target_prompts, str) or not isinstance(target_prompts, (list, tuple)) or not target_prompts:
            raise InputError(
                f"target_prompts must be a non-empty list of prompts, got {target_prompts!r}", param="target"
            )
        for key in ("callback", "preview", "return_source"):
            if key in controls:
                raise InputError(f"edit_many takes no {key}; call edit() per target for it", param=key)
        known = set(inspect.signature(self.edit).parameters) - {"inv", "target_prompt"}
        unknown = sorted(set(controls) - known)
        if unknown:
            raise InputError(
                f"edit_many got unknown parameters {', '.join(unknown)}; it takes {', '.join(sorted(known))}",
                param=unknown[0],
            )
        self._check_inversion(inv)
        checked = {k: controls[k] for k in ("output_type",) if k in controls}
        edit_keys = ("cross_replace", "self_replace", "amplify", "blend", "guidance", "tau", "mode")
        given = {k: controls[k] for k in edit_keys if k in controls}
        for target in target_prompts:
            self.check_edit(inv.source_prompt, target, **given, **checked)
        return [self.edit(inv, target, **controls) for target in target_prompts]

    def _preview(self, preview, k: int, x_t: np.ndarray, eps: np.ndarray, t: int) -> None:
        """x̂0 = (x_t − σ_t·ε̂)/a_t of one row, decoded for a preview callback."""
        a_t, s_t = self.constants.alpha_sigma[t]
        x0 = ((x_t - np.float32(s_t) * eps) / np.float32(a_t)).astype(np.float32)
        preview(k + 1, len(self.constants.reverse), self._decode(x0, "pil", fast=True))

    def reconstruct(
        self,
        inv: Inversion,
        *,
        guidance: float = 0.0,
        tau: float = 0.8,
        output_type: str = "pil",
        keep_size: bool = False,
    ) -> ImageOut:
        """Decode an inversion under its own source prompt: unguided (w = 0) by default, the
        official reconstruction setting; τ as in editing (0.8)."""
        self._check_inversion(inv)
        guidance, tau = self.check_reconstruct(guidance=guidance, tau=tau, output_type=output_type)
        return self._reverse(
            np.array(inv.latent),
            inv.source_prompt,
            guidance,
            tau,
            output_type,
            "reconstruct",
            inv.fit if keep_size else None,
        )

    def generate(
        self,
        prompt: str,
        *,
        seed: int = 0,
        guidance: float = 7.0,
        tau: float = 1.0,
        output_type: str = "pil",
        rng: str = "torch",
        noise=None,
    ) -> ImageOut:
        """Text to image: x_999 ~ N(0, I) from ``seed``, reverse steps with guidance w (τ = 1: every step).

        The defaults follow the official text-to-image setting of the reverse model (w = 7 in code
        units, guided at every step); ``rng`` and ``noise`` as in :meth:`invert`."""
        check_prompt(prompt, "prompt")
        seed = check_seed(seed)
        rng = check_rng(rng)
        self._check_output_type(output_type)
        guidance = check_range(guidance, 0.0, self.constants.max_guidance, "guidance")
        tau = check_range(tau, 0.0, 1.0, "tau")
        shape = (1, 4, self.constants.latent_hw, self.constants.latent_hw)
        x = check_array(noise, shape, "noise") if noise is not None else make_noise(shape, seed, rng)
        return self._reverse(x, prompt, guidance, tau, output_type, "generate")

    def _added_cond(self, prompt: str) -> dict | None:
        """Further UNet feeds a prompt brings (SDXL's added condition); none for SD1.5."""
        return None

    def _reverse(self, x, prompt, guidance, tau, output_type, desc, fit=None):
        c = self.constants
        with self._bar(len(c.reverse) + 1, desc) as bar:
            _, emb = self.encode_prompt(prompt)
            conds = [self._wemb(w) for w in c.guided_w(guidance, tau)]
            x = loop.reverse(
                self.sessions.run, c, x, emb, conds, on_step=lambda *_: bar.update(1), extra=self._added_cond(prompt)
            )
            result = self._decode(x, output_type, fit)
            bar.update(1)
        return result


SOURCE_CACHE_MODES = ("auto", "invert", "edit", "off")


def _source_cache_mode(mode: str, bundle: Bundle, memory: str) -> str:
    """The editor's source-cache mode for a bundle and memory policy (``auto`` resolved)."""
    from icd_edge.bundle.spec import REEDIT_GRAPHS

    if mode not in SOURCE_CACHE_MODES:
        raise InputError(
            f"source_cache must be one of {', '.join(SOURCE_CACHE_MODES)}, got {mode!r}", param="source_cache"
        )
    if bundle.manifest.family == "sdxl" and mode not in ("auto", "off"):
        raise InputError(
            f"source_cache={mode!r} applies to SD1.5 bundles: an SDXL edit runs one row, so there is no source "
            "branch to cache (use 'auto' or 'off')",
            param="source_cache",
        )
    has = all(g in bundle.graphs for g in REEDIT_GRAPHS)
    if mode == "auto":
        return "invert" if has and memory != "sequential" else "off"
    if mode != "off" and not has:
        raise InputError(
            f"source_cache={mode!r} needs a bundle with the re-edit graphs ({', '.join(REEDIT_GRAPHS)}); "
            f"{bundle.root} was exported without them: re-export it (without --no-reedit), or use source_cache='off'",
            param="source_cache",
        )
    return mode


def _check_policy_fits_bundle(memory: str, bundle: Bundle) -> None:
    if memory == "shared-base" and bundle.manifest.unet_weights != "shared-base":
        raise InputError(
            f"memory policy shared-base needs a bundle exported with --unet-weights shared-base; "
            f"{bundle.root} stores fused UNets (use resident or sequential)"
        )
