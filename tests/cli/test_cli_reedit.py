"""Re-edits from an inversion file: invert → .npz → edit/reconstruct --inversion, several targets
per run, and the errors of each (exit code 2, one line, no file left behind)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from icd_edge.edit.inversion import Inversion
from icd_edge.image import read_metadata

CAT = "a photo of a cat"
DOG, TIGER = "a photo of a dog", "a photo of a tiger"


def _fails(tmp_path, *args) -> str:
    """Run the CLI expecting a bad-input failure; nothing new may appear in tmp_path."""
    before = sorted(p.name for p in tmp_path.rglob("*"))
    proc = run_cli(*args)
    assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no output, no temporary file
    return lines[0]


@pytest.fixture(scope="module")
def inv_file(tiny_bundle, tmp_path_factory, photo):
    """One inversion file of the cat photo, made with non-default seed, rng and fit (so that a
    re-edit that ignored the file's settings would differ from a fresh inversion)."""
    folder = tmp_path_factory.mktemp("inv")
    Image.fromarray(photo).save(folder / "cat.png")
    out = folder / "inv.npz"
    args = ["invert", "--bundle", str(tiny_bundle), "--image", str(folder / "cat.png"), "--source", CAT]
    args += ["--seed", "3", "--rng", "numpy", "--fit", "crop", "--out", str(out), "--json"]
    rep = json.loads(run_cli(*args, check=True).stdout)
    assert rep["wrote"] == str(out) and rep["source_cache"] is False
    return out


@pytest.fixture(scope="module")
def fresh(tiny_bundle, photo):
    """The same edits from a fresh inversion through the API: what the file must reproduce."""
    from icd_edge.edit.editor import Editor

    with Editor.open(tiny_bundle, backend="onnxruntime") as ed:
        inv = ed.invert(photo, CAT, seed=3, fit="crop", rng="numpy")
        return {
            DOG: np.asarray(ed.edit(inv, DOG)),
            TIGER: np.asarray(ed.edit(inv, TIGER)),
            "source": np.asarray(ed.edit(inv, DOG, return_source=True)[1]),
            "rec": np.asarray(ed.reconstruct(inv)),
        }


def _edit(bundle, *args):
    return ["edit", "--bundle", str(bundle), "--backend", "onnxruntime", *args]


def test_the_file_holds_the_inversion(inv_file, tiny_bundle):
    inv = Inversion.load(inv_file)
    assert (inv.source_prompt, inv.seed, inv.rng, inv.fit) == (CAT, 3, "numpy", ("crop", 451, 300))
    assert inv.image_size == (451, 300) and inv.latent.shape == (1, 4, 16, 16)
    from icd_edge.bundle.store import open_bundle

    assert inv.bundle_id == open_bundle(tiny_bundle, verify=False).bundle_id


def test_edit_two_targets_from_the_file_with_a_pattern(inv_file, tiny_bundle, tmp_path, fresh):
    out = tmp_path / "e_{i}.png"
    proc = run_cli(
        *_edit(tiny_bundle, "--inversion", str(inv_file), "--target", DOG, "--target", TIGER, "--out", str(out)),
        "--json",
        check=True,
    )
    rep = json.loads(proc.stdout)
    paths = [tmp_path / "e_1.png", tmp_path / "e_2.png"]
    assert rep["wrote"] == [str(p) for p in paths]
    assert rep["outputs"] == [{"target": DOG, "path": str(paths[0])}, {"target": TIGER, "path": str(paths[1])}]
    assert rep["parameters"]["target"] == [DOG, TIGER] and rep["parameters"]["inversion"] == str(inv_file)
    for path, target in zip(paths, (DOG, TIGER)):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), fresh[target])  # the file's own x_999
        meta = read_metadata(path)
        assert meta["target"] == target and meta["command"] == "edit"
        assert (meta["source"], meta["seed"], meta["rng"], meta["fit"]) == (CAT, 3, "numpy", "crop")
        assert meta["inversion"] == str(inv_file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e_1.png", "e_2.png"]


def test_edit_out_dir_with_the_source_row_edits_one_by_one(inv_file, tiny_bundle, tmp_path, fresh):
    """--save-source takes the per-target path (edit() each, the source row from the first): the
    images must equal edit_many's (the pattern test above) and the source row be written once."""
    out_dir = tmp_path / "edits"
    out_dir.mkdir()
    src = tmp_path / "source.png"
    run_cli(
        *_edit(tiny_bundle, "--inversion", str(inv_file), "--target", DOG, "--target", TIGER),
        *("--out-dir", str(out_dir), "--save-source", str(src), "--source", CAT),  # --source equal to the file's
        check=True,
    )
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["01_a-photo-of-a-dog.png", "02_a-photo-of-a-tiger.png"]
    for name, target in zip(names, (DOG, TIGER)):
        np.testing.assert_array_equal(np.asarray(Image.open(out_dir / name)), fresh[target])
        assert read_metadata(out_dir / name)["target"] == target
    np.testing.assert_array_equal(np.asarray(Image.open(src)), fresh["source"])
    meta = read_metadata(src)
    assert meta["command"] == "edit-source" and meta["target"] == [DOG, TIGER]


def test_target_slug_in_the_name(inv_file, tiny_bundle, tmp_path):
    run_cli(
        *_edit(tiny_bundle, "--inversion", str(inv_file), "--target", "A photo of a DOG, in snow!"),
        *("--out", str(tmp_path / "{target}.jpg")),
        check=True,
    )
    assert [p.name for p in tmp_path.iterdir()] == ["a-photo-of-a-dog-in-snow.jpg"]


def test_reconstruct_from_the_file(inv_file, tiny_bundle, tmp_path, fresh):
    out = tmp_path / "rec.png"
    args = ["reconstruct", "--bundle", str(tiny_bundle), "--backend", "onnxruntime", "--inversion", str(inv_file)]
    run_cli(*args, "--out", str(out), check=True)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), fresh["rec"])
    meta = read_metadata(out)
    assert meta["command"] == "reconstruct" and meta["source"] == CAT and meta["inversion"] == str(inv_file)
    assert "--image" in _fails(tmp_path, *args, "--image", str(out), "--out", str(tmp_path / "r2.png"))
    assert "--seed" in _fails(tmp_path, *args, "--seed", "0", "--out", str(tmp_path / "r2.png"))


