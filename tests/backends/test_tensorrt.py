"""TensorRT backend and export target: pure planning logic, and the TensorRT/CUDA code paths
driven by a fake ``tensorrt`` + cuda-python (tests/backends/fake_trt.py). No real TensorRT runs here."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import fake_trt
import numpy as np
import onnx
import pytest
from conftest import run_cli
from onnx import numpy_helper

from icd_edge.bundle.schema import Artifact, Graph, IOSpec
from icd_edge.bundle.store import file_table, open_bundle, sha256_file, write_manifest
from icd_edge.errors import BackendUnavailable, BundleError, InputError
from icd_edge.runtimes.trt import plan as trt_plan
from icd_edge.runtimes.trt.plan import GpuInfo, PrecisionPlan, Source

GPU = GpuInfo("NVIDIA Fake GPU", "8.9")
STRONG = 1 << 1  # 1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED (= 1 in TensorRT 10 and 11)


def _entry(*sources):
    """A graph entry with the given (fmt, precision) ONNX artifacts and one input/output."""
    arts = {fmt: Artifact(prec, file=f"onnx/g.{fmt}.onnx", weights=f"onnx/g.{fmt}.weights") for fmt, prec in sources}
    return Graph("g", (IOSpec("x", "float32", (1, 4, 8, 8)),), (IOSpec("y", "float32", (1, 4, 8, 8)),), arts)


# ------------------------------------------------------------------------------ pure logic
@pytest.mark.parametrize(
    "sources, requested, version, expect",
    [
        ([("onnx", "fp32")], "fp32", "10.8.0", ("fp32", "onnx", True, ())),
        ([("onnx", "fp32")], "fp16", "10.8.0", ("fp16", "onnx", False, ("FP16",))),
        ([("onnx", "fp32")], "auto", "10.8.0", ("fp16", "onnx", False, ("FP16",))),
        ([("onnx", "fp32")], "auto", "11.4.0.106", ("fp32", "onnx", True, ())),
        ([("onnx", "fp32"), ("onnx_fp16", "fp16")], "fp16", "11.4.0", ("fp16", "onnx_fp16", True, ())),
        ([("onnx", "fp32"), ("onnx_fp16", "fp16")], "auto", "10.3.0", ("fp16", "onnx_fp16", True, ())),
        ([("onnx", "fp32"), ("onnx_int8", "int8")], "int8", "10.8.0", ("int8", "onnx_int8", True, ())),
        ([("onnx", "fp32"), ("onnx_int8", "int8")], "int8", "11.0.0", ("int8", "onnx_int8", True, ())),
        ([("onnx", "fp32"), ("onnx_int8", "int8")], "auto", "11.0.0", ("fp32", "onnx", True, ())),
    ],
)
def test_precision_mapping(sources, requested, version, expect):
    plan = trt_plan.plan_precision("g", _entry(*sources), requested, version)
    assert (plan.precision, plan.source.fmt, plan.strongly_typed, plan.builder_flags) == expect
    assert "INT8" not in plan.builder_flags  # int8 comes only from Q/DQ graphs, never from the flag


def test_precision_mapping_refusals():
    with pytest.raises(BackendUnavailable, match="Q/DQ"):
        trt_plan.plan_precision("g", _entry(("onnx", "fp32")), "int8", "10.8.0")
    with pytest.raises(BackendUnavailable, match="removed in TensorRT 11"):
        trt_plan.plan_precision("g", _entry(("onnx", "fp32")), "fp16", "11.4.0")
    with pytest.raises(BackendUnavailable, match="precision must be"):
        trt_plan.plan_precision("g", _entry(("onnx", "fp32")), "bf16", "10.8.0")
    refit = trt_plan.plan_precision("g", _entry(("onnx", "fp32")), "fp16", "10.8.0", refit=True)
    assert refit.builder_flags == ("FP16", "REFIT")


def test_old_tensorrt_is_refused(monkeypatch):
    assert trt_plan.version_problem("10.3.0.30") is None and trt_plan.version_problem("11.4.0") is None
    assert "JetPack 6.1" in trt_plan.version_problem("8.6.2.3")
    rec = fake_trt.Recorder(version="8.6.2.3")
    fake_trt.install(monkeypatch, rec)
    from icd_edge.runtimes.trt import TensorRTBackend

    avail = TensorRTBackend().probe()
    assert not avail.ok and "older than 10.0" in avail.reason


def test_profile_and_bindings_from_manifest(tiny_bundle):
    b = open_bundle(tiny_bundle, verify=False)
    entry = b.graphs["unet_reverse_edit"]
    profile = trt_plan.profile_shapes(entry)
    assert [n for n, _ in profile] == [s.name for s in entry.inputs]
    assert dict(profile)["sample"] == (2, 4, 16, 16) and dict(profile)["token_map"] == (77, 77)
    plan = trt_plan.binding_plan(entry)
    assert [x.name for x in plan] == [s.name for s in entry.inputs] + ["eps", "blend_maps"]
    assert [x.is_input for x in plan].count(False) == 2
    eps = next(x for x in plan if x.name == "eps")
    assert eps.nbytes == 2 * 4 * 16 * 16 * 4
    half = trt_plan.binding_plan(entry, {"eps": "float16"})
    assert next(x for x in half if x.name == "eps").nbytes == eps.nbytes // 2


def test_engine_io_problems():
    entry = _entry(("onnx", "fp32"))
    good = {"x": (True, "float32", (1, 4, 8, 8)), "y": (False, "float32", (1, 4, 8, 8))}
    assert trt_plan.engine_io_problems(entry, good) == []
    assert trt_plan.engine_io_problems(entry, {**good, "y": (False, "float16", (1, 4, 8, 8))}) == []  # cast on host
    assert trt_plan.engine_io_problems(entry, {**good, "x": (True, "float32", (-1, 4, 8, 8))}) == []  # dynamic dim
    bad = trt_plan.engine_io_problems(entry, {"x": (True, "int32", (1, 4, 16, 16)), "z": (False, "float32", (1,))})
    assert any("lacks tensor 'y'" in p for p in bad) and any("unexpected tensor 'z'" in p for p in bad)
    assert any("int32" in p for p in bad) and any("(1, 4, 16, 16)" in p for p in bad)


def test_cache_key_covers_every_input():
    plan = trt_plan.plan_precision("g", _entry(("onnx", "fp32")), "fp16", "10.8.0")
    profile = (("x", (1, 4, 8, 8)),)
    digests = {"onnx/g.onnx.onnx": "a" * 64, "onnx/g.onnx.weights": "b" * 64}
    base = trt_plan.key_material("g", digests, plan, profile, GPU, "10.8.0")
    key = trt_plan.engine_key(base)
    assert key == trt_plan.engine_key(dict(reversed(list(base.items()))))  # canonical JSON
    variants = [
        trt_plan.key_material("g", {**digests, "onnx/g.onnx.weights": "c" * 64}, plan, profile, GPU, "10.8.0"),
        trt_plan.key_material("g", digests, plan, profile, GpuInfo("NVIDIA A100", "8.9"), "10.8.0"),
        trt_plan.key_material("g", digests, plan, profile, GpuInfo(GPU.name, "8.6"), "10.8.0"),
        trt_plan.key_material("g", digests, plan, profile, GPU, "10.9.0"),
        trt_plan.key_material("g", digests, plan, (("x", (1, 4, 16, 16)),), GPU, "10.8.0"),
        trt_plan.key_material("g", digests, PrecisionPlan("fp32", plan.source, True, ()), profile, GPU, "10.8.0"),
        trt_plan.key_material("h", digests, plan, profile, GPU, "10.8.0"),
    ]
    keys = {trt_plan.engine_key(m) for m in variants}
    assert len(keys) == len(variants) and key not in keys
    name = trt_plan.engine_filename("g", "fp16", key)
    assert name == f"g.fp16.{key[:16]}.plan" and trt_plan.meta_path(Path(name)).suffix == ".json"
    assert trt_plan.timing_cache_name(GPU, "10.8.0") == "timing-trt10.8.0-nvidia-fake-gpu-cc8.9.cache"


def test_stale_reason(tmp_path):
    plan = PrecisionPlan("fp32", Source("onnx", "a.onnx", None, "fp32"), True, ())
    material = trt_plan.key_material("g", {"a.onnx": "0" * 64}, plan, (), GPU, "10.8.0")
    engine = tmp_path / "g.plan"
    assert trt_plan.stale_reason(None, material, engine, sha256_file) == "no engine file"
    engine.write_bytes(b"engine-bytes")
    meta = {
        "key": trt_plan.engine_key(material),
        "material": material,
        "engine_bytes": 12,
        "engine_sha256": sha256_file(engine),
    }
    assert trt_plan.stale_reason(meta, material, engine, sha256_file) is None
    assert "metadata" in trt_plan.stale_reason(None, material, engine, sha256_file)
    other = {**material, "gpu": "NVIDIA A100", "tensorrt": "10.3.0"}
    reason = trt_plan.stale_reason(meta, other, engine, sha256_file)
    assert "gpu: 'NVIDIA Fake GPU' -> 'NVIDIA A100'" in reason and "tensorrt: '10.8.0' -> '10.3.0'" in reason
    engine.write_bytes(b"engine-byt")  # truncated
    assert "bytes" in trt_plan.stale_reason(meta, material, engine, sha256_file)
    engine.write_bytes(b"ENGINE-bytes")  # same size, other content
    assert "sha256" in trt_plan.stale_reason(meta, material, engine, sha256_file)


# ------------------------------------------------------------------------------ refit map
def _arrays(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path), load_external_data=True)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_refit_weight_map_on_tiny_bundle(tiny_bundle):
    from icd_edge.runtimes.trt.refit import differing, load_weights, refit_weight_map

    m = refit_weight_map(tiny_bundle, "onnx/unet_forward.onnx", "onnx/unet_reverse.onnx")
    fwd, rev = _arrays(tiny_bundle / "onnx/unet_forward.onnx"), _arrays(tiny_bundle / "onnx/unet_reverse.onnx")
    truly_different = {n for n in fwd if not np.array_equal(fwd[n], rev[n])}
    assert set(differing(m)) == truly_different
    assert 0 < len(truly_different) < len(m["weights"])  # LoRAs touch some layers only
    names = [w["name"] for w in m["weights"]]
    got_f = load_weights(tiny_bundle, m, "forward", names)
    got_r = load_weights(tiny_bundle, m, "reverse", differing(m))
    for n in names:
        np.testing.assert_array_equal(got_f[n], fwd[n])
    for n in differing(m):
        np.testing.assert_array_equal(got_r[n], rev[n])
    json.dumps(m)  # cached as JSON


def test_refit_map_matches_by_topology_when_names_differ(tiny_bundle, tmp_path):
    from icd_edge.runtimes.trt.refit import differing, load_weights, refit_weight_map

    root = tmp_path / "b"
    (root / "onnx").mkdir(parents=True)
    for f in ("unet_forward.onnx", "unet_forward.weights", "unet_reverse.weights", "unet_reverse_edit.onnx"):
        shutil.copy(tiny_bundle / "onnx" / f, root / "onnx" / f)
    model = onnx.load(str(tiny_bundle / "onnx/unet_reverse.onnx"), load_external_data=False)
    rename = {t.name: f"renamed_{i}" for i, t in enumerate(model.graph.initializer)}
    for t in model.graph.initializer:
        t.name = rename[t.name]
    for node in model.graph.node:
        for j, x in enumerate(node.input):
            if x in rename:
                node.input[j] = rename[x]
    onnx.save(model, str(root / "onnx/unet_reverse.onnx"))
    m = refit_weight_map(root, "onnx/unet_forward.onnx", "onnx/unet_reverse.onnx")
    assert all(w["reverse_name"] == rename[w["name"]] for w in m["weights"])
    plain = refit_weight_map(tiny_bundle, "onnx/unet_forward.onnx", "onnx/unet_reverse.onnx")
    assert differing(m) == differing(plain)
    n = differing(m)[0]
    np.testing.assert_array_equal(
        load_weights(root, m, "reverse", [n])[n], load_weights(tiny_bundle, plain, "reverse", [n])[n]
    )
    with pytest.raises(BundleError, match="same topology"):
        refit_weight_map(root, "onnx/unet_forward.onnx", "onnx/unet_reverse_edit.onnx")


# ------------------------------------------------------------------------------ fake TensorRT
@pytest.fixture
def fake(monkeypatch):
    rec = fake_trt.Recorder()
    fake_trt.install(monkeypatch, rec)
    return rec


def _backend(tmp_path, **options):
    from icd_edge.runtimes.trt import TensorRTBackend

    return TensorRTBackend(engine_cache=tmp_path / "cache", **options)


def _export_ctx(out, manifest):
    """The part of an ExportContext the tensorrt target reads (fp16 engines, default workspace)."""
    return SimpleNamespace(
        cfg=SimpleNamespace(trt_precision="fp16", trt_workspace_mb=None),
        out_dir=out,
        manifest=manifest,
        timings={},
        progress=None,
        step=lambda label: None,
    )


def _unet_feeds(b, graph="unet_forward", seed=0):
    rng = np.random.default_rng(seed)
    return {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in b.graphs[graph].inputs}


def _checksum(path: Path) -> float:
    return fake_trt.weights_checksum(_arrays(path).values())


def test_lazy_build_binds_manifest_names_and_runs(fake, tiny_bundle, tmp_path):
    b = open_bundle(tiny_bundle, verify=False)
    backend = _backend(tmp_path, precision="fp16", workspace_mb=256)
    assert backend.probe().ok and "NVIDIA Fake GPU (compute capability 8.9)" in backend.probe().reason
    sess = backend.open_session(b, "unet_forward")
    assert fake.named("create_network") == [("create_network", 0)]  # fp16 from fp32 ONNX on TRT 10: weakly typed
    assert ("set_flag", "FP16") in fake.calls and ("set_memory_pool_limit", "WORKSPACE", 256 << 20) in fake.calls
    assert fake.named("parse_from_file") == [("parse_from_file", str(tiny_bundle / "onnx/unet_forward.onnx"))]
    assert fake.named("create_timing_cache") == [("create_timing_cache", b"")]
    addresses = dict((c[1], c[2]) for c in fake.named("set_tensor_address"))
    assert sorted(addresses) == sorted([s.name for s in b.graphs["unet_forward"].inputs] + ["eps"])
    assert len(set(addresses.values())) == len(addresses)
    feeds = _unet_feeds(b)
    out = sess.run(feeds)
    c = _checksum(tiny_bundle / "onnx/unet_forward.onnx")
    np.testing.assert_allclose(out["eps"], feeds["sample"] * 2 + c, rtol=1e-5)
    assert fake.named("execute_async_v3")[0][1] == int(sess._stream)
    cache = tmp_path / "cache"
    engines = sorted(p.name for p in cache.glob("*.plan"))
    assert len(engines) == 1 and engines[0].startswith("unet_forward.fp16.")
    meta = json.loads((cache / engines[0]).with_suffix(".json").read_text())
    assert meta["material"]["gpu"] == "NVIDIA Fake GPU" and meta["material"]["compute_capability"] == "8.9"
    assert meta["material"]["tensorrt"] == fake.version and meta["engine_sha256"] == sha256_file(cache / engines[0])
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # atomic writes left no temp files
    sess.close()
    assert fake.device == {} and fake.pinned == {}  # every buffer freed


def test_timing_cache_reused_and_cached_engines_not_rebuilt(fake, tiny_bundle, tmp_path):
    b = open_bundle(tiny_bundle, verify=False)
    backend = _backend(tmp_path, precision="fp32")
    backend.open_session(b, "vae_decoder").close()
    backend.open_session(b, "text_encoder").close()
    caches = fake.named("create_timing_cache")
    assert caches[0][1] == b"" and caches[1][1] == b"|timing"  # the second build starts from the first's cache
    assert fake.named("create_network") == [
        ("create_network", STRONG),
        ("create_network", STRONG),
    ]  # fp32: strongly typed
    assert fake.builds == 2
    again = _backend(tmp_path, precision="fp32")
    out = again.open_session(b, "text_encoder").run({"input_ids": np.zeros((1, 77), np.int64)})
    assert fake.builds == 2 and again.built == []  # reused from the cache
    assert out["last_hidden_state"].shape == (1, 77, b.dims["D"])


def test_stale_engine_is_rebuilt_never_used(fake, tiny_bundle, tmp_path, caplog):
    b = open_bundle(tiny_bundle, verify=False)
    _backend(tmp_path, precision="fp32").open_session(b, "vae_decoder").close()
    engine = next((tmp_path / "cache").glob("vae_decoder.*.plan"))
    data = bytearray(engine.read_bytes())
    data[-2] ^= 1
    engine.write_bytes(bytes(data))
    with pytest.raises(BackendUnavailable, match="does not match the sha256"):
        _backend(tmp_path, precision="fp32", build=False).open_session(b, "vae_decoder")
    with caplog.at_level(logging.WARNING, logger="icd_edge.runtimes.trt"):
        backend = _backend(tmp_path, precision="fp32")
        backend.open_session(b, "vae_decoder").close()
    assert backend.built == [engine.name] and fake.builds == 2
    assert "rebuilding stale" in caplog.text and "sha256" in caplog.text
    # an engine the installed TensorRT cannot deserialize (metadata forged to match) is rebuilt too
    meta_file = engine.with_suffix(".json")
    meta = json.loads(meta_file.read_text())
    engine.write_bytes(b"x" * meta["engine_bytes"])
    meta_file.write_text(json.dumps({**meta, "engine_sha256": sha256_file(engine)}))
    backend = _backend(tmp_path, precision="fp32")
    backend.open_session(b, "vae_decoder").close()
    assert backend.built == [engine.name] and fake.builds == 3


def test_new_tensorrt_version_gets_its_own_engine(monkeypatch, tiny_bundle, tmp_path):
    b = open_bundle(tiny_bundle, verify=False)
    rec = fake_trt.Recorder(version="10.8.0.43")
    fake_trt.install(monkeypatch, rec)
    _backend(tmp_path, precision="fp32").open_session(b, "vae_encoder").close()
    rec2 = fake_trt.Recorder(version="11.4.0.106")
    fake_trt.install(monkeypatch, rec2, fp16_flag=False)
    backend = _backend(tmp_path)  # auto on TRT 11 with fp32 ONNX: fp32, strongly typed, no FP16 flag
    backend.open_session(b, "vae_encoder").close()
    assert rec2.builds == 1 and not rec2.named("set_flag")
    assert rec2.named("create_network") == [("create_network", STRONG)]
    assert len(list((tmp_path / "cache").glob("vae_encoder.fp32.*.plan"))) == 2


def test_prepare_builds_every_graph_once(fake, tiny_bundle, tmp_path):
    b = open_bundle(tiny_bundle, verify=False)
    built = _backend(tmp_path, shared_base=True).prepare(b)
    assert len(built) == len(b.graphs) - 1  # unet_forward and unet_reverse share one refittable engine
    assert any(".fp16." in n and n.startswith("unet_forward.") for n in built)
    assert _backend(tmp_path, shared_base=True).prepare(b) == [] and fake.builds == len(built)


def test_failed_build_leaves_nothing(fake, tiny_bundle, tmp_path):
    b = open_bundle(tiny_bundle, verify=False)
    fake.fail_build = True
    with pytest.raises(BackendUnavailable, match="could not build vae_decoder"):
        _backend(tmp_path).open_session(b, "vae_decoder")
    fake.fail_build = "parse"
    with pytest.raises(BackendUnavailable, match="cannot parse vae_decoder.onnx: In node 3"):
        _backend(tmp_path).open_session(b, "vae_decoder")
    assert not list((tmp_path / "cache").glob("*.plan")) and not list((tmp_path / "cache").glob(".*"))


def test_dynamic_inputs_get_fixed_profile_from_manifest(fake, tiny_bundle, tmp_path):
    b = open_bundle(tiny_bundle, verify=False)
    fake.dynamic_inputs = {"sample", "encoder_hidden_states"}
    sess = _backend(tmp_path).open_session(b, "unet_reverse_edit")
    shapes = {s.name: tuple(s.shape) for s in b.graphs["unet_reverse_edit"].inputs}
    assert sorted(c[1] for c in fake.named("set_shape")) == ["encoder_hidden_states", "sample"]
    for _, name, lo, opt, hi in fake.named("set_shape"):
        assert lo == opt == hi == shapes[name]
    assert len(fake.named("add_optimization_profile")) == 1
    feeds = _unet_feeds(b, "unet_reverse_edit")
    out = sess.run(feeds)
    assert out["eps"].shape == (2, 4, 16, 16) and out["blend_maps"].shape == tuple(
        b.graphs["unet_reverse_edit"].outputs[1].shape
    )
    sess.close()


def test_cuda_graph_captures_once_then_replays(fake, tiny_bundle, tmp_path):
    b = open_bundle(tiny_bundle, verify=False)
    sess = _backend(tmp_path, precision="fp32", cuda_graph=True).open_session(b, "unet_reverse")
    c = _checksum(tiny_bundle / "onnx/unet_reverse.onnx")
    for seed in range(3):
        feeds = _unet_feeds(b, "unet_reverse", seed)
        np.testing.assert_allclose(sess.run(feeds)["eps"], feeds["sample"] * 2 + c, rtol=1e-5)
    assert fake.enqueues == 2 and fake.launches == 2  # warm-up + capture, then two replays
    sess.close()
    assert fake.named("cudaGraphExecDestroy")


def test_shared_base_refits_between_forward_and_reverse(fake, tiny_bundle, tmp_path):
    from icd_edge.runtimes.trt.refit import differing, refit_weight_map

    b = open_bundle(tiny_bundle, verify=False)
    backend = _backend(tmp_path, precision="fp32", shared_base=True)
    fwd, rev = backend.open_session(b, "unet_forward"), backend.open_session(b, "unet_reverse")
    assert fake.builds == 1 and ("set_flag", "REFIT") in fake.calls
    feeds = _unet_feeds(b)
    c_fwd, c_rev = _checksum(tiny_bundle / "onnx/unet_forward.onnx"), _checksum(tiny_bundle / "onnx/unet_reverse.onnx")
    assert abs(c_fwd - c_rev) > 1e-3  # so the outputs tell which weights the engine holds
    np.testing.assert_allclose(fwd.run(feeds)["eps"], feeds["sample"] * 2 + c_fwd, rtol=1e-5)
    assert backend.refit_log == [] and not fake.named("Refitter")
    np.testing.assert_allclose(rev.run(feeds)["eps"], feeds["sample"] * 2 + c_rev, rtol=1e-5)
    np.testing.assert_allclose(fwd.run(feeds)["eps"], feeds["sample"] * 2 + c_fwd, rtol=1e-5)
    expected = differing(refit_weight_map(tiny_bundle, "onnx/unet_forward.onnx", "onnx/unet_reverse.onnx"))
    assert [e["to"] for e in backend.refit_log] == ["reverse", "forward"]
    assert all(e["weights"] == len(expected) and e["ms"] >= 0 for e in backend.refit_log)
    assert sorted(c[1] for c in fake.named("set_named_weights")) == sorted(expected * 2)
    assert list((tmp_path / "cache").glob("refit-map.*.json"))
    fwd.close()
    assert fake.device  # the engine stays while the reverse view is open
    rev.close()
    assert fake.device == {}


def test_shared_base_supplies_missing_and_refuses_folded(fake, tiny_bundle, tmp_path):
    from icd_edge.runtimes.trt.refit import differing, refit_weight_map

    b = open_bundle(tiny_bundle, verify=False)
    m = refit_weight_map(tiny_bundle, "onnx/unet_forward.onnx", "onnx/unet_reverse.onnx")
    changed = differing(m)
    same = next(w["name"] for w in m["weights"] if not w["differs"])
    fake.combined = {changed[0]: same}  # TensorRT fused `same` with a changed weight
    backend = _backend(tmp_path, precision="fp32", shared_base=True)
    backend.open_session(b, "unet_reverse").run(_unet_feeds(b))
    assert fake.named("refit_cuda_engine")[-1][1] == sorted(changed + [same])
    assert backend.refit_log[0]["weights"] == len(changed) + 1
    fake.folded = {changed[-1]}
    other = _backend(tmp_path / "2", precision="fp32", shared_base=True)
    with pytest.raises(BackendUnavailable, match="not refittable in this engine"):
        other.open_session(b, "unet_reverse").run(_unet_feeds(b))


def test_export_target_records_engines_the_runtime_reuses(fake, tiny_bundle, tmp_path, monkeypatch, caplog):
    from icd_edge.export import to_tensorrt

    monkeypatch.setenv("ICD_EDGE_CACHE", str(tmp_path / "export-cache"))
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    b = open_bundle(out, verify=False)
    manifest = b.manifest
    ctx = _export_ctx(out, manifest)
    to_tensorrt.export_target(ctx)
    assert fake.builds == len(manifest.graphs)
    assert len(list((tmp_path / "export-cache" / "trt").glob("timing-*.cache"))) == 1
    for graph, entry in manifest.graphs.items():
        art = entry.artifacts["tensorrt"]
        assert art.file.startswith(f"tensorrt/{graph}.fp16.") and (out / art.file).is_file()
        assert art.details["material"]["sources"][f"onnx/{graph}.onnx"] == sha256_file(out / f"onnx/{graph}.onnx")
    write_manifest(out, manifest.with_(files=file_table(out)))
    b = open_bundle(out)
    backend = _backend(tmp_path, precision="fp16")
    backend.open_session(b, "vae_decoder").close()
    assert backend.built == [] and fake.builds == len(manifest.graphs)  # the bundle's engine was used
    fake.gpu = "NVIDIA Other GPU"  # same bundle on another kind of GPU: never use the bundle's engine
    with caplog.at_level(logging.INFO, logger="icd_edge.runtimes.trt"):
        other = _backend(tmp_path / "other", precision="fp16")
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", fake_trt.make_cudart(fake))
        other.open_session(b, "vae_decoder").close()
    assert len(other.built) == 1 and "built for other inputs" in caplog.text and "NVIDIA Other GPU" in caplog.text


def test_int8_qdq_artifact_builds_strongly_typed(fake, tiny_bundle, tmp_path):
    from icd_edge.runtimes.trt.build import BuildRequest, build_engine

    entry = open_bundle(tiny_bundle, verify=False).graphs["vae_decoder"]
    # a fp32 graph standing in for a Q/DQ one
    entry = replace(
        entry, artifacts={**entry.artifacts, "onnx_int8": replace(entry.artifacts["onnx"], precision="int8")}
    )
    plan = trt_plan.plan_precision("vae_decoder", entry, "int8", fake.version)
    path = tmp_path / "e.plan"
    trt = sys.modules["tensorrt"]
    build_engine(
        trt,
        BuildRequest(
            "vae_decoder", tiny_bundle / plan.source.file, plan, trt_plan.profile_shapes(entry), {}, path, None
        ),
        trt.Logger(),
    )
    assert fake.named("create_network") == [("create_network", STRONG)] and not fake.named("set_flag")
    assert not fake.named("create_timing_cache") and path.is_file()


# ------------------------------------------------------------------------------ without TensorRT
def test_options_are_validated():
    from icd_edge.runtimes.trt import TensorRTBackend

    with pytest.raises(InputError, match="tensorrt backend has no option"):
        TensorRTBackend(precison="fp16")
    with pytest.raises(InputError, match="precision must be one of"):
        TensorRTBackend(precision="fp8")
    with pytest.raises(InputError, match="workspace_mb"):
        TensorRTBackend(workspace_mb=-1)


def test_without_tensorrt_selection_fails_typed(tiny_bundle):
    from icd_edge.edit.editor import Editor
    from icd_edge.runtimes.trt import TensorRTBackend

    assert TensorRTBackend().probe().reason == "not installed"
    with pytest.raises(BackendUnavailable, match="'tensorrt' is not available: not installed"):
        Editor.open(tiny_bundle, backend="tensorrt", verify=False)


def test_export_with_tensorrt_target_fails_early_without_tensorrt(tmp_path):
    out = tmp_path / "b"
    proc = run_cli(
        "--model",
        "tiny",
        "--out",
        str(out),
        "--targets",
        "onnx,tensorrt",
        "--no-progress",
        module="icd_edge.export",
        timeout=120,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert lines == [
        "error: tensorrt is not installed; install TensorRT from NVIDIA's index (see docs/tensorrt.md) "
        "or leave the tensorrt target out; the runtime can build engines lazily on the GPU"
    ]
    assert not out.exists()


def test_tensorrt_modules_import_without_torch():
    code = (
        "import sys; import icd_edge.runtimes.trt, icd_edge.runtimes.trt.build, icd_edge.runtimes.trt.cuda, "
        "icd_edge.runtimes.trt.refit, icd_edge.runtimes.trt.session; "
        "print([m for m in ('torch', 'tensorrt', 'onnx', 'icd_edge.export') if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_sdxl_engines_bind_the_added_condition(fake, tiny_xl_bundle, tmp_path, monkeypatch):
    """The tensorrt target and backend on an SDXL bundle: an engine per graph, the UNets bound to
    text_embeds and time_ids, the second text encoder's two outputs (fake TensorRT)."""
    from icd_edge.export import to_tensorrt

    monkeypatch.setenv("ICD_EDGE_CACHE", str(tmp_path / "export-cache"))
    out = tmp_path / "bundle"
    shutil.copytree(tiny_xl_bundle, out)
    manifest = open_bundle(out, verify=False).manifest
    ctx = _export_ctx(out, manifest)
    to_tensorrt.export_target(ctx)
    assert fake.builds == len(manifest.graphs) == 6
    write_manifest(out, manifest.with_(files=file_table(out)))
    b = open_bundle(out)
    backend = _backend(tmp_path, precision="fp16")
    sess = backend.open_session(b, "unet_reverse")
    names = {s.name for s in b.graphs["unet_reverse"].inputs}
    assert {"text_embeds", "time_ids"} <= names
    bound = {c[1] for c in fake.named("set_tensor_address")}
    assert names | {"eps"} <= bound
    feeds = _unet_feeds(b, "unet_reverse")
    c = _checksum(out / "onnx/unet_reverse.onnx")
    np.testing.assert_allclose(sess.run(feeds)["eps"], feeds["sample"] * 2 + c, rtol=1e-5)
    sess.close()
    sess = backend.open_session(b, "text_encoder_2")
    got = sess.run({"input_ids": np.zeros((1, 77), np.int64)})
    assert set(got) == {"hidden_states", "text_embeds"} and got["text_embeds"].shape == (1, b.dims["P"])
    sess.close()
    assert backend.built == []  # the bundle's engines were used
