"""Token alignment (refine, replace), schedules, equalizer and local blend on hand-made cases."""

import numpy as np
import pytest

from icd_edge.edit import p2p
from icd_edge.errors import InputError
from icd_edge.tokenizer import ClipTokenizer, Tokens


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> ClipTokenizer:
    from icd_edge.export.models import byte_level_vocab, write_clip_tokenizer

    return ClipTokenizer(write_clip_tokenizer(byte_level_vocab(), [], tmp_path_factory.mktemp("tok")))


def _tokens(ids: list[int]) -> Tokens:
    padded = np.full(77, 99, dtype=np.int64)
    padded[: len(ids)] = ids
    return Tokens(padded, len(ids), tuple([-1] * len(ids)), False)


def test_global_align_inserted_word():
    # BOS a photo of a cat EOS  →  BOS a photo of a big cat EOS
    src = [1, 10, 11, 12, 10, 13, 2]
    tgt = [1, 10, 11, 12, 10, 14, 13, 2]
    assert p2p.global_align(src, tgt) == [0, 1, 2, 3, 4, -1, 5, 6]


def test_global_align_removed_and_replaced():
    assert p2p.global_align([1, 5, 6, 7, 2], [1, 5, 7, 2]) == [0, 1, 3, 4]
    # a substituted token is aligned (mismatch -1 beats two gaps only when scores tie-break so)
    aligned = p2p.global_align([1, 5, 6, 2], [1, 5, 9, 2])
    assert aligned[0] == 0 and aligned[1] == 1 and aligned[-1] == 3


def test_refine_map_gathers_aligned_tokens_and_zeroes_new_ones():
    src, tgt = _tokens([1, 10, 11, 13, 2]), _tokens([1, 10, 11, 14, 13, 2])
    m, r = p2p.refine_map(src, tgt)
    assert m.shape == (77, 77) and r.shape == (77,)
    assert r[3] == 0 and r.sum() == 76
    for j, i in enumerate([0, 1, 2, None, 3, 4]):
        if i is None:
            assert m[:, j].sum() == 0
        else:
            assert m[i, j] == 1 and m[:, j].sum() == 1
    for j in range(6, 77):  # padding maps to itself
        assert m[j, j] == 1
    # P_src·M gathers source columns
    p_src = np.random.default_rng(0).random((3, 77)).astype(np.float32)
    np.testing.assert_array_equal((p_src @ m)[:, 4], p_src[:, 3])


def test_replace_map_same_length_word(tok):
    s, t = "a photo of a cat", "a photo of a dog"
    m, r = p2p.replace_map(tok, s, tok(s), t, tok(t))
    np.testing.assert_array_equal(r, 1.0)
    np.testing.assert_array_equal(m, np.eye(77, dtype=np.float32))  # byte tokens: cat/dog both 3 tokens


def test_replace_map_splits_weight_when_token_counts_differ(tok):
    s, t = "a photo of a cat", "a photo of a tiger"
    src, tgt = tok(s), tok(t)
    cat = [k for k, w in enumerate(src.word_of_token) if w == 4]
    tiger = [k for k, w in enumerate(tgt.word_of_token) if w == 4]
    assert len(cat) == 3 and len(tiger) == 5
    m, _ = p2p.replace_map(tok, s, src, t, tgt)
    np.testing.assert_allclose(m[np.ix_(cat, tiger)], 0.2)
    assert m[0, 0] == 1 and m[1, 1] == 1  # unchanged words map one to one
    np.testing.assert_allclose(m[:, tiger].sum(0), 3 * 0.2)


def test_replace_needs_same_word_count(tok):
    with pytest.raises(InputError, match="same number of words"):
        p2p.replace_map(tok, "a cat", tok("a cat"), "a big cat", tok("a big cat"))


