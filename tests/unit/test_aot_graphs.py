"""The fast path's ahead-of-time compiled graphs (AOTInductor on the CPU here, the same packages
as on a GPU): recorded calls become packages that read the module's own weights, a later
instance loads them without compiling, and an entry that does not fit is removed, not loaded."""

from __future__ import annotations

import json
import logging

import pytest

torch = pytest.importorskip("torch")

from icd_edge.fast.aot import INDEX, AotGraphs, signature  # noqa: E402


class Small(torch.nn.Module):
    """A conv and a linear, a host flag baked in like the P2P step flags, and a tensor made in
    forward (a constant of the compiled code)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x, scale, flag=None):
        h = self.conv(x).mean(dim=(2, 3)) * scale
        if flag:
            h = h + torch.tensor([0.5, -0.5, 0.25, 1.0, 0.0, 2.0, -1.0, 0.125])
        return self.lin(h), h.sum()


MATERIAL = {"schema": 1, "bundle_id": "b1", "device": "cpu"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One entry with two signatures of the same module (flag on/off), recorded and compiled."""
    folder = tmp_path_factory.mktemp("aot") / "entry"
    module = Small().eval()
    rec = AotGraphs(folder, MATERIAL, torch.device("cpu"), record=True)
    call = rec.wrap("small", module, fallback=lambda *a: pytest.fail("recording must not compile"))
    x, s = torch.randn(2, 3, 8, 8), torch.tensor([1.5])
    with torch.inference_mode():  # as the editor's loops run
        want = [call(x, s, True), call(x, s, False), call(x, s, True)]
    assert len(rec.examples) == 2  # one example per signature
    rec.build(progress=False)
    return folder, module, (x, s), want


def test_packages_load_and_equal_the_module(built):
    folder, module, (x, s), want = built
    index = json.loads((folder / INDEX).read_text())
    assert {v["graph"] for v in index["variants"]} == {"small"} and len(index["variants"]) == 2
    aot = AotGraphs(folder, MATERIAL, torch.device("cpu"))
    assert aot.load({"small": module}) and len(aot.models) == 2
    call = aot.wrap("small", module, fallback=lambda *a: pytest.fail("a prepared call must not compile"))
    with torch.inference_mode():
        for flag, ref in ((True, want[0]), (False, want[1])):
            got = call(x, s, flag)
            torch.testing.assert_close(got[0], ref[0])
            torch.testing.assert_close(got[1], ref[1])


def test_packages_read_the_modules_weights_in_place(built):
    """user-managed constants: a change to the module's weight shows in the package's output, so
    the variants share one copy of the weights (Inductor keeps small tensors such as biases in the
    library itself)."""
    folder, _, (x, s), _ = built
    module = Small().eval()
    aot = AotGraphs(folder, MATERIAL, torch.device("cpu"))
    assert aot.load({"small": module})
    call = aot.wrap("small", module, fallback=None)
    with torch.inference_mode():
        before = call(x, s, False)[0].clone()
        module.lin.weight.mul_(2.0)
        after = call(x, s, False)[0]
        assert not torch.allclose(after, before)
        torch.testing.assert_close(after, module(x, s, False)[0])


def test_an_unprepared_signature_runs_the_fallback(built, caplog):
    folder, module, (x, s), _ = built
    aot = AotGraphs(folder, MATERIAL, torch.device("cpu"))
    assert aot.load({"small": module})
    seen = []
    call = aot.wrap("small", module, fallback=lambda *a: seen.append(a) or module(*a))
    with caplog.at_level(logging.WARNING, logger="icd_edge.fast.aot"), torch.inference_mode():
        call(torch.randn(1, 3, 8, 8), s, False)  # batch 1 was never prepared
        call(x.to(memory_format=torch.channels_last), s, False)  # nor these strides
    assert len(seen) == 2 and "no compiled graph for this call" in caplog.text


