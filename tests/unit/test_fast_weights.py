"""icd_edge.fast.weights: modules built on the meta device and filled from safetensors equal
from_pretrained's, sharded files included (SDXL's float32 UNet is saved in two shards)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from icd_edge.errors import BundleError  # noqa: E402
from icd_edge.fast.weights import load_module  # noqa: E402


def _vae():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1,
    )  # fmt: skip


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_load_equals_from_pretrained(tmp_path, shard):
    vae = _vae()
    vae.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert (len(shards) > 1) == bool(shard)
    want = diffusers.AutoencoderKL.from_pretrained(tmp_path).state_dict()
    got = load_module(diffusers.AutoencoderKL, tmp_path, "cpu", torch.bfloat16)
    assert not got.training and got.state_dict().keys() == want.keys()
    for k, v in got.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, want[k].to(torch.bfloat16)), k


def test_a_broken_shard_index_is_a_bundle_error(tmp_path):
    _vae().save_pretrained(tmp_path, max_shard_size="20KB")
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
    with pytest.raises(BundleError, match="not a readable shard index"):
        load_module(diffusers.AutoencoderKL, tmp_path, "cpu", torch.float32)
