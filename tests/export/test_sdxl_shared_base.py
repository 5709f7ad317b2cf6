"""An SDXL bundle with shared-base UNets (the teacher's weights stored once, the LoRAs as
branches) and another VAE given with --vae (as an fp16-safe one would be): the same images as the
fused weights under every memory policy, the VAE in fp16 and recorded as a deviation."""

from __future__ import annotations

import numpy as np
from conftest import run_cli

from icd_edge.bundle.store import open_bundle
from icd_edge.edit.editor import Editor
from icd_edge.export.parity import psnr_db


def test_sdxl_shared_base_bundle(tmp_path, tiny_xl_bundle, photo):
    out = tmp_path / "xl-shared.bundle"
    run_cli(
        "--model",
        "tiny-xl",
        "--out",
        str(out),
        "--unet-weights",
        "shared-base",
        "--precision",
        "fp16",
        "--graph-precision",
        "unet_forward=fp32",
        "--graph-precision",
        "unet_reverse=fp32",
        "--vae",
        str(tiny_xl_bundle / "torch" / "vae"),  # the same weights, standing in for an fp16-safe VAE
        "--no-progress",
        module="icd_edge.export",
        check=True,
    )
    m = open_bundle(out).manifest
    assert m.unet_weights == "shared-base"
    assert m.graphs["vae_decoder"].artifacts["onnx"].precision == "fp16"  # --vae: it follows --precision
    assert "vae" in m.info["sources"]["deviations"][0]
    assert {m.graphs[g].artifacts["onnx"].weights for g in ("unet_forward", "unet_reverse")} == {
        "onnx/unet_base.weights"
    }
    assert len(m.info["shared_initializers"]["unet_forward"]) > 50
    # the fp16 text encoders of a shared-base bundle are traced in float16 too (the converter mis-types them)
    assert m.graphs["text_encoder_2"].artifacts["onnx"].details["fp16_method"] == "traced in float16"
    assert all(e.psnr_db >= 35 for e in m.parity.entries if e.check in ("edit", "generate"))
    images = {}
    for memory in ("resident", "shared-base", "sequential"):
        with Editor.open(out, "onnxruntime", memory=memory) as ed:
            images[memory] = ed.edit(ed.invert(photo, "a photo of a cat", seed=1), "a photo of a dog", output_type="np")
    assert psnr_db(images["resident"], images["shared-base"], peak=1.0) > 90
    np.testing.assert_array_equal(images["resident"], images["sequential"])
    with Editor.open(tiny_xl_bundle, "onnxruntime") as ed:  # the fused fp32 bundle of the same weights
        fused = ed.edit(ed.invert(photo, "a photo of a cat", seed=1), "a photo of a dog", output_type="np")
    assert psnr_db(fused, images["resident"], peak=1.0) > 35
