"""The iCD edit loop over backend sessions. No backend branches here.

>>> editor = Editor.open("bundle")
>>> inv = editor.invert("cat.png", "a photo of a cat", seed=0)
>>> dog = editor.edit(inv, "a photo of a dog", blend=("cat", "dog"))
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from icd_edge.edit import p2p
from icd_edge.errors import BundleError, EditorClosed, InputError, NumericsError
from icd_edge.image import array_to_pil, fit_square, image_to_tensor, load_image, restore_fit, tensor_to_array
from icd_edge.bundle.store import Bundle, open_bundle
from icd_edge.rng import RNGS
from icd_edge.rng import noise as make_noise
from icd_edge.schedule import consistency_step, dynamic_guidance
from icd_edge.tokenizer import ClipTokenizer, Tokens

logger = logging.getLogger(__name__)
MODES = ("auto", "refine", "replace")
MEMORY_POLICIES = ("resident", "sequential", "shared-base")
UNET_GRAPHS = ("unet_forward", "unet_reverse", "unet_reverse_edit")
ALWAYS_KEPT = ("taesd_decoder",)  # 1.2 MB, decodes a preview after every step: never released


@dataclass(frozen=True)
class Inversion:
    """A photo encoded to noise by the forward model; reusable for any number of edits.

    Attributes:
        latent: (1, 4, h, w) float32 x_999 (read-only).
        source_prompt: the prompt the photo was inverted with.
        seed: seed of the t = 19 start noise (None when the noise or the latent was given).
        image_size: (width, height) of the input photo.
        bundle_id: the bundle it belongs to (edits with another bundle are refused).
        fit: how the photo was made square (``stretch``, ``crop``, ``pad``), for ``keep_size``.
        rng: where the start noise came from: ``torch``, ``numpy``, ``array`` (given) or
            ``latent`` (made from a known x_999 with :meth:`Editor.inversion_from_latent`).
    """

    latent: np.ndarray
    source_prompt: str
    seed: int | None
    image_size: tuple[int, int]
    bundle_id: str
    fit: tuple = ("stretch", 0, 0)
    rng: str = "torch"


def _check_prompt(prompt, what: str) -> str:
    if not isinstance(prompt, str):
        raise InputError(f"{what} must be a string, got {type(prompt).__name__}", param=what)
    try:  # lone surrogates: what Python makes of undecodable bytes in argv, or a broken str
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{what} is not valid text (undecodable bytes or lone surrogates); pass UTF-8 text",
                         param=what) from None
    if not prompt.strip():
        raise InputError(f"{what} is empty; describe the picture, e.g. 'a photo of a cat'", param=what)
    if any(ord(c) < 32 and c not in "\t\n\r" for c in prompt):
        raise InputError(f"{what} contains control characters; remove them", param=what)
    return prompt


def _check_range(value, lo: float, hi: float, what: str, hint: str = "", param: str | None = None) -> float:
    param = param or what
    if isinstance(value, bool):
        raise InputError(f"{what} must be a number in [{lo:g}, {hi:g}], got {value!r}", param=param)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number in [{lo:g}, {hi:g}], got {value!r}", param=param) from None
    if not (math.isfinite(v) and lo <= v <= hi):
        raise InputError(f"{what} must be in [{lo:g}, {hi:g}], got {value!r}{hint}", param=param)
    return v


def _check_rng(rng) -> str:
    if rng not in RNGS:
        raise InputError(f"rng must be one of {', '.join(RNGS)}, got {rng!r}", param="rng")
    return rng


def _check_array(value, shape: tuple, what: str) -> np.ndarray:
    """A float array of exactly ``shape`` (a leading batch axis of 1 may be left out), finite."""
    arr = np.asarray(value)
    if arr.shape == shape[1:] and shape[0] == 1:
        arr = arr[None]
    if arr.shape != shape:
        raise InputError(f"{what} must have shape {shape}, got {arr.shape}", param=what)
    if arr.dtype.kind != "f":
        raise InputError(f"{what} must be a float array, got {arr.dtype}", param=what)
    if not np.isfinite(arr).all():
        raise InputError(f"{what} holds NaN or infinity", param=what)
    return np.ascontiguousarray(arr, dtype=np.float32)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**63:
        raise InputError(f"seed must be an integer in [0, 2^63), got {seed!r}", param="seed")
    return int(seed)


_WARNED: set[tuple[str, str]] = set()


def _warn_if_int8_saturates(bundle: Bundle, backend) -> None:
    """Warn once per bundle and backend when the bundle's int8 weights are wider than this CPU's
    int8 kernels sum exactly (full 8-bit weights on a CPU without VNNI), measured on one-node graphs."""
    from icd_edge.runtimes import int8_kernels

    name = getattr(backend, "name", "")
    int8 = [g for g in bundle.graphs if str((bundle.artifact(g, "onnx") or {}).get("precision", "")).startswith("int8")]
    if not int8 or name not in int8_kernels.BACKENDS or (bundle.bundle_id, name) in _WARNED:
        return
    if name == "onnxruntime":
        from icd_edge.runtimes import _onnxruntime_has_gpu

        chosen = getattr(getattr(backend, "options", None), "providers", None)
        if (chosen[0] if chosen else "CUDAExecutionProvider" if _onnxruntime_has_gpu() else "CPUExecutionProvider") \
                != "CPUExecutionProvider":
            return  # the check is of the CPU kernels
    # bundles written before the manifest recorded the scheme used the full 8-bit range
    wmax = int((bundle.manifest.get("int8_scheme") or {}).get("weight_max", 127))
    if 2 * 255 * wmax <= 32767 or not int8_kernels.saturates(name, wmax):
        return
    _WARNED.add((bundle.bundle_id, name))
    logger.warning("this bundle's int8 weights use the range [-%d, %d], which %s's int8 kernels on this CPU (no VNNI) "
                   "sum with saturation: edits lose quality. Re-export it with --int8-weights 7bit (the default), "
                   "or run an fp16/fp32 bundle", wmax, wmax, name)


class Editor:
    """Runs invert / edit / reconstruct / generate from one bundle on one backend.

    Sessions open lazily on first use and stay open; the object is safe to share between
    threads (sessions are created under a lock and runs are independent).

    Args:
        bundle: an opened :class:`~icd_edge.bundle.store.Bundle`.
        backend: a backend instance (see :func:`icd_edge.runtimes.select_backend`).
        progress: show a progress bar on calls that take more than a second.
        decoder: ``full`` (the SD VAE, default) or ``taesd`` (the tiny decoder, bundles exported
            with ``--taesd``) for final images; previews use TAESD when the bundle has it.
        memory: ``resident`` keeps every graph loaded once used (fastest for many edits);
            ``sequential`` keeps one graph loaded at a time (the TAESD preview decoder aside):
            opening one closes the others, and the forward UNet is released right after an
            inversion; on onnxruntime the sessions also run without planned buffer reuse, so a
            UNet holds only the activations it is using (lowest peak memory; graphs reload per call);
            ``shared-base`` (bundles exported with ``--unet-weights shared-base``) keeps the UNets
            resident but maps the teacher's weights once for all of them, the LoRAs being
            separate low-rank branches.
    """

    def __init__(self, bundle: Bundle, backend, progress: bool = False, memory: str = "resident", decoder: str = "full"):
        if decoder not in ("full", "taesd"):
            raise InputError(f"decoder must be 'full' or 'taesd', got {decoder!r}")
        if decoder == "taesd" and "taesd_decoder" not in bundle.graphs:
            raise InputError("this bundle has no TAESD decoder; re-export it with --taesd (or use decoder='full')")
        self.decoder = decoder
        if memory not in MEMORY_POLICIES:
            raise InputError(f"memory must be one of {', '.join(MEMORY_POLICIES)}, got {memory!r}")
        self.bundle = bundle
        self.backend = backend
        self.progress = progress
        self.memory = memory
        if memory == "sequential" and hasattr(backend, "prefer_low_memory"):
            backend.prefer_low_memory()  # onnxruntime: no planned buffer reuse (lower peak)
        self.profile: list[tuple[str, float]] | None = None  # set to [] to record (stage, ms)
        m = bundle.manifest
        self.image_hw = int(m["dims"]["H"])
        self.latent_hw = int(m["dims"]["h"])
        self.vae_scale = float(m["vae"]["scaling_factor"])
        self.forward_steps = [(int(t), int(s), float(c1), float(c2)) for (t, s), (c1, c2) in
                              zip(m["schedule"]["forward"], m["schedule"]["coefficients"]["forward"])]
        self.reverse_steps = [(int(t), int(s), float(c1), float(c2)) for (t, s), (c1, c2) in
                              zip(m["schedule"]["reverse"], m["schedule"]["coefficients"]["reverse"])]
        self.start_a, self.start_sigma = m["schedule"]["encoder_start"]["alpha_sigma"]
        self.max_guidance = float(m["guidance"]["max"])
        self.blend_threshold = float(m["p2p"]["blend_threshold"])
        self.tokenizer = ClipTokenizer(bundle.path(m["tokenizer"]["file"]))
        self._sessions: dict = {}
        self._closed = False
        self._lock = threading.RLock()  # re-entered by _session → _release_others
        self._prompt_cache: dict[str, tuple[Tokens, np.ndarray]] = {}
        _warn_if_int8_saturates(bundle, backend)

    @classmethod
    def open(cls, bundle: str | Path | Bundle, backend: str = "auto", *, verify: bool = True,
             progress: bool = False, memory: str = "resident", decoder: str = "full", **backend_options) -> "Editor":
        """Open a bundle folder and pick a backend (``"auto"``, ``"onnxruntime"``, ``"torch"``, ...)."""
        from icd_edge.runtimes import select_backend

        if memory not in MEMORY_POLICIES:
            raise InputError(f"memory must be one of {', '.join(MEMORY_POLICIES)}, got {memory!r}")
        b = bundle if isinstance(bundle, Bundle) else open_bundle(bundle, verify=verify)
        if memory == "shared-base":
            if b.manifest.get("unet_weights") != "shared-base":
                raise InputError(f"memory policy shared-base needs a bundle exported with --unet-weights shared-base; "
                                 f"{b.root} stores fused UNets (use resident or sequential)")
            backend_options = {**backend_options, "share_weights": True}
            backend = "onnxruntime" if backend == "auto" else backend
        try:
            chosen = select_backend(backend, b, low_memory=memory == "sequential", **backend_options)
        except TypeError as exc:  # an option this backend does not take
            raise InputError(f"backend {backend!r} does not accept these options ({exc}); shared-base runs on onnxruntime") from exc
        return cls(b, chosen, progress=progress, memory=memory, decoder=decoder)

    # ------------------------------------------------------------------ plumbing
    def _session(self, graph: str):
        with self._lock:
            if self._closed:
                raise EditorClosed("this Editor was closed; open a new one with Editor.open(bundle)")
            if graph not in self._sessions and self.memory == "sequential" and graph not in ALWAYS_KEPT:
                # one graph at a time: the peak is the largest graph plus its activations, not a sum
                self._release_others(graph)
            if graph not in self._sessions:
                with self._timed(f"load:{graph}"):
                    try:
                        self._sessions[graph] = self.backend.open_session(self.bundle, graph)
                    except OSError as exc:  # reading or memory-mapping the graph's files
                        from icd_edge.atomic import describe_os_error

                        raise BundleError(f"cannot load graph {graph} from {self.bundle.root}: "
                                          f"{describe_os_error(exc)}") from None
            return self._sessions[graph]

    def _run(self, graph: str, stage: str, **feeds) -> dict[str, np.ndarray]:
        sess = self._session(graph)
        with self._timed(stage):
            out = sess.run(feeds)
        for name, value in out.items():  # one bad value would propagate through every later step
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise NumericsError(f"{graph} returned NaN or infinity in {name!r} on the {self.backend.name} backend "
                                    f"({stage}); a reduced precision overflowed: use an fp32 bundle, or "
                                    f"--ov-precision f32 on openvino")
        return out

    @contextlib.contextmanager
    def _timed(self, stage: str):
        t0 = time.perf_counter()
        yield
        if self.profile is not None:
            self.profile.append((stage, (time.perf_counter() - t0) * 1000.0))

    def _bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, delay=1.0, disable=not self.progress, leave=False)

    def _release_others(self, graph: str) -> None:
        """Close every session but ``graph``'s and the always-kept ones."""
        with self._lock:
            for other in [g for g in self._sessions if g != graph and g not in ALWAYS_KEPT]:
                self._sessions.pop(other).close()

    def release(self, graph: str) -> None:
        """Close one graph's session (it reopens on next use)."""
        with self._lock:
            sess = self._sessions.pop(graph, None)
        if sess is not None:
            sess.close()

    def close(self) -> None:
        """Close every session; the Editor cannot be used afterwards."""
        with self._lock:
            self._closed = True
            for s in self._sessions.values():
                s.close()
            self._sessions.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def encode_prompt(self, prompt: str) -> tuple[Tokens, np.ndarray]:
        """(tokens, (1, 77, D) embedding); cached per prompt."""
        with self._lock:
            hit = self._prompt_cache.get(prompt)
        if hit is not None:
            return hit
        tokens = self.tokenizer(prompt)
        emb = self._run("text_encoder", "text_encoder", input_ids=tokens.ids[None])["last_hidden_state"]
        with self._lock:
            if len(self._prompt_cache) > 64:
                self._prompt_cache.clear()
            self._prompt_cache[prompt] = (tokens, emb)
        return tokens, emb

    def _wemb(self, w: float) -> np.ndarray:
        return self.bundle.guidance_embedding(w)[None]

    def _decode(self, latent: np.ndarray, output_type: str, fit: tuple | None = None, fast: bool = False):
        if self.decoder == "taesd" or (fast and "taesd_decoder" in self.bundle.graphs):
            if not fast and self.memory == "sequential":
                self._release_others("taesd_decoder")  # a final decode: the UNet is done
            img = self._run("taesd_decoder", "taesd_decoder", latent=latent.astype(np.float32))["image"]
        else:
            img = self._run("vae_decoder", "vae_decoder", latent=(latent / np.float32(self.vae_scale)).astype(np.float32))["image"]
        arr = tensor_to_array(img)
        if fit is not None:  # keep_size: back to the input's geometry
            restored = restore_fit(array_to_pil(arr), fit)
            return np.asarray(restored, dtype=np.float32) / 255.0 if output_type == "np" else restored
        return arr if output_type == "np" else array_to_pil(arr)

    def _check_inversion(self, inv) -> None:
        if not isinstance(inv, Inversion):
            raise InputError(f"expected an Inversion from Editor.invert, got {type(inv).__name__}")
        if inv.bundle_id != self.bundle.bundle_id:
            raise InputError("this inversion was made with another bundle; invert the photo again with this editor")
        if not np.isfinite(inv.latent).all():
            raise NumericsError("the inversion's latent holds NaN or infinity; invert the photo again "
                                "(with an fp32 bundle if a reduced precision overflowed)")

    @staticmethod
    def _check_output_type(output_type: str) -> None:
        if output_type not in ("pil", "np"):
            raise InputError(f"output_type must be 'pil' or 'np', got {output_type!r}")

    # ------------------------------------------------------------------ public API
    def invert(self, image, source_prompt: str, *, seed: int = 0, fit: str = "stretch", rng: str = "torch",
               noise=None) -> Inversion:
        """Encode a photo to x_999 with the forward model under the source prompt (w = 0).

        Args:
            image: a path, bytes, binary file, PIL image or array; resized to the bundle's side.
            source_prompt: what the photo shows.
            seed: seed of the noise added to the photo's latent at t = 19 (official default 0).
            fit: ``stretch`` (the official loader's bicubic resize), ``crop`` or ``pad``.
            rng: ``torch`` (default, as the official code: ``torch.randn`` on the CPU, bit for bit,
                see :mod:`icd_edge.rng`) or ``numpy`` (PCG64).
            noise: the t = 19 noise itself, shape (1, 4, h, h) (or (4, h, h)); ``seed`` and
                ``rng`` are then unused.
        """
        _check_prompt(source_prompt, "source prompt")
        seed = _check_seed(seed)
        rng = _check_rng(rng)
        shape = (1, 4, self.latent_hw, self.latent_hw)
        given = None if noise is None else _check_array(noise, shape, "noise")
        img = load_image(image)
        square, fit_info = fit_square(img, self.image_hw, fit)
        with self._bar(2 + len(self.forward_steps), "invert") as bar:
            _, emb = self.encode_prompt(source_prompt)
            pixels = image_to_tensor(square, self.image_hw)
            z0 = self._run("vae_encoder", "vae_encoder", image=pixels)["latent_mean"] * np.float32(self.vae_scale)
            bar.update(2)
            eps0 = given if given is not None else make_noise(z0.shape, seed, rng)
            x = (np.float32(self.start_a) * z0 + np.float32(self.start_sigma) * eps0).astype(np.float32)
            w0 = self._wemb(0.0)
            for i, (t, _s, c1, c2) in enumerate(self.forward_steps):
                eps = self._run("unet_forward", f"forward_{i}", sample=x, timestep=np.array([t], np.float32),
                                encoder_hidden_states=emb, timestep_cond=w0)["eps"]
                x = consistency_step(x, eps, c1, c2)
                bar.update(1)
        if self.memory == "sequential":
            self.release("unet_forward")
        x.setflags(write=False)
        return Inversion(x, source_prompt, None if given is not None else seed, img.size, self.bundle.bundle_id,
                         fit_info, "array" if given is not None else rng)

    def inversion_from_latent(self, latent, source_prompt: str, *, image_size: tuple[int, int] | None = None) -> Inversion:
        """An :class:`Inversion` from a known x_999 (e.g. one made by another implementation of the
        same model), shape (1, 4, h, h) or (4, h, h); ``image_size`` defaults to the bundle's side."""
        _check_prompt(source_prompt, "source prompt")
        x = _check_array(latent, (1, 4, self.latent_hw, self.latent_hw), "latent")
        size = image_size or (self.image_hw, self.image_hw)
        if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            raise InputError(f"image_size must be (width, height) in pixels, got {image_size!r}", param="image_size")
        x.setflags(write=False)
        return Inversion(x, source_prompt, None, tuple(size), self.bundle.bundle_id, ("stretch", *size), "latent")

    def edit_controls(self, source_prompt: str, target_prompt: str, *, cross_replace: float = 0.2,
                      self_replace: float = 0.2, amplify: dict | None = None, blend=None,
                      mode: str = "auto") -> p2p.EditControls:
        """The Prompt-to-Prompt inputs for an edit (validated)."""
        _check_prompt(source_prompt, "source prompt")
        _check_prompt(target_prompt, "target prompt")
        cross_replace = _check_range(cross_replace, 0.0, 1.0, "cross_replace")
        self_replace = _check_range(self_replace, 0.0, 1.0, "self_replace")
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}", param="mode")
        src_tok = self.tokenizer(source_prompt)
        tgt_tok = self.tokenizer(target_prompt)
        same_words = len(source_prompt.split(" ")) == len(target_prompt.split(" "))
        if mode == "replace" or (mode == "auto" and same_words):
            token_map, refine_alpha = p2p.replace_map(self.tokenizer, source_prompt, src_tok, target_prompt, tgt_tok)
        else:
            token_map, refine_alpha = p2p.refine_map(src_tok, tgt_tok)
        equalizer = np.ones(77, dtype=np.float32)
        for word, factor in (amplify or {}).items():
            f = _check_range(factor, 0.0, 20.0, f"amplify factor of {word!r}", param="amplify")
            equalizer[p2p.word_mask(self.tokenizer, tgt_tok, target_prompt, word, "amplify") > 0] = f
        n = len(self.reverse_steps)
        cross = np.repeat(p2p.cross_schedule(cross_replace, n)[:, None], 77, axis=1)
        self_flag = p2p.self_schedule(self_replace, n)[:, None]
        blend_tokens = None
        if blend is not None:
            if not (isinstance(blend, (tuple, list)) and len(blend) == 2 and all(isinstance(w, str) for w in blend)):
                raise InputError(f"blend must be a pair of words (source_word, target_word), got {blend!r}",
                                 param="blend")
            blend_tokens = np.stack([
                p2p.word_mask(self.tokenizer, src_tok, source_prompt, blend[0], "blend source"),
                p2p.word_mask(self.tokenizer, tgt_tok, target_prompt, blend[1], "blend target"),
            ])
        return p2p.EditControls(token_map, refine_alpha, equalizer, cross.astype(np.float32),
                                self_flag.astype(np.float32), blend_tokens)

    def check_edit(self, source_prompt: str, target_prompt: str, *, cross_replace: float = 0.2,
                   self_replace: float = 0.2, amplify: dict | None = None, blend=None, guidance: float = 19.0,
                   tau: float = 0.8, mode: str = "auto", output_type: str = "pil"
                   ) -> tuple[p2p.EditControls, float, float]:
        """Validate every parameter of :meth:`edit` without running a model: call it before a
        slow :meth:`invert` so that a bad parameter fails first. Returns (controls, guidance, tau)."""
        self._check_output_type(output_type)
        ctl = self.edit_controls(source_prompt, target_prompt, cross_replace=cross_replace, self_replace=self_replace,
                                 amplify=amplify, blend=blend, mode=mode)
        guidance = _check_range(guidance, 0.0, self.max_guidance, "guidance", " (the students were trained up to 19)")
        return ctl, guidance, _check_range(tau, 0.0, 1.0, "tau")

    def check_reconstruct(self, *, guidance: float = 0.0, tau: float = 0.8, output_type: str = "pil") -> tuple[float, float]:
        """Validate :meth:`reconstruct`'s parameters without running a model; returns (guidance, tau)."""
        self._check_output_type(output_type)
        return _check_range(guidance, 0.0, self.max_guidance, "guidance"), _check_range(tau, 0.0, 1.0, "tau")

    def edit(self, inv: Inversion, target_prompt: str, *, cross_replace: float = 0.2, self_replace: float = 0.2,
             amplify: dict | None = None, blend=None, guidance: float = 19.0, tau: float = 0.8,
             mode: str = "auto", output_type: str = "pil", keep_size: bool = False, callback=None, preview=None,
             return_source: bool = False):
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
        ctl, guidance, tau = self.check_edit(inv.source_prompt, target_prompt, cross_replace=cross_replace,
                                             self_replace=self_replace, amplify=amplify, blend=blend,
                                             guidance=guidance, tau=tau, mode=mode, output_type=output_type)
        with self._bar(len(self.reverse_steps) + 2, "edit") as bar:
            _, e_src = self.encode_prompt(inv.source_prompt)
            _, e_tgt = self.encode_prompt(target_prompt)
            bar.update(1)
            x = np.concatenate([inv.latent, inv.latent]).astype(np.float32)
            text = np.concatenate([e_src, e_tgt])
            w0 = self._wemb(0.0)
            acc = None
            for k, (t, _s, c1, c2) in enumerate(self.reverse_steps):
                cond = np.concatenate([w0, self._wemb(dynamic_guidance(guidance, t, tau))])
                out = self._run("unet_reverse_edit", f"reverse_edit_{k}", sample=x, timestep=np.array([t], np.float32),
                                encoder_hidden_states=text, timestep_cond=cond, **ctl.step_feeds(k))
                x_prev = x
                x = consistency_step(x, out["eps"], c1, c2)
                if preview is not None:
                    self._preview(preview, k, x_prev[1:2], out["eps"][1:2], t)
                if ctl.blend_tokens is not None:
                    acc = out["blend_maps"] if acc is None else acc + out["blend_maps"]
                    mask = p2p.blend_mask(acc, ctl.blend_tokens, self.latent_hw, self.blend_threshold)
                    x[1] = x[0] + mask.astype(np.float32) * (x[1] - x[0])
                bar.update(1)
                if callback is not None:
                    callback(k + 1, len(self.reverse_steps))
            result = self._decode(x[1:2], output_type, inv.fit if keep_size else None)
            if return_source:
                result = (result, self._decode(x[0:1], output_type, inv.fit if keep_size else None))
            bar.update(1)
        return result

    def _preview(self, preview, k: int, x_t: np.ndarray, eps: np.ndarray, t: int) -> None:
        """x̂0 = (x_t − σ_t·ε̂)/a_t of one row, decoded for a preview callback."""
        a_t, s_t = self.bundle.manifest["schedule"]["alpha_sigma"][str(t)]
        x0 = ((x_t - np.float32(s_t) * eps) / np.float32(a_t)).astype(np.float32)
        preview(k + 1, len(self.reverse_steps), self._decode(x0, "pil", fast=True))

    def reconstruct(self, inv: Inversion, *, guidance: float = 0.0, tau: float = 0.8, output_type: str = "pil",
                    keep_size: bool = False):
        """Decode an inversion under its own source prompt: unguided (w = 0) by default, the
        official reconstruction setting; τ as in editing (0.8)."""
        self._check_inversion(inv)
        guidance, tau = self.check_reconstruct(guidance=guidance, tau=tau, output_type=output_type)
        _, emb = self.encode_prompt(inv.source_prompt)
        return self._reverse(np.array(inv.latent), emb, guidance, tau, output_type, "reconstruct",
                             inv.fit if keep_size else None)

    def generate(self, prompt: str, *, seed: int = 0, guidance: float = 7.0, tau: float = 1.0, output_type: str = "pil",
                 rng: str = "torch", noise=None):
        """Text to image: x_999 ~ N(0, I) from ``seed``, reverse steps with guidance w (τ = 1: every step).

        The defaults follow the official text-to-image setting of the reverse model (w = 7 in code
        units, guided at every step); ``rng`` and ``noise`` as in :meth:`invert`."""
        _check_prompt(prompt, "prompt")
        seed = _check_seed(seed)
        rng = _check_rng(rng)
        self._check_output_type(output_type)
        guidance = _check_range(guidance, 0.0, self.max_guidance, "guidance")
        tau = _check_range(tau, 0.0, 1.0, "tau")
        shape = (1, 4, self.latent_hw, self.latent_hw)
        x = _check_array(noise, shape, "noise") if noise is not None else make_noise(shape, seed, rng)
        _, emb = self.encode_prompt(prompt)
        return self._reverse(x, emb, guidance, tau, output_type, "generate")

    def _reverse(self, x, emb, guidance, tau, output_type, desc, fit=None):
        with self._bar(len(self.reverse_steps) + 1, desc) as bar:
            for k, (t, _s, c1, c2) in enumerate(self.reverse_steps):
                eps = self._run("unet_reverse", f"reverse_{k}", sample=x, timestep=np.array([t], np.float32),
                                encoder_hidden_states=emb, timestep_cond=self._wemb(dynamic_guidance(guidance, t, tau)))["eps"]
                x = consistency_step(x, eps, c1, c2)
                bar.update(1)
            result = self._decode(x, output_type, fit)
            bar.update(1)
        return result
