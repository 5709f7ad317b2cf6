"""TAESD decoder: both weight layouts load to the same model; bundles with --taesd decode and preview."""

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from icd_edge.edit.editor import Editor
from icd_edge.errors import ExportError, InputError
from icd_edge.export.taesd import diffusers_decoder_to_official, load_taesd


def test_official_and_diffusers_layouts_load_identically(tmp_path):
    ref = load_taesd("random", seed=3)
    state = ref.state_dict()
    official = diffusers_decoder_to_official(state)
    assert "1.weight" in official and not any(k.startswith("0.") for k in official)  # index 0 is Clamp
    torch.save(official, tmp_path / "taesd_decoder.pth")
    ref.save_pretrained(tmp_path / "diffusers", safe_serialization=True)
    for source in (tmp_path / "taesd_decoder.pth", tmp_path / "diffusers"):
        got = load_taesd(str(source)).state_dict()
        for k, v in state.items():
            if k.startswith("decoder."):
                assert torch.equal(got[k], v), (source, k)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            load_taesd(str(tmp_path / "taesd_decoder.pth")).decode(x).sample, ref.decode(x).sample
        )


def test_bad_taesd_sources(tmp_path):
    (tmp_path / "x.txt").write_text("no")
    with pytest.raises(ExportError, match="must be"):
        load_taesd(str(tmp_path / "x.txt"))
    torch.save({"1.bogus": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ExportError, match="not an SD1.5 TAESD"):
        load_taesd(str(tmp_path / "bad.pth"))
    with pytest.raises(ExportError, match="cannot load"):
        load_taesd(str(tmp_path / "missing-folder"))


@pytest.fixture(scope="module")
def taesd_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("taesd") / "b"
    run_cli(
        "--model",
        "tiny",
        "--out",
        str(out),
        "--taesd",
        "random",
        "--targets",
        "onnx,torch",
        "--no-progress",
        "--no-reedit",
        "--parity",
        "graphs",
        module="icd_edge.export",
        check=True,
    )
    return out


def test_taesd_bundle_decodes_and_previews(taesd_bundle, photo, tmp_path):
    from icd_edge.bundle.store import open_bundle

    m = open_bundle(taesd_bundle).manifest
    assert m.parity.get("graph", "taesd_decoder").psnr_db >= 60
    previews = []
    with Editor.open(taesd_bundle, decoder="taesd") as ed:
        inv = ed.invert(photo, "a photo of a cat")
        img = ed.edit(inv, "a photo of a dog", preview=lambda k, n, im: previews.append((k, n, im.size)))
        assert (
            img.size == (128, 128) and "taesd_decoder" in ed.loaded_graphs() and "vae_decoder" not in ed.loaded_graphs()
        )
    assert previews == [(k, 4, (128, 128)) for k in range(1, 5)]
    previews.clear()
    with Editor.open(taesd_bundle, decoder="taesd", memory="sequential") as ed:
        seq = ed.edit(
            ed.invert(photo, "a photo of a cat"),
            "a photo of a dog",
            preview=lambda k, n, im: previews.append(sorted(ed.loaded_graphs())),
        )
        # previews decode beside the edit UNet; the final decode releases it first
        assert previews == [["taesd_decoder", "unet_reverse_edit"]] * 4 and list(ed.loaded_graphs()) == [
            "taesd_decoder"
        ]
    assert np.array_equal(np.asarray(seq), np.asarray(img))
    Image.fromarray(photo).save(tmp_path / "p.png")
    (tmp_path / "prev").mkdir()
    proc = run_cli(
        "edit",
        "--bundle",
        str(taesd_bundle),
        "--image",
        str(tmp_path / "p.png"),
        "--source",
        "a photo of a cat",
        "--target",
        "a photo of a dog",
        "--out",
        str(tmp_path / "o.png"),
        "--preview",
        str(tmp_path / "prev"),
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "prev").iterdir()) == [f"step_{k}_of_4.png" for k in range(1, 5)]


def test_taesd_decoder_needs_a_taesd_bundle(tiny_bundle):
    with pytest.raises(InputError, match="no TAESD"):
        Editor.open(tiny_bundle, decoder="taesd")


def test_torch_paths_decode_with_the_bundles_taesd(taesd_bundle, photo):
    """The export keeps TAESD's torch weights: the torch reference and the fast torch path
    (here on the CPU, fp32, eager) decode with it as the ONNX graph does."""
    from icd_edge.export.parity import psnr_db
    from icd_edge.fast.editor import FastEditor

    kw = dict(cross_replace=0.4, self_replace=0.6, blend=("cat", "dog"))
    src, tgt = "a photo of a cat", "a photo of a dog"

    def edit(backend):
        with Editor.open(taesd_bundle, backend=backend, decoder="taesd") as ed:
            return ed.edit(ed.invert(photo, src, seed=4), tgt, output_type="np", **kw)

    onnx_img, torch_img = edit("onnxruntime"), edit("torch")
    assert psnr_db(onnx_img, torch_img, peak=1.0) > 60
    cpu = dict(device="cpu", dtype="float32", channels_last=False, compile=False, cuda_graphs=False)
    fast = FastEditor.from_bundle(taesd_bundle, decoder="taesd", **cpu)
    fast_img = fast.edit_image(photo, src, tgt, seed=4, output_type="np", **kw)
    assert psnr_db(onnx_img, fast_img, peak=1.0) > 60
    # a re-edit from the source cache decodes with it too
    lat = fast.invert_batch([photo], [src], [4])
    again = fast.reedit_batch(lat, fast.source_cache(lat, src), src, [tgt], **kw)
    assert psnr_db(fast_img, again[0], peak=1.0) >= 60
    # the same latents through the SD VAE: another image (the decoder really changed)
    full = FastEditor.from_bundle(taesd_bundle, **cpu).edit_image(photo, src, tgt, seed=4, output_type="np", **kw)
    assert psnr_db(full, fast_img, peak=1.0) < 30


def test_fast_taesd_needs_its_torch_weights(tiny_bundle):
    from icd_edge.errors import BackendUnavailable
    from icd_edge.fast.editor import FastEditor, FastOptions

    cpu = dict(device="cpu", dtype="float32", channels_last=False, compile=False, cuda_graphs=False)
    with pytest.raises(BackendUnavailable, match="--taesd and --targets onnx,torch"):
        FastEditor.from_bundle(tiny_bundle, decoder="taesd", **cpu)
    with pytest.raises(InputError, match="decoder must be"):
        FastEditor(None, None, None, None, None, FastOptions(decoder="tiny", **cpu))
