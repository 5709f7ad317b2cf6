"""Same seed, same noise as the official code: noise and latents passed in, and the source row of
an edit (torch_randn against torch.randn bit for bit: tests/unit/test_rng.py)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_cli

from icd_edge import torch_randn
from icd_edge.errors import InputError


def test_invert_noise_latent_and_rng(tiny_bundle, photo):
    from icd_edge.edit.editor import Editor

    with Editor.open(tiny_bundle, backend="onnxruntime") as ed:
        h = ed.constants.latent_hw
        a = ed.invert(photo, "a cat", seed=3)  # default: the official torch noise
        b = ed.invert(photo, "a cat", noise=torch_randn((1, 4, h, h), 3))
        c = ed.invert(photo, "a cat", noise=torch_randn((4, h, h), 3))
        np.testing.assert_array_equal(a.latent, b.latent)
        np.testing.assert_array_equal(a.latent, c.latent)
        assert a.rng == "torch" and b.rng == "array" and b.seed is None
        n = ed.invert(photo, "a cat", seed=3, rng="numpy")
        assert n.rng == "numpy" and not np.array_equal(n.latent, a.latent)
        np.testing.assert_array_equal(
            n.latent,
            ed.invert(photo, "a cat", noise=np.random.default_rng(3).standard_normal((1, 4, h, h), np.float32)).latent,
        )
        for noise, match in (
            (np.zeros((1, 4, h + 1, h), np.float32), "shape"),
            (np.zeros((1, 4, h, h), np.int64), "float"),
            (np.full((1, 4, h, h), np.nan, np.float32), "NaN"),
        ):
            with pytest.raises(InputError, match=match):
                ed.invert(photo, "a cat", noise=noise)
        with pytest.raises(InputError, match="rng"):
            ed.invert(photo, "a cat", rng="philox")
        # an inversion made elsewhere, decoded here
        known = ed.inversion_from_latent(np.array(a.latent), "a cat")
        assert known.rng == "latent" and known.image_size == (ed.constants.image_hw, ed.constants.image_hw)
        np.testing.assert_array_equal(ed.edit(known, "a dog", output_type="np"), ed.edit(a, "a dog", output_type="np"))
        with pytest.raises(InputError, match="shape"):
            ed.inversion_from_latent(np.zeros((1, 3, h, h), np.float32), "a cat")
        g1 = ed.generate("a dog", seed=5, output_type="np")
        g2 = ed.generate("a dog", noise=torch_randn((1, 4, h, h), 5), output_type="np")
        np.testing.assert_array_equal(g1, g2)


def test_edit_returns_the_source_row(tiny_bundle, photo):
    from icd_edge.edit.editor import Editor
    from icd_edge.export.parity import psnr_db

    with Editor.open(tiny_bundle, backend="onnxruntime") as ed:
        inv = ed.invert(photo, "a photo of a cat")
        alone = ed.edit(inv, "a photo of a dog", blend=("cat", "dog"), output_type="np")
        target, source = ed.edit(inv, "a photo of a dog", blend=("cat", "dog"), output_type="np", return_source=True)
        np.testing.assert_array_equal(alone, target)
        # the source row is the unguided reconstruction (batch-2 edit graph vs the batch-1 graph)
        assert psnr_db(ed.reconstruct(inv, output_type="np"), source, peak=1.0) > 60
        assert psnr_db(source, target, peak=1.0) < 60  # and not the edit


def test_cli_rng_and_save_source(tiny_bundle, photo_png, tmp_path):
    from PIL import Image

    from icd_edge.image import read_metadata

    base = [
        "edit",
        "--bundle",
        str(tiny_bundle),
        "--image",
        str(photo_png),
        "--source",
        "a photo of a cat",
        "--target",
        "a photo of a dog",
    ]
    run_cli(*base, "--out", str(tmp_path / "t.png"), "--save-source", str(tmp_path / "s.png"), check=True)
    run_cli(*base, "--out", str(tmp_path / "n.png"), "--rng", "numpy", check=True)
    t, s, n = (np.asarray(Image.open(tmp_path / f)) for f in ("t.png", "s.png", "n.png"))
    assert not np.array_equal(t, s) and not np.array_equal(t, n)
    assert (
        read_metadata(tmp_path / "s.png")["command"] == "edit-source"
        and read_metadata(tmp_path / "n.png")["rng"] == "numpy"
    )
    proc = run_cli(*base, "--out", str(tmp_path / "x.png"), "--save-source", str(tmp_path / "x.png"))
    assert proc.returncode == 2 and "same file" in proc.stderr


@pytest.fixture(scope="module", params=[("3", "4"), ("4", "3")], ids=["3+4", "4+3"])
def mixed_bundle(request, tmp_path_factory):
    fwd, rev = request.param
    out = tmp_path_factory.mktemp("mixed") / f"f{fwd}r{rev}.bundle"
    # graph parity at export; the end-to-end comparison is the test's own, on three backends
    run_cli(
        "--model",
        "tiny",
        "--out",
        str(out),
        "--targets",
        "onnx,torch",
        "--no-progress",
        "--no-reedit",  # mixed schedules of the re-edit graphs: tests/edit/test_reedit.py
        "--forward-steps",
        fwd,
        "--reverse-steps",
        rev,
        "--parity",
        "graphs",
        module="icd_edge.export",
        check=True,
    )
    return out, int(fwd), int(rev)


def test_mixed_step_schedules_run_on_every_backend(mixed_bundle, photo):
    from icd_edge.bundle.store import open_bundle
    from icd_edge.edit.editor import Editor
    from icd_edge.export.parity import psnr_db

    path, fwd, rev = mixed_bundle
    m = open_bundle(path).manifest
    assert m.schedule.config == f"{fwd}+{rev}"
    assert len(m.schedule.forward) == fwd and len(m.schedule.reverse) == rev
    assert m.schedule.forward[-1].s == 999 == m.schedule.reverse[0].t
    assert all(e.psnr_db >= 60 for e in m.parity.find("graph"))  # the export's graph gate
    images, steps = {}, {}
    for backend in ("onnxruntime", "openvino", "torch"):
        with Editor.open(path, backend=backend) as ed:
            calls = []
            ed.profile = calls
            inv = ed.invert(photo, "a photo of a cat")
            images[backend] = ed.edit(
                inv, "a photo of a dog", blend=("cat", "dog"), cross_replace=0.4, self_replace=0.6, output_type="np"
            )
            steps[backend] = (
                [s for s, _ in calls if s.startswith("forward_")],
                [s for s, _ in calls if s.startswith("reverse_edit_")],  # the batch-2 edit (no re-edit graphs)
            )
            ctl = ed.edit_controls("a photo of a cat", "a photo of a dog", cross_replace=0.4, self_replace=0.6)
            # P2P windows follow the reverse schedule's length: k < floor(c (N+1)) and k < floor(s N)
            assert ctl.cross_alpha[:, 0].tolist() == [float(k < int(0.4 * (rev + 1))) for k in range(rev)]
            assert ctl.self_flag[:, 0].tolist() == [float(k < int(0.6 * rev)) for k in range(rev)]
        assert len(steps[backend][0]) == fwd and len(steps[backend][1]) == rev
        assert not any(s.startswith(("source_", "target_")) for s, _ in calls)
    assert psnr_db(images["torch"], images["onnxruntime"], peak=1.0) > 45
    assert psnr_db(images["torch"], images["openvino"], peak=1.0) > 45


def test_lora_pair_that_does_not_meet_at_999_is_refused(tmp_path):
    for name in ("forward-19-259-519-779.safetensors", "reverse-249-499-699-899.safetensors"):
        (tmp_path / name).write_bytes(b"")
    proc = run_cli(
        "--model",
        "icd-sd15",
        "--out",
        str(tmp_path / "b"),
        "--forward-lora",
        str(tmp_path / "forward-19-259-519-779.safetensors"),
        "--reverse-lora",
        str(tmp_path / "reverse-249-499-699-899.safetensors"),
        module="icd_edge.export",
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2 and "do not form one schedule" in proc.stderr and "999" in proc.stderr, proc.stderr
    assert not (tmp_path / "b").exists()


def test_mixed_schedules_on_the_compiled_gpu_path_code(mixed_bundle, photo):
    """FastEditor (the compiled GPU path) runs the same schedule: its device-side loop on the CPU
    in fp32, without compile or CUDA graphs, against the host loop on the torch reference."""
    import tempfile
    from pathlib import Path

    from conftest import TINY_SEED

    from icd_edge.bundle.store import open_bundle
    from icd_edge.edit.editor import Editor
    from icd_edge.export.models import build_random
    from icd_edge.export.parity import psnr_db
    from icd_edge.fast.editor import FastEditor, FastOptions

    path, fwd, rev = mixed_bundle
    b = open_bundle(path)
    with tempfile.TemporaryDirectory() as work:
        src = build_random("tiny", TINY_SEED, Path(work), steps=(fwd, rev))
    fast = FastEditor(
        b,
        src.text_encoder,
        src.vae,
        src.unet_forward,
        src.unet_reverse,
        FastOptions(device="cpu", dtype="float32", channels_last=False, compile=False, cuda_graphs=False),
    )
    kw = dict(cross_replace=0.4, self_replace=0.6, blend=("cat", "dog"))
    with Editor.open(path, backend="torch") as ref:
        a = ref.edit(ref.invert(photo, "a photo of a cat", seed=4), "a photo of a dog", output_type="np", **kw)
    got = fast.edit_image(photo, "a photo of a cat", "a photo of a dog", seed=4, output_type="np", **kw)
    assert psnr_db(a, got, peak=1.0) > 80
