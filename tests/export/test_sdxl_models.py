"""The SDXL source models (issue: iCD-XL): ``tiny-xl`` has SDXL's classes, conditioning and
schedule, and the LoRA reader fuses both official layouts onto SDXL's module names."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from icd_edge.export import lora as lora_mod
from icd_edge.export import models
from icd_edge.tokenizer import ClipTokenizer

SEED = 3


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory):
    return models.build_random_xl("tiny-xl", SEED, tmp_path_factory.mktemp("xl"))


def test_tiny_xl_has_the_sdxl_classes_and_schedule(tiny_xl):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    src = tiny_xl
    assert src.family == "sdxl" and src.image_hw == 128
    cfg = src.unet_reverse.config
    assert cfg.addition_embed_type == "text_time" and cfg.time_cond_proj_dim == 512
    assert cfg.cross_attention_dim == src.text_encoder.config.hidden_size + src.text_encoder_2.config.hidden_size
    assert type(src.text_encoder) is CLIPTextModel and type(src.text_encoder_2) is CLIPTextModelWithProjection
    assert src.vae.config.scaling_factor == 0.13025 and src.vae.config.force_upcast
    # SDXL's released 4-step pair
    assert src.steps.name == "4B" and src.steps.reverse[0] == (999, 699) and src.steps.forward[0] == (19, 249)


def test_tiny_xl_unet_takes_the_sdxl_conditioning(tiny_xl):
    """Both encoders' penultimate hidden states concatenated, the second's pooled projection and
    time_ids as added condition, the guidance embedding as timestep_cond."""
    src = tiny_xl
    ids = torch.tensor(ClipTokenizer(src.tokenizer_json)("a photo of a cat").ids[None])
    ids_2 = torch.tensor(ClipTokenizer(src.tokenizer_2_json, pad_token="!")("a photo of a cat").ids[None])
    with torch.no_grad():
        out_1 = src.text_encoder(ids, output_hidden_states=True)
        out_2 = src.text_encoder_2(ids_2, output_hidden_states=True)
        text = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        pooled = out_2.text_embeds
        cond = {"text_embeds": pooled, "time_ids": torch.tensor([models.SDXL_TIME_IDS])}
        x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        w = torch.zeros(1, 512)
        eps = src.unet_reverse(x, 999, text, timestep_cond=w, added_cond_kwargs=cond).sample
        # the pooled condition reaches the output (the prompt-switch quirk depends on it)
        other = {**cond, "text_embeds": torch.zeros_like(pooled)}
        eps_other = src.unet_reverse(x, 999, text, timestep_cond=w, added_cond_kwargs=other).sample
    assert text.shape == (1, 77, 96) and pooled.shape == (1, 64) and eps.shape == x.shape
    assert torch.isfinite(eps).all() and not torch.equal(eps, eps_other)


def test_second_tokenizer_pads_with_its_own_token(tiny_xl):
    tok, tok_2 = ClipTokenizer(tiny_xl.tokenizer_json), ClipTokenizer(tiny_xl.tokenizer_2_json, pad_token="!")
    a, b = tok("a cat"), tok_2("a cat")
    assert a.length == b.length and np.array_equal(a.ids[: a.length], b.ids[: b.length])
    assert set(a.ids[a.length :]) == {tok.eos_id} and set(b.ids[b.length :]) == {0} != {tok.eos_id}
    from icd_edge.errors import BundleError

    with pytest.raises(BundleError, match="pad token"):
        ClipTokenizer(tiny_xl.tokenizer_2_json, pad_token="<pad>")


def _kohya(state: dict) -> dict:
    """The official loader's rewrite of a peft file: lora_unet_ prefix, underscores, up/down, alpha 8."""
    out = {}
    for key, t in state.items():
        stem = key.removeprefix("unet.base_model.model.")
        module, kind = stem.rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = t
        out[f"{name}.alpha"] = torch.tensor(8.0)
    return out


def test_both_lora_layouts_fuse_identically_on_sdxl_module_names(tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    torch.manual_seed(SEED)
    teacher = UNet2DConditionModel(**models.tiny_xl_configs()["unet"]).eval()
    peft = models.write_random_lora(teacher, tmp_path / "reverse-249-499-699-999.safetensors", 4, 1, std=0.05)
    kohya = tmp_path / "kohya.safetensors"
    save_file(_kohya(load_file(str(peft))), str(kohya))
    targets = models.lora_target_names(teacher)
    # SDXL's linear projections and deep transformer stacks are adapted; its added-condition
    # embedding and the time embedding are not
    assert any(n.endswith("attentions.0.proj_in") for n in targets)
    assert any(".transformer_blocks.1.attn2.to_k" in n for n in targets)
    assert not any(n.startswith(("add_embedding", "time_embedding")) for n in targets)
    a, b = copy.deepcopy(teacher), copy.deepcopy(teacher)
    facts_a = lora_mod.load_and_fuse(a, peft)
    facts_b = lora_mod.load_and_fuse(b, kohya)
    assert facts_a["modules"] == facts_b["modules"] == len(targets)
    assert (facts_a["layout"], facts_b["layout"]) == ("peft", "kohya")
    sa, sb, st = a.state_dict(), b.state_dict(), teacher.state_dict()
    changed = {k for k in st if not torch.equal(sa[k], st[k])}
    assert changed == {f"{n}.weight" for n in targets}
    assert all(torch.equal(sa[k], sb[k]) for k in st)
