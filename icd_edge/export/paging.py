"""torch modules whose tensors live in memory-mapped files.

A full-size SDXL UNet is 10.3 GB in float32 and the export needs two fused copies of it, their
traces and the text encoders: more than a 24 GB machine holds as ordinary memory. Paged out, a
module keeps its values, but its pages are clean file-backed memory the kernel can drop under
pressure and read back when the module runs again. The mapping is private: writing a tensor in
place (fusing a LoRA) copies only the pages it touches and never changes the file.
"""

from __future__ import annotations

import copy
import gc
import shutil
import weakref
from pathlib import Path

import torch

from icd_edge.errors import ExportError
from icd_edge.memory import trim_heap

# module -> the file its tensors map; kept outside the module, whose attributes the trace reuse
# compares (same_structure): a per-module path there would make the two UNets differ
_PAGED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def page_out(module: torch.nn.Module, path: Path) -> None:
    """Write ``module``'s state to ``path`` and make its tensors memory-mapped views of that file.
    A disk without room for it is an :class:`ExportError` naming the folder, checked before writing
    (torch reports a full disk as a bare ``RuntimeError``), and leaves no partial file."""
    state = module.state_dict(keep_vars=False)
    need = sum(t.numel() * t.element_size() for t in state.values())
    free = shutil.disk_usage(path.parent).free
    if need > free:
        raise ExportError(_no_room(path, need, free))
    try:
        torch.save(state, path)
    except (RuntimeError, OSError) as exc:  # a full disk, most often (the check above saw the room then)
        path.unlink(missing_ok=True)
        raise ExportError(
            f"could not write {path.name} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            + _no_room(path, need, shutil.disk_usage(path.parent).free)
        ) from None
    del state
    module.load_state_dict(torch.load(path, mmap=True, weights_only=True), assign=True)
    _PAGED[module] = str(path)
    gc.collect()
    trim_heap()


def _no_room(path: Path, need: int, free: int) -> str:
    return (
        f"no room to page the export's weights out to {path.parent}: {need / 1e9:.1f} GB needed, "
        f"{free / 1e9:.1f} GB free (a full-size SDXL export needs about 60 GB of scratch space); "
        "free some, or point TMPDIR at a larger disk"
    )


def paged_file(module: torch.nn.Module) -> str | None:
    """The file ``module`` was paged out to, if its tensors are still that file's views."""
    return _PAGED.get(module)


def mark_dirty(module: torch.nn.Module) -> None:
    """``module``'s tensors were changed in place (their touched pages are ordinary memory again)."""
    _PAGED.pop(module, None)


def twin(module: torch.nn.Module) -> torch.nn.Module:
    """A second module of ``module``'s structure whose tensors map the same file as ``module``'s
    (paged out first): no copy of the weights is made in memory, where ``copy.deepcopy`` would."""
    path = paged_file(module)
    if path is None:
        raise ValueError("twin() needs a paged-out module")
    # parameters become meta tensors in the copy, so deepcopy allocates nothing for them; every
    # one is then replaced by the file's mapped tensor (strict: a name left on meta is an error)
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in module.parameters()}
    out = copy.deepcopy(module, memo)
    out.load_state_dict(torch.load(path, mmap=True, weights_only=True), assign=True, strict=True)
    if any(t.is_meta for t in [*out.parameters(), *out.buffers()]):
        raise RuntimeError("twin(): a tensor of the module is not in its state dict")
    _PAGED[out] = path
    return out
