"""Paged-out modules (the export's memory plan for full-size SDXL): values kept, a twin maps the same
file without a copy, writes stay private, and the lean LoRA pair equals the deep-copy pair."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from icd_edge.export import paging  # noqa: E402


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_page_out_keeps_values_and_maps_the_file(tmp_path):
    m = _net()
    before = _state(m)
    paging.page_out(m, tmp_path / "m.pt")
    assert paging.paged_file(m) == str(tmp_path / "m.pt")
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    # the tensors are views of the file now: their storage is no longer the one torch allocated
    assert (tmp_path / "m.pt").stat().st_size > sum(v.numel() * 4 for v in before.values())


def test_twin_shares_the_file_and_writes_stay_private(tmp_path):
    m = _net()
    x = torch.randn(3, 16)
    y = m(x)
    paging.page_out(m, tmp_path / "m.pt")
    t = paging.twin(m)
    assert t is not m and paging.paged_file(t) == paging.paged_file(m)
    assert all(not p.is_meta for p in t.parameters())
    assert torch.equal(t(x), y)
    with torch.no_grad():  # fusing a LoRA writes in place: neither the original nor the file changes
        t[0].weight += 1.0
    assert torch.equal(m(x), y)
    assert torch.equal(paging.twin(m)(x), y)
    paging.mark_dirty(t)
    assert paging.paged_file(t) is None


def test_twin_needs_a_paged_module():
    with pytest.raises(ValueError):
        paging.twin(_net())


def test_lean_pair_equals_the_deep_copy_pair(tmp_path):
    """_fuse_pair with a work folder (paged, twin) gives the same fused weights as without one."""
    from diffusers import UNet2DConditionModel

    from icd_edge.export.models import _fuse_pair, tiny_configs, write_random_lora
    from icd_edge.export.to_onnx import same_structure

    def teacher():
        torch.manual_seed(0)
        return UNet2DConditionModel(**tiny_configs()["unet"]).eval()

    fwd_file = write_random_lora(teacher(), tmp_path / "forward.safetensors", 4, 1, std=0.02)
    rev_file = write_random_lora(teacher(), tmp_path / "reverse.safetensors", 4, 2, std=0.02)
    for weights in ("fused", "shared-base"):
        a_fwd, a_rev, a_facts = _fuse_pair(teacher(), fwd_file, rev_file, weights)
        work = tmp_path / weights
        work.mkdir()
        b_fwd, b_rev, b_facts = _fuse_pair(teacher(), fwd_file, rev_file, weights, work=work)
        assert a_facts == b_facts
        for a, b in ((a_fwd, b_fwd), (a_rev, b_rev)):
            sa, sb = a.state_dict(), b.state_dict()
            assert sa.keys() == sb.keys()
            assert all(torch.equal(sa[k], sb[k]) for k in sa), weights
        # the exporter reuses the forward trace for the reverse UNet only if they still match
        assert same_structure(b_fwd, b_rev), weights
        # the LoRAs differ, so forward and reverse must too (a twin that aliased would not)
        sf, sr = b_fwd.state_dict(), b_rev.state_dict()
        assert any(not torch.equal(sf[k], sr[k]) for k in sf), weights


def test_a_full_disk_is_a_typed_error_and_leaves_no_file(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from icd_edge.errors import ExportError

    m = _net()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 100, 100))
    with pytest.raises(ExportError, match="no room"):
        paging.page_out(m, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists() and paging.paged_file(m) is None

    def failing_save(obj, f):  # what torch raises when the disk fills during the write
        open(f, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 0")

    monkeypatch.undo()
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(ExportError, match="could not write m.pt"):
        paging.page_out(m, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()
