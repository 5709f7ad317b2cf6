"""Schedule, step coefficients, guidance embedding and dynamic guidance against the official code's values."""

import numpy as np
import pytest

from icd_edge import schedule as S

# the official schedule's values: t -> (ᾱ_t, a_t, σ_t)
SPEC_SCHEDULE = {
    19: (0.982244, 0.991082, 0.133252),
    249: (0.675432, 0.821847, 0.569708),
    259: (0.658975, 0.811773, 0.583973),
    339: (0.524892, 0.724494, 0.689281),
    499: (0.277670, 0.526944, 0.849900),
    519: (0.251578, 0.501575, 0.865114),
    699: (0.083128, 0.288320, 0.957534),
    779: (0.044200, 0.210239, 0.977650),
    999: (0.004660, 0.068265, 0.997667),
}
# §2.3 table: config -> [(c1, c2)] forward then reverse
SPEC_COEFFS = {
    "4A": (
        [(0.819077, 0.474830), (0.617876, 0.504291), (0.419157, 0.615031), (0.324701, 0.680223)],
        [(3.079753, -2.094919), (2.385739, -1.467304), (1.618448, -0.816169), (1.231871, -0.719380)],
    ),
    "4B": (
        [(0.829242, 0.459211), (0.641170, 0.484620), (0.547155, 0.492507), (0.236768, 0.770954)],
        [(4.223545, -3.256159), (1.827636, -0.900124), (1.559649, -0.755838), (1.216772, -0.693205)],
    ),
    "3": (
        [(0.731013, 0.591872), (0.397960, 0.683228), (0.236768, 0.770954)],
        [(4.223545, -3.256159), (2.512816, -1.716827), (1.380273, -0.951396)],
    ),
}


@pytest.mark.parametrize("t", sorted(SPEC_SCHEDULE))
def test_schedule_matches_spec_table(t):
    acp = S.alphas_cumprod()
    a, s = S.alpha_sigma(t, acp)
    np.testing.assert_allclose([acp[t], a, s], SPEC_SCHEDULE[t], atol=1.5e-6)


def test_schedule_matches_diffusers():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    np.testing.assert_allclose(S.alphas_cumprod(), sched.alphas_cumprod.numpy(), rtol=2e-6, atol=0)


@pytest.mark.parametrize("name", SPEC_COEFFS)
def test_step_coefficients_match_spec(name):
    cfg = S.STEP_CONFIGS[name]
    fwd, rev = SPEC_COEFFS[name]
    np.testing.assert_allclose([S.step_coefficients(t, s) for t, s in cfg.forward], fwd, atol=1.5e-6)
    np.testing.assert_allclose([S.step_coefficients(t, s) for t, s in cfg.reverse], rev, atol=1.5e-6)


def test_segments_follow_the_release_rule():
    a = S.STEP_CONFIGS["4A"]
    assert a.forward == ((19, 259), (259, 519), (519, 779), (779, 999))
    assert a.reverse == ((999, 779), (779, 519), (519, 259), (259, 0))
    assert S.STEP_CONFIGS["3"].reverse == ((999, 699), (699, 339), (339, 0))


def test_step_equals_ddim_formula():
    rng = np.random.default_rng(0)
    x, eps = rng.standard_normal((2, 1, 4, 8, 8), dtype=np.float32)
    acp = S.alphas_cumprod()
    for t, s in [(999, 779), (259, 0), (19, 259)]:
        a_t, s_t = np.sqrt(acp[t]), np.sqrt(1 - acp[t])
        a_s, s_s = (1.0, 0.0) if s == 0 else (np.sqrt(acp[s]), np.sqrt(1 - acp[s]))
        x0 = (x - s_t * eps) / a_t
        expected = a_s * x0 + s_s * eps
        got = S.consistency_step(x, eps, *S.step_coefficients(t, s))
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=2e-5)


def test_step_config_from_lora_names():
    assert (
        S.step_config_from_lora_names("forward-19-259-519-779.safetensors", "reverse-259-519-779-999.safetensors").name
        == "4A"
    )
    assert (
        S.step_config_from_lora_names(
            "iCD-SD15-forward_19_339_699.safetensors", "iCD-SD15-reverse_339_699_999.safetensors"
        ).name
        == "3"
    )
    assert S.step_config_from_lora_names("fwd.safetensors", "rev.safetensors") is None
    mixed = S.step_config_from_lora_names("forward-19-339-699.safetensors", "reverse-259-519-779-999.safetensors")
    assert mixed.name == "3+4" and mixed.forward == ((19, 339), (339, 699), (699, 999)) and len(mixed.reverse) == 4
    assert (
        S.step_config_from_lora_names("forward-19-259-519-779.safetensors", "reverse-339-699-999.safetensors").name
        == "4+3"
    )
    with pytest.raises(ValueError, match="999"):
        S.step_config_from_lora_names("forward-19-259-519-779.safetensors", "reverse-249-499-699-899.safetensors")
    with pytest.raises(ValueError, match="start at 19"):
        S.step_config([29, 259], [259, 999])


def test_guidance_embedding_zero_is_zeros_then_ones():
    e = S.guidance_embedding(0.0)
    assert e.shape == (512,) and e.dtype == np.float32
    np.testing.assert_array_equal(e[:256], 0.0)
    np.testing.assert_array_equal(e[256:], 1.0)


@pytest.mark.parametrize("w", [0.0, 7.0, 19.0, 3.5])
def test_guidance_embedding_matches_torch_formula(w):
    import torch
    from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import (
        LatentConsistencyModelPipeline as P,
    )

    ref = P.get_guidance_scale_embedding(None, torch.tensor([w]), 512, torch.float32)[0].numpy()
    # Arguments reach 19 000 rad: a 1-ulp difference of exp() between numpy and torch moves the
    # phase by ~1e-3. Bundles therefore ship torch's vectors for trained w.
    np.testing.assert_allclose(S.guidance_embedding(w), ref, atol=5e-3)


def test_dynamic_guidance_rule():
    # SD1.5 edit, config A, τ = 0.8, w = 19: t = 999 unguided; 779, 519, 259 guided.
    assert [S.dynamic_guidance(19, t, 0.8) for t in (999, 779, 519, 259)] == [0, 19, 19, 19]
    # τ = 0.7 with config A leaves 999 and 779 unguided; config B: 699 ≤ 700 is guided.
    assert [S.dynamic_guidance(19, t, 0.7) for t in (999, 779, 519, 259)] == [0, 0, 19, 19]
    assert S.dynamic_guidance(7, 699, 0.7) == 7
    # Generation default τ = 1: every step guided.
    assert all(S.dynamic_guidance(7, t, 1.0) == 7 for t in (999, 779, 519, 259))
