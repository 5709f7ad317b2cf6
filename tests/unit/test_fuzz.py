"""Property-based fuzzing (hypothesis) of the tokenizer, the image loader and the manifest parser
(made-up input, no bundle; mutations of a real manifest: tests/bundle/test_manifest_fuzz.py).

Bounded in CI; for a longer run: ``ICD_FUZZ_EXAMPLES=20000 python -m pytest tests/unit/test_fuzz.py
--hypothesis-show-statistics -p no:cacheprovider``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from icd_edge.bundle.store import open_bundle
from icd_edge.errors import BundleError, ImageError, InputError
from icd_edge.image import load_image
from icd_edge.tokenizer import ClipTokenizer

EXAMPLES = int(os.environ.get("ICD_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from icd_edge.export.models import byte_level_vocab, write_clip_tokenizer

    return ClipTokenizer(write_clip_tokenizer(byte_level_vocab(), [], tmp_path_factory.mktemp("tok")))


@FUZZ
@given(text=st.text(max_size=400))
def test_tokenizer_never_crashes(tok, text):
    t = tok(text)
    assert t.ids.shape == (77,) and t.ids.dtype == np.int64
    assert t.ids[0] == tok.bos_id and t.ids[t.length - 1] == tok.eos_id and 2 <= t.length <= 77
    assert len(t.word_of_token) == t.length
    assert all(-1 <= w < len(text.split(" ")) for w in t.word_of_token)


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png_bytes()


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=2048),
        st.builds(lambda cut, junk: PNG[:cut] + junk, st.integers(0, len(PNG)), st.binary(max_size=64)),
        st.builds(
            lambda pos, b: PNG[:pos] + bytes([b]) + PNG[pos + 1 :], st.integers(0, len(PNG) - 1), st.integers(0, 255)
        ),
    )
)
def test_image_loader_raises_only_typed_errors(data):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.png"
        p.write_bytes(data)
        try:
            img = load_image(p)
        except ImageError:
            return
        assert img.mode == "RGB" and img.width >= 1 and img.height >= 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(
    manifest=st.one_of(
        json_values,
        st.fixed_dictionaries(
            {
                "format": st.sampled_from(["icd_edge.bundle", "x"]),
                "schema_version": st.one_of(st.integers(-1, 3), st.text(max_size=2)),
                "complete": st.booleans(),
                "dims": json_values,
                "graphs": json_values,
                "schedule": json_values,
                "guidance": json_values,
                "tokenizer": json_values,
                "vae": json_values,
                "files": st.dictionaries(st.text(max_size=12), json_values, max_size=3),
            }
        ),
    ),
    raw=st.booleans(),
)
def test_manifest_parser_raises_only_typed_errors(manifest, raw):
    with tempfile.TemporaryDirectory() as d:
        text = json.dumps(manifest) if not raw else json.dumps(manifest)[: max(1, len(json.dumps(manifest)) // 2)]
        (Path(d) / "manifest.json").write_text(text)
        try:
            open_bundle(d)
        except (BundleError, InputError):
            pass


@settings(max_examples=60, deadline=None)
@given(
    side=st.sampled_from([8, 16]),
    shape=st.sampled_from(["exact", "bigger", "gray", "rgba", "float", "strided"]),
    seed=st.integers(0, 2**16),
)
def test_photo_uint8_equals_the_pil_round_trip(side, shape, seed):
    """The fast path's shortcut for arrays that need no conversion gives the same pixels as
    load_image + image_to_uint8, and every other input still takes that path."""
    from icd_edge.image import image_to_uint8, photo_uint8

    rng = np.random.default_rng(seed)
    arr = {
        "exact": lambda: rng.integers(0, 256, (side, side, 3), dtype=np.uint8),
        "bigger": lambda: rng.integers(0, 256, (side + 5, side + 2, 3), dtype=np.uint8),
        "gray": lambda: rng.integers(0, 256, (side, side), dtype=np.uint8),
        "rgba": lambda: rng.integers(0, 256, (side, side, 4), dtype=np.uint8),
        "float": lambda: rng.random((side, side, 3)),
        "strided": lambda: rng.integers(0, 256, (side, 2 * side, 3), dtype=np.uint8)[:, ::2],
    }[shape]()
    got = photo_uint8(arr, side)
    np.testing.assert_array_equal(got, image_to_uint8(load_image(arr), side))
    assert got.shape == (side, side, 3) and got.dtype == np.uint8


def test_pil_rgb_images_do_not_share_the_array():
    """The fast path hands PIL a view of its pinned output buffer and reuses the buffer at the next
    edit: Image.fromarray must copy RGB pixels (it maps only modes such as L/RGBA onto the array)."""
    from PIL import Image

    arr = np.zeros((4, 4, 3), np.uint8)
    img = Image.fromarray(arr, "RGB")
    arr[...] = 200
    assert np.asarray(img).max() == 0
