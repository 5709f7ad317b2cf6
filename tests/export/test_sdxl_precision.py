"""tiny-xl at reduced precision: fp16 (SDXL's VAE stays fp32) and static int8 on the reverse UNet,
each through its end-to-end parity gate against the torch fp32 reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli

CASES = {
    # precision: (expected graph precisions, gate dB)
    "fp16": ({"text_encoder": "fp16", "text_encoder_2": "fp16", "unet_forward": "fp16", "unet_reverse": "fp16"}, 35),
    "int8": ({"text_encoder": "fp32", "text_encoder_2": "fp32", "unet_forward": "fp32", "unet_reverse": "int8"}, 25),
}


@pytest.mark.parametrize("precision", sorted(CASES))
def test_reduced_precision_sdxl_bundle(tmp_path, photo, precision):
    from icd_edge.edit.editor import Editor

    out = tmp_path / f"xl-{precision}.bundle"
    run_cli(
        "--model",
        "tiny-xl",
        "--out",
        str(out),
        "--precision",
        precision,
        "--calibration-count",
        "1",
        "--no-progress",
        module="icd_edge.export",
        check=True,
    )
    m = json.loads((out / "manifest.json").read_text())
    want, gate = CASES[precision]
    got = {g: v["artifacts"]["onnx"]["precision"] for g, v in m["graphs"].items()}
    assert got == {**want, "vae_encoder": "fp32", "vae_decoder": "fp32"}
    e2e = [e for e in m["parity"]["entries"] if e["check"] in ("edit", "generate") and e["backend"] == "onnxruntime"]
    assert {e["target"] for e in e2e} == {"synthetic", "calibration_0"}
    assert all(e["gate_db"] == gate for e in e2e)
    assert np.mean([e["psnr_db"] for e in e2e if e["check"] == "edit"]) >= gate
    if precision == "int8":
        assert m["int8_scheme"]["weight_max"] == 64  # exact on CPUs without VNNI too
    with Editor.open(out, "onnxruntime") as ed:
        img = ed.edit(ed.invert(photo, "a photo of a cat"), "a photo of a dog", output_type="np")
    assert img.shape == (128, 128, 3) and np.isfinite(img).all()
