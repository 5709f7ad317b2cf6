"""Shared fixtures: one tiny bundle per test session, exported through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_SEED = 0


def run_cli(
    *args: str, module: str = "icd_edge", check: bool = False, timeout: int = 600, env=None
) -> subprocess.CompletedProcess:
    """Run ``python -m <module> args`` and return the completed process (text output)."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session", autouse=True)
def _openvino_cache(tmp_path_factory):
    """OpenVINO's compiled-graph cache in the test session's temp folder, not the user's ~/.cache
    (subprocesses inherit it)."""
    old = os.environ.get("ICD_EDGE_CACHE")
    os.environ["ICD_EDGE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("ICD_EDGE_CACHE", None)
    else:
        os.environ["ICD_EDGE_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """The tiny model exported with ONNX graphs and torch reference weights (about 1-2 min)."""
    out = tmp_path_factory.mktemp("bundles") / "tiny.bundle"
    run_cli(
        "--model",
        "tiny",
        "--out",
        str(out),
        "--targets",
        "onnx,torch",
        "--no-progress",
        module="icd_edge.export",
        check=True,
    )
    return out


@pytest.fixture(scope="session")
def int8_bundle(tmp_path_factory) -> Path:
    """The tiny model in int8 (UNets static Q/DQ, int8 text encoder), one calibration photo."""
    out = tmp_path_factory.mktemp("bundles") / "int8.bundle"
    run_cli(
        "--model",
        "tiny",
        "--out",
        str(out),
        "--no-progress",
        "--calibration-count",
        "1",
        "--precision",
        "int8",
        "--graph-precision",
        "text_encoder=int8",
        module="icd_edge.export",
        check=True,
    )
    return out


@pytest.fixture(scope="session")
def tiny_xl_bundle(tmp_path_factory) -> Path:
    """tiny-xl (the SDXL classes at toy width) exported with ONNX graphs and torch weights (under a minute)."""
    out = tmp_path_factory.mktemp("bundles") / "tiny-xl.bundle"
    run_cli(
        "--model",
        "tiny-xl",
        "--out",
        str(out),
        "--targets",
        "onnx,torch",
        "--no-progress",
        module="icd_edge.export",
        check=True,
    )
    return out


@pytest.fixture(scope="session")
def tiny_graphs(tiny_bundle):
    """The tiny model's torch modules, rebuilt in memory from the same seed."""
    import tempfile

    from icd_edge.bundle.store import open_bundle
    from icd_edge.export.models import build_random
    from icd_edge.graphs.wrappers import build_graphs

    b = open_bundle(tiny_bundle, verify=False)
    with tempfile.TemporaryDirectory() as work:
        src = build_random("tiny", TINY_SEED, Path(work))
    return build_graphs(src.text_encoder, src.vae, src.unet_forward, src.unet_reverse, b.dims)


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real public-domain photo shipped with scikit-image (no download)."""
    import skimage.data

    return skimage.data.chelsea()


@pytest.fixture
def photo_png(tmp_path, photo) -> Path:
    from PIL import Image

    p = tmp_path / "cat.png"
    Image.fromarray(photo).save(p)
    return p
