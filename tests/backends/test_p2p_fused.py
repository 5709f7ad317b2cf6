"""P2P on fused attention equals the explicit-probability version (tiny model, CPU, fp32)."""

import copy

import numpy as np
import pytest
import torch

from icd_edge.graphs.attention import FusedP2PAttnProcessor, P2PAttnProcessor, P2PControls


@pytest.fixture(scope="module")
def unets():
    from diffusers import UNet2DConditionModel

    from icd_edge.export.models import tiny_configs

    torch.manual_seed(0)
    base = UNet2DConditionModel(**tiny_configs()["unet"]).eval()
    explicit, fused = copy.deepcopy(base), copy.deepcopy(base)
    explicit.set_attn_processor(P2PAttnProcessor())
    fused.set_attn_processor(FusedP2PAttnProcessor())
    return explicit, fused


def _controls(rng, n):
    tm = np.zeros((n, 77, 77), np.float32)
    for i in range(n):
        perm = rng.permutation(77)
        tm[i, perm, np.arange(77)] = 1.0
        tm[i, :, 5] *= 0.5
    ra = (rng.random((n, 77)) > 0.3).astype(np.float32)
    eq = (1 + 2 * rng.random((n, 77))).astype(np.float32)
    ca = np.ones((n, 77), np.float32)
    ca[:, 40:] = 0.0
    sf = np.array([[1.0], [0.0], [1.0]][:n], np.float32)
    return [torch.from_numpy(x) for x in (tm, ra, eq, ca, sf)]


def _run(unet, ctl_tensors, sample, text, cond, pair_slice=None):
    ctl = P2PControls(*ctl_tensors, self_max_keys=64, blend_queries=16)
    with torch.no_grad():
        eps = unet(sample, torch.tensor([779.0]), text, timestep_cond=cond, cross_attention_kwargs={"p2p": ctl}).sample
    return eps, ctl.blend_maps()


def test_fused_equals_explicit_for_one_pair(unets):
    explicit, fused = unets
    rng = np.random.default_rng(0)
    sample, text, cond = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32) * 3, torch.randn(2, 512)
    ctl = [c[0] for c in _controls(rng, 1)]
    e1, m1 = _run(explicit, ctl, sample, text, cond)
    e2, m2 = _run(fused, ctl, sample, text, cond)
    assert m1.shape == m2.shape == (2, 1, 16, 77)
    torch.testing.assert_close(e2, e1, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(m2, m1, atol=1e-6, rtol=1e-4)
    # the controls matter: no-edit controls give a different target row
    plain = [torch.eye(77), torch.ones(77), torch.ones(77), torch.zeros(77), torch.zeros(1)]
    e3, _ = _run(fused, plain, sample, text, cond)
    assert (e3[1] - e2[1]).abs().max() > 1e-3
    torch.testing.assert_close(e3[0], e2[0], atol=1e-5, rtol=1e-4)  # the source row is never edited


def test_fused_batches_pairs_with_their_own_controls(unets):
    explicit, fused = unets
    rng = np.random.default_rng(1)
    n = 3
    sample, text, cond = torch.randn(2 * n, 4, 16, 16), torch.randn(2 * n, 77, 32) * 3, torch.randn(2 * n, 512)
    ctl = _controls(rng, n)
    eps, maps = _run(fused, ctl, sample, text, cond)
    assert maps.shape == (2, n, 16, 77)
    for i in range(n):
        rows = [i, n + i]
        e1, m1 = _run(explicit, [c[i] for c in ctl], sample[rows], text[rows], cond[rows])
        torch.testing.assert_close(eps[rows], e1, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(maps[:, i], m1[:, 0], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("cross_on, self_on", [(True, True), (False, False), (True, False), (False, True)])
def test_static_step_flags_equal_the_tensor_path(unets, cross_on, self_on):
    """Host-known 0/1 step flags specialise the fused processor without changing the result."""
    explicit, fused = unets
    sample, text, cond = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32) * 3, torch.randn(2, 512)
    ctl = [c[0] for c in _controls(np.random.default_rng(2), 1)]
    ctl[3] = torch.full((77,), float(cross_on))
    ctl[4] = torch.full((1,), float(self_on))
    e1, m1 = _run(explicit, ctl, sample, text, cond)
    c = P2PControls(*ctl, self_max_keys=64, blend_queries=16)
    c.cross_on, c.self_on = cross_on, self_on
    with torch.no_grad():
        e2 = fused(sample, torch.tensor([779.0]), text, timestep_cond=cond, cross_attention_kwargs={"p2p": c}).sample
    torch.testing.assert_close(e2, e1, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(c.blend_maps(), m1, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("cross, self_flag", [("on", 1.0), ("off", 0.0), ("mixed", 1.0), ("mixed", 0.0)])
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_fused_onnx_edit_graph_equals_the_explicit_form(tiny_bundle, tiny_graphs, backend, cross, self_flag):
    """The bundle's edit graph (P2P as plain attentions, fused by the runtime) against the explicit
    torch module, for cross replacement on / off / per token, self-injection on / off, a refine
    map, a token permutation and amplification."""
    from icd_edge.bundle.store import open_bundle
    from icd_edge.export.parity import psnr_db
    from icd_edge.runtimes import backend_class

    b = open_bundle(tiny_bundle, verify=False)
    assert b.artifact("unet_reverse_edit", "onnx").details["p2p_attention"] == "fused"
    sess_backend = backend_class(backend)()
    if not sess_backend.probe().ok:
        pytest.skip(f"{backend} is not available here: {sess_backend.probe().reason}")
    rng = np.random.default_rng(5)
    tm, ra, eq, _, _ = (c[0].numpy() for c in _controls(rng, 1))
    ca = {"on": np.ones(77), "off": np.zeros(77), "mixed": (rng.random(77) > 0.5)}[cross].astype(np.float32)
    feeds = {
        "sample": rng.standard_normal((2, 4, 16, 16)).astype(np.float32),
        "timestep": np.array([519.0], np.float32),
        "encoder_hidden_states": (rng.standard_normal((2, 77, 32)) * 3).astype(np.float32),
        "timestep_cond": np.stack([b.guidance_embedding(0.0), b.guidance_embedding(19.0)]),
        "token_map": tm,
        "refine_alpha": ra,
        "equalizer": eq,
        "cross_alpha": ca,
        "self_flag": np.array([self_flag], np.float32),
    }
    sess = sess_backend.open_session(b, "unet_reverse_edit")
    got = sess.run(feeds)
    unedited = sess.run({**feeds, "cross_alpha": np.zeros(77, np.float32), "self_flag": np.zeros(1, np.float32)})
    sess.close()
    assert tiny_graphs["unet_reverse_edit"].attention == "explicit"
    with torch.no_grad():
        args = (torch.from_numpy(feeds[s.name]) for s in b.graphs["unet_reverse_edit"].inputs)
        eps, maps = tiny_graphs["unet_reverse_edit"](*args)
    # fp32 on both sides: equal to float rounding (the 60 dB export gate is far below)
    assert psnr_db(eps.numpy(), got["eps"]) > 100 and psnr_db(maps.numpy(), got["blend_maps"]) > 100
    # the controls act on the target row only: with both edits off it is the unedited one
    np.testing.assert_allclose(got["eps"][0], unedited["eps"][0], atol=1e-5)
    change = np.abs(got["eps"][1] - unedited["eps"][1]).max()
    assert change < 1e-5 if (cross, self_flag) == ("off", 0.0) else change > 1e-3
