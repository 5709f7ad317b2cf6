"""The fast path's compile cache: kernels compiled in one process are found ready in the next
(torch's compile cache artifacts; Inductor on the CPU here, the same mechanism as on a GPU)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from icd_edge.fast.compile_cache import CompileCache, entry_key, key_material  # noqa: E402

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from torch._dynamo.utils import counters
    from icd_edge.fast.compile_cache import CompileCache, key_material

    mode, root = sys.argv[1], sys.argv[2]
    cache = CompileCache(root)
    material = key_material("bundle-1", "cpu", {"dtype": "fp32"})
    loaded = cache.load(material) if mode == "load" else False
    f = torch.compile(lambda x: torch.nn.functional.gelu(x * 3.0 + 1.0).sum(dim=-1))
    out = f(torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7)
    saved = str(cache.save(material)) if mode == "save" else None
    print(json.dumps({"loaded": loaded, "saved": saved, "hit": counters["inductor"]["fxgraph_cache_hit"],
                      "miss": counters["inductor"]["fxgraph_cache_miss"], "out": out.tolist()}))
    """
)


def _run(mode: str, root: Path, inductor_dir: Path) -> dict:
    # each process gets its own Inductor cache folder: a hit can only come from the loaded entry
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, str(root)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kernels_compiled_in_one_process_are_found_in_the_next(tmp_path):
    root = tmp_path / "cache"
    first = _run("save", root, tmp_path / "inductor1")
    assert first["saved"] and first["miss"] > 0 and first["hit"] == 0
    again = _run("load", root, tmp_path / "inductor2")
    assert again["loaded"] and again["hit"] > 0 and again["miss"] == 0
    assert again["out"] == first["out"]
    cold = _run("none", root, tmp_path / "inductor3")  # the control: without the entry, compiled anew
    assert cold["hit"] == 0 and cold["miss"] > 0


def test_entries_are_keyed_by_everything_the_kernels_depend_on():
    base = key_material("bundle-1", "cpu", {"dtype": "fp16", "channels_last": True})
    assert key_material("bundle-1", "cpu", {"channels_last": True, "dtype": "fp16"}) == base  # order-free
    others = [
        key_material("bundle-2", "cpu", {"dtype": "fp16", "channels_last": True}),
        key_material("bundle-1", "cpu", {"dtype": "bf16", "channels_last": True}),
        {**base, "torch": "0.0"},
        {**base, "device": "NVIDIA H200", "capability": [9, 0]},
    ]
    assert len({entry_key(m) for m in [base, *others]}) == 5
    assert base["torch"] == torch.__version__ and base["device"] == "cpu"


def test_damaged_entries_are_removed_not_loaded(tmp_path, caplog):
    cache = CompileCache(tmp_path)
    material = key_material("bundle-1", "cpu", {})
    assert cache.load(material) is False  # no entry: nothing said
    folder = cache.entry(material)
    folder.mkdir(parents=True)
    (folder / "artifacts.bin").write_bytes(b"not torch's format")
    (folder / "meta.json").write_text(json.dumps({"material": material, "bytes": 18}))
    with caplog.at_level(logging.WARNING, logger="icd_edge.fast.compile_cache"):
        assert cache.load(material) is False
    assert "torch could not load it" in caplog.text and str(folder) in caplog.text and not folder.exists()
    folder.mkdir(parents=True)
    (folder / "artifacts.bin").write_bytes(b"x" * 10)
    (folder / "meta.json").write_text(json.dumps({"material": {**material, "torch": "other"}, "bytes": 10}))
    assert cache.load(material) is False and not folder.exists()  # made for other inputs


def test_unwritable_cache_is_a_typed_error(tmp_path, monkeypatch):
    from icd_edge.errors import BackendUnavailable

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"payload", None))
    with pytest.raises(BackendUnavailable, match="ICD_EDGE_CACHE"):
        CompileCache(blocker / "cache").save(key_material("bundle-1", "cpu", {}))
