"""Editor API semantics on the tiny bundle (ONNX Runtime)."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from icd_edge.edit.editor import Editor, Inversion
from icd_edge.errors import BackendUnavailable, ImageError, InputError


@pytest.fixture(scope="module")
def editor(tiny_bundle):
    with Editor.open(tiny_bundle, backend="onnxruntime") as ed:
        yield ed


def test_invert_once_edit_many_equals_separate_edits(editor, photo):
    inv = editor.invert(photo, "a photo of a cat", seed=5)
    targets = ["a photo of a dog", "a photo of a tiger cat", "a painting of a cat"]
    shared = [editor.edit(inv, t, output_type="np") for t in targets]
    for t, img in zip(targets, shared):
        fresh = editor.edit(editor.invert(photo, "a photo of a cat", seed=5), t, output_type="np")
        np.testing.assert_array_equal(img, fresh)
    assert not np.array_equal(shared[0], shared[1])


def test_outputs_are_pil_of_bundle_size(editor, photo):
    inv = editor.invert(photo, "a photo of a cat")
    assert isinstance(inv, Inversion) and inv.latent.shape == (1, 4, 16, 16) and not inv.latent.flags.writeable
    for img in (editor.edit(inv, "a photo of a dog"), editor.reconstruct(inv), editor.generate("a dog", seed=1)):
        assert isinstance(img, Image.Image) and img.size == (128, 128) and img.mode == "RGB"


def test_seed_controls_inversion_noise(editor, photo):
    a = editor.invert(photo, "a photo of a cat", seed=1).latent
    b = editor.invert(photo, "a photo of a cat", seed=1).latent
    c = editor.invert(photo, "a photo of a cat", seed=2).latent
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_p2p_controls_change_the_edit(editor, photo):
    inv = editor.invert(photo, "a photo of a cat")
    base = editor.edit(inv, "a photo of a dog", cross_replace=0.0, self_replace=0.0, output_type="np")
    for kw in (
        {"cross_replace": 1.0},
        {"self_replace": 1.0},
        {"amplify": {"dog": 5.0}, "cross_replace": 1.0},
        {"guidance": 0.0},
        {"tau": 1.0},
    ):
        other = editor.edit(
            inv, "a photo of a dog", **{"cross_replace": 0.0, "self_replace": 0.0, **kw}, output_type="np"
        )
        assert np.abs(other - base).max() > 1e-4, kw


def test_full_replacement_with_identity_map_reproduces_source_attention(editor, photo):
    """cross = self = 1 with identical prompts must equal the plain reconstruction's source row."""
    inv = editor.invert(photo, "a photo of a cat")
    same = editor.edit(inv, "a photo of a cat", cross_replace=1.0, self_replace=1.0, guidance=0.0, output_type="np")
    rec = editor.reconstruct(inv, output_type="np")
    np.testing.assert_allclose(same, rec, atol=2e-5)


def test_blend_limits_the_edit_to_the_mask(editor, photo):
    """Random weights give near-uniform attention, so at the spec's 0.3 threshold the blend mask
    covers everything; a 0.995 threshold keeps only the attention peaks, and outside them the
    target row follows the source row (the reconstruction)."""
    inv = editor.invert(photo, "a photo of a cat")
    rec = editor.reconstruct(inv, output_type="np")
    free = editor.edit(inv, "a photo of a dog", cross_replace=0.4, output_type="np")
    spec = editor.constants
    editor.constants = dataclasses.replace(spec, blend_threshold=0.995)
    try:
        blended = editor.edit(inv, "a photo of a dog", cross_replace=0.4, blend=("cat", "dog"), output_type="np")
    finally:
        editor.constants = spec
    changed_free = np.abs(free - rec).max(axis=-1) > 1e-3
    changed_blend = np.abs(blended - rec).max(axis=-1) > 1e-3
    assert changed_free.mean() > 0.5
    assert 0.0 < changed_blend.mean() < changed_free.mean()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"guidance": 25}, "guidance must be in"),
        ({"guidance": float("nan")}, "guidance"),
        ({"tau": -0.1}, "tau"),
        ({"cross_replace": 1.5}, "cross_replace"),
        ({"self_replace": "x"}, "self_replace"),
        ({"amplify": {"dog": -1}}, "amplify"),
        ({"amplify": {"zebra": 2}}, "not a word"),
        ({"blend": ("cat",)}, "pair of words"),
        ({"blend": ("cow", "dog")}, "not a word"),
        ({"mode": "swap"}, "mode"),
        ({"output_type": "tensor"}, "output_type"),
    ],
)
def test_bad_edit_parameters(editor, photo, kwargs, match):
    inv = editor.invert(photo, "a photo of a cat")
    with pytest.raises(InputError, match=match):
        editor.edit(inv, "a photo of a dog", **kwargs)


def test_bad_inputs(editor, photo, tmp_path):
    with pytest.raises(InputError, match="empty"):
        editor.invert(photo, "   ")
    with pytest.raises(InputError, match="seed"):
        editor.invert(photo, "a cat", seed=-1)
    with pytest.raises(InputError, match="Inversion"):
        editor.edit("not an inversion", "a dog")
    with pytest.raises(InputError, match="replace"):
        editor.edit(editor.invert(photo, "a photo of a cat"), "a big dog", mode="replace")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageError):
        editor.invert(bad, "a cat")


def test_unavailable_backends_are_typed_errors(tiny_bundle):
    with pytest.raises(BackendUnavailable, match="not installed|only on macOS"):
        Editor.open(tiny_bundle, backend="tensorrt")
    with pytest.raises(BackendUnavailable, match="only on macOS"):
        Editor.open(tiny_bundle, backend="coreml")
    with pytest.raises(InputError, match="unknown backend"):
        Editor.open(tiny_bundle, backend="cuda-magic")
