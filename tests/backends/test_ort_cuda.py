"""onnxruntime's CUDA path: the fused graph copies and their cache, the provider's options and
error messages, ``icd-edge prepare``. CI has no GPU: everything that does not need one runs
here (the fusions are written by plain Python; the attention-only copy runs on the CPU provider);
the CUDA run itself is the ``gpu`` test at the end and ``benchmarks/bench_gpu.py --phase ort``."""

from __future__ import annotations

import collections
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_cli

from icd_edge.bundle.store import open_bundle
from icd_edge.edit.editor import Editor
from icd_edge.errors import BackendUnavailable, InputError
from icd_edge.runtimes.ort import OrtBackend, cuda

EDIT = dict(cross_replace=0.4, self_replace=0.6, amplify={"dog": 2.0}, blend=("cat", "dog"))


def ops(path: Path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.mark.parametrize("graph", ["unet_reverse_edit", "vae_decoder"])
def test_all_fusions_replace_every_group_norm_and_plain_attention(tiny_bundle, tmp_path, graph):
    src = Path(tiny_bundle) / "onnx" / f"{graph}.onnx"
    before = ops(src)
    stats = cuda.optimize_graph(src, graph, tmp_path / "model.onnx", "all")
    after = ops(tmp_path / "model.onnx")
    # every 4-D GroupNorm pattern (InstanceNormalization inside) became a fused GroupNorm /
    # SkipGroupNorm; the VAE's attention block normalises a 3-D tensor, which GroupNorm does not take
    three_d = 1 if graph == "vae_decoder" else 0
    assert stats["GroupNormPattern"] == before["InstanceNormalization"] - three_d
    assert after["GroupNorm"] + after["SkipGroupNorm"] == stats["GroupNormPattern"]
    assert after["InstanceNormalization"] == three_d and "UnfusedGroupNormCasts" not in stats
    # plain attention is MultiHeadAttention; only the probabilities P2P reads stay explicit
    assert after["MultiHeadAttention"] == stats["MultiHeadAttention"] > 0
    assert after["Softmax"] == before["Softmax"] - stats["MultiHeadAttention"]
    assert after["NhwcConv"] == before["Conv"] and after["Conv"] == 0
    model = onnx.load(str(tmp_path / "model.onnx"))  # weights read back from the external file
    assert {i.name for i in model.graph.input} == {i.name for i in onnx.load(str(src)).graph.input}
    assert not [
        i for n in model.graph.node for i in n.input if i.endswith(cuda.FP32_SUFFIX) and "GroupNorm" not in n.op_type
    ]


def test_fp16_graph_gets_float32_group_norm_parameters(tiny_bundle, tmp_path):
    """fp16 bundles: the fusion writes gamma/beta as float32 (what GroupNorm takes), no casts left."""
    from icd_edge.export.quant.fp16 import to_fp16

    src = tmp_path / "fp16" / "unet_reverse.onnx"
    src.parent.mkdir()
    onnx.save_model(to_fp16(Path(tiny_bundle) / "onnx" / "unet_reverse.onnx"), str(src))
    stats = cuda.optimize_graph(src, "unet_reverse", tmp_path / "model.onnx", "all")
    model = onnx.load(str(tmp_path / "model.onnx"))
    inits = {t.name: t.data_type for t in model.graph.initializer}
    norms = [n for n in model.graph.node if n.op_type in ("GroupNorm", "SkipGroupNorm")]
    assert norms and stats.get("UnfusedGroupNormCasts", 0) == 0
    assert all(inits[n.input[1]] == onnx.TensorProto.FLOAT for n in norms)  # gamma
    assert not [t for t in inits if t.endswith(cuda.FP32_SUFFIX) and not any(t in n.input for n in norms)]


def geglu_model(width=2560, *, half_first=True, rank=3, dtype=np.float32, gelu_on_first=False):
    """``y = h · gelu(g)``, ``h, g = Split(x·W + b)``, as torch exports a GEGLU feed-forward."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    const = {"W": rng.standard_normal((8, width)), "b": rng.standard_normal(width), "sq": 2**0.5, "one": 1, "half": 0.5}
    inits = [numpy_helper.from_array(np.asarray(v, dtype), k) for k, v in const.items()]
    h, g = ("g", "h") if gelu_on_first else ("h", "g")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["a"]),
        helper.make_node("Split", ["a"], ["h", "g"], axis=-1, num_outputs=2),
        helper.make_node("Div", [g, "sq"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["u"]),
        # both associations torch writes: (g·u)·0.5 and (0.5·g)·u
        *(
            [helper.make_node("Mul", [g, "u"], ["gu"]), helper.make_node("Mul", ["gu", "half"], ["gelu"])]
            if half_first
            else [helper.make_node("Mul", ["half", g], ["hg"]), helper.make_node("Mul", ["hg", "u"], ["gelu"])]
        ),
        helper.make_node("Mul", [h, "gelu"], ["y"]),
    ]
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    shape = [2, 16, 8] if rank == 3 else [32, 8]
    graph = helper.make_graph(
        nodes,
        "geglu",
        [helper.make_tensor_value_info("x", elem, shape)],
        [helper.make_tensor_value_info("y", elem, shape[:-1] + [width // 2])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


@pytest.mark.parametrize("half_first", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_geglu_becomes_bias_split_gelu(half_first, dtype):
    import math

    import onnxruntime as ort

    erf = np.vectorize(math.erf)
    model = geglu_model(half_first=half_first, dtype=dtype)
    x = np.random.default_rng(1).standard_normal((2, 16, 8)).astype(dtype)
    (ref,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert cuda.bias_split_gelus(model) == 1
    (fused,) = [n for n in model.graph.node if n.op_type == "BiasSplitGelu"]
    assert [n.op_type for n in model.graph.node] == ["MatMul", "BiasSplitGelu"] and fused.domain == "com.microsoft"
    assert list(fused.input) == ["m", "b"] and list(fused.output) == ["y"]
    assert any(o.domain == "com.microsoft" for o in model.opset_import)  # or no session loads it
    onnx.checker.check_model(model)
    # what BiasSplitGelu computes (the CPU provider has no kernel for it): left half times the
    # erf GELU of the right half, after the bias; the graph it replaced computed the same
    w = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    a = x.astype(np.float64) @ w["W"] + w["b"]
    left, right = np.split(a, 2, axis=-1)
    expect = left * 0.5 * right * (1 + erf(right / np.sqrt(2)))
    tol = 1e-4 if dtype == np.float32 else 2e-2
    np.testing.assert_allclose(ref.astype(np.float64), expect, rtol=tol, atol=tol * np.abs(expect).max())


@pytest.mark.parametrize(
    "kw", [dict(width=1000), dict(rank=2), dict(gelu_on_first=True)], ids=["unsupported-width", "2-d", "gelu-on-first"]
)
def test_geglu_the_kernel_cannot_run_stays(kw):
    """Widths other than 2560/5120/10240 and 2-D inputs fail in the CUDA kernel; gelu of the
    first half is another function."""
    model = geglu_model(**kw)
    before = [n.op_type for n in model.graph.node]
    assert cuda.bias_split_gelus(model) == 0 and [n.op_type for n in model.graph.node] == before


def test_row_projections_merge_into_one_gemm_with_the_same_result(tiny_bundle):
    """The edit graph's P2P layers project each row with the same output layer: after the
    rewrite each such layer is one MatMul of the stacked rows, and the graph computes the same."""
    import onnxruntime as ort

    b = open_bundle(tiny_bundle, verify=False)
    src = Path(tiny_bundle) / "onnx" / "unet_reverse_edit.onnx"
    model = onnx.load(str(src))
    before = collections.Counter(n.op_type for n in model.graph.node)
    merged = cuda.merge_row_projections(model)
    after = collections.Counter(n.op_type for n in model.graph.node)
    assert merged > 0 and after["MatMul"] == before["MatMul"] - merged and after["Add"] == before["Add"] - merged
    rng = np.random.default_rng(0)
    feeds = {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in b.graphs["unet_reverse_edit"].inputs}
    feeds["self_flag"] = np.ones_like(feeds["self_flag"])
    run = lambda proto: ort.InferenceSession(proto, providers=["CPUExecutionProvider"]).run(None, feeds)  # noqa: E731
    for want, got in zip(run(str(src)), run(model.SerializeToString())):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_attention_copy_edits_like_the_bundle_graphs(tiny_bundle, photo, tmp_path, monkeypatch):
    """The attention-only fused copy runs on the CPU provider: the whole cached path (fuse, cache,
    load, bind) gives the edit of the bundle's own graphs."""
    kw = dict(backend="onnxruntime", providers=["CPUExecutionProvider"], source_cache="off")
    with Editor.open(tiny_bundle, fuse_attention=False, **kw) as ed:
        ref = ed.edit(ed.invert(photo, "a photo of a cat"), "a photo of a dog", output_type="np", **EDIT)
    monkeypatch.setattr(OrtBackend, "runs_on_cuda", lambda self: True)
    with Editor.open(tiny_bundle, cuda_fusions="attention", cache_dir=str(tmp_path), io_binding=True, **kw) as ed:
        out = ed.edit(ed.invert(photo, "a photo of a cat"), "a photo of a dog", output_type="np", **EDIT)
        assert ed.backend.fused_ops["unet_reverse_edit"]["MultiHeadAttention"] > 0
        assert ed.session("unet_reverse_edit").io_binding
    assert np.abs(out - ref).max() < 2e-3
    assert sorted(p.name.split(".")[0] for p in tmp_path.iterdir()) == sorted(
        ["text_encoder", "vae_encoder", "unet_forward", "unet_reverse_edit", "vae_decoder"]
    )


def test_cache_reuses_rebuilds_and_keys(tiny_bundle, tmp_path, monkeypatch, caplog):
    b = open_bundle(tiny_bundle, verify=False)
    calls = []
    real = cuda.optimize_graph
    monkeypatch.setattr(cuda, "optimize_graph", lambda *a: calls.append(a[1]) or real(*a))
    cache = cuda.FusedGraphCache(tmp_path)
    path, meta = cache.get(b, "vae_decoder", "1.0", "attention")
    assert calls == ["vae_decoder"] and meta["fused"] == {"MultiHeadAttention": 1}
    assert cache.get(b, "vae_decoder", "1.0", "attention")[0] == path and calls == ["vae_decoder"]
    # another onnxruntime version or fusion set is another entry
    assert cache.get(b, "vae_decoder", "2.0", "attention")[0] != path
    assert cache.get(b, "vae_decoder", "1.0", "all")[0] not in (path,)
    assert len(calls) == 3
    # a truncated file is rebuilt, with a warning naming the entry
    data = path.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="icd_edge.runtimes.ort.cuda"):
        cache.get(b, "vae_decoder", "1.0", "attention")
    assert len(calls) == 4 and "wrong size" in caplog.text and str(path.parent) in caplog.text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_corrupt_cached_model_is_rebuilt_on_open(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(OrtBackend, "runs_on_cuda", lambda self: True)
    backend = OrtBackend(providers=["CPUExecutionProvider"], cuda_fusions="attention", cache_dir=str(tmp_path))
    b = open_bundle(tiny_bundle, verify=False)
    backend.open_session(b, "vae_decoder").close()
    (model,) = tmp_path.glob("vae_decoder.*/model.onnx")
    model.write_bytes(b"\0" * model.stat().st_size)  # same size: only loading it finds out
    sess = backend.open_session(b, "vae_decoder")
    (spec,) = b.graphs["vae_decoder"].inputs
    assert sess.run({"latent": np.zeros(spec.shape, np.float32)})["image"].shape[1] == 3


def test_unwritable_cache_is_a_typed_error(tiny_bundle, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = cuda.FusedGraphCache(blocker / "cache")
    with pytest.raises(BackendUnavailable, match="ICD_EDGE_CACHE"):
        cache.get(open_bundle(tiny_bundle, verify=False), "vae_decoder", "1.0", "attention")


def test_provider_options():
    opts = cuda.provider_options(1, "HEURISTIC", True)
    assert opts["device_id"] == "1" and opts["cudnn_conv_algo_search"] == "HEURISTIC"
    assert (
        opts["enable_cuda_graph"] == "1" and cuda.provider_options(0, "EXHAUSTIVE", False)["enable_cuda_graph"] == "0"
    )
    with pytest.raises(InputError, match="EXHAUSTIVE"):
        cuda.provider_options(0, "fastest", True)
    # more of onnxruntime's provider options pass through and win over the defaults
    more = cuda.provider_options(0, "HEURISTIC", True, (("prefer_nhwc", "1"), ("do_copy_in_default_stream", "0")))
    assert more["prefer_nhwc"] == "1" and more["do_copy_in_default_stream"] == "0"
    backend = OrtBackend(cuda_provider_options={"prefer_nhwc": 1, "fuse_conv_bias": "1"})
    assert backend.options.cuda_provider_options == (("fuse_conv_bias", "1"), ("prefer_nhwc", "1"))
    with pytest.raises(InputError, match="cuda_fusions"):
        OrtBackend(cuda_fusions="most")._fused_for_cuda(None, "unet_forward")


def test_missing_library_messages():
    log = (
        "[E:onnxruntime:Default, provider_bridge_ort.cc:2251] Failed to load library "
        "libonnxruntime_providers_cuda.so with error: libcudnn.so.9: cannot open shared object file: "
        "No such file or directory"
    )
    assert cuda.missing_library(log) == "libcudnn.so.9"
    assert cuda.explain_missing("libcudnn.so.9", "13.0").endswith("pip install nvidia-cudnn-cu13")
    assert "install the NVIDIA driver" in cuda.explain_missing("libcuda.so.1", "13.0")
    assert "CUDA 12.8" in cuda.explain_missing("libcudart.so.12", "12.8")
    assert "\n" not in cuda.explain_missing(None, None)
    assert cuda.graph_unsupported("This session cannot use the graph capture feature as requested")
    assert not cuda.graph_unsupported("Protobuf parsing failed")


def test_probe_model_is_one_add_node():
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load_from_string(cuda.probe_model())
    assert [n.op_type for n in model.graph.node] == ["Add"]
    onnx.checker.check_model(model)
    assert helper.printable_graph(model.graph)
    sess = ort.InferenceSession(cuda.probe_model(), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.full(1, 2.0, np.float32)})[0][0] == 4.0
    assert cuda.check_provider()["ok"] is ("CUDAExecutionProvider" in ort.get_available_providers())


def test_nvidia_smi_parsing():
    rows = cuda.parse_nvidia_smi("NVIDIA H200, 143771, 580.159.04, 9.0\nbad line\n")
    assert rows == [{"name": "NVIDIA H200", "driver": "580.159.04", "memory_gib": 140.4, "compute_capability": "9.0"}]


def test_prepare_cli(tiny_bundle, tmp_path):
    env = {"ICD_EDGE_CACHE": str(tmp_path)}
    r = run_cli("prepare", str(tiny_bundle), "--fusions", "attention", "--jobs", "2", "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["graphs"]) == set(cuda.graphs_to_prepare(open_bundle(tiny_bundle, verify=False)))
    assert out["graphs"]["unet_forward"]["fused"]["MultiHeadAttention"] > 0
    again = run_cli("prepare", str(tiny_bundle), "--fusions", "attention", "--json", env=env)
    assert json.loads(again.stdout)["graphs"] == out["graphs"]  # every entry reused as it was
    bad = run_cli("prepare", str(tiny_bundle), "--jobs", "0", env=env)
    assert bad.returncode == 2 and "--jobs" in bad.stderr and "Traceback" not in bad.stderr
    missing = run_cli("prepare", str(tmp_path / "nope"), env=env)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    if importlib.util.find_spec("torch") is not None:
        import torch

        if not torch.cuda.is_available():  # CI: --fast is refused in one line, nothing written
            fast = run_cli("prepare", "--fast", str(tiny_bundle), env=env)
            assert fast.returncode == 2 and "CUDA GPU" in fast.stderr and "Traceback" not in fast.stderr
            assert not (tmp_path / "torch-compile").exists()


def test_doctor_reports_the_cuda_provider():
    r = run_cli("doctor", "--json")
    gpu = json.loads(r.stdout)["gpu"]
    import onnxruntime as ort

    assert gpu["provider"] is ("CUDAExecutionProvider" in ort.get_available_providers())
    assert gpu["onnxruntime"] == ort.__version__ and isinstance(gpu["gpus"], list)
    assert "onnxruntime CUDA provider:" in run_cli("doctor").stdout


def _cuda_provider() -> bool:
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    return cuda.check_provider()["ok"]


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_provider(), reason="needs onnxruntime-gpu with a working CUDA provider")
def test_cuda_edit_matches_the_cpu_provider(tiny_bundle, photo, tmp_path):
    """Fused graphs + fixed buffers + CUDA graphs on the GPU against the CPU provider (fp32 bundle)."""
    kw = dict(backend="onnxruntime", source_cache="off")
    with Editor.open(tiny_bundle, providers=["CPUExecutionProvider"], **kw) as ed:
        ref = ed.edit(ed.invert(photo, "a photo of a cat"), "a photo of a dog", output_type="np", **EDIT)
    with Editor.open(tiny_bundle, cache_dir=str(tmp_path), **kw) as ed:
        outs = [ed.edit(ed.invert(photo, "a photo of a cat"), "a photo of a dog", output_type="np", **EDIT)]
        outs.append(ed.edit(ed.invert(photo, "a photo of a cat"), "a photo of a dog", output_type="np", **EDIT))
        sess = ed.session("unet_reverse_edit")
        assert sess.providers[0] == "CUDAExecutionProvider" and sess.cuda_graph
    from icd_edge.export.parity import psnr_db

    # ONNX Runtime's fused GroupNorm sums with atomics: runs differ in the last bits, not more
    assert psnr_db(outs[0], outs[1], peak=1.0) > 50
    assert min(psnr_db(ref, o, peak=1.0) for o in outs) > 40


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_provider(), reason="needs onnxruntime-gpu with a working CUDA provider")
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_bias_split_gelu_runs_like_the_pattern_on_cuda(dtype):
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((2, 16, 8)).astype(dtype)
    model = geglu_model(dtype=dtype)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CUDAExecutionProvider"]).run(
        None, {"x": x}
    )[0]  # noqa: E731
    ref = run(model)
    assert cuda.bias_split_gelus(model) == 1
    got = run(model).astype(np.float64)
    tol = 1e-4 if dtype == np.float32 else 2e-2
    np.testing.assert_allclose(got, ref.astype(np.float64), rtol=tol, atol=tol * np.abs(ref).max())


