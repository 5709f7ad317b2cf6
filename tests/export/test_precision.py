"""fp16 / int8 bundles of the tiny model run end to end and meet their recorded thresholds;
memory policies give the same image as ``resident``."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from conftest import run_cli

from icd_edge.bundle.store import open_bundle
from icd_edge.edit.editor import Editor
from icd_edge.errors import InputError

UNETS = ("unet_forward", "unet_reverse", "unet_reverse_edit")


def _export(tmp_path_factory, name, *args):
    out = tmp_path_factory.mktemp("prec") / name
    run_cli(
        "--model",
        "tiny",
        "--out",
        str(out),
        "--no-progress",
        "--calibration-count",
        "1",
        *args,
        module="icd_edge.export",
        check=True,
    )
    return out


@pytest.fixture(scope="module")
def fp16_bundle(tmp_path_factory):
    return _export(
        tmp_path_factory,
        "fp16.bundle",
        "--no-reedit",  # re-edits in fp16: the GPU path's tests; in int8: int8_bundle
        "--precision",
        "fp16",
        "--graph-precision",
        "vae_decoder=fp32",
        "--embeddings",
        "int8",
    )


def _ops(bundle, graph):
    return {n.op_type for n in onnx.load(str(bundle / "onnx" / f"{graph}.onnx"), load_external_data=False).graph.node}


def test_fp16_bundle(fp16_bundle, photo):
    m = open_bundle(fp16_bundle).manifest
    prec = {g: v.artifacts["onnx"].precision for g, v in m.graphs.items()}
    assert prec["vae_decoder"] == "fp32" and all(p == "fp16" for g, p in prec.items() if g != "vae_decoder")
    # UNets are traced in float16 (no conversion pass), the small graphs converted; I/O stays float32
    methods = {g: v.artifacts["onnx"].details.get("fp16_method") for g, v in m.graphs.items()}
    assert all(methods[g] == "traced in float16" for g in UNETS) and methods["text_encoder"].startswith("onnxconverter")
    model = onnx.load(str(fp16_bundle / "onnx" / "unet_reverse_edit.onnx"), load_external_data=False)
    assert {i.type.tensor_type.elem_type for i in model.graph.input} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    # --embeddings int8: the fp16 text encoder's token embedding as int8 rows with fp16 row scales
    assert list(m.info["int8_embeddings"]) == ["text_encoder"]
    te = {
        t.name: t
        for t in onnx.load(str(fp16_bundle / "onnx" / "text_encoder.onnx"), load_external_data=False).graph.initializer
    }
    table = next(n for n in te if n.endswith("_int8"))
    assert te[table].data_type == onnx.TensorProto.INT8
    assert te[table.replace("_int8", "_row_scale")].data_type == onnx.TensorProto.FLOAT16
    par = m.parity
    assert par.get("edit", "synthetic").gate_db == 35.0 and par.edit_mean_psnr_db() >= 35.0
    assert par.get("generate", "synthetic").psnr_db >= 35.0
    assert par.get("edit", "calibration_0") is not None  # quality also measured on a real photo
    with Editor.open(fp16_bundle) as ed:
        img = ed.edit(ed.invert(photo, "a photo of a cat"), "a photo of a dog", blend=("cat", "dog"), output_type="np")
    assert img.shape == (128, 128, 3) and np.isfinite(img).all()


def test_int8_bundle(int8_bundle, photo, tmp_path):
    m = open_bundle(int8_bundle).manifest
    for g in ("unet_reverse", "unet_reverse_edit", "unet_reverse_source", "unet_reverse_target"):
        assert m.graphs[g].artifacts["onnx"].precision == "int8"
        assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(int8_bundle, g)
    # the forward UNet stays fp32 by default: inversion errors are amplified by the reverse jumps
    assert m.graphs["unet_forward"].artifacts["onnx"].precision == "fp32"
    assert "QuantizeLinear" not in _ops(int8_bundle, "unet_forward")
    assert m.graphs["vae_decoder"].artifacts["onnx"].precision == "fp32"
    # the text encoder's token embedding is stored as int8 rows (the quantiser leaves Gather alone)
    assert m.graphs["text_encoder"].artifacts["onnx"].precision == "int8"
    assert list(m.info["int8_embeddings"]) == ["text_encoder"] and len(m.info["int8_embeddings"]["text_encoder"]) == 1
    te = onnx.load(str(int8_bundle / "onnx" / "text_encoder.onnx"), load_external_data=False).graph
    assert any(t.data_type == onnx.TensorProto.INT8 and t.name.endswith("_int8") for t in te.initializer)
    assert (
        m.info["calibration"]["feeds"]["unet_reverse_edit"] == 4 and m.info["calibration"]["feeds"]["unet_reverse"] == 4
    )
    # the time embedding's Gemm weights, which the static quantiser leaves float, are weight-only int8
    assert {"unet_reverse", "unet_reverse_edit"} <= set(m.info["int8_gemm_weights"])
    g = onnx.load(str(int8_bundle / "onnx" / "unet_reverse.onnx"), load_external_data=False).graph
    dq = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_int8")}
    gemms = [n for n in g.node if n.op_type == "Gemm"]
    assert gemms and all(n.input[1] in dq for n in gemms)
    # each quantiser process reports its peak RSS (Linux), recorded for memory planning
    reverse = {"unet_reverse", "unet_reverse_edit", "unet_reverse_source", "unet_reverse_target"}
    assert set(m.info["quantiser_peak_rss_gb"]) == {"text_encoder", "taesd_decoder", *reverse}
    # the re-edit graphs were calibrated on their own rows (the source pass and the target-only edit)
    feeds = m.info["calibration"]["feeds"]
    assert feeds["unet_reverse_source"] == feeds["unet_reverse_target"] == feeds["unet_reverse_edit"]
    assert all(0.05 < v < 8 for v in m.info["quantiser_peak_rss_gb"].values())
    assert m.parity.get("edit", "synthetic").gate_db == 25.0 and m.parity.edit_mean_psnr_db() >= 25.0
    out = tmp_path / "o.png"
    from PIL import Image

    Image.fromarray(photo).save(tmp_path / "p.png")
    proc = run_cli(
        "edit",
        "--bundle",
        str(int8_bundle),
        "--image",
        str(tmp_path / "p.png"),
        "--source",
        "a photo of a cat",
        "--target",
        "a photo of a dog",
        "--out",
        str(out),
        "--memory",
        "sequential",
    )
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()


def test_int8_embeddings_need_a_converted_text_encoder(tmp_path):
    proc = run_cli("--model", "tiny", "--out", str(tmp_path / "b"), "--embeddings", "int8", module="icd_edge.export")
    assert proc.returncode == 2 and "--embeddings int8 needs" in proc.stderr and not (tmp_path / "b").exists()


def test_int8_dynamic_and_gate(tmp_path_factory):
    out = _export(tmp_path_factory, "dyn.bundle", "--no-reedit", "--precision", "int8-dynamic", "--parity", "graphs")
    ops = _ops(out, "unet_reverse")
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops


@pytest.mark.parametrize("memory", ["sequential"])
def test_memory_policies_give_the_same_image(tiny_bundle, photo, memory):
    # the batch-2 edit under both policies (sequential leaves the source cache off by default)
    with Editor.open(tiny_bundle, "onnxruntime", memory="resident", source_cache="off") as ed:
        ref = ed.edit(ed.invert(photo, "a photo of a cat"), "a photo of a dog", output_type="np")
        assert {"unet_forward", "unet_reverse_edit"} <= set(ed.loaded_graphs())
        assert ed.session("unet_reverse_edit").session_options.enable_mem_reuse
    with Editor.open(tiny_bundle, "onnxruntime", memory=memory) as ed:
        inv = ed.invert(photo, "a photo of a cat")
        assert "unet_forward" not in ed.loaded_graphs()  # released after the inversion
        opened, options = [], {}
        real_open = ed.backend.open_session

        def spy(b, g):
            opened.append((g, sorted(ed.loaded_graphs())))
            sess = real_open(b, g)
            options[g] = sess.session_options
            return sess

        ed.backend.open_session = spy
        got = ed.edit(inv, "a photo of a dog", output_type="np")
        # one graph at a time: each opens with nothing else loaded; the decoder is the last one
        assert [g for g, _ in opened] == ["text_encoder", "unet_reverse_edit", "vae_decoder"]
        assert all(loaded == [] for _, loaded in opened) and list(ed.loaded_graphs()) == ["vae_decoder"]
        # sequential sessions run without planned buffer reuse, image-resolution graphs without
        # the arena (lower peak memory)
        assert not options["vae_decoder"].enable_mem_reuse and not options["vae_decoder"].enable_cpu_mem_arena
        assert not options["unet_reverse_edit"].enable_mem_reuse and options["unet_reverse_edit"].enable_cpu_mem_arena
        ed.reconstruct(inv)
        assert list(ed.loaded_graphs()) == ["vae_decoder"] and opened[-2][0] == "unet_reverse"
    np.testing.assert_array_equal(ref, got)
    with pytest.raises(InputError, match="memory"):
        Editor.open(tiny_bundle, memory="swap")


def test_quantiser_failure_is_a_typed_error(tmp_path):
    """The quantiser runs in a child process; its failure (here: a file that is no ONNX graph)
    comes back as an ExportError naming the graph, not as a traceback."""
    from icd_edge.errors import ExportError
    from icd_edge.export.quant.int8 import quantize

    bad = tmp_path / "unet_forward.onnx"
    bad.write_bytes(b"not an onnx graph")
    with pytest.raises(ExportError, match="int8 quantisation of unet_forward failed"):
        quantize(bad, "int8", [{"x": np.zeros(1, np.float32)}])


def test_quantiser_child_runs(tmp_path):
    """The child process starts and quantises (a regression: after the module became a package,
    ``python -m`` found no entry and every int8 export failed)."""
    from onnx import TensorProto, helper, numpy_helper

    from icd_edge.export.quant.int8 import quantize

    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        [numpy_helper.from_array(w, "w")],
    )
    src = tmp_path / "g.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(src))
    model, _ = quantize(src, "int8-dynamic", None)
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & {n.op_type for n in model.graph.node}


def test_paged_out_modules_keep_their_values(tmp_path):
    """Before quantising, the exporter moves the torch weights into memory-mapped files; the
    modules must compute exactly what they did (parity runs on them afterwards)."""
    import types

    import torch

    from icd_edge.export.to_onnx import _page_out_modules

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8)
    before = net(x).detach().clone()
    ctx = types.SimpleNamespace(
        src=types.SimpleNamespace(text_encoder=net, vae=None, unet_forward=net, unet_reverse=None), graphs={}
    )
    _page_out_modules(ctx, tmp_path)
    assert len(list(tmp_path.glob("paged_*.pt"))) == 1  # a module shared by two roles is paged once
    assert torch.equal(net(x), before)


def test_int8_taesd_decoder_is_calibrated(int8_bundle):
    """The calibration trajectories decode with the full VAE; an int8 TAESD decoder is calibrated
    on the same final latents (a regression: it used to fail with 'recorded no inputs')."""
    m = open_bundle(int8_bundle).manifest
    assert m.graphs["taesd_decoder"].artifacts["onnx"].precision == "int8"
    assert m.info["calibration"]["feeds"]["taesd_decoder"] == m.info["calibration"]["feeds"]["vae_decoder"] > 0
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(int8_bundle, "taesd_decoder")


def _feeds(bundle, graph, n, seed=0):
    entry = open_bundle(bundle, verify=False).graphs[graph]
    rng = np.random.default_rng(seed)
    feeds = []
    for k in range(n):
        f = {i.name: rng.standard_normal(i.shape).astype(i.dtype) for i in entry.inputs}
        f["timestep"] = np.array([259.0 * (k + 1)], np.float32)
        feeds.append(f)
    return feeds


def test_lean_calibrator_matches_onnxruntime(tiny_bundle):
    """Our range collection (one copy of the weights) gives the ranges ONNX Runtime's MinMax
    calibrator gives for the same tensors and feeds, on the tiny P2P edit UNet."""
    from onnxruntime.quantization import CalibrationDataReader, create_calibrator

    from icd_edge.export.quant.calibration import calibrate_ranges
    from icd_edge.export.quant.surgery import activation_matmuls

    src = tiny_bundle / "onnx" / "unet_reverse_edit.onnx"
    feeds = _feeds(tiny_bundle, "unet_reverse_edit", 3)
    ours = calibrate_ranges(src, feeds, ("Conv", "MatMul"), activation_matmuls(src))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        cal = create_calibrator(
            src, ["Conv", "MatMul"], augmented_model_path=str(Path(d) / "aug.onnx"), use_external_data_format=True
        )
        cal.collect_data(Reader())
        theirs = {k: tuple(float(x) for x in v.range_value) for k, v in cal.compute_data().data.items()}
    assert len(ours) > 20 and set(ours) <= set(theirs)
    for name, (lo, hi) in ours.items():
        assert lo < hi
        np.testing.assert_allclose((lo, hi), theirs[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # attention's activation x activation MatMuls are not calibrated (they stay float)
    model = onnx.load(str(src), load_external_data=False)
    excluded = set(activation_matmuls(src))
    assert excluded and all(n.op_type == "MatMul" for n in model.graph.node if n.name in excluded)
    only_there = {t for n in model.graph.node if n.name in excluded for t in (*n.input, *n.output)} - {
        t
        for n in model.graph.node
        if n.op_type in ("Conv", "MatMul") and n.name not in excluded
        for t in (*n.input, *n.output)
    }
    assert only_there and not only_there & set(ours)


def test_int8_keeps_attention_matmuls_float(int8_bundle):
    """Q·Kᵀ and P·V stay float MatMuls (quantised, ONNX Runtime made them and the Softmax between
    them slower than fp32); the weight MatMuls and convolutions are quantised."""
    for g in ("unet_reverse", "unet_reverse_edit"):
        graph = onnx.load(str(int8_bundle / "onnx" / f"{g}.onnx"), load_external_data=False).graph
        dq_out = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
        mm = [n for n in graph.node if n.op_type == "MatMul"]
        quantised = [n for n in mm if all(i in dq_out for i in n.input)]
        float_mm = [n for n in mm if not any(i in dq_out for i in n.input)]
        assert quantised and float_mm, g
        assert "Softmax" in {n.op_type for n in graph.node}
        prod = {o: n for n in graph.node for o in n.output}
        # every Softmax feeds a float MatMul: no Q/DQ around it
        for n in graph.node:
            if n.op_type == "Softmax":
                assert all(prod.get(i) is None or prod[i].op_type != "DequantizeLinear" for i in n.input)


def test_quantize_gemm_weights_per_output_channel():
    """Large float Gemm weights (the UNet's time-embedding linears) become int8 + a scale per output
    channel behind a DequantizeLinear, for either layout of B; ONNX Runtime's result stays within the
    quantisation error; small weights and weights another op reads are left alone."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from icd_edge.export.quant.surgery import quantize_gemm_weights

    rng = np.random.default_rng(0)
    wt = (rng.standard_normal((96, 64)) * rng.uniform(0.01, 2.0, (96, 1))).astype(np.float32)  # (N, K), transB=1
    wn = (rng.standard_normal((64, 80)) * rng.uniform(0.01, 2.0, (1, 80))).astype(np.float32)  # (K, N)
    small = rng.standard_normal((64, 8)).astype(np.float32)
    shared = rng.standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "wt"], ["a"], name="g1", transB=1),
            helper.make_node("Gemm", ["x", "wn"], ["b"], name="g2"),
            helper.make_node("Gemm", ["x", "small"], ["c"], name="g3"),
            helper.make_node("Gemm", ["x", "shared"], ["d"], name="g4"),
            helper.make_node("MatMul", ["x", "shared"], ["e"], name="m"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [2, n]) for o, n in zip("abcde", (96, 80, 8, 64, 64))],
        [numpy_helper.from_array(a, n) for a, n in ((wt, "wt"), (wn, "wn"), (small, "small"), (shared, "shared"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert quantize_gemm_weights(model, min_elements=1000) == ["wt", "wn"]
    onnx.checker.check_model(model)
    inits = {t.name: t for t in model.graph.initializer}
    assert inits["wt_int8"].data_type == inits["wn_int8"].data_type == TensorProto.INT8
    assert {"small", "shared"} <= set(inits) and not {"wt", "wn"} & set(inits)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    a, b, c, d, _ = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )
    for got, want, step in ((a, x @ wt.T, np.abs(wt).max(1) / 127), (b, x @ wn, np.abs(wn).max(0) / 127)):
        bound = np.abs(x).sum(1, keepdims=True) * step[None] / 2  # half a step per weight, summed over K
        assert np.all(np.abs(got - want) <= bound + 1e-5) and not np.allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(c, x @ small, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d, x @ shared, rtol=1e-5, atol=1e-5)


def test_quantize_embeddings_rows():
    """A vocabulary-sized Gather table becomes int8 rows with a scale per row; ONNX Runtime gives
    the table's rows back within half a quantisation step; small tables are left alone."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from icd_edge.export.quant.surgery import quantize_embeddings

    rng = np.random.default_rng(0)
    vocab = (rng.standard_normal((300, 16)) * rng.uniform(0.01, 2.0, (300, 1))).astype(np.float32)
    pos = rng.standard_normal((77, 16)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["vocab", "ids"], ["e"], name="tok", axis=0),
            helper.make_node("Gather", ["pos", "pid"], ["p"], name="pos", axis=0),
            helper.make_node("Add", ["e", "p"], ["y"], name="add"),
        ],
        "g",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5]),
            helper.make_tensor_value_info("pid", TensorProto.INT64, [1, 5]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 16])],
        [numpy_helper.from_array(vocab, "vocab"), numpy_helper.from_array(pos, "pos")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert quantize_embeddings(model) == ["vocab"]
    onnx.checker.check_model(model)
    inits = {t.name: t for t in model.graph.initializer}
    assert inits["vocab_int8"].data_type == TensorProto.INT8 and "pos" in inits and "vocab" not in inits
    ids, pid = np.array([[0, 7, 299, 150, 7]]), np.arange(5)[None]
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"ids": ids, "pid": pid}
    )[0]
    want = vocab[ids] + pos[pid]
    step = (np.abs(vocab).max(1) / 127)[ids][..., None]
    assert np.all(np.abs(y - want) <= step / 2 + 1e-6) and not np.array_equal(y, want)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's /proc")
def test_quantiser_peak_is_the_childs_own(tmp_path):
    """The quantiser child's recorded peak is its own: Linux carries ru_maxrss over from the
    forked parent, so a child of a large exporter used to report the exporter's size."""
    import resource
    import subprocess

    big = np.ones(600_000_000 // 8)  # the parent holds 0.6 GB when it starts the child
    code = (
        "import json, resource; from icd_edge.export.quant.int8 import _own_peak_rss_gb; "
        "print(json.dumps([_own_peak_rss_gb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9]))"
    )
    own, inherited = json.loads(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    assert big.sum() > 0 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9 > 0.6
    assert inherited > 0.6 and 0.005 < own < 0.4
