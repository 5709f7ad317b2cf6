"""Property-based fuzzing (hypothesis) of the manifest validation on the tiny bundle's real
manifest: one value replaced or one key removed anywhere in the runtime's part (the fuzzing of
the tokenizer, the image loader and the manifest parser on made-up input is tests/unit/test_fuzz.py).

Bounded in CI; for a longer run: ``ICD_FUZZ_EXAMPLES=20000 python -m pytest tests/bundle/test_manifest_fuzz.py
--hypothesis-show-statistics -p no:cacheprovider``.
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from icd_edge.errors import BundleError

EXAMPLES = int(os.environ.get("ICD_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)


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


replacement = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.just([]),
    st.just({}),
    st.just([1, 2]),
    st.just(["x"]),
)


@FUZZ
@given(data=st.data())
def test_manifest_value_mutations_raise_only_bundle_errors(real_manifest, tiny_bundle, data):
    """Real manifests with one value replaced, or one key removed, anywhere in the runtime's part:
    open_bundle either accepts it (the value is not one the runtime reads) or raises BundleError,
    and an accepted bundle still builds an Editor and encodes a prompt."""
    import copy

    from icd_edge.bundle.store import Bundle, validate_manifest
    from icd_edge.edit.editor import Editor

    m = copy.deepcopy(real_manifest)
    keys = (
        "dims",
        "schedule",
        "guidance",
        "vae",
        "p2p",
        "tokenizer",
        "graphs",
        "files",
        "model",
        "int8_scheme",
        "parity",
        "unet_weights",
    )
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
        typed = validate_manifest(m)
    except BundleError:
        return
    b = Bundle(tiny_bundle, typed)
    try:
        Editor(b, _NoBackend())
    except BundleError:  # the tokenizer file it names may be another listed file
        return


class _NoBackend:
    name, fmt = "none", "onnx"
    memory_policies = ("resident",)

    def configure(self, bundle, memory):
        pass

    def open_session(self, bundle, graph):
        raise AssertionError("no session is opened by this test")
