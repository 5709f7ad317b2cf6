"""The CLI on an SDXL bundle (tiny-xl), and the SDXL export's refusals: exit code 2, one line,
nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image


def _edit(bundle, photo_png, out, *extra):
    return run_cli(
        "edit",
        "--bundle",
        str(bundle),
        "--image",
        str(photo_png),
        "--source",
        "a photo of a cat",
        "--target",
        "a photo of a dog",
        "--out",
        str(out),
        "--backend",
        "onnxruntime",
        "--quiet",
        *extra,
    )


def test_edit_invert_and_generate(tiny_xl_bundle, photo_png, tmp_path):
    from icd_edge.image import read_metadata

    out = tmp_path / "dog.png"
    proc = _edit(tiny_xl_bundle, photo_png, out, "--guidance", "7", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["parameters"]["tau"] == 0.7 and report["parameters"]["guidance"] == 7.0
    assert "blend" not in report["parameters"] and "cross_replace" not in report["parameters"]
    assert Image.open(out).size == (128, 128)
    meta = read_metadata(out)
    assert meta["tau"] == 0.7 and meta["model"] == "tiny-xl"

    # invert to a file, then edit from it: the same image as the edit from the photo
    inv = tmp_path / "cat.npz"
    args = ("--bundle", str(tiny_xl_bundle), "--backend", "onnxruntime", "--quiet")
    proc = run_cli("invert", *args, "--image", str(photo_png), "--source", "a photo of a cat", "--out", str(inv))
    assert proc.returncode == 0, proc.stderr
    again = tmp_path / "dog2.png"
    proc = run_cli(
        "edit", *args, "--inversion", str(inv), "--target", "a photo of a dog", "--guidance", "7", "--out", str(again)
    )
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))

    gen = tmp_path / "gen.png"
    proc = run_cli("generate", *args, "--prompt", "a photo of a dog", "--out", str(gen))
    assert proc.returncode == 0, proc.stderr
    assert Image.open(gen).size == (128, 128)


@pytest.mark.parametrize(
    "flags, named",
    [
        (("--blend", "cat", "dog"), "--blend"),
        (("--cross-replace", "0.4", "--amplify", "dog=2"), "--cross-replace, --amplify"),
        (("--mode", "replace"), "--mode"),
        (("--decoder", "taesd"), "full VAE only"),
    ],
)
def test_edit_refuses_sd15_controls(tiny_xl_bundle, photo_png, tmp_path, flags, named):
    out = tmp_path / "dog.png"
    proc = _edit(tiny_xl_bundle, photo_png, out, *flags)
    assert proc.returncode == 2, proc.stderr
    assert named in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, says",
    [
        (("--taesd", "random"), "TAESDXL"),
        (("--graph-precision", "vae_decoder=fp16"), "--vae"),
        (("--p2p-attention", "explicit"), "Prompt-to-Prompt"),
    ],
)
def test_sdxl_export_refusals(tmp_path, flags, says):
    out = tmp_path / "xl.bundle"
    proc = run_cli("--model", "tiny-xl", "--out", str(out), "--no-progress", *flags, module="icd_edge.export")
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_sdxl_core_ml_packages_take_the_added_condition(tiny_xl_bundle):
    """Core ML packages of every SDXL graph, their I/O the manifest's (checked by the export,
    read back here); prediction needs macOS and is not run."""
    import importlib.util

    if importlib.util.find_spec("coremltools") is None:
        pytest.skip("coremltools is not installed (pip install -c constraints.txt -e '.[coreml]')")
    import coremltools as ct

    from icd_edge.export.to_coreml import package_io

    m = json.loads((tiny_xl_bundle / "manifest.json").read_text())
    for graph, entry in m["graphs"].items():
        art = entry["artifacts"]["coreml"]
        assert art["format"] == "mlprogram"
        inputs, outputs = package_io(ct.models.MLModel(str(tiny_xl_bundle / art["file"]), skip_model_load=True))
        assert [(i["name"], list(i["shape"])) for i in inputs] == [(i["name"], i["shape"]) for i in entry["inputs"]]
        assert [(o["name"], list(o["shape"])) for o in outputs] == [(o["name"], o["shape"]) for o in entry["outputs"]]
    assert [i["name"] for i in m["graphs"]["unet_reverse"]["inputs"]][-2:] == ["text_embeds", "time_ids"]
