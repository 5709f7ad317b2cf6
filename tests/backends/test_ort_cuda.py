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
    # no conv that feeds a SkipGroupNorm alone keeps its bias-add: the norm adds it
    users = collections.Counter(i for n in model.graph.node for i in n.input)
    into_norm = {i for n in model.graph.node if n.op_type == "SkipGroupNorm" for i in (n.input[0], n.input[3])}
    moved = [
        n for n in model.graph.node if n.op_type == "NhwcConv" and users[n.output[0]] == 1 and n.output[0] in into_norm
    ]
    assert moved and all(len(n.input) == 2 for n in moved) and stats["ConvBiasesInGroupNorm"] == len(moved)
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


def conv_norm_model(dtype=np.float32):
    """The resnet tail as the CUDA fusions leave it, NHWC: ``conv1 → SkipGroupNorm(skip = time
    embedding, broadcast)``; ``conv2, 1×1 shortcut → SkipGroupNorm`` with its sum ``S`` read
    on; and a conv with two consumers (its bias must stay)."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(3)
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    c = 16
    inits = {
        "w1": rng.standard_normal((c, 3, 3, c)),
        "b1": rng.standard_normal(c),
        "w2": rng.standard_normal((c, 3, 3, c)),
        "b2": rng.standard_normal(c),
        "ws": rng.standard_normal((c, 1, 1, c)),
        "bs": rng.standard_normal(c),
        "w3": rng.standard_normal((c, 3, 3, c)),
        "b3": rng.standard_normal(c),
    }
    inits = [numpy_helper.from_array((v * 0.2).astype(dtype), k) for k, v in inits.items()]
    inits += [numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), n) for n in ("g", "be")]
    conv = lambda x, w, b, out, k: helper.make_node(  # noqa: E731
        "NhwcConv", [x, w, b], [out], domain="com.microsoft", kernel_shape=[k, k], pads=[k // 2] * 4
    )
    norm = lambda ins, outs: helper.make_node(  # noqa: E731
        "SkipGroupNorm", ins, outs, domain="com.microsoft", groups=4, activation=1, epsilon=1e-5
    )
    nodes = [
        conv("x", "w1", "b1", "c1", 3),
        norm(["c1", "g", "be", "temb"], ["h"]),
        conv("h", "w2", "b2", "c2", 3),
        conv("x", "ws", "bs", "cs", 1),
        norm(["c2", "g", "be", "cs"], ["y", "s"]),
        conv("s", "w3", "b3", "c3", 3),
        norm(["c3", "g", "be", "temb"], ["z"]),
        helper.make_node("Add", ["c3", "s"], ["u"]),
    ]
    io = lambda n, shape: helper.make_tensor_value_info(n, elem, shape)  # noqa: E731
    graph = helper.make_graph(
        nodes,
        "resnet",
        [io("x", [2, 8, 8, c]), io("temb", [2, 1, 1, c])],
        [io(n, [2, 8, 8, c]) for n in ("y", "s", "z", "u")],
        inits,
    )
    ops = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=ops, ir_version=10)


def standard_ops(model):
    """``NhwcConv`` and ``SkipGroupNorm`` (CUDA-only kernels) written as the standard operators
    they compute, so that the CPU provider runs the graph before and after a rewrite."""
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    out = []
    for n in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        p = n.name or n.output[0]
        if n.op_type == "NhwcConv":
            w = numpy_helper.to_array(inits[n.input[1]]).transpose(0, 3, 1, 2)
            graph.initializer.append(numpy_helper.from_array(w, p + "_oihw"))
            out += [
                helper.make_node("Transpose", [n.input[0]], [p + "_nchw"], perm=[0, 3, 1, 2]),
                helper.make_node("Conv", [p + "_nchw", p + "_oihw", *n.input[2:]], [p + "_y"], **attrs),
                helper.make_node("Transpose", [p + "_y"], [n.output[0]], perm=[0, 2, 3, 1]),
            ]
        elif n.op_type == "SkipGroupNorm":
            g = attrs["groups"]
            total = n.output[1] if len(n.output) > 1 else p + "_sum"
            adds = [helper.make_node("Add", [n.input[0], n.input[3]], [p + "_xs" if len(n.input) > 4 else total])]
            if len(n.input) > 4 and n.input[4]:
                adds.append(helper.make_node("Add", [p + "_xs", n.input[4]], [total]))
            shape = numpy_helper.from_array(np.array([0, 0, 0, g, -1], np.int64), p + "_grp")
            back = numpy_helper.from_array(np.array([0, 0, 0, -1], np.int64), p + "_back")
            axes = numpy_helper.from_array(np.array([1, 2, 4], np.int64), p + "_axes")
            graph.initializer.extend([shape, back, axes])
            dt = inits[n.input[0]].data_type if n.input[0] in inits else graph.input[0].type.tensor_type.elem_type
            out += adds + [
                helper.make_node("Cast", [total], [p + "_f"], to=onnx.TensorProto.FLOAT),
                helper.make_node("Reshape", [p + "_f", p + "_grp"], [p + "_r"]),
                helper.make_node("ReduceMean", [p + "_r", p + "_axes"], [p + "_m"]),
                helper.make_node("Sub", [p + "_r", p + "_m"], [p + "_d"]),
                helper.make_node("Mul", [p + "_d", p + "_d"], [p + "_dd"]),
                helper.make_node("ReduceMean", [p + "_dd", p + "_axes"], [p + "_v"]),
                helper.make_node("Add", [p + "_v", p + "_eps"], [p + "_ve"]),
                helper.make_node("Sqrt", [p + "_ve"], [p + "_sd"]),
                helper.make_node("Div", [p + "_d", p + "_sd"], [p + "_n"]),
                helper.make_node("Reshape", [p + "_n", p + "_back"], [p + "_nb"]),
                helper.make_node("Mul", [p + "_nb", n.input[1]], [p + "_sc"]),
                helper.make_node("Add", [p + "_sc", n.input[2]], [p + "_ab"]),
                helper.make_node("Sigmoid", [p + "_ab"], [p + "_sg"]),
                helper.make_node("Mul", [p + "_ab", p + "_sg"], [p + "_act"]),
                helper.make_node("Cast", [p + "_act"], [n.output[0]], to=dt),
            ]
            graph.initializer.append(numpy_helper.from_array(np.array(attrs["epsilon"], np.float32), p + "_eps"))
        else:
            out.append(n)
    del graph.node[:]
    graph.node.extend(out)
    return model


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_conv_biases_move_into_skip_group_norms(dtype):
    """A conv whose one consumer is a SkipGroupNorm loses its bias to that node's bias input
    (two convs into one node: the sum); the graph computes the same, sums ``S`` included."""
    import onnxruntime as ort

    model = conv_norm_model(dtype)
    rng = np.random.default_rng(4)
    feeds = {
        "x": rng.standard_normal((2, 8, 8, 16)).astype(dtype),
        "temb": rng.standard_normal((2, 1, 1, 16)).astype(dtype),
    }
    run = lambda m: ort.InferenceSession(  # noqa: E731
        standard_ops(m).SerializeToString(), providers=["CPUExecutionProvider"]
    ).run(None, feeds)
    want = run(model)
    assert cuda.conv_biases_into_group_norms(model) == 3
    convs = {n.output[0]: n for n in model.graph.node if n.op_type == "NhwcConv"}
    assert [len(convs[c].input) for c in ("c1", "c2", "cs", "c3")] == [2, 2, 2, 3]  # c3 feeds an Add too
    norms = [n for n in model.graph.node if n.op_type == "SkipGroupNorm"]
    assert [len(n.input) for n in norms] == [5, 5, 4]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert not {"b1", "b2", "bs"} & set(inits) and "b3" in inits
    before = {t.name: onnx.numpy_helper.to_array(t) for t in conv_norm_model(dtype).graph.initializer}
    assert np.array_equal(inits[norms[0].input[4]], before["b1"])
    summed = (before["b2"].astype(np.float32) + before["bs"].astype(np.float32)).astype(dtype)
    assert np.array_equal(inits[norms[1].input[4]], summed)
    onnx.checker.check_model(model)
    tol = 1e-5 if dtype == np.float32 else 3e-3
    for w, g in zip(want, run(model)):
        np.testing.assert_allclose(g.astype(np.float32), w.astype(np.float32), rtol=tol, atol=tol * np.abs(w).max())


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
    lone = run_cli("prepare", "--aot", str(tiny_bundle), env=env)  # --aot is an option of --fast
    assert lone.returncode == 2 and "add --fast" in lone.stderr and "Traceback" not in lone.stderr
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
