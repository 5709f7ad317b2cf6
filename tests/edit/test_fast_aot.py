"""The fast path with AOTInductor packages (``FastOptions(aot=True)``) on the CPU: the calls an
inversion makes are recorded, compiled, loaded by a new editor without compiling, and give the
eager editor's result, reading the editor's own weights."""

import copy
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SEED

from icd_edge.bundle.store import open_bundle
from icd_edge.fast.editor import FastEditor, FastOptions


def test_packages_of_an_inversion_load_and_equal_eager(tiny_bundle, photo, tmp_path):
    from icd_edge.export.models import build_random

    b = open_bundle(tiny_bundle)
    with tempfile.TemporaryDirectory() as work:
        src = build_random("tiny", TINY_SEED, Path(work))
    parts = lambda: [copy.deepcopy(m) for m in (src.text_encoder, src.vae, src.unet_forward, src.unet_reverse)]  # noqa: E731
    base = dict(device="cpu", dtype="float32", channels_last=False, cuda_graphs=False)
    eager = FastEditor(b, *parts(), FastOptions(**base, compile=False))
    want = eager.invert_batch([photo], ["a photo of a cat"], [3]).numpy()

    opts = FastOptions(**base, aot=True, compile_cache=str(tmp_path / "cache"))
    FastEditor._recording = True  # what prepare does: run eagerly, remember each call
    try:
        rec = FastEditor(b, *parts(), opts)
    finally:
        FastEditor._recording = False
    rec.invert_batch([photo], ["a photo of a cat"], [3])
    assert {g for g, _ in rec._aot.examples} == {"vae_encoder", "unet_forward"}
    rec._aot.build(progress=False)

    fresh = FastEditor(b, *parts(), opts)
    assert fresh.compile_cache_loaded and len(fresh._aot.models) == 2
    fresh.unet_f_c.fallback = fresh.vae_enc_c.fallback = lambda *a: pytest.fail("a prepared call compiled")
    got = fresh.invert_batch([photo], ["a photo of a cat"], [3]).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    # the packages read the editor's parameters in place (one copy of the weights)
    with torch.no_grad():
        fresh.unet_f.unet.conv_in.weight.mul_(0.5)
    assert not np.allclose(fresh.invert_batch([photo], ["a photo of a cat"], [3]).numpy(), got, atol=1e-4)
