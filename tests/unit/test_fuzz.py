"""Property-based fuzzing (hypothesis) of the tokenizer, the image loader and the manifest parser.

Bounded in CI; for a longer run: ``ICD_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz.py
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

from icd_edge.errors import BundleError, ImageError, InputError
from icd_edge.image import load_image
from icd_edge.bundle.store import open_bundle
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
@given(data=st.one_of(st.binary(max_size=2048),
                      st.builds(lambda cut, junk: PNG[:cut] + junk, st.integers(0, len(PNG)), st.binary(max_size=64)),
                      st.builds(lambda pos, b: PNG[:pos] + bytes([b]) + PNG[pos + 1:], st.integers(0, len(PNG) - 1),
                                st.integers(0, 255))))
def test_image_loader_raises_only_typed_errors(data):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.png"
        p.write_bytes(data)
        try:
            img = load_image(p)
        except ImageError:
            return
        assert img.mode == "RGB" and img.width >= 1 and img.height >= 1


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=20)


@FUZZ
@given(manifest=st.one_of(json_values, st.fixed_dictionaries({
    "format": st.sampled_from(["icd_edge.bundle", "x"]), "schema_version": st.one_of(st.integers(-1, 3), st.text(max_size=2)),
    "complete": st.booleans(), "dims": json_values, "graphs": json_values, "schedule": json_values,
    "guidance": json_values, "tokenizer": json_values, "vae": json_values,
    "files": st.dictionaries(st.text(max_size=12), json_values, max_size=3)})), raw=st.booleans())
def test_manifest_parser_raises_only_typed_errors(manifest, raw):
    with tempfile.TemporaryDirectory() as d:
        text = json.dumps(manifest) if not raw else json.dumps(manifest)[: max(1, len(json.dumps(manifest)) // 2)]
        (Path(d) / "manifest.json").write_text(text)
        try:
            open_bundle(d)
        except (BundleError, InputError):
            pass


def _paths(value, prefix=()):
    """Every (path, leaf or container) of a JSON value."""
    yield prefix, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


@pytest.fixture(scope="module")
def real_manifest(tiny_bundle):
    return json.loads((tiny_bundle / "manifest.json").read_text())


replacement = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
                        st.text(max_size=6), st.just([]), st.just({}), st.just([1, 2]), st.just(["x"]))


@FUZZ
@given(data=st.data())
def test_manifest_value_mutations_raise_only_bundle_errors(real_manifest, tiny_bundle, data):
    """Real manifests with one value replaced, or one key removed, anywhere in the runtime's part:
    open_bundle either accepts it (the value is not one the runtime reads) or raises BundleError,
    and an accepted bundle still builds an Editor and encodes a prompt."""
    import copy

    from icd_edge.edit.editor import Editor
    from icd_edge.bundle.store import Bundle, validate_manifest

    m = copy.deepcopy(real_manifest)
    keys = ("dims", "schedule", "guidance", "vae", "p2p", "tokenizer", "graphs", "files", "model", "int8_scheme")
    paths = [p for p, _ in _paths(m) if p and p[0] in keys and not (p[0] == "guidance" and len(p) > 3)]
    path = data.draw(st.sampled_from(paths))
    parent = m
    for k in path[:-1]:
        parent = parent[k]
    if data.draw(st.booleans()) and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(replacement)
    try:
        validate_manifest(m)
    except BundleError:
        return
    b = Bundle(tiny_bundle, m)
    try:
        Editor(b, _NoBackend())
    except BundleError:  # the tokenizer file it names may be another listed file
        return


class _NoBackend:
    name, fmt = "none", "onnx"

    def open_session(self, bundle, graph):
        raise AssertionError("no session is opened by this test")
