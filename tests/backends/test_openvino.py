"""The openvino backend: the bundle's ONNX graphs compiled by OpenVINO, compared with the torch
reference and onnxruntime; its precision rule, cache, selection and errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import run_cli

from icd_edge.bundle.store import open_bundle
from icd_edge.edit.editor import Editor
from icd_edge.errors import BackendUnavailable, BundleError, InputError, NumericsError, ShapeMismatch
from icd_edge.export.parity import psnr_db
from icd_edge.runtimes import openvino as ovb

pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'icd_edge[openvino]')")


def _edit(ed, photo):
    inv = ed.invert(photo, "a photo of a cat", seed=3)
    return ed.edit(inv, "a photo of a dog", blend=("cat", "dog"), amplify={"dog": 2.0}, output_type="np")


def test_hint_follows_the_graph_precision():
    caps_bf16, caps_plain = ("FP32", "BF16", "INT8"), ("FP32", "INT8")
    assert ovb.hint_for("auto", "fp32", caps_bf16) == "f32"
    assert ovb.hint_for("auto", "fp16", caps_bf16) == "f32"  # x86: no fast float16; the graph's fp16 weights are upcast
    assert ovb.hint_for("auto", "int8", caps_bf16) == "bf16"
    assert ovb.hint_for("auto", "int8-dynamic", caps_bf16) == "bf16"
    assert ovb.hint_for("auto", "int8", caps_plain) == "f32"  # no native bfloat16: stay float32
    assert ovb.hint_for("fp32", "int8", caps_bf16) == "f32" and ovb.hint_for("bf16", "fp32", caps_plain) == "bf16"
    # one precision vocabulary; the spellings of earlier versions still read
    assert ovb.OvOptions(precision="f32").precision == "fp32" and ovb.OvOptions(precision="half").precision == "fp16"


def test_fp32_edit_equals_torch_and_onnxruntime(tiny_bundle, tiny_graphs, photo):
    from icd_edge.runtimes.torch_ref import TorchBackend

    b = open_bundle(tiny_bundle, verify=False)
    with Editor(b, TorchBackend(tiny_graphs)) as ed:
        ref = _edit(ed, photo)
    with Editor.open(b, "onnxruntime") as ed:
        ort_img = _edit(ed, photo)
    with Editor.open(b, "openvino", precision="auto") as ed:
        got = _edit(ed, photo)
        assert {ed.session(g).precision for g in ed.loaded_graphs()} == {"fp32"}  # fp32 graphs stay float32 under auto
        gen = ed.generate("a photo of a dog", seed=1, output_type="np")
    assert psnr_db(ref, got, peak=1.0) > 80 and psnr_db(ort_img, got, peak=1.0) > 80
    with Editor(b, TorchBackend(tiny_graphs)) as ed:
        assert psnr_db(ed.generate("a photo of a dog", seed=1, output_type="np"), gen, peak=1.0) > 80


def test_memory_policies_and_preview_decoder(tiny_bundle, photo):
    with Editor.open(tiny_bundle, "openvino") as ed:
        resident = _edit(ed, photo)
    with Editor.open(tiny_bundle, "openvino", memory="sequential") as ed:
        inv = ed.invert(photo, "a photo of a cat", seed=3)
        assert "unet_forward" not in ed.loaded_graphs()  # released after the inversion
        seq = ed.edit(inv, "a photo of a dog", blend=("cat", "dog"), amplify={"dog": 2.0}, output_type="np")
        assert list(ed.loaded_graphs()) == ["vae_decoder"]
    np.testing.assert_array_equal(resident, seq)
    with pytest.raises(InputError, match="shared-base"):
        Editor.open(tiny_bundle, "openvino", memory="shared-base")


def test_int8_bundle_runs_in_bfloat16_where_native(int8_bundle, photo):
    """An int8 bundle's float parts run in bfloat16 under auto on a CPU with native bfloat16 (this
    one: Xeon with AMX); both precisions stay close to onnxruntime's int8 result, and the export
    recorded OpenVINO's end-to-end parity beside onnxruntime's."""
    b = open_bundle(int8_bundle, verify=False)
    with Editor.open(b, "onnxruntime") as ed:
        ref = _edit(ed, photo)
    caps = ovb.OpenVinoBackend().capabilities()
    images = {}
    for precision in ("auto", "f32"):
        with Editor.open(b, "openvino", precision=precision) as ed:
            images[precision] = _edit(ed, photo)
            hints = {g: ed.session(g).precision for g in ed.loaded_graphs()}
        # the edit runs the re-edit target graph (the source pass ran in invert)
        assert hints["unet_reverse_target"] == ("bf16" if precision == "auto" and "BF16" in caps else "fp32")
        assert hints["unet_forward"] == "fp32" and hints["vae_encoder"] == "fp32"  # exported fp32 (the defaults)
    # the same int8 graph on two engines: rounding of int8 arithmetic and requantisation differs; they
    # still agree as closely as the int8 gate asks of onnxruntime vs torch, bfloat16 float parts given
    # 3 dB of it (measured on an AVX-512 BF16 EPYC: f32 32.1 dB, auto 28.7 dB, gate 25 dB)
    parity = b.manifest.parity
    gate = parity.get("edit", "synthetic").gate_db
    assert psnr_db(ref, images["f32"], peak=1.0) > gate
    assert psnr_db(ref, images["auto"], peak=1.0) > gate - 3
    assert np.isfinite(images["auto"]).all()
    ov = {(e.check, e.target): e for e in parity.entries if e.backend == "openvino"}
    cases = {("synthetic",), ("calibration_0",)}
    assert set(ov) == {(c, *t) for c in ("edit", "reedit") for t in cases} | {("generate", "synthetic")}
    assert all(e.precision == "auto" and e.error is None for e in ov.values())
    assert ov["edit", "synthetic"].details["inference_precision"]["unet_reverse_edit"] in ("bf16", "fp32")
    # each entry carries the gate of onnxruntime's entries and says whether it meets it
    for e in ov.values():
        assert e.gate_db == gate and e.meets_gate == (e.psnr_db >= e.gate_db)
    # recorded only (the gate is onnxruntime's), so held to onnxruntime's figures for the same cases:
    # the same int8 graphs on another engine land within 3 dB (measured: edit 25.9 vs 25.1 dB,
    # generate 48.5 vs 49.0 dB)
    for check in ("edit", "reedit", "generate"):
        assert abs(ov[check, "synthetic"].psnr_db - parity.get(check, "synthetic").psnr_db) < 3.0
    out = run_cli("inspect", str(int8_bundle), "--no-verify")
    assert out.returncode == 0 and "end-to-end edit on openvino" in out.stdout


def test_compiled_graphs_are_cached(tiny_bundle, tmp_path):
    cache = tmp_path / "ovcache"
    b = open_bundle(tiny_bundle, verify=False)
    backend = ovb.OpenVinoBackend(cache_dir=cache)
    feeds = {"input_ids": np.zeros((1, 77), np.int64)}
    first = backend.open_session(b, "text_encoder").run(feeds)
    blobs = sorted(p.name for p in cache.iterdir())
    assert blobs, "nothing was cached"
    again = ovb.OpenVinoBackend(cache_dir=cache).open_session(b, "text_encoder").run(feeds)
    assert sorted(p.name for p in cache.iterdir()) == blobs  # loaded from the cache, not compiled anew
    np.testing.assert_array_equal(first["last_hidden_state"], again["last_hidden_state"])
    assert ovb.OpenVinoBackend(cache_dir="").cache_dir() is None


def test_non_finite_outputs_raise(tiny_bundle):
    """A precision the activations overflow in gives a typed error, not a NaN image."""
    sess = ovb.OpenVinoBackend(cache_dir="").open_session(open_bundle(tiny_bundle, verify=False), "text_encoder")
    feeds = {"input_ids": np.zeros((1, 77), np.int64)}
    assert np.isfinite(sess.run(feeds)["last_hidden_state"]).all()
    port = sess._ports["last_hidden_state"]

    class Overflowing:
        def infer(self, feeds):
            return {port: np.full((1, 77, 32), np.nan, np.float32)}

    sess._request = Overflowing()
    with pytest.raises(NumericsError, match="--ov-precision fp32"):
        sess.run(feeds)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ICD_EDGE_CACHE", str(tmp_path / "c"))
    assert ovb.default_cache_dir() == tmp_path / "c" / "openvino"
    monkeypatch.delenv("ICD_EDGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert ovb.default_cache_dir() == tmp_path / "x" / "icd_edge" / "openvino"


def test_bad_options_and_files(tiny_bundle, tmp_path):
    with pytest.raises(InputError, match="precision"):
        ovb.OpenVinoBackend(precision="int4")
    with pytest.raises(InputError, match="threads"):
        ovb.OpenVinoBackend(threads=-1)

    class PlainCpu:  # a CPU plugin without native float16 or bfloat16 (most x86 CPUs before Sapphire Rapids)
        def get_property(self, device, name):
            return ["FP32", "INT8", "BIN", "EXPORT_IMPORT"]

    backend = ovb.OpenVinoBackend(precision="f16")
    backend._core = PlainCpu()
    with pytest.raises(BackendUnavailable, match="no native f16"):
        backend.compile_config()
    backend = ovb.OpenVinoBackend()
    backend._core = PlainCpu()
    assert backend.compile_config("int8")["INFERENCE_PRECISION_HINT"] == "f32"  # auto falls back to float32
    broken = tmp_path / "b"
    shutil.copytree(tiny_bundle, broken)
    graph = broken / "onnx" / "vae_decoder.onnx"
    graph.write_bytes(b"\xff" * graph.stat().st_size)  # same size (open_bundle checks sizes), not a graph
    b = open_bundle(broken, verify=False)
    with pytest.raises(BundleError, match="OpenVINO cannot read"):
        ovb.OpenVinoBackend(cache_dir="").open_session(b, "vae_decoder")
    with pytest.raises(BundleError, match="no graph 'taesd_decoder'"):
        ovb.OpenVinoBackend().open_session(b, "taesd_decoder")
    sess = ovb.OpenVinoBackend(cache_dir="").open_session(b, "text_encoder")
    with pytest.raises(ShapeMismatch, match="expected int64"):
        sess.run({"input_ids": np.zeros((1, 76), np.int64)})


def test_probe_and_auto_selection(tiny_bundle, int8_bundle, monkeypatch):
    from icd_edge import runtimes
    from icd_edge.precision import is_int8

    avail = ovb.OpenVinoBackend().probe()
    assert avail.ok and avail.reason.startswith("openvino ")
    fp32, int8 = open_bundle(tiny_bundle, verify=False), open_bundle(int8_bundle, verify=False)
    # auto: openvino for int8 edit UNets on the CPU classes where it measured faster, onnxruntime on
    # the others, for fp32/fp16 UNets and for the sequential policy (lower peak memory)
    # (on classes with per-graph routes the chosen backend is a router whose primary is that backend)
    for isa, fastest in runtimes.INT8_CPU_BACKEND.items():
        monkeypatch.setattr(runtimes, "isa_class", lambda isa=isa: isa)
        chosen = runtimes.select_backend("auto", int8)
        assert getattr(chosen, "primary", chosen).name == fastest, isa
        routes = runtimes.INT8_CPU_GRAPH_BACKEND.get(isa, {})
        assert getattr(chosen, "routes", {}) == {
            g: b for g, b in routes.items() if g in int8.graphs and is_int8(int8.precision(g))
        }, isa
    assert runtimes.INT8_CPU_BACKEND["amx"] == "openvino" and runtimes.INT8_CPU_BACKEND["avx2"] == "onnxruntime"
    monkeypatch.setattr(runtimes, "isa_class", lambda: "amx")
    assert runtimes.select_backend("auto", int8).name == "openvino"
    assert runtimes.select_backend("auto", fp32).name == "onnxruntime"
    assert runtimes.select_backend("auto", int8, memory="sequential").name == "onnxruntime"
    with Editor.open(int8, memory="sequential") as ed:
        assert ed.backend.name == "onnxruntime"
    # typed options: each backend takes its own, those of another backend are not passed to it
    from icd_edge.runtimes.ort import OrtOptions

    chosen = runtimes.select_backend("auto", int8, options=(OrtOptions(fuse_attention=False), ovb.OvOptions(threads=1)))
    assert chosen.name == "openvino" and chosen.options.threads == 1
    with pytest.raises(InputError, match="need a named backend"):  # keyword fields belong to one backend
        runtimes.select_backend("auto", int8, fuse_attention=False)
    with pytest.raises(InputError, match="its options are precision, threads, cache_dir"):
        Editor.open(int8, "openvino", fuse_attention=False)
    monkeypatch.setattr(runtimes, "onnxruntime_has_gpu", lambda: True)  # a GPU onnxruntime wins
    assert runtimes.select_backend("auto", int8).name == "onnxruntime"
    monkeypatch.setattr(ovb.importlib.util, "find_spec", lambda name: None)
    assert "pip install 'icd_edge[openvino]'" in ovb.OpenVinoBackend().probe().reason


def test_cli(tiny_bundle, photo_png, tmp_path):
    out = tmp_path / "o.png"
    proc = run_cli(
        "edit",
        "--bundle",
        str(tiny_bundle),
        "--image",
        str(photo_png),
        "--source",
        "a photo of a cat",
        "--target",
        "a photo of a dog",
        "--out",
        str(out),
        "--backend",
        "openvino",
        "--ov-precision",
        "f32",
        "--ov-cache",
        str(tmp_path / "c"),
    )
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and any((tmp_path / "c").iterdir())
    proc = run_cli(
        "edit",
        "--bundle",
        str(tiny_bundle),
        "--image",
        str(photo_png),
        "--source",
        "a photo of a cat",
        "--target",
        "a photo of a dog",
        "--out",
        str(tmp_path / "p.png"),
        "--backend",
        "onnxruntime",
        "--ov-precision",
        "bf16",
    )
    assert proc.returncode == 2 and "apply to the openvino backend" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "p.png").exists()
    doctor = run_cli("doctor")
    assert "openvino" in doctor.stdout
