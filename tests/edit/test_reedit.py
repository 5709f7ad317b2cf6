"""Re-edits through the source cache equal the batch-2 edit of the same inversion (tiny model, fp32).

The reference math (explicit probabilities) on the torch backend over every control combination
and the 3- and 4-step schedules; the exported graphs (fused attention) on onnxruntime and
OpenVINO against the torch batch-2 edit."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import TINY_SEED

from icd_edge.edit import p2p
from icd_edge.edit.editor import Editor
from icd_edge.export.parity import psnr_db

PROMPTS = ("a photo of a cat", "a photo of a dog")
# (cross_replace, self_replace): none, the official default, partial, every step, cross only
FRACTIONS = ((0.0, 0.0), (0.2, 0.2), (0.4, 0.6), (1.0, 1.0), (0.6, 0.0))
COMBOS = [
    dict(mode=mode, cross_replace=c, self_replace=s, amplify=amp, blend=blend)
    for mode, (c, s), amp, blend in itertools.product(
        ("refine", "replace"), FRACTIONS, (None, {"dog": 3.0}), (None, ("cat", "dog"))
    )
]


@pytest.fixture(scope="module", params=[(4, 4), (3, 3)], ids=["4+4", "3+3"])
def pair(request, tmp_path_factory):
    """A batch-2 editor and a re-edit editor on the same torch modules and schedule."""
    from icd_edge.export.pipeline import memory_bundle
    from icd_edge.graphs.wrappers import build_graphs
    from icd_edge.runtimes.torch_ref import TorchBackend

    src, bundle = memory_bundle("tiny", TINY_SEED, tmp_path_factory.mktemp("reedit"), steps=request.param, reedit=True)
    graphs = build_graphs(src.text_encoder, src.vae, src.unet_forward, src.unet_reverse, bundle.dims)
    backend = TorchBackend(graphs)
    return Editor(bundle, backend, source_cache="off"), Editor(bundle, backend, source_cache="edit")


@pytest.fixture
def masks(monkeypatch):
    """Every local-blend mask the editors compute, in order."""
    seen = []
    real = p2p.blend_mask

    def recording(*args, **kwargs):
        m = real(*args, **kwargs)
        seen.append(m.copy())
        return m

    monkeypatch.setattr(p2p, "blend_mask", recording)
    return seen


def test_reedit_equals_the_batch2_edit_for_every_control(pair, photo, masks):
    batch2, cached = pair
    inv = batch2.invert(photo, PROMPTS[0], seed=0)
    steps = len(batch2.constants.reverse)
    worst = np.inf
    for controls in COMBOS:
        masks.clear()
        ref, ref_src = batch2.edit(inv, PROMPTS[1], output_type="np", return_source=True, **controls)
        n_ref = len(masks)
        got, got_src = cached.edit(inv, PROMPTS[1], output_type="np", return_source=True, **controls)
        assert inv.source is not None and inv.source.steps == steps  # made by the first edit, then reused
        if controls["blend"] is not None:
            assert n_ref == steps and len(masks) == 2 * steps
            for a, b in zip(masks[:steps], masks[steps:]):
                np.testing.assert_array_equal(a, b)
        db = psnr_db(ref, got, peak=1.0)
        assert db >= 60.0, (controls, db)
        assert psnr_db(ref_src, got_src, peak=1.0) >= 60.0, controls
        worst = min(worst, db)
    # the controls reach the target row: the edits differ from each other
    a = cached.edit(inv, PROMPTS[1], output_type="np", **COMBOS[0])
    b = cached.edit(inv, PROMPTS[1], output_type="np", **COMBOS[-1])
    assert psnr_db(a, b, peak=1.0) < 45.0


def test_source_cache_is_computed_once_and_reused(pair, photo):
    _, cached = pair
    inv = cached.invert(photo, PROMPTS[0], seed=1)
    assert inv.source is None  # source_cache="edit": made by the first edit
    cached.profile = []
    cached.edit_many(inv, [PROMPTS[1], "a photo of a lion", "a photo of a dog in a hat"], output_type="np")
    stages = [s for s, _ in cached.profile if not s.startswith("load:")]
    steps = len(cached.constants.reverse)
    assert sum(s.startswith("source_") for s in stages) == steps
    assert sum(s.startswith("target_") for s in stages) == 3 * steps
    assert not any(s.startswith("reverse_edit") for s in stages)
    report = inv.source.size_report()
    assert report["fp16_mib"] * 2 == pytest.approx(report["fp32_mib"], abs=0.02)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_exported_reedit_graphs_match_the_torch_batch2_edit(tiny_bundle, backend, photo):
    from icd_edge.runtimes import select_backend

    ref = Editor.open(tiny_bundle, "torch", source_cache="off")
    options = {"precision": "fp32"} if backend == "openvino" else {}
    ed = Editor(ref.bundle, select_backend(backend, ref.bundle, **options))
    assert ed.source_cache == "invert"
    inv = ref.invert(photo, PROMPTS[0], seed=0)
    ed.profile = []
    for controls in (COMBOS[3], COMBOS[-1], COMBOS[len(COMBOS) // 2 + 5]):
        want = ref.edit(inv, PROMPTS[1], output_type="np", **controls)
        got = ed.edit(inv, PROMPTS[1], output_type="np", **controls)
        assert psnr_db(want, got, peak=1.0) >= 60.0, controls
    assert any(s.startswith("target_") for s, _ in ed.profile)


def test_edit_many_checks_every_target_before_running(pair, photo):
    from icd_edge.errors import InputError

    _, cached = pair
    inv = cached.invert(photo, PROMPTS[0], seed=2)
    cached.profile = []
    with pytest.raises(InputError, match="blend target word 'dog'"):
        cached.edit_many(inv, [PROMPTS[1], "a photo of a lion"], blend=("cat", "dog"))
    with pytest.raises(InputError, match="unknown parameters colour"):
        cached.edit_many(inv, [PROMPTS[1]], colour="red")
    with pytest.raises(InputError, match="non-empty list"):
        cached.edit_many(inv, PROMPTS[1])
    assert not any(s.startswith(("source_", "target_")) for s, _ in cached.profile)  # nothing ran