# ----------------------------------------------------------------------------- errors


def test_several_targets_need_several_names(inv_file, tiny_bundle, tmp_path):
    base = _edit(tiny_bundle, "--inversion", str(inv_file))
    two = ["--target", DOG, "--target", TIGER]
    msg = _fails(tmp_path, *base, *two, "--out", str(tmp_path / "x.png"))
    assert "2 --target prompts" in msg and "{i}" in msg and "--out-dir" in msg
    msg = _fails(tmp_path, *base, "--target", DOG, "--target", DOG, "--out", str(tmp_path / "{target}.png"))
    assert "--target 1" in msg and "--target 2" in msg and "would both write" in msg
    # distinct prompts, one file name: the slug drops case and punctuation
    msg = _fails(tmp_path, *base, "--target", "a dog", "--target", "A dog!", "--out", str(tmp_path / "{target}.png"))
    assert "would both write" in msg
    assert "unknown placeholder {n}" in _fails(tmp_path, *base, "--target", DOG, "--out", str(tmp_path / "{n}.png"))
    assert "--preview" in _fails(tmp_path, *base, *two, "--out", str(tmp_path / "{i}.png"), "--preview", str(tmp_path))
    msg = _fails(tmp_path, *base, *two, "--out", str(tmp_path / "{i}.png"), "--save-source", str(tmp_path / "1.png"))
    assert "--save-source" in msg
    assert "not a folder" in _fails(tmp_path, *base, *two, "--out-dir", str(tmp_path / "missing"))
    assert "--quality" in _fails(tmp_path, *base, *two, "--out-dir", str(tmp_path), "--quality", "80")


def test_names_are_checked_before_the_bundle_opens(inv_file, tmp_path):
    """A bundle that does not exist: the output errors must still be what is reported."""
    base = ["edit", "--bundle", str(tmp_path / "no.bundle"), "--inversion", str(inv_file)]
    msg = _fails(tmp_path, *base, "--target", DOG, "--target", DOG, "--out", str(tmp_path / "{target}.png"))
    assert "would both write" in msg
    assert "does not exist" in _fails(tmp_path, *base, "--target", DOG, "--out", str(tmp_path / "no" / "{i}.png"))
    assert "no.bundle" in _fails(tmp_path, *base, "--target", DOG, "--out", str(tmp_path / "{i}.png"))  # control


def test_bad_inversion_files(inv_file, tiny_bundle, photo_png, tmp_path, monkeypatch):
    import icd_edge.edit.inversion as inversion

    inv = Inversion.load(inv_file)
    other = dataclasses.replace(inv, bundle_id="0" * 16).save(tmp_path / "other.npz")
    monkeypatch.setattr(inversion, "FILE_VERSION", inversion.FILE_VERSION + 1)
    newer = inv.save(tmp_path / "newer.npz")  # the CLI's process reads with the real FILE_VERSION
    monkeypatch.undo()
    data = inv_file.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    out = str(tmp_path / "out.png")

    def edit(path, *extra):
        return _fails(tmp_path, *_edit(tiny_bundle, "--inversion", str(path), "--target", DOG, "--out", out), *extra)

    assert "another bundle" in edit(other)
    msg = edit(newer)
    assert f"format version {inversion.FILE_VERSION + 1}" in msg and "upgrade" in msg
    assert "not an .npz archive" in edit(tmp_path / "trunc.npz")
    assert "not an .npz archive" in edit(photo_png)
    assert "does not exist" in edit(tmp_path / "missing.npz")
    assert "not the prompt" in edit(inv_file, "--source", "a photo of a cow")
    msg = edit(inv_file, "--seed", "3", "--fit", "crop")  # even the file's own values: they cannot change
    assert "--seed and --fit cannot be used with --inversion" in msg
    assert "--rng" in edit(inv_file, "--rng", "numpy")
    assert "not allowed with" in edit(inv_file, "--image", str(photo_png))
    msg = _fails(tmp_path, *_edit(tiny_bundle, "--image", str(photo_png), "--target", DOG, "--out", out))
    assert "--image needs --source" in msg
    assert "one of the arguments --image --inversion is required" in _fails(
        tmp_path, *_edit(tiny_bundle, "--source", CAT, "--target", DOG, "--out", out)
    )


