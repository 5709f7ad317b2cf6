"""Prompt-to-Prompt controls computed on the host (numpy), as the official Prompt-to-Prompt code computes them.

The reverse-edit graph applies, in every cross-attention layer, to the target row::

    P' = a_k ⊙ [((P_src·M) ⊙ r + P_tgt ⊙ (1 - r)) ⊙ e] + (1 - a_k) ⊙ P_tgt

and in self-attention layers with few enough keys ``P' = f·P_src + (1 - f)·P_tgt``.
This module builds M (token map), r (refine alpha), e (equalizer), a_k (cross schedule),
f (self flag) and the local-blend mask from the 16×16 cross-attention maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from icd_edge.edit.validate import check_prompt, check_range
from icd_edge.errors import InputError
from icd_edge.tokenizer import MAX_LENGTH, ClipTokenizer, Tokens

BLEND_THRESHOLD = 0.3

_GAP, _MATCH, _MISMATCH = 0, 1, -1


def global_align(x: list[int], y: list[int]) -> list[int]:
    """Needleman-Wunsch alignment of token sequences (gap 0, match +1, mismatch -1).

    Returns, for every position j of ``y``, the aligned position in ``x`` or -1 (a new token).
    Ties break left (gap in x), then up (gap in y), then diagonal, as prompt-to-prompt's
    ``seq_aligner`` does, so the maps are the same as the official code's.
    """
    nx, ny = len(x), len(y)
    score = np.zeros((nx + 1, ny + 1), dtype=np.int64)
    score[0, 1:] = np.arange(1, ny + 1) * _GAP
    score[1:, 0] = np.arange(1, nx + 1) * _GAP
    trace = np.zeros((nx + 1, ny + 1), dtype=np.int8)
    trace[0, 1:], trace[1:, 0], trace[0, 0] = 1, 2, 4
    for i in range(1, nx + 1):
        for j in range(1, ny + 1):
            left = score[i, j - 1] + _GAP
            up = score[i - 1, j] + _GAP
            diag = score[i - 1, j - 1] + (_MATCH if x[i - 1] == y[j - 1] else _MISMATCH)
            best = max(left, up, diag)
            score[i, j] = best
            trace[i, j] = 1 if best == left else 2 if best == up else 3
    mapper: list[tuple[int, int]] = []
    i, j = nx, ny
    while i > 0 or j > 0:
        move = trace[i, j]
        if move == 3:
            i, j = i - 1, j - 1
            mapper.append((j, i))
        elif move == 1:
            j -= 1
            mapper.append((j, -1))
        elif move == 2:
            i -= 1
        else:
            break
    mapper.reverse()
    return [src for _, src in mapper]


def refine_map(src: Tokens, tgt: Tokens) -> tuple[np.ndarray, np.ndarray]:
    """ "Refine" mode: (M (77, 77), r (77,)) from the alignment of the two token sequences.

    ``M[i, j] = 1`` gathers source token i into target position j; r_j = 0 for target tokens
    with no source counterpart. Positions past the target's length map to themselves.
    """
    aligned = global_align(list(src.ids[: src.length]), list(tgt.ids[: tgt.length]))
    m = np.zeros((MAX_LENGTH, MAX_LENGTH), dtype=np.float32)
    r = np.ones(MAX_LENGTH, dtype=np.float32)
    for j, i in enumerate(aligned):
        if i >= 0:
            m[i, j] = 1.0
        else:
            r[j] = 0.0
    for j in range(len(aligned), MAX_LENGTH):
        m[j, j] = 1.0
    return m, r


def replace_map(
    tokenizer: ClipTokenizer, src_prompt: str, src: Tokens, tgt_prompt: str, tgt: Tokens
) -> tuple[np.ndarray, np.ndarray]:
    """ "Replace" mode (word swap, same word count): (M, r ≡ 1).

    A source word of n tokens that becomes m tokens spreads weight 1/m over the m targets.
    """
    words_src, words_tgt = src_prompt.split(" "), tgt_prompt.split(" ")
    if len(words_src) != len(words_tgt):
        raise InputError(
            f"mode 'replace' needs prompts with the same number of words; source has "
            f"{len(words_src)}, target has {len(words_tgt)}. Use mode 'refine' (or 'auto')."
        )
    changed = [i for i in range(len(words_tgt)) if words_tgt[i] != words_src[i]]
    src_inds = [[k for k, w in enumerate(src.word_of_token) if w == i] for i in changed]
    tgt_inds = [[k for k, w in enumerate(tgt.word_of_token) if w == i] for i in changed]
    m = np.zeros((MAX_LENGTH, MAX_LENGTH), dtype=np.float32)
    i = j = cur = 0
    while i < MAX_LENGTH and j < MAX_LENGTH:
        if cur < len(src_inds) and src_inds[cur] and src_inds[cur][0] == i:
            s_ids, t_ids = src_inds[cur], tgt_inds[cur]
            if len(s_ids) == len(t_ids):
                m[s_ids, t_ids] = 1.0
            else:
                for t_id in t_ids:
                    m[s_ids, t_id] = 1.0 / len(t_ids)
            cur += 1
            i += len(s_ids)
            j += len(t_ids)
        elif cur < len(src_inds):
            m[i, j] = 1.0
            i += 1
            j += 1
        else:
            m[j, j] = 1.0
            i += 1
            j += 1
    return m, np.ones(MAX_LENGTH, dtype=np.float32)


def cross_schedule(fraction: float, num_steps: int) -> np.ndarray:
    """a_k per step: 1 for k < ⌊c·(N+1)⌋ else 0 (prompt-to-prompt's time-word alpha)."""
    end = int(fraction * (num_steps + 1))
    return (np.arange(num_steps) < end).astype(np.float32)


def self_schedule(fraction: float, num_steps: int) -> np.ndarray:
    """f per step: 1 for k < ⌊s·N⌋ else 0."""
    end = int(num_steps * fraction)
    return (np.arange(num_steps) < end).astype(np.float32)


def word_mask(tokenizer: ClipTokenizer, tokens: Tokens, prompt: str, word: str, what: str) -> np.ndarray:
    """(77,) float32 with 1 at the tokens of ``word`` in ``prompt``; an absent word is an error."""
    inds = tokenizer.word_token_indices(tokens, word, prompt)
    if not inds:
        raise InputError(
            f"{what} word {word!r} is not a word of the prompt {prompt!r}; "
            f"give one of: {', '.join(repr(w) for w in prompt.split(' ') if w)}"
        )
    mask = np.zeros(MAX_LENGTH, dtype=np.float32)
    mask[inds] = 1.0
    return mask


@dataclass(frozen=True)
class EditControls:
    """Everything the reverse-edit graph and local blend need, for N reverse steps.

    Attributes:
        token_map: (77, 77) float32 M.
        refine_alpha: (77,) float32 r.
        equalizer: (77,) float32 e.
        cross_alpha: (N, 77) float32 a_k.
        self_flag: (N, 1) float32 f.
        blend_tokens: (2, 77) float32 word masks [source word in source, target word in
            target], or None for no local blend.
    """

    token_map: np.ndarray
    refine_alpha: np.ndarray
    equalizer: np.ndarray
    cross_alpha: np.ndarray
    self_flag: np.ndarray
    blend_tokens: np.ndarray | None

    def step_feeds(self, k: int) -> dict[str, np.ndarray]:
        """The control inputs of the reverse-edit graph at reverse step k."""
        return {
            "token_map": self.token_map,
            "refine_alpha": self.refine_alpha,
            "equalizer": self.equalizer,
            "cross_alpha": self.cross_alpha[k],
            "self_flag": self.self_flag[k],
        }


def blend_mask(
    acc_maps: np.ndarray, blend_tokens: np.ndarray, latent_hw: int, threshold: float = BLEND_THRESHOLD
) -> np.ndarray:
    """Local-blend mask (latent_hw, latent_hw) bool from accumulated cross-attention maps.

    Args:
        acc_maps: (2, Q, 77) maps summed over the steps so far, Q = m·m (16·16 at 512 px).
        blend_tokens: (2, 77) word masks per row.

    Per row: sum over the word's tokens → m×m; 3×3 max-pool (stride 1, pad 1); nearest
    upsample to the latent; divide by its max; > threshold. The result is mask_src OR mask_tgt.
    """
    rows, q, _ = acc_maps.shape
    m = int(round(q**0.5))
    g = np.einsum("rqt,rt->rq", acc_maps.astype(np.float32), blend_tokens.astype(np.float32)).reshape(rows, m, m)
    padded = np.pad(g, ((0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    pooled = np.max(np.stack([padded[:, dy : dy + m, dx : dx + m] for dy in range(3) for dx in range(3)]), axis=0)
    factor = latent_hw // m
    up = np.repeat(np.repeat(pooled, factor, axis=1), factor, axis=2)
    peak = up.max(axis=(1, 2), keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        mask = (up / peak) > threshold
    return mask[0] | mask[1]


MODES = ("auto", "refine", "replace")


def build_controls(
    tokenizer: ClipTokenizer,
    source_prompt: str,
    target_prompt: str,
    num_steps: int,
    *,
    cross_replace: float = 0.2,
    self_replace: float = 0.2,
    amplify: dict | None = None,
    blend=None,
    mode: str = "auto",
) -> EditControls:
    """The Prompt-to-Prompt inputs of an edit with ``num_steps`` reverse steps (validated)."""
    check_prompt(source_prompt, "source prompt")
    check_prompt(target_prompt, "target prompt")
    cross_replace = check_range(cross_replace, 0.0, 1.0, "cross_replace")
    self_replace = check_range(self_replace, 0.0, 1.0, "self_replace")
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}", param="mode")
    src_tok = tokenizer(source_prompt)
    tgt_tok = tokenizer(target_prompt)
    same_words = len(source_prompt.split(" ")) == len(target_prompt.split(" "))
    if mode == "replace" or (mode == "auto" and same_words):
        token_map, refine_alpha = replace_map(tokenizer, source_prompt, src_tok, target_prompt, tgt_tok)
    else:
        token_map, refine_alpha = refine_map(src_tok, tgt_tok)
    equalizer = np.ones(77, dtype=np.float32)
    for word, factor in (amplify or {}).items():
        f = check_range(factor, 0.0, 20.0, f"amplify factor of {word!r}", param="amplify")
        equalizer[word_mask(tokenizer, tgt_tok, target_prompt, word, "amplify") > 0] = f
    n = num_steps
    cross = np.repeat(cross_schedule(cross_replace, n)[:, None], 77, axis=1)
    self_flag = self_schedule(self_replace, n)[:, None]
    blend_tokens = None
    if blend is not None:
        if not (isinstance(blend, (tuple, list)) and len(blend) == 2 and all(isinstance(w, str) for w in blend)):
            raise InputError(f"blend must be a pair of words (source_word, target_word), got {blend!r}", param="blend")
        blend_tokens = np.stack(
            [
                word_mask(tokenizer, src_tok, source_prompt, blend[0], "blend source"),
                word_mask(tokenizer, tgt_tok, target_prompt, blend[1], "blend target"),
            ]
        )
    return EditControls(
        token_map, refine_alpha, equalizer, cross.astype(np.float32), self_flag.astype(np.float32), blend_tokens
    )
