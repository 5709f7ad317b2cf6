"""A bundle's torch weights straight onto the device, in the dtype they run in.

``from_pretrained`` builds each module on the CPU with random initial weights, reads the float32
file into it and leaves the copy to the device and the cast to the caller: for SD1.5's two UNets
that is 7 GB of float32 through host memory twice. Here each module is built on the meta device
(no memory, no initialisation), safetensors reads the file directly to ``device``, the cast runs
there, and the tensors become the module's own (``load_state_dict(assign=True)``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from icd_edge.errors import BundleError

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def _state_files(folder: Path) -> list[Path]:
    """The safetensors file of a saved module, or its shards (``*.safetensors.index.json``)."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / (name + ".index.json")
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise BundleError(f"{index} is not a readable shard index ({exc}); re-export the bundle") from None
            return [folder / s for s in shards]
    raise BundleError(f"{folder} holds no safetensors weights ({' or '.join(WEIGHT_FILES)}); re-export the bundle")


def load_module(cls, folder: str | Path, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``cls`` (a diffusers model or a transformers ``PreTrainedModel``) from a ``save_pretrained``
    folder, its floating-point tensors in ``dtype`` on ``device``, in eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if hasattr(cls, "load_config"):  # diffusers
        config = cls.load_config(folder)
        build = lambda: cls.from_config(config)  # noqa: E731
    else:  # transformers
        config = cls.config_class.from_pretrained(folder)
        build = lambda: cls(config)  # noqa: E731
    dev = torch.device(device)
    state = {}
    for f in _state_files(folder):
        state.update(load_file(f, device=str(dev)))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    with torch.device("meta"):
        module = build()
    # buffers outside the state dict (e.g. CLIP's position ids) stay on meta: such a module is
    # built on the device instead, where it initialises fast, and the weights copied in
    try:
        if any(b.is_meta for n, b in module.named_buffers() if n not in state):
            with torch.device(dev):
                module = build()
            module.to(dtype=dtype).load_state_dict(state, strict=True)
        else:
            module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # missing, unexpected or misshapen tensors
        raise BundleError(f"{folder}: its weights do not fit its config ({exc}); re-export the bundle") from None
    left = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left:
        raise BundleError(f"{folder}: the weights do not cover {', '.join(left[:4])}; re-export the bundle")
    return module.eval()
