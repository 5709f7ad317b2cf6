"""The ``coreml`` backend's logic that runs on every platform (no coremltools needed).

Prediction itself needs macOS and is not executed by these tests: a stand-in object with a
``predict`` method takes the place of coremltools' CompiledMLModel to test the session's own
feed casting and output checks.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from icd_edge.bundle.schema import FileEntry, IOSpec
from icd_edge.errors import BackendUnavailable, BundleError, InputError, ShapeMismatch
from icd_edge.runtimes.coreml import (
    CoreMLBackend,
    CoreMLOptions,
    CoreMLSession,
    availability,
    cache_key,
    cast_feeds,
    check_target,
    default_cache_dir,
    package_files,
)


@pytest.mark.skipif(platform.system() == "Darwin", reason="checks the answer off macOS; this is macOS")
def test_probe_off_macos_says_why_without_importing_coremltools():
    code = (
        "import sys; from icd_edge.runtimes.coreml import CoreMLBackend; a = CoreMLBackend().probe(); "
        "print(a.ok, a.reason, 'coremltools' in sys.modules, sep='|')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "False|Core ML runs only on macOS|False"


@pytest.mark.parametrize(
    "facts, ok, reason",
    [
        (("Linux", "", "9.0", True), False, "Core ML runs only on macOS"),
        (("Windows", "", None, None), False, "Core ML runs only on macOS"),
        (("Darwin", "15.1", None, None), False, "not installed (pip install 'icd_edge[coreml]')"),
        (("Darwin", "13.6.1", "9.0", True), False, "need macOS 14 or newer, this is macOS 13.6.1"),
        (("Darwin", "15.1", "9.0", False), False, "has no native library"),
        (("Darwin", "14.0", "9.0", True), True, "coremltools 9.0, macOS 14.0"),
    ],
)
def test_availability_decisions(facts, ok, reason):
    got = availability(*facts)
    assert got.ok is ok and reason in got.reason, got


def test_package_deployment_target_is_checked():
    check_target("unet_forward", "macOS14", "14.0")
    check_target("unet_forward", "macOS15", "15.0.1")
    with pytest.raises(BackendUnavailable, match="needs macOS15 or newer, this is macOS 14.6"):
        check_target("unet_forward", "macOS15", "14.6")
    with pytest.raises(BundleError, match="unknown deployment target 'iOS18'"):
        check_target("unet_forward", "iOS18", "15.0")


def test_compute_units_are_validated():
    assert CoreMLBackend(compute_units="CPU_AND_NE").options == CoreMLOptions("CPU_AND_NE", None)
    for bad in ("NE", "all", "GPU"):
        with pytest.raises(InputError, match="CPU_AND_NE"):
            CoreMLBackend(compute_units=bad)


FILES = {
    "coreml/unet_forward.mlpackage/Manifest.json": FileEntry(10, "a" * 64),
    "coreml/unet_forward.mlpackage/Data/com.apple.CoreML/weights/weight.bin": FileEntry(99, "b" * 64),
    "coreml/unet_forward.mlpackage2/Manifest.json": FileEntry(10, "c" * 64),
    "onnx/unet_forward.onnx": FileEntry(5, "d" * 64),
}


def test_package_files_takes_only_that_package():
    assert package_files(FILES, "coreml/unet_forward.mlpackage") == {
        "Manifest.json": "a" * 64,
        "Data/com.apple.CoreML/weights/weight.bin": "b" * 64,
    }
    with pytest.raises(BundleError, match="no files under coreml/vae_decoder.mlpackage"):
        package_files(FILES, "coreml/vae_decoder.mlpackage")


def test_cache_key_follows_content_and_versions():
    files = package_files(FILES, "coreml/unet_forward.mlpackage")
    key = cache_key(files, "9.0", "15.1")
    assert len(key) == 64 and int(key, 16) >= 0
    assert cache_key(dict(reversed(list(files.items()))), "9.0", "15.1") == key  # order does not matter
    changed = {**files, "Manifest.json": "e" * 64}
    others = {
        cache_key(changed, "9.0", "15.1"),
        cache_key(files, "9.1", "15.1"),
        cache_key(files, "9.0", "15.2"),
        cache_key({**files, "extra.json": "f" * 64}, "9.0", "15.1"),
    }
    assert key not in others and len(others) == 4


def test_default_cache_dir():
    home = Path("/home/u")
    assert default_cache_dir("Darwin", {}, home) == home / "Library/Caches/icd_edge/coreml"
    assert default_cache_dir("Linux", {}, home) == home / ".cache/icd_edge/coreml"
    assert default_cache_dir("Darwin", {"ICD_EDGE_CACHE": "/tmp/c"}, home) == Path("/tmp/c/coreml")
    # one cache root for every backend; the variables of earlier versions are named, not read
    assert (
        default_cache_dir("Darwin", {"ICD_EDGE_CACHE_DIR": "/tmp/old"}, home) == home / "Library/Caches/icd_edge/coreml"
    )


PACKAGE_IN = [{"name": "input_ids", "dtype": "int32", "shape": [1, 77]}]
MANIFEST_IN = (IOSpec("input_ids", "int64", (1, 77)),)
MANIFEST_OUT = (IOSpec("last_hidden_state", "float32", (1, 77, 8)),)


def test_cast_feeds_int64_to_int32_with_range_check():
    ids = np.arange(77, dtype=np.int64)[None]
    got = cast_feeds("text_encoder", {"input_ids": ids}, PACKAGE_IN)
    assert got["input_ids"].dtype == np.int32 and np.array_equal(got["input_ids"], ids)
    with pytest.raises(ShapeMismatch, match="int32 range"):
        cast_feeds("text_encoder", {"input_ids": ids + 2**40}, PACKAGE_IN)
    x = np.zeros((1, 4), np.float32)
    assert cast_feeds("g", {"x": x}, [{"name": "x", "dtype": "float32", "shape": [1, 4]}])["x"] is x


class StandIn:
    """Takes the place of coremltools' CompiledMLModel (which loads only on macOS)."""

    def __init__(self, shape=(1, 77, 8)):
        self.fed, self.shape = None, shape

    def predict(self, feeds):
        self.fed = feeds
        return {"last_hidden_state": np.ones(self.shape, np.float16)}


def test_session_casts_feeds_and_returns_float32_by_manifest_names():
    model = StandIn()
    sess = CoreMLSession("text_encoder", model, MANIFEST_IN, MANIFEST_OUT, PACKAGE_IN)
    out = sess.run({"input_ids": np.zeros((1, 77), np.int64)})
    assert model.fed["input_ids"].dtype == np.int32
    assert list(out) == ["last_hidden_state"] and out["last_hidden_state"].dtype == np.float32
    with pytest.raises(ShapeMismatch, match="expected int64"):  # feeds are checked against the manifest first
        sess.run({"input_ids": np.zeros((1, 77), np.int32)})
    bad = CoreMLSession("text_encoder", StandIn((1, 77, 9)), MANIFEST_IN, MANIFEST_OUT, PACKAGE_IN)
    with pytest.raises(ShapeMismatch, match=r"came back \(1, 77, 9\)"):
        bad.run({"input_ids": np.zeros((1, 77), np.int64)})
