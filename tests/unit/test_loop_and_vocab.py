"""The edit loop, the precision vocabulary and the cache root, without a bundle or a model: the
loop runs over a stand-in ``run`` whose ε̂ is known, so every step can be checked by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from icd_edge import precision
from icd_edge.bundle.schema import Step
from icd_edge.cache import cache_dir, cache_root
from icd_edge.edit import loop
from icd_edge.errors import InputError

C = loop.Constants(
    image_hw=64,
    latent_hw=8,
    vae_scale=0.18215,
    forward=(Step(19, 259, 1.5, 0.25), Step(259, 999, 2.0, -0.5)),
    reverse=(Step(999, 519, 0.5, 1.0), Step(519, 0, 0.25, 2.0)),
    start=(0.9, 0.1),
    alpha_sigma={999: (0.07, 0.99), 519: (0.5, 0.8)},
    max_guidance=19.0,
    blend_threshold=0.3,
)


class Recorder:
    """A model stand-in: ε̂ = 0.1·x (+ 1 on the target rows), blend maps of ones; records calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, graph, stage, **feeds):
        self.calls.append((graph, stage, feeds))
        x = feeds["sample"]
        eps = 0.1 * x
        if graph == "unet_reverse_edit":
            eps = eps + np.concatenate([np.zeros_like(x[:1]), np.ones_like(x[1:])])
            return {"eps": eps.astype(np.float32), "blend_maps": np.ones((2, 4, 77), np.float32)}
        return {"eps": eps.astype(np.float32)}


def test_invert_is_the_start_point_then_the_forward_steps():
    run, z0, noise = Recorder(), np.full((1, 4, 8, 8), 2.0, np.float32), np.ones((1, 4, 8, 8), np.float32)
    x = loop.invert(run, C, z0, noise, "emb", "w0")
    want = 0.9 * 2.0 + 0.1 * 1.0
    for st in C.forward:
        want = st.c1 * want + st.c2 * 0.1 * want
    np.testing.assert_allclose(x, want, rtol=1e-6)
    assert [(g, s, float(f["timestep"][0])) for g, s, f in run.calls] == [
        ("unet_forward", "forward_0", 19.0),
        ("unet_forward", "forward_1", 259.0),
    ]
    assert all(f["encoder_hidden_states"] == "emb" and f["timestep_cond"] == "w0" for _, _, f in run.calls)


def test_edit_rows_steps_feeds_and_blend():
    run, latent = Recorder(), np.ones((1, 4, 8, 8), np.float32)
    seen = []
    x = loop.edit(
        run,
        C,
        latent,
        "text",
        ["c0", "c1"],
        lambda k: {"cross_alpha": k},
        blend=None,
        on_step=lambda k, xb, eps, st: seen.append((k, st.t)),
    )
    src = tgt = 1.0
    for st in C.reverse:
        src, tgt = st.c1 * src + st.c2 * 0.1 * src, st.c1 * tgt + st.c2 * (0.1 * tgt + 1.0)
    np.testing.assert_allclose(x[0], src, rtol=1e-6)
    np.testing.assert_allclose(x[1], tgt, rtol=1e-6)
    assert seen == [(0, 999), (1, 519)]
    assert [(f["timestep_cond"], f["cross_alpha"], f["sample"].shape[0]) for _, _, f in run.calls] == [
        ("c0", 0, 2),
        ("c1", 1, 2),
    ]
    # a mask of zeros: the target row follows the source row at every step
    masks = []
    x = loop.edit(
        Recorder(),
        C,
        latent,
        "text",
        ["c0", "c1"],
        lambda k: {},
        blend=lambda acc: masks.append(acc.copy()) or np.zeros((8, 8), bool),
    )
    np.testing.assert_array_equal(x[0], x[1])
    assert [float(m.max()) for m in masks] == [1.0, 2.0]  # the maps are summed over steps


def test_dynamic_guidance_per_step():
    assert C.guided_w(19.0, 0.8) == [0.0, 19.0] and C.guided_w(7.0, 1.0) == [7.0, 7.0]


def test_one_precision_vocabulary():
    assert precision.canonical("f32", precision.ALL) == "fp32"
    assert (
        precision.canonical("HALF", precision.ALL) == "fp16"
        and precision.canonical("bfloat16", precision.ALL) == "bf16"
    )
    with pytest.raises(InputError, match="must be one of fp32, fp16"):
        precision.canonical("fp8", precision.ALL)
    assert precision.is_int8("int8-dynamic") and not precision.is_int8("fp16") and not precision.is_int8(None)
    assert precision.OPENVINO["fp32"] == "f32" and precision.from_library("f32") == "fp32"


def test_one_cache_root(caplog, monkeypatch):
    import icd_edge.cache

    monkeypatch.setattr(icd_edge.cache, "_warned", set())  # the warning is once per process
    home = Path("/home/u")
    assert cache_root({}, "Linux", home) == home / ".cache/icd_edge"
    assert cache_root({"XDG_CACHE_HOME": "/x"}, "Linux", home) == Path("/x/icd_edge")
    assert cache_root({}, "Darwin", home) == home / "Library/Caches/icd_edge"
    assert cache_dir("trt", {"ICD_EDGE_CACHE": "/c"}, "Linux", home) == Path("/c/trt")
    with caplog.at_level("WARNING", logger="icd_edge.cache"):
        assert cache_dir("trt", {"ICD_EDGE_TRT_CACHE": "/old"}, "Linux", home) == home / ".cache/icd_edge/trt"
    assert "ICD_EDGE_TRT_CACHE is no longer read" in caplog.text
