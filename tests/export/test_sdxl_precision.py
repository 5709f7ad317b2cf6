"""tiny-xl at reduced precision in one export: fp16 text encoders and forward UNet, static int8
reverse UNet, SDXL's VAE in fp32; the end-to-end gate (the lowest precision's, int8) against the
torch fp32 reference."""

from __future__ import annotations

import json

import numpy as np
from conftest import run_cli


def test_reduced_precision_sdxl_bundle(tmp_path, photo):
    from icd_edge.edit.editor import Editor

    out = tmp_path / "xl-fp16-int8.bundle"
    run_cli(
        "--model",
        "tiny-xl",
        "--out",
        str(out),
        "--precision",
        "fp16",
        "--graph-precision",
        "unet_reverse=int8",
        "--calibration-count",
        "1",
        "--no-progress",
        module="icd_edge.export",
        check=True,
    )
    m = json.loads((out / "manifest.json").read_text())
    got = {g: v["artifacts"]["onnx"]["precision"] for g, v in m["graphs"].items()}
    assert got == {
        "text_encoder": "fp16",
        "text_encoder_2": "fp16",
        "unet_forward": "fp16",
        "unet_reverse": "int8",
        "vae_encoder": "fp32",  # fp32 under --precision fp16: SDXL's VAE overflows in float16
        "vae_decoder": "fp32",
    }
    # SDXL's text encoders are traced in float16 like the UNets (the converter mis-types their output)
    methods = {g: v["artifacts"]["onnx"].get("fp16_method") for g, v in m["graphs"].items()}
    assert methods["text_encoder_2"] == methods["unet_forward"] == "traced in float16"
    e2e = [e for e in m["parity"]["entries"] if e["check"] in ("edit", "generate") and e["backend"] == "onnxruntime"]
    assert {e["target"] for e in e2e} == {"synthetic", "calibration_0"}
    assert all(e["gate_db"] == 25 for e in e2e)
    assert np.mean([e["psnr_db"] for e in e2e if e["check"] == "edit"]) >= 25
    assert m["int8_scheme"]["weight_max"] == 64  # exact on CPUs without VNNI too
    assert m["calibration"]["feeds"]["unet_reverse"] == 8  # the prompt-switch edit and the reconstruction
    with Editor.open(out, "onnxruntime") as ed:
        img = ed.edit(ed.invert(photo, "a photo of a cat"), "a photo of a dog", output_type="np")
    assert img.shape == (128, 128, 3) and np.isfinite(img).all()