def _add_one_session(n: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(np.ones(1, np.float32), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_read_only_feeds_stay_on_the_device_between_runs():
    """The binding keeps large read-only feeds (a source cache) on the device and copies them
    device to device; writable arrays are uploaded every run; the least recently used go first."""
    from icd_edge.bundle.spec import TensorSpec
    from icd_edge.runtimes.ort import _Binding

    n = 1024
    spec = [TensorSpec("x", "float32", (1, n))]
    out = [TensorSpec("y", "float32", (1, n))]
    b = _Binding(_add_one_session(n), spec, out, "cpu", resident_min=n, resident_bytes=2 * 4 * n)
    stack = np.random.default_rng(0).standard_normal((3, 1, n)).astype(np.float32)
    stack.setflags(write=False)
    for k in (0, 0, 1, 1):  # each step's view of one read-only stack: uploaded once per step
        np.testing.assert_array_equal(b.run({"x": stack[k]})["y"], stack[k] + 1)
    assert b.uploads == 2
    writable = stack[0].copy()
    for _ in range(2):
        np.testing.assert_array_equal(b.run({"x": writable})["y"], writable + 1)
    assert b.uploads == 4
    b.run({"x": stack[2]})  # a third resident array: the cap holds two, step 0's goes
    assert b.uploads == 5
    np.testing.assert_array_equal(b.run({"x": stack[0]})["y"], stack[0] + 1)
    assert b.uploads == 6
    np.testing.assert_array_equal(b.run({"x": stack[2]})["y"], stack[2] + 1)  # still kept
    assert b.uploads == 6
    small = _Binding(_add_one_session(n), spec, out, "cpu", resident_min=None)  # off: the CPU default
    small.run({"x": stack[0]})
    small.run({"x": stack[0]})
    assert small.uploads == 2
