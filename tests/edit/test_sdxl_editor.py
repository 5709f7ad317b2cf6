"""iCD-XL through the Editor API on the exported tiny-xl bundle: the torch reference against the
official procedure written with diffusers' own pieces, onnxruntime against the torch reference,
and what SDXL refuses."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from icd_edge.errors import BundleError, InputError

SOURCE, TARGET, SEED = "a photo of a cat", "a photo of a dog", 3
# the released 4-step "B" lists of iCD-XL (forward from t = 19, reverse from t = 999)
FORWARD_T, REVERSE_T = [19, 249, 499, 699], [249, 499, 699, 999]
TAU, W = 0.7, 19.0


@pytest.fixture(scope="module")
def xl(tiny_xl_bundle):
    from icd_edge.bundle.store import open_bundle

    return open_bundle(tiny_xl_bundle)


def _official_edit(bundle, photo):
    """x_999 and the edited image (PIL) the way the official iCD-XL code computes them: its prompt
    encoding, diffusers' img2img ``prepare_latents`` (posterior sample, then the start noise, from
    one CPU generator seeded with the image's seed), its step function and prompt switch, and
    diffusers' post-processing."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerFast

    m = bundle.manifest
    root = bundle.root / "torch"
    text_1 = CLIPTextModel.from_pretrained(root / "text_encoder").eval()
    text_2 = CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2").eval()
    vae = AutoencoderKL.from_pretrained(root / "vae").eval()
    unet_f = UNet2DConditionModel.from_pretrained(root / "unet_forward").eval()
    unet_r = UNet2DConditionModel.from_pretrained(root / "unet_reverse").eval()
    special = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", model_max_length=77)
    tok_1 = PreTrainedTokenizerFast(
        tokenizer_file=str(bundle.path(m.tokenizer_file)), pad_token="<|endoftext|>", **special
    )
    tok_2 = PreTrainedTokenizerFast(tokenizer_file=str(bundle.path(m.tokenizer_2_file)), pad_token="!", **special)
    sched = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
    )
    alphas, sigmas = sched.alphas_cumprod.sqrt(), (1 - sched.alphas_cumprod).sqrt()
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])

    def encode(prompt):
        embeds = []
        for tok, enc in ((tok_1, text_1), (tok_2, text_2)):
            ids = tok([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            out = enc(ids, output_hidden_states=True)
            pooled = out[0]
            embeds.append(out.hidden_states[-2])
        return torch.concat(embeds, dim=-1), pooled

    def wemb(w):
        u = torch.tensor([w]) * 1000.0
        freq = torch.exp(torch.arange(256, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / 255))
        arg = u[:, None] * freq[None, :]
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)

    def step(eps, t, s, x):
        a_s, s_s = (1.0, 0.0) if s == 0 else (alphas[s], sigmas[s])
        x0 = (x - sigmas[t] * eps) / alphas[t]
        return a_s * x0 + s_s * eps

    side = m.image_hw
    with torch.no_grad():
        image = VaeImageProcessor().preprocess(Image.fromarray(photo).resize((side, side)))
        pipe = SimpleNamespace(vae=vae, scheduler=sched)
        x = StableDiffusionXLImg2ImgPipeline.prepare_latents(
            pipe, image, torch.tensor([19]), 1, 1, torch.float32, "cpu", generator=torch.Generator().manual_seed(SEED)
        )
        e_src, p_src = encode(SOURCE)
        for t, s in zip(FORWARD_T, FORWARD_T[1:] + [999]):
            cond = {"text_embeds": p_src, "time_ids": time_ids}
            eps = unet_f(x, t, encoder_hidden_states=e_src, timestep_cond=wemb(0.0), added_cond_kwargs=cond).sample
            x = step(eps, t, s, x)
        x_999 = x.numpy()
        e_tgt, p_tgt = encode(TARGET)
        rev = REVERSE_T[::-1]
        for t, s in zip(rev, rev[1:] + [0]):
            early = t > TAU * 1000
            emb, w = (e_src, 0.0) if early else (e_tgt, W)
            cond = {"text_embeds": p_tgt, "time_ids": time_ids}  # the target's pooled text on every step
            eps = unet_r(x, t, encoder_hidden_states=emb, timestep_cond=wemb(w), added_cond_kwargs=cond).sample
            x = step(eps, t, s, x)
        decoded = vae.decode(x / vae.config.scaling_factor).sample
    return x_999, VaeImageProcessor().postprocess(decoded, output_type="pil")[0]


def test_torch_reference_is_the_official_procedure(xl, photo):
    from icd_edge.edit.editor import Editor
    from icd_edge.edit.xl import XLEditor
    from icd_edge.runtimes.torch_ref import TorchBackend

    sched = xl.manifest.schedule
    assert [st.t for st in sched.forward] == FORWARD_T and [st.t for st in sched.reverse] == REVERSE_T[::-1]
    ed = Editor(xl, TorchBackend())
    assert isinstance(ed, XLEditor)
    inv = ed.invert(photo, SOURCE, seed=SEED)
    got = np.asarray(ed.edit(inv, TARGET), dtype=np.int16)
    x_999, official = _official_edit(xl, photo)
    np.testing.assert_allclose(inv.latent, x_999, atol=2e-4, rtol=1e-4)
    diff = np.abs(got - np.asarray(official, dtype=np.int16))
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_runtimes_against_torch_and_the_noise_api(xl, photo):
    import importlib.util

    from icd_edge.edit.editor import Editor
    from icd_edge.export.parity import psnr_db
    from icd_edge.rng import torch_randn_sequence

    ref = Editor.open(xl, "torch")
    inv_ref = ref.invert(photo, SOURCE, seed=SEED)
    runs = (
        ("edit", lambda ed, i: ed.edit(i, TARGET, output_type="np")),
        ("edit w=7 tau=0.5", lambda ed, i: ed.edit(i, TARGET, guidance=7.0, tau=0.5, output_type="np")),
        ("reconstruct", lambda ed, i: ed.reconstruct(i, output_type="np")),
        ("generate", lambda ed, i: ed.generate(TARGET, seed=1, output_type="np")),
    )
    want = {name: run(ref, inv_ref) for name, run in runs}
    backends = ["onnxruntime"] + (["openvino"] if importlib.util.find_spec("openvino") else [])
    for backend in backends:
        with Editor.open(xl, backend) as ed:
            inv = ed.invert(photo, SOURCE, seed=SEED)
            assert psnr_db(inv_ref.latent, inv.latent) > 60, backend
            for name, run in runs:
                assert psnr_db(want[name], run(ed, inv), peak=1.0) >= 45, (backend, name)
    assert want["generate"].shape == (xl.manifest.image_hw,) * 2 + (3,)
    ort = Editor.open(xl, "onnxruntime")
    inv = ort.invert(photo, SOURCE, seed=SEED)

    # the two draws given as an array equal the seeded ones; numpy's generator gives others
    h = xl.manifest.latent_hw
    n1, n2 = torch_randn_sequence([(1, 4, h, h)] * 2, SEED)
    given = ort.invert(photo, SOURCE, noise=np.concatenate([n1, n2]))
    np.testing.assert_array_equal(given.latent, inv.latent)
    assert given.seed is None and given.rng == "array"
    other = ort.invert(photo, SOURCE, seed=SEED, rng="numpy")
    assert np.abs(other.latent - inv.latent).max() > 0.1

    # the prompt switch: with tau = 1 every step is guided under the target, so the edit changes
    sw = ort.edit(inv, TARGET, output_type="np")
    assert np.abs(ort.edit(inv, TARGET, tau=1.0, output_type="np") - sw).max() > 1e-3
    ort.close()
    ref.close()


def test_sdxl_refuses_what_it_does_not_have(xl, photo):
    from icd_edge.edit.editor import Editor

    ed = Editor.open(xl, "onnxruntime")
    inv = ed.invert(photo, SOURCE, seed=0)
    for kwargs in ({"blend": ("cat", "dog")}, {"cross_replace": 0.4}, {"amplify": {"dog": 2.0}}, {"mode": "refine"}):
        with pytest.raises(InputError, match="without Prompt-to-Prompt"):
            ed.edit(inv, TARGET, **kwargs)
    with pytest.raises(InputError, match="unknown edit parameters"):
        ed.edit(inv, TARGET, strength=0.5)
    with pytest.raises(InputError, match="noise"):
        ed.invert(photo, SOURCE, noise=np.zeros((1, 4, xl.manifest.latent_hw, xl.manifest.latent_hw), np.float32))
    ed.close()
    with pytest.raises(InputError, match="full VAE only"):
        Editor.open(xl, "onnxruntime", decoder="taesd")
    with pytest.raises(InputError, match="no source branch"):
        Editor.open(xl, "onnxruntime", source_cache="invert")


def test_sdxl_manifest_round_trip_and_checks(xl):
    import copy

    from icd_edge.bundle.schema import Manifest

    m = xl.manifest
    assert (m.family, m.p2p, m.tokenizer_2_pad, m.vae_encode, m.vae_to_uint8) == ("sdxl", None, "!", "sample", "round")
    assert m.vae_scaling_factor == pytest.approx(0.13025)
    assert m.time_ids == (1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0)
    assert m.guidance.defaults["tau_edit"] == 0.7 and 3.0 in m.guidance.trained
    assert set(m.graphs) == {
        "text_encoder",
        "text_encoder_2",
        "vae_encoder",
        "vae_decoder",
        "unet_forward",
        "unet_reverse",
    }
    raw = m.to_json()
    assert "p2p" not in raw and Manifest.from_json(raw) == m
    e2e = [e for e in m.parity.entries if e.check in ("edit", "generate") and e.backend == "onnxruntime"]
    assert len(e2e) == 2 and all(e.psnr_db >= 45 for e in e2e)
    for key, change in (
        ("model.family", lambda j: j["model"].update(family="sd3")),
        ("added_cond", lambda j: j.pop("added_cond")),
        ("added_cond.time_ids", lambda j: j["added_cond"].update(time_ids=[1024.0] * 5)),
        ("tokenizer.file_2", lambda j: j["tokenizer"].pop("file_2")),
        ("vae.encode", lambda j: j["vae"].update(encode="mode")),
    ):
        bad = copy.deepcopy(raw)
        change(bad)
        with pytest.raises(BundleError, match=key.replace(".", r"\.")):
            Manifest.from_json(bad)


def test_fast_path_code_equals_the_reference(xl, photo):
    """The compiled GPU path's code (here eager fp32 on the CPU) gives the reference's edit."""
    from icd_edge.edit.editor import Editor
    from icd_edge.export.parity import psnr_db
    from icd_edge.fast.xl import FastXLEditor
    from icd_edge.runtimes.torch_ref import TorchBackend

    fast = FastXLEditor.from_bundle(xl.root, device="cpu", dtype="fp32", compile=False, cuda_graphs=False)
    got = fast.edit_image(photo, SOURCE, TARGET, seed=SEED, guidance=7.0, tau=0.5, output_type="np")
    ref = Editor(xl, TorchBackend())
    want = ref.edit(ref.invert(photo, SOURCE, seed=SEED), TARGET, guidance=7.0, tau=0.5, output_type="np")
    assert psnr_db(want, got, peak=1.0) > 80
    # its PIL output is made on the device: the reference's pixels (rounded), within one level
    pil = fast.edit_image(photo, SOURCE, TARGET, seed=SEED, guidance=7.0, tau=0.5)
    want_pil = ref.edit(ref.invert(photo, SOURCE, seed=SEED), TARGET, guidance=7.0, tau=0.5)
    assert np.abs(np.asarray(pil, np.int16) - np.asarray(want_pil, np.int16)).max() <= 1
    with pytest.raises(InputError, match="guidance"):
        fast.edit_image(photo, SOURCE, TARGET, guidance=25.0)


@pytest.mark.gpu
def test_compiled_gpu_path_against_the_fp32_reference(tmp_path):
    """fp16 UNets, compile and the CUDA graph on tiny-xl (built in memory: no onnx needed), against
    the fp32 eager path; the fp16-VAE option too."""
    import copy

    import torch

    from icd_edge.export.parity import psnr_db
    from icd_edge.export.pipeline import memory_bundle
    from icd_edge.export.samples import sample_photo
    from icd_edge.fast.editor import FastOptions
    from icd_edge.fast.xl import FastXLEditor

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    src, bundle = memory_bundle("tiny-xl", 0, tmp_path)
    mods = [src.text_encoder, src.text_encoder_2, src.vae, src.unet_forward, src.unet_reverse]
    photo = sample_photo(bundle.manifest.image_hw)
    eager32 = FastOptions(dtype="fp32", compile=False, cuda_graphs=False)
    want = FastXLEditor(bundle, *copy.deepcopy(mods), eager32).edit_image(photo, SOURCE, TARGET, output_type="np")
    fast = FastXLEditor(bundle, *copy.deepcopy(mods))
    got = fast.edit_image(photo, SOURCE, TARGET, output_type="np")
    assert psnr_db(want, got, peak=1.0) > 40
    assert fast.captured_graphs() == [(False, True, True, True)]  # only t = 999 under the source prompt
    np.testing.assert_array_equal(got, fast.edit_image(photo, SOURCE, TARGET, output_type="np"))
    half_vae = FastXLEditor(bundle, *mods, FastOptions(vae_dtype="fp16"))
    assert psnr_db(want, half_vae.edit_image(photo, SOURCE, TARGET, output_type="np"), peak=1.0) > 35


def test_vae_attention_in_bf16(xl, photo):
    """``vae_attention="bf16"``: the processor in float32 is the VAE's own attention, in bfloat16 it
    changes the output a little, and the fast path's edit with it stays close to the float32 one."""
    import torch
    from diffusers import AutoencoderKL

    from icd_edge.export.parity import psnr_db
    from icd_edge.fast.xl import FastXLEditor
    from icd_edge.graphs.attention import cast_vae_attention

    vae = AutoencoderKL.from_pretrained(xl.root / "torch" / "vae").eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        run = lambda: vae.decode(vae.encode(x).latent_dist.mean).sample  # noqa: E731
        want = run()
        assert cast_vae_attention(vae, torch.float32) == 2  # the encoder's and the decoder's mid block
        torch.testing.assert_close(run(), want, rtol=1e-5, atol=1e-5)
        cast_vae_attention(vae, torch.bfloat16)
        assert 0 < (run() - want).abs().max() < 0.05
    opts = dict(device="cpu", dtype="fp32", compile=False, cuda_graphs=False)
    kw = dict(seed=SEED, guidance=7.0, tau=0.5, output_type="np")
    default = FastXLEditor.from_bundle(xl.root, **opts)
    assert default.vae_attention == "fp32"  # "auto": bfloat16 on CUDA only
    full = default.edit_image(photo, SOURCE, TARGET, **kw)
    low = FastXLEditor.from_bundle(xl.root, vae_attention="bf16", **opts)
    assert low.vae_attention == "bf16"
    low = low.edit_image(photo, SOURCE, TARGET, **kw)
    assert 35 < psnr_db(full, low, peak=1.0) < 200
    with pytest.raises(InputError, match="vae_attention"):
        FastXLEditor.from_bundle(xl.root, vae_attention="fp8", **opts)
