"""Inversion.save / Inversion.load: the .npz file of an inverted photo, without a bundle."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest

from icd_edge.edit.inversion import FILE_VERSION, Inversion, SourceCache
from icd_edge.errors import InputError, OutputError

BUNDLE = "b" * 64


def _inv(source: bool = True, **over) -> Inversion:
    rng = np.random.default_rng(3)
    cache = None
    if source:
        # the documented layout at a toy size; tensors in float16 as the compiled path keeps them,
        # so the round trip must keep each array's dtype
        cache = SourceCache(
            rng.standard_normal((4, 1, 4, 8, 8)).astype(np.float32),
            rng.random((4, 1, 16, 77)).astype(np.float32),
            rng.standard_normal((4, 300)).astype(np.float16),
        )
    fields = {
        "latent": rng.standard_normal((1, 4, 8, 8)).astype(np.float32),
        "source_prompt": "a photo of a café",
        "seed": 12,
        "image_size": (451, 300),
        "bundle_id": BUNDLE,
        "fit": ("crop", 451, 300),
        "rng": "numpy",
        "source": cache,
        **over,
    }
    return Inversion(**fields)


def _write(path, meta: dict | None, **arrays) -> None:
    """A file in the inversion layout with metadata of our choosing."""
    if meta is not None:
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _meta(**over) -> dict:
    meta = {
        "version": FILE_VERSION,
        "source_prompt": "a cat",
        "seed": 0,
        "image_size": [64, 64],
        "bundle_id": BUNDLE,
        "fit": ["stretch", 64, 64],
        "rng": "torch",
        "source_cache": False,
    }
    return {**meta, **over}


def test_round_trip_of_every_field_with_the_source_cache(tmp_path):
    inv = _inv()
    back = Inversion.load(inv.save(tmp_path / "inv.npz", source=True), bundle_id=BUNDLE)
    np.testing.assert_array_equal(back.latent, inv.latent)
    assert (back.source_prompt, back.seed, back.image_size, back.bundle_id, back.fit, back.rng) == (
        "a photo of a café",
        12,
        (451, 300),
        BUNDLE,
        ("crop", 451, 300),
        "numpy",
    )
    assert type(back.image_size) is tuple and type(back.fit) is tuple
    assert not back.latent.flags.writeable
    for name in ("latents", "maps", "tensors"):
        a, b = getattr(inv.source, name), getattr(back.source, name)
        assert b.dtype == a.dtype and b.shape == a.shape, name
        np.testing.assert_array_equal(b, a)
    assert back.source.steps == 4 and back.source.nbytes == inv.source.nbytes


def test_without_source_the_cache_is_not_stored(tmp_path):
    small = _inv().save(tmp_path / "a.npz")
    big = _inv().save(tmp_path / "b.npz", source=True)
    assert Inversion.load(small).source is None and Inversion.load(big).source is not None
    assert small.stat().st_size < big.stat().st_size
    back = Inversion.load(_inv(source=False, seed=None, rng="latent").save(tmp_path / "c.npz"))
    assert back.seed is None and back.rng == "latent"  # a given latent has no seed, and keeps saying so


def test_save_refuses_a_missing_cache_and_a_bad_suffix(tmp_path):
    with pytest.raises(InputError, match="no source cache"):
        _inv(source=False).save(tmp_path / "a.npz", source=True)
    with pytest.raises(InputError, match="must end in .npz"):
        _inv().save(tmp_path / "a.npy")
    assert list(tmp_path.iterdir()) == []


def test_another_bundle_is_refused(tmp_path):
    path = _inv().save(tmp_path / "inv.npz")
    with pytest.raises(InputError, match="another bundle"):
        Inversion.load(path, bundle_id="c" * 64)
    assert Inversion.load(path).bundle_id == BUNDLE  # without bundle_id: no check


def test_a_newer_format_version_says_upgrade(tmp_path):
    path = tmp_path / "new.npz"
    _write(path, _meta(version=FILE_VERSION + 1), latent=np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(InputError, match=f"format version {FILE_VERSION + 1}.*upgrade icd-edge"):
        Inversion.load(path)


def test_missing_metadata_and_the_old_layout(tmp_path):
    old = tmp_path / "old.npz"  # what `icd-edge invert` wrote before the file had a version
    _write(old, None, latent=np.zeros((1, 4, 8, 8), np.float32), source_prompt=np.array("a cat"))
    with pytest.raises(InputError, match="no metadata") as info:
        Inversion.load(old)
    assert "InputError" not in str(info.value)  # not wrapped in a second message ("cannot be read (InputError: ...")
    _write(tmp_path / "nover.npz", {"source_prompt": "a cat"}, latent=np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(InputError, match="no format version"):
        Inversion.load(tmp_path / "nover.npz")


@pytest.mark.parametrize(
    "over, arrays",
    [
        ({"fit": ["stretch", 64]}, {}),  # keep_size would fail to unpack it mid-edit
        ({"image_size": [64]}, {}),
        ({"source_prompt": 5}, {}),
        ({"seed": "x"}, {}),
        ({"rng": None}, {}),
        ({}, {"latent": np.zeros((4, 8, 8), np.float32)}),
        ({"source_cache": True}, {}),  # says it holds a cache and has none
    ],
)
def test_damaged_fields_are_input_errors(tmp_path, over, arrays):
    path = tmp_path / "bad.npz"
    meta = _meta(**over)
    _write(path, meta, **{"latent": np.zeros((1, 4, 8, 8), np.float32), **arrays})
    with pytest.raises(InputError, match="damaged"):
        Inversion.load(path)


def test_truncated_empty_and_foreign_files(tmp_path):
    good = _inv().save(tmp_path / "inv.npz", source=True)
    data = good.read_bytes()
    cases = {
        "truncated.npz": data[: len(data) // 2],
        "empty.npz": b"",
        "text.npz": b"hello, not an archive",
    }
    np.save(tmp_path / "arr.npy", np.zeros(3))
    cases["npy.npz"] = (tmp_path / "arr.npy").read_bytes()  # np.load gives a bare array for it
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(InputError, match="not an .npz archive"):
            Inversion.load(tmp_path / name)
    with pytest.raises(InputError, match="does not exist"):
        Inversion.load(tmp_path / "missing.npz")
    with pytest.raises(InputError, match="does not exist"):
        Inversion.load(tmp_path)  # a folder


def test_a_damaged_member_is_an_input_error(tmp_path):
    """The zip's directory intact but a stored array's bytes overwritten: a CRC or header error."""
    path = _inv().save(tmp_path / "inv.npz")
    data = bytearray(path.read_bytes())
    at = data.index(b"\x93NUMPY")  # the first array's .npy header inside the (uncompressed) zip
    data[at : at + 64] = b"\x00" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="inversion file"):
        Inversion.load(path)


def test_a_failing_write_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "inv.npz"
    path.write_bytes(b"the previous file")

    def full_disk(f, **arrays):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(OutputError, match="disk is full"):
        _inv().save(path, source=True)
    assert path.read_bytes() == b"the previous file"  # the old file untouched, no temporary left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inv.npz"]


def test_no_room_for_the_source_cache_is_refused_before_writing(tmp_path, monkeypatch):
    import icd_edge.atomic as atomic

    inv = _inv()
    real = os.statvfs(tmp_path)

    class Room:  # room for the latent, not for latent + cache
        f_frsize = 1
        f_bavail = inv.latent.nbytes + (1 << 16) + 10

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(atomic.os, "statvfs", lambda p: Room())
    inv.save(tmp_path / "small.npz")
    with pytest.raises(OutputError, match="disk is full"):
        inv.save(tmp_path / "big.npz", source=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.npz"]
