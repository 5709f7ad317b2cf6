"""The fast path's compiled kernels, kept between processes.

``torch.compile`` of the UNet variants takes minutes in every new process (about 250 s to the
first edit on an H200), almost all of it Inductor's code generation and Triton's kernel builds.
torch can serialise exactly that work (``torch.compiler.save_cache_artifacts``: the FX graph,
AOTAutograd and Triton caches of what this process compiled) and load it back into a new process
before anything compiles (``load_cache_artifacts``); compiling then finds every kernel ready.
Dynamo still traces each module, and the CUDA graphs are still captured on top, per process.

An entry is keyed like the TensorRT engines: GPU name and compute capability (or the CPU), torch,
CUDA and Triton versions, the bundle's id, and the options that change the compiled code (dtype,
memory format, compile mode). An entry for another key is never loaded (another folder); an
entry whose file does not load is removed with a warning and rebuilt by the next compile.

Layout: ``$ICD_EDGE_CACHE/torch-compile/<key16>/artifacts.bin`` and ``meta.json``.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

from icd_edge.cache import material_key as entry_key
from icd_edge.cache import write_entry

logger = logging.getLogger(__name__)

SCHEMA = 1
CACHE_KIND = "torch-compile"
ARTIFACTS = "artifacts.bin"


def device_identity(device: str) -> dict:
    """What the compiled kernels are specific to on ``device``."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        return {
            "device": torch.cuda.get_device_name(index),
            "capability": list(torch.cuda.get_device_capability(index)),
            "cuda": torch.version.cuda,
        }
    return {"device": "cpu", "machine": platform.machine(), "processor": platform.processor() or None}


def key_material(bundle_id: str, device: str, options: dict) -> dict:
    """Everything the compiled code depends on: equal material <=> the entry may be loaded."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "schema": SCHEMA,
        "bundle_id": bundle_id,
        "torch": torch.__version__,
        "triton": triton_version,
        **device_identity(device),
        "options": dict(sorted(options.items())),
    }


class CompileCache:
    """Compile cache artifacts per key under ``root`` (default ``$ICD_EDGE_CACHE/torch-compile``)."""

    def __init__(self, root: Path | str | None = None):
        if root is None:
            from icd_edge.cache import cache_dir

            root = cache_dir(CACHE_KIND)
        self.root = Path(root)

    def entry(self, material: dict) -> Path:
        return self.root / entry_key(material)[:16]

    def load(self, material: dict) -> bool:
        """Load the entry of ``material`` into this process's compile caches; False when there is
        none (or it was unusable: removed, with a warning naming it)."""
        import torch

        folder = self.entry(material)
        path = folder / ARTIFACTS
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
            data = path.read_bytes()
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as exc:
            return self._drop(folder, f"unreadable ({exc})")
        if meta.get("material") != material or meta.get("bytes") != len(data):
            return self._drop(folder, "its metadata does not match its file")
        try:
            info = torch.compiler.load_cache_artifacts(data)
        except Exception as exc:  # torch raises its own types for some damaged or foreign payloads
            return self._drop(folder, f"torch could not load it ({type(exc).__name__}: {exc})")
        if info is None:  # others it logs and declines
            return self._drop(folder, "torch could not load it (see torch's warning above)")
        logger.info("compiled kernels loaded from %s (%.1f MB)", folder, len(data) / 1e6)
        return True

    def save(self, material: dict) -> Path | None:
        """Write what this process compiled so far as the entry of ``material`` (atomically);
        None when torch has nothing to save."""
        import torch

        saved = torch.compiler.save_cache_artifacts()
        if not saved or not saved[0]:
            return None
        data = saved[0]
        folder = self.entry(material)
        with write_entry(folder, "compile cache") as tmp:
            (tmp / ARTIFACTS).write_bytes(data)
            meta = {"material": material, "bytes": len(data), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        logger.info("compiled kernels saved to %s (%.1f MB)", folder, len(data) / 1e6)
        return folder

    def _drop(self, folder: Path, why: str) -> bool:
        import shutil

        logger.warning("removing the compile cache entry %s: %s; the next compile rebuilds it", folder, why)
        shutil.rmtree(folder, ignore_errors=True)
        return False
