"""Runtime tokenizer (tokenizers library, no transformers) vs transformers' CLIPTokenizer on the
real CLIP BPE vocabulary, which ships inside the clip-anytorch wheel (fetched from PyPI once)."""

from __future__ import annotations

import gzip
import io
import itertools
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from icd_edge.tokenizer import ClipTokenizer

CACHE = Path(__file__).resolve().parents[2] / ".cache"
WHEEL = "clip-anytorch==2.6.0"


def _bpe_lines() -> list[str]:
    CACHE.mkdir(exist_ok=True)
    wheels = sorted(CACHE.glob("clip_anytorch-*.whl"))
    if not wheels:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE), WHEEL],
            capture_output=True,
            text=True,
            timeout=300,
        )
        wheels = sorted(CACHE.glob("clip_anytorch-*.whl"))
        if not wheels:
            pytest.skip(f"cannot fetch {WHEEL} (the real CLIP BPE file) from PyPI: {proc.stderr.strip()[-200:]}")
    with zipfile.ZipFile(wheels[-1]) as z:
        data = z.read("clip/bpe_simple_vocab_16e6.txt.gz")
    return gzip.open(io.BytesIO(data)).read().decode("utf-8").split("\n")


@pytest.fixture(scope="module")
def real_tokenizers(tmp_path_factory):
    from transformers import CLIPTokenizer

    from icd_edge.export.models import clip_vocab_from_bpe, write_clip_tokenizer

    vocab, merges = clip_vocab_from_bpe(_bpe_lines())
    assert len(vocab) == 49408
    d = tmp_path_factory.mktemp("clip")
    (d / "vocab.json").write_text(__import__("json").dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    hf = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=77)
    ours = ClipTokenizer(write_clip_tokenizer(vocab, merges, d / "bundle_tok"))
    return hf, ours


def _prompts() -> list[str]:
    subjects = [
        "a photo of a cat",
        "A PHOTO OF A DOG",
        "a lego bird",
        "an astronaut riding a horse",
        "portrait of a woman",
    ]
    styles = [
        "",
        ", oil painting",
        " in the style of Van Gogh!",
        " — 4k, hdr",
        " (masterpiece:1.2)",
        "  with   extra   spaces  ",
    ]
    extras = [
        "",
        " 🐱🐶",
        " café naïve façade",
        " 東京の夜景",
        " שלום עולם",
        " مرحبا",
        " e=mc^2 & 100% #1",
        " it's a dog's life",
        " \t tabs\tand\nnewlines",
        " ÅNGSTRÖM ǅ ﬁ ligature",
    ]
    prompts = [s + st + ex for s, st, ex in itertools.product(subjects, styles, extras)]
    long = " ".join(["word"] * 120)
    prompts += [long, "a " * 200, "x" * 500, "🙂" * 100, "", " ", ".", "a,b;c:d!e?f", "12345 678 9.5"]
    return prompts


def test_canonical_ids(real_tokenizers):
    _, ours = real_tokenizers
    t = ours("a photo of a cat")
    assert t.ids[: t.length].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (t.ids[t.length :] == 49407).all() and t.ids.dtype == np.int64


def test_ids_equal_transformers_on_hundreds_of_prompts(real_tokenizers):
    hf, ours = real_tokenizers
    prompts = _prompts()
    assert len(prompts) >= 300
    for p in prompts:
        expected = hf(p, padding="max_length", max_length=77, truncation=True).input_ids
        got = ours(p)
        assert got.ids.tolist() == expected, p
        assert got.truncated == (len(hf(p).input_ids) > 77), p


def test_truncation_warns(real_tokenizers, caplog):
    _, ours = real_tokenizers
    with caplog.at_level("WARNING"):
        t = ours(" ".join(["word"] * 120))
    assert t.truncated and t.length == 77 and t.ids[-1] == 49407
    assert "was cut" in caplog.text


def test_word_of_token_follows_space_split(real_tokenizers):
    _, ours = real_tokenizers
    prompt = "a photo of a lego-bird, flying"
    t = ours(prompt)
    words = prompt.split(" ")
    assert t.word_of_token[0] == -1 and t.word_of_token[t.length - 1] == -1
    assert set(t.word_of_token[1:-1]) == set(range(len(words)))
    assert ours.word_token_indices(t, "flying", prompt) == [t.length - 2]
