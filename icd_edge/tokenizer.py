"""CLIP BPE tokenizer from a bundle's ``tokenizer.json``, through the ``tokenizers`` library.

No transformers at run time. Ids are padded with the end-of-text id and truncated to 77,
as SD1.5's ``CLIPTokenizer(padding="max_length", truncation=True)`` does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from icd_edge.errors import BundleError, InputError

logger = logging.getLogger(__name__)

MAX_LENGTH = 77


@dataclass(frozen=True)
class Tokens:
    """A tokenised prompt.

    Attributes:
        ids: (77,) int64, BOS + tokens + EOS, padded with the pad id.
        length: number of real tokens including BOS and EOS (≤ 77).
        word_of_token: for each of the ``length`` positions, the index of the space-separated
            word it comes from, or -1 for BOS/EOS.
        truncated: True when the prompt did not fit and was cut.
    """

    ids: np.ndarray
    length: int
    word_of_token: tuple[int, ...]
    truncated: bool


class ClipTokenizer:
    """CLIP BPE with BOS/EOS, fixed length 77.

    Args:
        path: a ``tokenizer.json`` written by the export stage.
        pad_token: the padding token when it is not the end token (SDXL's second tokenizer pads
            with ``!``); the manifest names it.
    """

    def __init__(self, path: str | Path, pad_token: str | None = None):
        from tokenizers import Tokenizer

        path = Path(path)
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise BundleError(f"cannot read tokenizer {path}: {exc}. Re-export the bundle.") from exc
        self._tok.no_padding()
        self._tok.no_truncation()
        vocab = self._tok.get_vocab()
        try:
            self.bos_id = vocab["<|startoftext|>"]
            self.eos_id = vocab["<|endoftext|>"]
        except KeyError as exc:
            raise BundleError(f"{path} is not a CLIP tokenizer (no <|startoftext|>/<|endoftext|>)") from exc
        self.pad_id = self.eos_id
        if pad_token is not None:
            if pad_token not in vocab:
                raise BundleError(
                    f"{path} has no pad token {pad_token!r} (named by the manifest); re-export the bundle"
                )
            self.pad_id = vocab[pad_token]

    def __call__(self, prompt: str) -> Tokens:
        """Tokenise one prompt; prompts longer than 75 tokens are truncated with a warning."""
        if not isinstance(prompt, str):
            raise InputError(f"a prompt must be a string, got {type(prompt).__name__}")
        enc = self._tok.encode(prompt)
        ids = list(enc.ids)
        offsets = list(enc.offsets)
        # The CLIP post-processor adds BOS/EOS; normalise in case a file lacks it.
        if not ids or ids[0] != self.bos_id:
            ids, offsets = [self.bos_id] + ids + [self.eos_id], [(0, 0)] + offsets + [(0, 0)]
        truncated = len(ids) > MAX_LENGTH
        if truncated:
            logger.warning(
                "prompt has %d tokens; CLIP reads at most %d, so it was cut after %r",
                len(ids) - 2,
                MAX_LENGTH - 2,
                prompt[: offsets[MAX_LENGTH - 2][1]],
            )
            ids = ids[: MAX_LENGTH - 1] + [self.eos_id]
            offsets = offsets[: MAX_LENGTH - 1] + [(0, 0)]
        words = _word_spans(prompt)
        word_of_token = [-1] + [_word_index(words, start) for start, _ in offsets[1:-1]] + [-1]
        padded = np.full(MAX_LENGTH, self.pad_id, dtype=np.int64)
        padded[: len(ids)] = ids
        return Tokens(padded, len(ids), tuple(word_of_token), truncated)

    def word_token_indices(self, tokens: Tokens, word: str, prompt: str) -> list[int]:
        """Token positions of every occurrence of a space-separated ``word`` in ``prompt``."""
        split = prompt.split(" ")
        places = {i for i, w in enumerate(split) if w == word}
        return [k for k, w in enumerate(tokens.word_of_token) if w in places]


def _word_spans(prompt: str) -> list[tuple[int, int]]:
    """Character spans of the words of ``prompt.split(" ")`` (the P2P notion of a word)."""
    spans, pos = [], 0
    for w in prompt.split(" "):
        spans.append((pos, pos + len(w)))
        pos += len(w) + 1
    return spans


def _word_index(spans: list[tuple[int, int]], char: int) -> int:
    for i, (start, end) in enumerate(spans):
        if start <= char < end:
            return i
    return -1