@pytest.mark.parametrize(
    "c, expected",
    [
        (0.0, [0, 0, 0, 0]),
        (0.2, [1, 0, 0, 0]),
        (0.3, [1, 0, 0, 0]),
        (0.4, [1, 1, 0, 0]),
        (0.6, [1, 1, 1, 0]),
        (1.0, [1, 1, 1, 1]),
    ],
)
def test_cross_schedule(c, expected):
    np.testing.assert_array_equal(p2p.cross_schedule(c, 4), expected)


@pytest.mark.parametrize(
    "s, expected", [(0.2, [0, 0, 0, 0]), (0.4, [1, 0, 0, 0]), (0.6, [1, 1, 0, 0]), (1.0, [1, 1, 1, 1])]
)
def test_self_schedule(s, expected):
    np.testing.assert_array_equal(p2p.self_schedule(s, 4), expected)


def test_word_mask_and_missing_word(tok):
    prompt = "a photo of a cat"
    mask = p2p.word_mask(tok, tok(prompt), prompt, "cat", "blend")
    assert mask.sum() == 3
    idx = np.flatnonzero(mask)
    assert idx.tolist() == [10, 11, 12]  # BOS, a(1), photo(5), of(2), a(1) → cat starts at 10
    with pytest.raises(InputError, match="not a word of the prompt"):
        p2p.word_mask(tok, tok(prompt), prompt, "dog", "blend")


def test_blend_mask_handmade():
    m, latent = 4, 16
    acc = np.zeros((2, m * m, 77), np.float32)
    acc[0, 1 * m + 1, 5] = 1.0  # source word at map cell (1, 1)
    acc[1, 3 * m + 3, 6] = 2.0  # target word at (3, 3)
    acc[1, 0, 6] = 0.5  # 25 % of the row's peak: below the 0.3 threshold
    tokens = np.zeros((2, 77), np.float32)
    tokens[0, 5] = 1
    tokens[1, 6] = 1
    mask = p2p.blend_mask(acc, tokens, latent)
    cells = np.zeros((m, m), bool)
    cells[0:3, 0:3] = True  # 3×3 max-pool around (1, 1)
    cells[2:4, 2:4] = True  # around (3, 3), clipped at the border
    expected = np.repeat(np.repeat(cells, 4, 0), 4, 1)
    np.testing.assert_array_equal(mask, expected)


def test_blend_mask_threshold_is_strict_and_relative():
    acc = np.zeros((2, 4, 77), np.float32)
    acc[:, 0, 1] = 10.0
    acc[:, 3, 1] = 3.5  # 0.35 of the peak → kept, but max-pool already covers it
    tokens = np.zeros((2, 77), np.float32)
    tokens[:, 1] = 1
    mask = p2p.blend_mask(acc, tokens, 4)
    assert mask.all()
    acc2 = np.zeros((2, 9, 77), np.float32)
    acc2[:, 0, 1] = 10.0
    acc2[:, 8, 1] = 2.9  # below 0.3 after pooling: corner (2, 2) only covered by itself
    mask2 = p2p.blend_mask(acc2, tokens, 3)
    assert mask2[0, 0] and mask2[1, 1] and not mask2[2, 2]


def test_device_blend_mask_equals_the_host_one():
    """The GPU path's torch twin gives the host mask for every photo of a batch."""
    torch = pytest.importorskip("torch")
    from icd_edge.fast.editor import blend_mask as device_blend_mask

    rng = np.random.default_rng(3)
    n, q, h = 3, 64, 16
    acc = rng.random((2, n, q, 77)).astype(np.float32) ** 8  # peaky, so the threshold bites
    tokens = (rng.random((n, 2, 77)) < 0.1).astype(np.float32)
    got = device_blend_mask(torch.from_numpy(acc), torch.from_numpy(tokens), h, 0.9).numpy()
    for i in range(n):
        want = p2p.blend_mask(acc[:, i], tokens[i], h, 0.9)
        assert 0 < want.mean() < 1
        np.testing.assert_array_equal(got[i, 0] > 0, want)
