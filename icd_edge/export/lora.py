"""Reading the official iCD LoRA files and fusing them into a UNet.

Two key layouts are accepted:

* peft-prefixed (the released files): ``unet.base_model.model.<module>.lora_A.weight`` /
  ``.lora_B.weight``, no alpha tensors → alpha = 8, as the official loader sets it;
* kohya: ``lora_unet_<module with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.

``W += (alpha / rank) · B·A`` (Linear) or the 1×1-up ∘ k×k-down product (Conv2d), in float32,
the rule peft/diffusers' ``fuse_lora`` applies. By default A and B are first rounded to float16, as
the official SD1.5 loader does (it casts the LoRA state dict to float16 before ``load_lora_weights``);
``rounding="none"`` keeps the file's precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from icd_edge.errors import ExportError

OFFICIAL_ALPHA = 8.0
ROUNDINGS = {"fp16": torch.float16, "none": None}
_PEFT_PREFIXES = ("unet.base_model.model.", "base_model.model.", "unet.")


@dataclass
class LoraPair:
    down: torch.Tensor  # A: (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # B: (out, r) or (out, r, 1, 1)
    alpha: float | None


def read_lora_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` LoRA (never pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"LoRA file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ExportError(f"{path} is not a readable .safetensors LoRA file: {exc}") from exc


def parse_lora(state: dict[str, torch.Tensor], module_names: list[str], source: str = "LoRA") -> dict[str, LoraPair]:
    """Map a LoRA state dict (either layout) onto UNet module names.

    Args:
        state: tensors of the file.
        module_names: ``named_modules()`` names of the target UNet (resolves kohya's underscores).
    """
    kohya_names = {name.replace(".", "_"): name for name in module_names}
    pairs: dict[str, dict] = {}
    unknown = []
    for key, tensor in state.items():
        if key.startswith("lora_unet_"):
            stem, _, kind = key[len("lora_unet_") :].partition(".")
            module = kohya_names.get(stem)
            kind = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(kind)
        else:
            stem = key
            for prefix in _PEFT_PREFIXES:
                if key.startswith(prefix):
                    stem = key[len(prefix) :]
                    break
            module, kind = None, None
            for suffix, k in (
                (".lora_A.weight", "down"),
                (".lora_B.weight", "up"),
                (".lora_A.default.weight", "down"),
                (".lora_B.default.weight", "up"),
                (".alpha", "alpha"),
            ):
                if stem.endswith(suffix):
                    module, kind = stem[: -len(suffix)], k
                    break
        if module is None or kind is None or (module not in kohya_names.values()):
            unknown.append(key)
            continue
        pairs.setdefault(module, {})[kind] = tensor
    if unknown:
        raise ExportError(
            f"{source}: {len(unknown)} keys do not name a module of this UNet, e.g. {unknown[:3]}; "
            "expected the official iCD layouts (unet.base_model.model.*.lora_A/B or lora_unet_*.lora_down/up)"
        )
    out = {}
    for module, parts in pairs.items():
        if "down" not in parts or "up" not in parts:
            raise ExportError(
                f"{source}: module {module} has only {sorted(parts)}; a LoRA needs both A (down) and B (up)"
            )
        alpha = float(parts["alpha"].item()) if "alpha" in parts else None
        out[module] = LoraPair(parts["down"].float(), parts["up"].float(), alpha)
    if not out:
        raise ExportError(f"{source}: the file holds no LoRA tensors")
    return out


def lora_delta(pair: LoraPair, weight_shape: torch.Size, default_alpha: float = OFFICIAL_ALPHA) -> torch.Tensor:
    """The fused weight delta ``scale · B·A`` with ``scale = alpha / rank``."""
    rank = pair.down.shape[0]
    scale = (pair.alpha if pair.alpha is not None else default_alpha) / rank
    a, b = pair.down, pair.up
    if len(weight_shape) == 2:
        delta = b.reshape(b.shape[0], rank) @ a.reshape(rank, -1)
    elif len(weight_shape) == 4:
        delta = (b.reshape(b.shape[0], rank) @ a.reshape(rank, -1)).reshape(weight_shape)
    else:
        raise ExportError(f"cannot fuse a LoRA into a weight of shape {tuple(weight_shape)}")
    if delta.shape != weight_shape:
        raise ExportError(f"LoRA delta {tuple(delta.shape)} does not fit the weight {tuple(weight_shape)}")
    return delta * scale


@torch.no_grad()
def fuse_lora(unet, lora: dict[str, LoraPair], default_alpha: float = OFFICIAL_ALPHA) -> int:
    """Add every LoRA delta to ``unet``'s weights in place; returns the number of modules fused."""
    modules = dict(unet.named_modules())
    for name, pair in lora.items():
        weight = modules[name].weight
        weight += lora_delta(pair, weight.shape, default_alpha).to(weight.dtype)
    return len(lora)


def round_lora(lora: dict[str, LoraPair], rounding: str) -> dict[str, LoraPair]:
    """A and B rounded through ``rounding``'s dtype and back to float32 (``none``: unchanged)."""
    if rounding not in ROUNDINGS:
        raise ExportError(f"LoRA rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    dtype = ROUNDINGS[rounding]
    if dtype is None:
        return lora
    return {k: LoraPair(p.down.to(dtype).float(), p.up.to(dtype).float(), p.alpha) for k, p in lora.items()}


def _read(unet, path, rounding: str):
    state = read_lora_file(path)
    lora = round_lora(parse_lora(state, [n for n, _ in unet.named_modules()], source=str(path)), rounding)
    facts = {
        "ranks": sorted({p.down.shape[0] for p in lora.values()}),
        "layout": "kohya" if any(k.startswith("lora_unet_") for k in state) else "peft",
        "rounding": rounding,
    }
    return lora, facts


def load_and_fuse(unet, path: str | Path, default_alpha: float = OFFICIAL_ALPHA, rounding: str = "fp16") -> dict:
    """Read ``path``, fuse into ``unet``; returns facts for the manifest."""
    lora, facts = _read(unet, path, rounding)
    return {"modules": fuse_lora(unet, lora, default_alpha), **facts}


class LoraBranch(torch.nn.Module):
    """``base(x) + up(down(x))``: a LoRA kept as a separate low-rank branch (shared-base bundles),
    numerically the fused weight ``W + scale·B·A``; the scale is folded into ``up``."""

    def __init__(self, base, pair: LoraPair, default_alpha: float = OFFICIAL_ALPHA):
        super().__init__()
        rank = pair.down.shape[0]
        scale = (pair.alpha if pair.alpha is not None else default_alpha) / rank
        self.base = base
        if isinstance(base, torch.nn.Linear):
            self.down = torch.nn.Linear(base.in_features, rank, bias=False)
            self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, torch.nn.Conv2d):
            self.down = torch.nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.up = torch.nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise ExportError(f"cannot attach a LoRA branch to {type(base).__name__}")
        with torch.no_grad():
            self.down.weight.copy_(pair.down.reshape(self.down.weight.shape))
            self.up.weight.copy_(pair.up.reshape(self.up.weight.shape) * scale)

    def forward(self, x, *args, **kwargs):
        return self.base(x, *args, **kwargs) + self.up(self.down(x))


def load_as_branches(unet, path: str | Path, default_alpha: float = OFFICIAL_ALPHA, rounding: str = "fp16") -> dict:
    """Like :func:`load_and_fuse` but keeps each LoRA as a :class:`LoraBranch` (weights unfused)."""
    lora, facts = _read(unet, path, rounding)
    modules = dict(unet.named_modules())
    for name, pair in lora.items():
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else unet, child, LoraBranch(modules[name], pair, default_alpha))
    return {"modules": len(lora), **facts, "fused": False}


def merge_branches(unet):
    """A deep copy of ``unet`` with every :class:`LoraBranch` fused back into a plain layer."""
    import copy

    merged = copy.deepcopy(unet)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, mod in list(modules.items()):
            if isinstance(mod, LoraBranch):
                base = mod.base
                rank = mod.down.weight.shape[0]
                delta = mod.up.weight.reshape(-1, rank) @ mod.down.weight.reshape(rank, -1)
                base.weight += delta.reshape(base.weight.shape)
                parent_name, _, child = name.rpartition(".")
                setattr(modules[parent_name] if parent_name else merged, child, base)
    return merged
