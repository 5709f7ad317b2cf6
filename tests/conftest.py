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


def shared_export(tmp_path_factory, name: str, *args: str) -> Path:
    """A bundle exported once per test run: with pytest-xdist the first worker that asks exports
    it under a lock in the run's shared temp folder and the others wait for it and reuse it (the
    export is atomic: a bundle with a manifest is complete)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        out = tmp_path_factory.mktemp("bundles") / name
        run_cli("--out", str(out), "--no-progress", *args, module="icd_edge.export", check=True)
        return out
    from filelock import FileLock

    out = tmp_path_factory.getbasetemp().parent / "shared_bundles" / name
    out.parent.mkdir(exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "manifest.json").is_file():
            run_cli("--out", str(out), "--no-progress", *args, module="icd_edge.export", check=True)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """The tiny model exported with ONNX graphs and torch reference weights (about 1-2 min)."""
    return shared_export(tmp_path_factory, "tiny.bundle", "--model", "tiny", "--targets", "onnx,torch")


@pytest.fixture(scope="session")
def int8_bundle(tmp_path_factory) -> Path:
    """The tiny model in int8 (UNets static Q/DQ, int8 text encoder), one calibration photo; with a
    TAESD decoder in int8 too (its calibration reads the full VAE's final latents)."""
    return shared_export(
        tmp_path_factory,
        "int8.bundle",
        "--model",
        "tiny",
        "--calibration-count",
        "1",
        "--precision",
        "int8",
        "--graph-precision",
        "text_encoder=int8",
        "--taesd",
        "random",
        "--graph-precision",
        "taesd_decoder=int8",
    )


@pytest.fixture(scope="session")
def tiny_xl_bundle(tmp_path_factory) -> Path:
    """tiny-xl (the SDXL classes at toy width) exported with ONNX graphs and torch weights (about a
    minute; 1.5 with the Core ML packages)."""
    import importlib.util

    # with Core ML packages where coremltools is installed (converted on Linux too; predicted on macOS only)
    targets = "onnx,torch" + (",coreml" if importlib.util.find_spec("coremltools") else "")
    return shared_export(tmp_path_factory, "tiny-xl.bundle", "--model", "tiny-xl", "--targets", targets)


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
