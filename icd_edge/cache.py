"""One cache root for everything a backend compiles once per machine (OpenVINO blobs, TensorRT
engines, compiled Core ML models): ``$ICD_EDGE_CACHE/<kind>``, else the platform's user cache."""

from __future__ import annotations

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
