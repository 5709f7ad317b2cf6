"""Bad-input corpus, unusual-but-valid photos, crash safety of the export, one Editor from 8 threads."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from icd_edge.bundle.store import open_bundle
from icd_edge.edit.editor import Editor
from icd_edge.errors import BundleError, ImageError, InputError
from icd_edge.image import fit_square, load_image, restore_fit

# ----------------------------------------------------------------------------- images


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


@pytest.fixture
def rgb(photo) -> Image.Image:
    return Image.fromarray(photo)


def test_bad_image_corpus(tmp_path, rgb):
    png = io.BytesIO()
    rgb.save(png, "PNG")
    jpg = io.BytesIO()
    rgb.save(jpg, "JPEG")
    cases = {
        "zero.png": b"",
        "truncated.png": png.getvalue()[: len(png.getvalue()) // 3],
        "truncated.jpg": jpg.getvalue()[:200],
        "corrupt.png": png.getvalue()[:50] + os.urandom(400) + png.getvalue()[450:],
        "random.bin": os.urandom(2048),
        "text.png": b"just text, not a picture",
    }
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(ImageError):
            load_image(p)
    bomb = _save(Image.new("1", (20000, 20000)), tmp_path / "bomb.png")
    with pytest.raises(ImageError, match="too large"):
        load_image(bomb)
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="NaN"):
        load_image(np.full((4, 4, 3), np.nan, np.float32))


def test_unusual_valid_images_load_as_rgb(tmp_path, rgb):
    small = rgb.resize((64, 48))
    variants = {
        "one.png": Image.new("RGB", (1, 1), (10, 20, 30)),
        "cmyk.jpg": small.convert("CMYK"),
        "grey16.png": Image.fromarray((np.asarray(small.convert("L"), np.uint16) * 257)),
        "palette.png": small.convert("P"),
        "alpha.png": small.convert("RGBA"),
        "la.png": small.convert("LA"),
        "grey.png": small.convert("L"),
        "wide.png": rgb.resize((300, 60)),
    }
    for name, img in variants.items():
        out = load_image(_save(img, tmp_path / name))
        assert out.mode == "RGB" and out.size == img.size, name


def test_alpha_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    img.putpixel((0, 0), (0, 0, 255, 255))
    out = np.asarray(load_image(_save(img, tmp_path / "a.png")))
    assert out[0, 0].tolist() == [0, 0, 255] and out[4, 4].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # white left band
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif, quality=95)
    out = load_image(p)
    assert out.size == (20, 40)  # portrait after orientation
    arr = np.asarray(out).mean(axis=-1)
    assert arr[:10].mean() > 200 and arr[-10:].mean() < 50  # the white band is now on top


@pytest.mark.parametrize("fit, expect", [("stretch", (300, 120)), ("crop", (120, 120)), ("pad", (300, 120))])
def test_fit_policies_restore_geometry(fit, expect):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 300, 3), dtype=np.uint8))
    square, info = fit_square(img, 64, fit)
    assert square.size == (64, 64)
    assert restore_fit(square, info).size == expect
    if fit == "pad":  # the padding is white and is cut away again
        assert np.asarray(square)[0].mean() > 250


def test_keep_size_through_the_editor(tiny_bundle, photo):
    with Editor.open(tiny_bundle) as ed:
        for fit, size in (("stretch", (451, 300)), ("crop", (300, 300)), ("pad", (451, 300))):
            inv = ed.invert(photo, "a photo of a cat", fit=fit)
            assert ed.edit(inv, "a photo of a dog", keep_size=True).size == size
            assert ed.edit(inv, "a photo of a dog").size == (128, 128)
            assert ed.reconstruct(inv, keep_size=True, output_type="np").shape == (size[1], size[0], 3)
        with pytest.raises(InputError, match="fit"):
            ed.invert(photo, "a cat", fit="zoom")


# ----------------------------------------------------------------------------- prompts and parameters


def test_prompt_corpus(tiny_bundle, photo):
    with Editor.open(tiny_bundle) as ed:
        for bad in ("", "   ", "\t\n", "a cat\x00", "a\x07bell"):
            with pytest.raises(InputError):
                ed.invert(photo, bad)
        inv = ed.invert(photo, "a photo of a cat")
        for ok in (
            " ".join(["word"] * 500),
            "a photo of a 🐱🐶 cat",
            "שלום עולם, a cat",
            "مرحبا بالعالم",
            "a cat\twith a tab",
            "ÅNGSTRÖM café",
        ):
            img = ed.edit(inv, ok)
            assert img.size == (128, 128)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"guidance": -1},
        {"guidance": 19.5},
        {"guidance": float("inf")},
        {"tau": 1.01},
        {"tau": "x"},
        {"cross_replace": -0.1},
        {"self_replace": 2},
        {"amplify": {"dog": 0.0 - 1}},
        {"amplify": {"dog": 1e9}},
        {"amplify": {"dog": float("nan")}},
    ],
)
def test_parameter_corpus(tiny_bundle, photo, kwargs):
    with Editor.open(tiny_bundle) as ed:
        inv = ed.invert(photo, "a photo of a cat")
        with pytest.raises(InputError):
            ed.edit(inv, "a photo of a dog", **kwargs)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, "7", True])
def test_seed_corpus(tiny_bundle, photo, seed):
    with Editor.open(tiny_bundle) as ed, pytest.raises(InputError):
        ed.invert(photo, "a cat", seed=seed)


# ----------------------------------------------------------------------------- bundles


def test_bundle_for_another_resolution_is_refused(tiny_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    m["dims"].update({"H": 256, "h": 32, "Q": 64})
    for g in m["graphs"].values():
        for spec in g["inputs"] + g["outputs"]:
            spec["shape"] = [
                {16: 32, 128: 256, 8 * 8: 64}.get(d, d) if i > 0 else d for i, d in enumerate(spec["shape"])
            ]
    (b / "manifest.json").write_text(json.dumps(m))
    with Editor.open(b) as ed, pytest.raises(BundleError, match="another resolution"):
        ed.generate("a cat")


def test_unfinished_export_is_refused(tiny_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    del m["complete"]
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="unfinished"):
        open_bundle(b)


def test_malformed_manifests(tiny_bundle, tmp_path):
    for i, mutate in enumerate(
        [
            lambda m: m.update(files=[]),
            lambda m: m["files"].update({"x": "y"}),
            lambda m: m.update(format="other"),
            lambda m: m.update(schema_version="1"),
            lambda m: m.pop("graphs"),
        ]
    ):
        b = tmp_path / f"b{i}"
        shutil.copytree(tiny_bundle, b)
        m = json.loads((b / "manifest.json").read_text())
        mutate(m)
        (b / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(BundleError):
            open_bundle(b)


# ----------------------------------------------------------------------------- crash safety


def _export_and_kill(out: Path, after_s: float) -> int:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "icd_edge.export",
            "--model",
            "tiny",
            "--out",
            str(out),
            "--no-progress",
            "--parity",
            "graphs",
            "--seed",
            "5",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(after_s)
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


def test_killed_export_leaves_previous_bundle_intact(tiny_bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    before = open_bundle(out).bundle_id
    for after in (1.0, 6.0, 15.0):
        _export_and_kill(out, after)
        bundle = open_bundle(out)  # verifies every sha256
        assert bundle.bundle_id == before or bundle.manifest.complete is True
        for leftover in tmp_path.glob(".bundle.*"):  # killed temp folders never pass for bundles
            with pytest.raises(BundleError):
                open_bundle(leftover)
    # the next export cleans up the temporary folders of dead exports
    from icd_edge.atomic import _remove_stale

    _remove_stale(out)
    assert not list(tmp_path.glob(".bundle.tmp-*"))


def test_killed_first_export_leaves_nothing_loadable(tmp_path):
    out = tmp_path / "fresh"
    _export_and_kill(out, 4.0)
    assert not out.exists()


# ----------------------------------------------------------------------------- concurrency


def test_one_editor_from_eight_threads(tiny_bundle, photo):
    jobs = [
        (np.roll(photo, 17 * i, axis=1), f"a photo of a {w}", i)
        for i, w in enumerate(["dog", "tiger", "lion", "fox", "bear", "wolf", "horse", "cow"])
    ]
    with Editor.open(tiny_bundle) as ed:
        sequential = [
            ed.edit(ed.invert(img, "a photo of a cat", seed=s), tgt, blend=("cat", tgt.split()[-1]), output_type="np")
            for img, tgt, s in jobs
        ]
    with Editor.open(tiny_bundle) as ed:
        results: dict[int, np.ndarray] = {}
        errors = []
        barrier = threading.Barrier(len(jobs))

        def work(k):
            img, tgt, s = jobs[k]
            try:
                barrier.wait()
                results[k] = ed.edit(
                    ed.invert(img, "a photo of a cat", seed=s), tgt, blend=("cat", tgt.split()[-1]), output_type="np"
                )
            except Exception as exc:  # noqa: BLE001 - surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    for k in range(len(jobs)):
        np.testing.assert_array_equal(results[k], sequential[k])
