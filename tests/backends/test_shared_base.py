"""shared-base bundles: the teacher's weights stored once (LoRAs as low-rank branches) and, with
``memory="shared-base"``, mapped once for all UNet sessions; same images as fused UNets."""

import numpy as np
import pytest
from conftest import run_cli

from icd_edge.bundle.store import open_bundle
from icd_edge.edit.editor import Editor
from icd_edge.errors import InputError
from icd_edge.export.parity import psnr_db


@pytest.fixture(scope="module")
def shared_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("shared") / "b"
    run_cli(
        "--model",
        "tiny",
        "--out",
        str(out),
        "--unet-weights",
        "shared-base",
        "--targets",
        "onnx,torch",
        "--no-progress",
        "--no-reedit",  # re-edits are tested on the fused bundle; this halves the export
        module="icd_edge.export",
        check=True,
    )
    return out


def test_teacher_weights_are_stored_once(shared_bundle, tiny_bundle):
    m = open_bundle(shared_bundle).manifest
    assert m.unet_weights == "shared-base" and m.info["sources"]["lora"]["forward"]["fused"] is False
    arts = {g: m.graphs[g].artifacts["onnx"].weights for g in ("unet_forward", "unet_reverse", "unet_reverse_edit")}
    assert set(arts.values()) == {"onnx/unet_base.weights"}
    shared = m.info["shared_initializers"]
    assert len(shared["unet_forward"]) > 50 and len(shared["unet_reverse_edit"]) > 50
    fused = open_bundle(tiny_bundle).manifest.files
    fused_unets = fused["onnx/unet_forward.weights"].bytes + fused["onnx/unet_reverse.weights"].bytes
    assert m.files["onnx/unet_base.weights"].bytes < 0.8 * fused_unets
    assert m.parity.get("edit", "synthetic").psnr_db >= 45  # branches vs the fused torch reference


def test_shared_memory_policy_gives_the_same_image(shared_bundle, tiny_bundle, photo):
    images = {}
    for label, bundle, memory in (
        ("resident", shared_bundle, "resident"),
        ("shared", shared_bundle, "shared-base"),
        ("fused", tiny_bundle, "resident"),
    ):
        with Editor.open(bundle, memory=memory, source_cache="off") as ed:  # the batch-2 edit on all three
            inv = ed.invert(photo, "a photo of a cat", seed=1)
            images[label] = ed.edit(inv, "a photo of a dog", blend=("cat", "dog"), output_type="np")
            if memory == "shared-base":
                assert len(ed.backend._shared_values) > 50  # one mapping per shared tensor
    assert psnr_db(images["resident"], images["shared"], peak=1.0) > 90
    assert psnr_db(images["fused"], images["shared"], peak=1.0) > 60


def test_shared_policy_needs_a_shared_bundle(tiny_bundle):
    with pytest.raises(InputError, match="--unet-weights shared-base"):
        Editor.open(tiny_bundle, memory="shared-base")


def test_equal_bytes_of_different_shapes_are_separate_values(tmp_path):
    """The weight store deduplicates by content, so one byte range can back tensors of different
    shapes (all-ones norm scales of (320,) and (320, 1, 1) in the full-size UNet); each shape
    gets its own value (a regression: the second got the first's shape and the full-size
    shared-base UNet failed with a broadcast error)."""
    import types

    from icd_edge.runtimes.ort import OrtBackend

    ones = np.ones(320, np.float32)
    (tmp_path / "w.weights").write_bytes(ones.tobytes())
    bundle = types.SimpleNamespace(path=lambda rel: tmp_path / rel)
    backend = OrtBackend(share_weights=True)
    a = backend._shared_value(bundle, "w.weights", 0, ones.nbytes, "float32", [320])
    b = backend._shared_value(bundle, "w.weights", 0, ones.nbytes, "float32", [320, 1, 1])
    assert a.shape() == [320] and b.shape() == [320, 1, 1]
    assert backend._shared_value(bundle, "w.weights", 0, ones.nbytes, "float32", [320]) is a  # still mapped once
