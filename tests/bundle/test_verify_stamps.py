"""The verified stamps: a verified open hashes a file once, later opens only stat it, and any doubt
(a changed file, a corrupt or unwritable stamp cache, ICD_EDGE_VERIFY=full) means hashing again."""

from __future__ import annotations

import json
import os

import pytest

from icd_edge.bundle import store
from icd_edge.bundle.store import MANIFEST, file_table, open_bundle, stamp_file
from icd_edge.errors import BundleError

FILES = {
    "tokenizer/tokenizer.json": b'{"model": "stub"}',
    "onnx/text_encoder.onnx": b"graph bytes " * 64,
    "onnx/unet_forward.weights": bytes(range(256)) * 16,
}


def _manifest(files: dict) -> dict:
    """The smallest manifest the parser accepts (one graph), with the given file table."""
    return {
        "format": "icd_edge.bundle",
        "schema_version": 2,
        "complete": True,
        "model": {"name": "stub", "family": "sd15"},
        "dims": {"H": 8, "h": 1},
        "schedule": {
            "config": "stub",
            "forward": [[0, 1]],
            "reverse": [[1, 0]],
            "coefficients": {"forward": [[1.0, 0.0]], "reverse": [[1.0, 0.0]]},
            "alpha_sigma": {"1": [1.0, 0.0]},
            "encoder_start": {"alpha_sigma": [1.0, 0.0]},
        },
        "guidance": {"dim": 1, "max": 1.0, "embeddings": {}},
        "p2p": {"blend_threshold": 0.3},
        "vae": {"scaling_factor": 0.18215},
        "tokenizer": {"file": "tokenizer/tokenizer.json"},
        "graphs": {
            "text_encoder": {
                "inputs": [{"name": "ids", "dtype": "int64", "shape": [1, 77]}],
                "outputs": [{"name": "emb", "dtype": "float32", "shape": [1, 77, 8]}],
                "artifacts": {"onnx": {"file": "onnx/text_encoder.onnx"}},
            }
        },
        "files": {k: {"bytes": f.bytes, "sha256": f.sha256} for k, f in files.items()},
    }


@pytest.fixture
def bundle(tmp_path, monkeypatch):
    """A tiny valid bundle folder (no model export) and an empty cache of its own."""
    monkeypatch.setenv("ICD_EDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ICD_EDGE_VERIFY", raising=False)
    root = tmp_path / "b.bundle"
    for rel, data in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / MANIFEST).write_text(json.dumps(_manifest(file_table(root))))
    return root


@pytest.fixture
def hashed(monkeypatch):
    """The files sha256_file is asked to hash, in order."""
    calls = []
    real = store.sha256_file

    def counting(path, *args, **kw):
        calls.append(os.path.basename(path))
        return real(path, *args, **kw)

    monkeypatch.setattr(store, "sha256_file", counting)
    return calls


def test_second_open_hashes_nothing(bundle, hashed):
    open_bundle(bundle)
    assert len(hashed) == len(FILES)
    stamps = json.loads(stamp_file(bundle).read_text())
    assert stamps["schema"] == 1 and stamps["root"] == str(bundle.resolve())
    assert set(stamps["files"]) == set(FILES)
    assert set(stamps["files"]["onnx/text_encoder.onnx"]) == {"bytes", "mtime_ns", "ino", "dev", "sha256"}
    assert stamp_file(bundle).parent == bundle.parent / "cache" / "verified"
    hashed.clear()
    open_bundle(bundle)
    assert hashed == []


def test_file_changed_after_a_verified_open_is_hashed_and_refused(bundle, hashed):
    open_bundle(bundle)
    f = bundle / "onnx" / "unet_forward.weights"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    st = f.stat()
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    hashed.clear()
    with pytest.raises(BundleError, match="unet_forward.weights does not match its recorded sha256"):
        open_bundle(bundle)
    assert hashed == ["unet_forward.weights"]
    # the failed file is never stamped: it is refused again at every open
    with pytest.raises(BundleError, match="sha256"):
        open_bundle(bundle)
    stamps = json.loads(stamp_file(bundle).read_text())["files"]
    assert stamps["onnx/unet_forward.weights"]["mtime_ns"] == st.st_mtime_ns


def test_corrupt_stamp_file_is_ignored_and_rewritten(bundle, hashed):
    open_bundle(bundle)
    stamp_file(bundle).write_bytes(b"\xff\x00 not json {{{" + os.urandom(64))
    hashed.clear()
    open_bundle(bundle)
    assert len(hashed) == len(FILES)
    hashed.clear()
    open_bundle(bundle)  # the rewritten stamps hold again
    assert hashed == []


def test_stamps_of_another_root_or_schema_are_ignored(bundle, hashed):
    open_bundle(bundle)
    path = stamp_file(bundle)
    good = json.loads(path.read_text())
    for bad in ({**good, "schema": 2}, {**good, "root": "/elsewhere"}, {**good, "files": []}, [good]):
        path.write_text(json.dumps(bad))
        hashed.clear()
        open_bundle(bundle)
        assert len(hashed) == len(FILES), bad


def test_verify_full_hashes_every_file(bundle, hashed, monkeypatch):
    open_bundle(bundle)
    monkeypatch.setenv("ICD_EDGE_VERIFY", "full")
    for _ in range(2):
        hashed.clear()
        open_bundle(bundle)
        assert len(hashed) == len(FILES)


def test_unwritable_cache_still_opens(bundle, hashed, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_bytes(b"")
    monkeypatch.setenv("ICD_EDGE_CACHE", str(blocker / "cache"))  # mkdir under a regular file fails
    for _ in range(2):
        hashed.clear()
        b = open_bundle(bundle)
        assert len(hashed) == len(FILES) and b.graphs
    assert blocker.is_file()


def test_no_verify_never_hashes_nor_stamps(bundle, hashed):
    open_bundle(bundle, verify=False)
    assert hashed == []
    assert not stamp_file(bundle).exists() and not (bundle.parent / "cache").exists()
    (bundle / "onnx" / "text_encoder.onnx").write_bytes(b"x" * len(FILES["onnx/text_encoder.onnx"]))
    open_bundle(bundle, verify=False)  # sizes only, as before
    with pytest.raises(BundleError, match="sha256"):
        open_bundle(bundle)
