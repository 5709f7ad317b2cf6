"""Re-edits from an inversion file: invert → .npz (edit/reconstruct --inversion follow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli

from icd_edge.edit.inversion import Inversion

CAT = "a photo of a cat"


# ----------------------------------------------------------------------------- invert


def test_invert_out_is_checked_before_the_photo_and_the_bundle(tmp_path, monkeypatch, capsys):
    """Neither the photo (missing) nor the bundle (missing; Editor.open must not even be called)
    may be what fails first: a bad --out is reported at once."""
    from icd_edge import cli
    from icd_edge.edit.editor import Editor

    monkeypatch.setattr(Editor, "open", classmethod(lambda *a, **k: pytest.fail("the bundle was opened")))
    base = ["invert", "--bundle", str(tmp_path / "no.bundle"), "--image", str(tmp_path / "no.png"), "--source", CAT]
    for out, expect in ((tmp_path / "inv.npy", "must end in .npz"), (tmp_path / "no" / "inv.npz", "does not exist")):
        assert cli.main([*base, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --out") and expect in err, err
    assert cli.main([*base, "--out", str(tmp_path / "inv.npz")]) == 2  # control: then the photo fails
    assert "no.png" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_invert_save_source(tiny_bundle, photo_png, tmp_path):
    """Whether this backend computes a source cache during the inversion decides what --save-source
    does: store it, or save without it and say so in one line (none with -q)."""
    out = tmp_path / "inv.npz"
    args = ["invert", "--bundle", str(tiny_bundle), "--image", str(photo_png), "--source", CAT, "--out", str(out)]
    proc = run_cli(*args, "--save-source", "--json", check=True)
    inv = Inversion.load(out)
    assert json.loads(proc.stdout)["source_cache"] is (inv.source is not None)
    if inv.source is None:
        assert proc.stderr.count("note: ") == 1 and "saved without it" in proc.stderr
    else:
        assert "note: " not in proc.stderr and inv.source.steps == 4
    assert run_cli(*args, "--save-source", "-q", check=True).stderr == ""


def test_invert_save_source_stores_the_cache(tiny_bundle, photo_png, tmp_path, monkeypatch):
    """With an editor that does compute a cache (faked here: the cache internals are not the CLI's
    concern), the file holds it, array for array."""
    from icd_edge import cli
    from icd_edge.edit.editor import Editor
    from icd_edge.edit.inversion import SourceCache

    rng = np.random.default_rng(0)
    cache = SourceCache(
        *(rng.standard_normal(s).astype(np.float32) for s in ((4, 1, 4, 16, 16), (4, 1, 64, 77), (4, 99)))
    )
    real = Editor.invert
    monkeypatch.setattr(Editor, "invert", lambda self, *a, **k: real(self, *a, **k).with_source(cache))
    out = tmp_path / "inv.npz"
    args = ["invert", "--bundle", str(tiny_bundle), "--image", str(photo_png), "--source", CAT, "--out", str(out)]
    assert cli.main([*args, "--backend", "onnxruntime", "--save-source", "-q"]) == 0
    back = Inversion.load(out).source
    for name in ("latents", "maps", "tensors"):
        np.testing.assert_array_equal(getattr(back, name), getattr(cache, name))
    assert cli.main([*args, "--backend", "onnxruntime", "-q"]) == 0  # without the flag: not stored
    assert Inversion.load(out).source is None