def test_signatures_separate_what_the_code_is_specific_to():
    x = torch.zeros(2, 3, 4, 4)
    base = signature((x, True))
    assert signature((torch.ones(2, 3, 4, 4), True)) == base  # values do not matter
    others = [
        signature((x, False)),
        signature((x.half(), True)),
        signature((torch.zeros(1, 3, 4, 4), True)),
        signature((x.to(memory_format=torch.channels_last), True)),
        signature((x, None)),
    ]
    assert len({base, *others}) == 6


def _copy(built, tmp_path):
    import shutil

    folder = tmp_path / "entry"
    shutil.copytree(built[0], folder)
    return folder


@pytest.mark.parametrize("damage", ["truncate", "garbage", "index", "material", "missing"])
def test_a_damaged_or_foreign_entry_is_removed_not_loaded(built, tmp_path, caplog, damage):
    folder = _copy(built, tmp_path)
    index = json.loads((folder / INDEX).read_text())
    pkg = folder / f"{index['variants'][0]['file']}.pt2"
    if damage == "truncate":
        pkg.write_bytes(pkg.read_bytes()[:1000])
    elif damage == "garbage":  # same size, not a package
        pkg.write_bytes(b"\0" * pkg.stat().st_size)
    elif damage == "index":
        (folder / INDEX).write_text("{not json")
    elif damage == "material":  # an entry of another bundle copied in
        index["material"] = {**MATERIAL, "bundle_id": "other"}
        (folder / INDEX).write_text(json.dumps(index))
    else:
        pkg.unlink()
    aot = AotGraphs(folder, MATERIAL, torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="icd_edge.fast.aot"):
        assert aot.load({"small": built[1]}) is False
    assert not folder.exists() and aot.models == {}
    assert "removing the compiled-graph entry" in caplog.text and "prepare --fast" in caplog.text


def test_no_entry_is_no_warning(tmp_path, caplog):
    aot = AotGraphs(tmp_path / "none", MATERIAL, torch.device("cpu"))
    with caplog.at_level(logging.WARNING):
        assert aot.load({"small": Small()}) is False
    assert caplog.text == ""


def test_a_module_without_the_packages_tensors_is_refused(built, tmp_path, caplog):
    folder = _copy(built, tmp_path)
    other = torch.nn.Sequential(torch.nn.Linear(2, 2))  # another module under the same graph name
    aot = AotGraphs(folder, MATERIAL, torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="icd_edge.fast.aot"):
        assert aot.load({"small": other}) is False
    assert "needs tensors the module does not have" in caplog.text


def test_the_load_check_passes_a_good_package_and_names_a_crash(built, tmp_path, monkeypatch):
    from icd_edge.errors import BackendUnavailable
    from icd_edge.fast import aot

    index = json.loads((built[0] / INDEX).read_text())
    aot.check_loads(built[0] / f"{index['variants'][0]['file']}.pt2")  # loads in the child: no error
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a package")
    with pytest.raises(BackendUnavailable, match="do not load with this torch on this machine"):
        aot.check_loads(bad)
    # what the H200's torch 2.11 + CUDA 13 did to every package: the child dies of SIGSEGV
    monkeypatch.setattr(aot, "CHECK", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    with pytest.raises(BackendUnavailable, match="killed by SIGSEGV.*aot=False"):
        aot.check_loads(bad)


def test_a_build_that_fails_its_load_check_leaves_no_entry(tmp_path, monkeypatch):
    from icd_edge.errors import BackendUnavailable
    from icd_edge.fast import aot

    monkeypatch.setattr(aot, "CHECK", "import sys; sys.exit(3)")
    rec = AotGraphs(tmp_path / "entry", MATERIAL, torch.device("cpu"), record=True)
    module = Small().eval()
    with torch.inference_mode():
        rec.wrap("small", module, fallback=None)(torch.randn(1, 3, 8, 8), torch.tensor([1.0]), False)
    with pytest.raises(BackendUnavailable):
        rec.build(progress=False)
    assert not (tmp_path / "entry").exists() and list(tmp_path.iterdir()) == []
