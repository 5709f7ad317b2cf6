"""TAESD (tiny autoencoder) decoder for fast CPU decoding and per-step previews.

Weights come from a diffusers ``AutoencoderTiny`` folder or hub id (``madebyollin/taesd``), or
from the official taesd ``taesd_decoder.pth`` (read with ``weights_only=True``). The official
decoder is an ``nn.Sequential`` whose index 0 is a ``Clamp`` with no weights, so its key ``i.rest``
is diffusers' ``decoder.layers.{i-1}.rest`` (verified on random weights).
The decoder takes the UNet-space latent (no division by 0.18215: AutoencoderTiny's scaling
factor is 1.0) and returns an image in [-1, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch

from icd_edge.errors import ExportError


def official_decoder_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``taesd_decoder.pth`` keys → ``AutoencoderTiny`` decoder keys."""
    out = {}
    for key, value in state.items():
        index, _, rest = key.partition(".")
        if not index.isdigit() or int(index) < 1:
            raise ExportError(f"unexpected key {key!r} in a taesd decoder file (expected '<layer>.<param>')")
        out[f"decoder.layers.{int(index) - 1}.{rest}"] = value
    return out


def diffusers_decoder_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse mapping (used by tests to write official-layout files)."""
    out = {}
    for key, value in state.items():
        if key.startswith("decoder.layers."):
            index, _, rest = key[len("decoder.layers.") :].partition(".")
            out[f"{int(index) + 1}.{rest}"] = value
    return out


def load_taesd(ref: str, revision: str | None = None, seed: int = 0):
    """An ``AutoencoderTiny`` (eval) from ``random`` (built-in random weights), a ``.pth``/``.safetensors``
    decoder file in the official layout, a diffusers folder, or a hub id."""
    from diffusers import AutoencoderTiny

    if ref == "random":
        torch.manual_seed(seed)
        return AutoencoderTiny().eval()
    p = Path(ref).expanduser()
    if p.is_file():
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        elif p.suffix in (".pth", ".pt"):
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        else:
            raise ExportError(f"--taesd file {p} must be taesd_decoder.pth or .safetensors")
        model = AutoencoderTiny()
        if any(k.startswith("decoder.") for k in state):
            dec = {k: v for k, v in state.items() if k.startswith("decoder.")}
        else:
            dec = official_decoder_to_diffusers(state)
        missing, unexpected = model.load_state_dict(dec, strict=False)
        missing = [k for k in missing if k.startswith("decoder.")]
        if missing or unexpected:
            raise ExportError(f"{p} is not an SD1.5 TAESD decoder: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model.eval()
    try:
        return AutoencoderTiny.from_pretrained(ref, revision=revision, use_safetensors=True).eval()
    except Exception as exc:  # hub/offline/missing-folder errors of several types
        raise ExportError(
            f"cannot load the TAESD decoder {ref!r} ({type(exc).__name__}); pass a local "
            "taesd_decoder.pth or AutoencoderTiny folder with --taesd"
        ) from exc