def test_every_target_is_checked_before_any_model_runs(inv_file, tiny_bundle, tmp_path, monkeypatch, capsys):
    from icd_edge import cli
    from icd_edge.runtimes.ort import OrtBackend

    monkeypatch.setattr(OrtBackend, "open_session", lambda *a, **k: pytest.fail("a graph ran before the check"))
    for extra in (["--target", DOG, "--target", "  "], ["--target", DOG, "--target", TIGER, "--guidance", "40"]):
        args = _edit(tiny_bundle, "--inversion", str(inv_file), *extra, "--out", str(tmp_path / "{i}.png"))
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
    assert list(tmp_path.iterdir()) == []


def test_a_failing_save_leaves_none_of_the_outputs(inv_file, tiny_bundle, tmp_path, monkeypatch, capsys):
    """All or nothing: the second image's write fails (a full disk), so the first, already
    written to its temporary file, must not appear either."""
    import errno
    import os

    import icd_edge.image as image
    from icd_edge import cli

    real, calls = image.save_image, []

    def second_fails(img, path, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(img, path, **kw)

    monkeypatch.setattr(image, "save_image", second_fails)
    args = _edit(tiny_bundle, "--inversion", str(inv_file), "--target", DOG, "--target", TIGER)
    assert cli.main([*args, "--out", str(tmp_path / "e_{i}.png"), "-q"]) == 2
    assert len(calls) == 2  # the first image was written (to its temporary file) before the fault
    assert "disk is full" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


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


def _invert_args(bundle, image, out):
    return ["invert", "--bundle", str(bundle), "--backend", "onnxruntime", "--image", str(image), "--source", CAT] + [
        "--out",
        str(out),
    ]


def test_invert_save_source_stores_the_editors_cache(tiny_bundle, photo_png, tmp_path, fresh, monkeypatch, capsys):
    """The tiny bundle has the re-edit graphs, so the inversion computes the cache and the file
    holds it; an edit of the file then uses it as stored (computing it again is forbidden here)
    and gives the fresh inversion's image."""
    from icd_edge import cli
    from icd_edge.bundle.store import open_bundle
    from icd_edge.edit.editor import Editor

    out = tmp_path / "inv.npz"
    args = _invert_args(tiny_bundle, photo_png, out) + ["--seed", "3", "--rng", "numpy", "--fit", "crop"]
    proc = run_cli(*args, "--save-source", "--json", check=True)
    inv, rep = Inversion.load(out), json.loads(proc.stdout)
    assert inv.source is not None and inv.source.steps == len(open_bundle(tiny_bundle).manifest.schedule.reverse)
    assert rep["source_cache"] is True and rep["source_cache_bytes"] == inv.source.nbytes
    assert "note:" not in proc.stderr
    monkeypatch.setattr(Editor, "_source_pass", lambda *a, **k: pytest.fail("the stored cache was not used"))
    dog = tmp_path / "dog.png"
    assert cli.main(_edit(tiny_bundle, "--inversion", str(out), "--target", DOG, "--out", str(dog), "-q")) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(dog)), fresh[DOG])
    assert capsys.readouterr().err == ""


def test_invert_save_source_without_a_cache_says_so(tiny_bundle, photo_png, tmp_path):
    """--memory sequential computes no cache (the editor's policy): the file is saved without it,
    with one note (none with -q), not an error."""
    out = tmp_path / "inv.npz"
    args = _invert_args(tiny_bundle, photo_png, out) + ["--memory", "sequential", "--save-source"]
    proc = run_cli(*args, "--json", check=True)
    assert json.loads(proc.stdout)["source_cache"] is False and Inversion.load(out).source is None
    assert proc.stderr.count("note: ") == 1 and "saved without it" in proc.stderr
    assert run_cli(*args, "-q", check=True).stderr == ""


def test_no_source_pass_where_nothing_uses_it(tiny_bundle, photo_png, tmp_path, monkeypatch):
    """invert without --save-source and reconstruct drop the source cache, so they must not spend
    the reverse steps computing it."""
    from icd_edge import cli
    from icd_edge.edit.editor import Editor

    monkeypatch.setattr(Editor, "_source_pass", lambda *a, **k: pytest.fail("a source pass ran"))
    out = tmp_path / "inv.npz"
    assert cli.main(_invert_args(tiny_bundle, photo_png, out) + ["-q"]) == 0
    assert Inversion.load(out).source is None
    rec = ["reconstruct", "--bundle", str(tiny_bundle), "--backend", "onnxruntime", "--out", str(tmp_path / "r.png")]
    assert cli.main([*rec, "--image", str(photo_png), "--source", CAT, "-q"]) == 0
    assert cli.main([*rec, "--inversion", str(out), "-q"]) == 0
