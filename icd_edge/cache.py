"""One cache root for everything a backend compiles once per machine (OpenVINO blobs, TensorRT
engines, compiled Core ML models): ``$ICD_EDGE_CACHE/<kind>``, else the platform's user cache."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
from pathlib import Path
from typing import Mapping

logger = logging.getLogger(__name__)
ENV = "ICD_EDGE_CACHE"
# read by earlier versions; still set somewhere, they would silently stop applying
_RETIRED = ("ICD_EDGE_TRT_CACHE", "ICD_EDGE_CACHE_DIR")
_warned: set[str] = set()


def cache_root(env: Mapping[str, str] | None = None, system: str | None = None, home: Path | None = None) -> Path:
    """``$ICD_EDGE_CACHE``, else ``~/Library/Caches/icd_edge`` on macOS, else
    ``$XDG_CACHE_HOME/icd_edge`` or ``~/.cache/icd_edge``."""
    env = os.environ if env is None else env
    for old in _RETIRED:
        if env.get(old) and old not in _warned:
            _warned.add(old)
            logger.warning("%s is no longer read; set %s (the one cache root, one folder per backend inside)", old, ENV)
    if env.get(ENV):
        return Path(env[ENV]).expanduser()
    home = Path.home() if home is None else home
    if (system or platform.system()) == "Darwin":
        return home / "Library" / "Caches" / "icd_edge"
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else home / ".cache"
    return base / "icd_edge"


def cache_dir(
    kind: str, env: Mapping[str, str] | None = None, system: str | None = None, home: Path | None = None
) -> Path:
    """The cache folder of one backend (``openvino``, ``trt``, ``coreml``)."""
    return cache_root(env, system, home) / kind


def material_key(material: dict) -> str:
    """sha256 of the canonical JSON of what a cache entry depends on (equal material, equal key)."""
    return hashlib.sha256(json.dumps(material, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@contextlib.contextmanager
def write_entry(folder: Path, what: str):
    """Write one cache entry folder atomically (yields the temporary folder to fill); an OS
    fault is a BackendUnavailable naming the folder and ICD_EDGE_CACHE, nothing left behind."""
    from icd_edge.atomic import atomic_dir, describe_os_error
    from icd_edge.errors import BackendUnavailable

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(folder) as tmp:
            yield tmp
    except OSError as exc:
        raise BackendUnavailable(
            f"cannot write the {what} {folder}: {describe_os_error(exc)}; set {ENV} to a writable folder"
        ) from None
