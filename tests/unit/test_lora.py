"""LoRA fusion equals diffusers' own loading + fuse_lora, for both official key layouts."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from icd_edge.errors import ExportError
from icd_edge.export import lora as L
from icd_edge.export.models import lora_target_names, tiny_configs, write_random_lora


@pytest.fixture(scope="module")
def teacher():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_configs()["unet"]).eval()


def official_peft_to_kohya(state: dict) -> dict:
    """The official iCD loader's rewrite (utils/loading.py): kohya names plus alpha = 8 per module."""
    out = {}
    for key, v in state.items():
        key2 = (
            key.replace("unet.base_model.model", "lora_unet")
            .replace("lora_A", "lora_down")
            .replace("lora_B", "lora_up")
        )
        parts = key2.split(".")
        key2 = "_".join(parts[:-2]) + "." + ".".join(parts[-2:])
        out[key2] = v
        if "lora_down" in key2:
            out[key2.split(".")[0] + ".alpha"] = torch.tensor(8.0)
    return out


def diffusers_fused(unet, kohya_file):
    from diffusers import StableDiffusionPipeline

    ref = copy.deepcopy(unet)
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(kohya_file))
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=ref)
    ref.fuse_lora(lora_scale=1.0)
    ref.unload_lora()
    return ref


def max_diff(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_fusion_equals_diffusers(teacher, tmp_path, layout):
    peft_file = write_random_lora(teacher, tmp_path / "forward.safetensors", rank=4, seed=3, std=0.05)
    kohya_file = tmp_path / "kohya.safetensors"
    save_file(official_peft_to_kohya(load_file(str(peft_file))), str(kohya_file))
    ref = diffusers_fused(teacher, kohya_file)
    ours = copy.deepcopy(teacher)
    facts = L.load_and_fuse(ours, peft_file if layout == "peft" else kohya_file, rounding="none")
    assert facts == {"modules": len(lora_target_names(teacher)), "ranks": [4], "layout": layout, "rounding": "none"}
    assert max_diff(ref, teacher) > 1e-2  # the LoRA really moves the weights
    assert max_diff(ref, ours) < 1e-6


def test_kohya_alpha_is_honoured(teacher, tmp_path):
    peft_file = write_random_lora(teacher, tmp_path / "f.safetensors", rank=4, seed=4, std=0.05)
    kohya = official_peft_to_kohya(load_file(str(peft_file)))
    for k in [k for k in kohya if k.endswith(".alpha")]:
        kohya[k] = torch.tensor(2.0)  # scale 2/4 instead of 8/4
    f = tmp_path / "k.safetensors"
    save_file(kohya, str(f))
    ref = diffusers_fused(teacher, f)
    ours = copy.deepcopy(teacher)
    L.load_and_fuse(ours, f, rounding="none")  # diffusers fuses the file's values as they are
    assert max_diff(ref, ours) < 1e-6


def test_default_scale_is_8_over_rank(teacher):
    pair = L.LoraPair(torch.ones(64, 3), torch.ones(5, 64), None)
    delta = L.lora_delta(pair, torch.Size([5, 3]))
    torch.testing.assert_close(delta, torch.full((5, 3), 64 * 0.125))


def test_unknown_keys_and_bad_files_are_typed_errors(teacher, tmp_path):
    names = [n for n, _ in teacher.named_modules()]
    with pytest.raises(ExportError, match="do not name a module"):
        L.parse_lora({"unet.base_model.model.nope.to_q.lora_A.weight": torch.zeros(1)}, names)
    with pytest.raises(ExportError, match="needs both"):
        L.parse_lora(
            {f"unet.base_model.model.{lora_target_names(teacher)[0]}.lora_A.weight": torch.zeros(4, 32)}, names
        )
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ExportError, match="not a readable"):
        L.read_lora_file(bad)
    with pytest.raises(ExportError, match="does not exist"):
        L.read_lora_file(tmp_path / "missing.safetensors")


def test_official_fp16_rounding_equals_diffusers_after_the_same_cast(teacher, tmp_path):
    """The official loader casts the LoRA state dict to float16 before load_lora_weights; with
    fp32 files whose values are not fp16-exact, the default rounding reproduces that fusion."""
    peft_file = write_random_lora(teacher, tmp_path / "forward.safetensors", rank=4, seed=5, std=0.05)
    state = load_file(str(peft_file))
    assert all(v.dtype == torch.float32 for v in state.values())
    assert any((v.half().float() != v).any() for v in state.values())  # not fp16-exact
    kohya16 = tmp_path / "kohya16.safetensors"
    save_file({k: v.half() for k, v in official_peft_to_kohya(state).items()}, str(kohya16))
    ref16 = diffusers_fused(teacher, kohya16)
    ours = copy.deepcopy(teacher)
    assert L.load_and_fuse(ours, peft_file)["rounding"] == "fp16"  # the default
    assert max_diff(ref16, ours) < 1e-6
    unrounded = copy.deepcopy(teacher)
    L.load_and_fuse(unrounded, peft_file, rounding="none")
    assert max_diff(unrounded, ours) > 1e-7  # the rounding is visible
    branches = copy.deepcopy(teacher)
    assert L.load_as_branches(branches, peft_file)["rounding"] == "fp16"
    assert max_diff(L.merge_branches(branches), ours) < 1e-6
    with pytest.raises(ExportError, match="rounding"):
        L.load_and_fuse(copy.deepcopy(teacher), peft_file, rounding="bf16")
