"""SDXL's invert and prompt-switch edit through the shared loops and the SDXL graph modules, against
an independent torch implementation of the method on tiny-xl (fp32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icd_edge.bundle import spec
from icd_edge.bundle.schema import Step
from icd_edge.edit import loop
from icd_edge.export import models
from icd_edge.graphs.wrappers import build_xl_graphs
from icd_edge.schedule import alpha_sigma, guidance_embedding, step_coefficients
from icd_edge.tokenizer import ClipTokenizer

TAU, W = 0.7, 7.0


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    src = models.build_random_xl("tiny-xl", 5, tmp_path_factory.mktemp("xl"))
    graphs = build_xl_graphs(src.text_encoder, src.text_encoder_2, src.vae, src.unet_forward, src.unet_reverse)
    return src, graphs


def _acp():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
    return sched.alphas_cumprod.numpy().astype(np.float32)


def _constants(src) -> loop.Constants:
    acp = _acp()
    step = lambda t, s: Step(t, s, *step_coefficients(t, s, acp))  # noqa: E731
    return loop.Constants(
        src.image_hw,
        src.image_hw // 8,
        float(src.vae.config.scaling_factor),
        tuple(step(t, s) for t, s in src.steps.forward),
        tuple(step(t, s) for t, s in src.steps.reverse),
        alpha_sigma(19, acp),
        {},
        19.0,
        0.3,
    )


def _run(graphs, calls):
    def run(graph, stage, **feeds):
        calls.append((graph, stage, feeds))
        with torch.no_grad():
            out = graphs[graph](*(torch.from_numpy(np.asarray(feeds[s.name])) for s in spec.XL_GRAPHS[graph][0]))
        return {"eps": out.numpy()}

    return run


def _texts(src, graphs, prompt):
    ids = torch.tensor(ClipTokenizer(src.tokenizer_json)(prompt).ids[None])
    ids_2 = torch.tensor(ClipTokenizer(src.tokenizer_2_json, pad_token="!")(prompt).ids[None])
    with torch.no_grad():
        h1 = graphs["text_encoder"](ids)
        h2, pooled = graphs["text_encoder_2"](ids_2)
    return torch.cat([h1, h2], -1).numpy(), pooled.numpy()


def test_xl_graph_modules_follow_the_spec(xl):
    src, graphs = xl
    dims = spec.dims_for_xl(src.image_hw, 32, 64, 64)
    assert dims["D"] == src.unet_reverse.config.cross_attention_dim and "Q" not in dims
    assert set(graphs) == set(spec.XL_GRAPHS)
    with torch.no_grad():
        mean, logvar = graphs["vae_encoder"](torch.zeros(1, 3, 128, 128))
        h2, pooled = graphs["text_encoder_2"](torch.zeros(1, 77, dtype=torch.long))
    for s, t in zip(spec.XL_GRAPHS["vae_encoder"][1], (mean, logvar)):
        assert tuple(t.shape) == s.resolve(dims)
    for s, t in zip(spec.XL_GRAPHS["text_encoder_2"][1], (h2, pooled)):
        assert tuple(t.shape) == s.resolve(dims)


def test_invert_and_prompt_switch_edit_equal_an_independent_implementation(xl):
    src, graphs = xl
    c = _constants(src)
    rng = np.random.default_rng(0)
    z0 = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
    noise = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
    e_src, p_src = _texts(src, graphs, "a photo of a cat")
    e_tgt, p_tgt = _texts(src, graphs, "a photo of a dog")
    time_ids = np.array([models.SDXL_TIME_IDS], np.float32)
    w0, wg = guidance_embedding(0.0)[None], guidance_embedding(W)[None]
    calls = []
    run = _run(graphs, calls)
    x999 = loop.invert(run, c, z0, noise, e_src, w0, extra={"text_embeds": p_src, "time_ids": time_ids})
    out = loop.edit_switch(run, c, x999, e_src, e_tgt, p_tgt, time_ids, w0, wg, TAU)

    # independent: the UNet called directly with diffusers' added_cond_kwargs, ᾱ from the scheduler
    acp = torch.from_numpy(_acp())
    a = lambda t: acp[t].sqrt() if t else torch.tensor(1.0)  # noqa: E731
    sg = lambda t: (1 - acp[t]).sqrt() if t else torch.tensor(0.0)  # noqa: E731
    T = torch.from_numpy  # noqa: N806

    def unet(m, x, t, e, pooled, w):
        cond = {"text_embeds": T(pooled), "time_ids": T(time_ids)}
        return m(x, torch.tensor([float(t)]), T(e), timestep_cond=T(w), added_cond_kwargs=cond).sample

    def step(x, eps, t, s):
        x0 = (x - sg(t) * eps) / a(t)
        return a(s) * x0 + sg(s) * eps

    with torch.no_grad():
        x = a(19) * T(z0) + sg(19) * T(noise)
        for t, s in src.steps.forward:
            x = step(x, unet(src.unet_forward, x, t, e_src, p_src, w0), t, s)
        ref_x999 = x
        for t, s in src.steps.reverse:
            guided = t / 1000 <= TAU
            e, w = (e_tgt, wg) if guided else (e_src, w0)
            x = step(x, unet(src.unet_reverse, x, t, e, p_tgt, w), t, s)  # pooled: the target's, always
    np.testing.assert_allclose(x999, ref_x999.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out, x.numpy(), rtol=1e-4, atol=2e-4)

    # the switch itself: τ = 0.7 with 4B leaves only t = 999 on the source prompt at w = 0
    rev = [f for g, _, f in calls if g == "unet_reverse"]
    assert [f["timestep"][0] for f in rev] == [999, 699, 499, 249]
    assert np.array_equal(rev[0]["encoder_hidden_states"], e_src) and np.array_equal(rev[0]["timestep_cond"], w0)
    assert all(np.array_equal(f["encoder_hidden_states"], e_tgt) for f in rev[1:])
    assert all(np.array_equal(f["timestep_cond"], wg) for f in rev[1:])
    assert all(np.array_equal(f["text_embeds"], p_tgt) for f in rev)
    # and the edit differs from a decode under the source prompt throughout
    calls.clear()
    same = loop.edit_switch(run, c, x999, e_src, e_src, p_src, time_ids, w0, wg, TAU)
    assert not np.allclose(same, out, atol=1e-3)
