"""The exporter traces the forward UNet once and gives the reverse UNet its own weights on that
trace: the result must equal a fresh trace of the reverse UNet, and modules that would trace
differently must not be matched."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from icd_edge.bundle import spec  # noqa: E402
from icd_edge.errors import ExportError  # noqa: E402
from icd_edge.export.to_onnx import (
    Template,
    WeightStore,
    _reuse_plan,
    retarget,
    same_structure,  # noqa: E402
    trace_graph,
    write_program,
)

INPUTS = [s.name for s in spec.GRAPHS["unet_forward"][0]]


def _feeds(seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "sample": rng.standard_normal((1, 4, 8, 8)).astype(np.float32),
        "timestep": np.array([519.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((1, 77, 32)).astype(np.float32),
        "timestep_cond": rng.standard_normal((1, 512)).astype(np.float32),
    }


def _write(program, path: Path) -> None:
    store = WeightStore(path.with_suffix(".weights"))
    try:
        write_program(program, path, store)
    finally:
        store.close()


def _run(path: Path, feeds) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_retargeted_trace_equals_a_fresh_trace(tiny_graphs, tmp_path):
    fwd, rev = tiny_graphs["unet_forward"], tiny_graphs["unet_reverse"]
    assert _reuse_plan(tiny_graphs) == {"unet_reverse": "unet_forward"}
    feeds = _feeds()
    args = tuple(torch.from_numpy(feeds[n]) for n in INPUTS)
    traced = trace_graph(fwd, args, INPUTS, ["eps"], "unet_forward", 18)
    template = Template.of(traced, fwd)
    _write(retarget(template, fwd), tmp_path / "fwd.onnx")  # as the exporter does
    _write(retarget(template, rev), tmp_path / "rev_reused.onnx")
    _write(trace_graph(rev, args, INPUTS, ["eps"], "unet_reverse", 18), tmp_path / "rev_fresh.onnx")

    import onnx

    ops = {
        p: [n.op_type for n in onnx.load(str(tmp_path / p), load_external_data=False).graph.node]
        for p in ("fwd.onnx", "rev_reused.onnx", "rev_fresh.onnx")
    }
    assert ops["rev_reused.onnx"] == ops["rev_fresh.onnx"]
    # the forward and the reused reverse graph differ in weight values only: same nodes, same names
    graphs = {p: onnx.load(str(tmp_path / p), load_external_data=False).graph for p in ("fwd.onnx", "rev_reused.onnx")}
    nodes = {p: [(n.op_type, list(n.input), list(n.output)) for n in g.node] for p, g in graphs.items()}
    assert nodes["fwd.onnx"] == nodes["rev_reused.onnx"]
    assert [t.name for t in graphs["fwd.onnx"].initializer] == [t.name for t in graphs["rev_reused.onnx"].initializer]
    reused, fresh, forward = (_run(tmp_path / p, feeds) for p in ("rev_reused.onnx", "rev_fresh.onnx", "fwd.onnx"))
    np.testing.assert_allclose(reused, fresh, rtol=0, atol=1e-6)
    with torch.no_grad():
        ref = rev(*args).numpy()
    np.testing.assert_allclose(reused, ref, rtol=0, atol=1e-4)
    assert np.abs(forward - fresh).max() > 1e-3  # the two UNets really differ: the weights were swapped


def test_modules_that_trace_differently_do_not_match(tiny_graphs):
    from diffusers.models.attention_processor import AttnProcessor2_0

    fwd, rev = tiny_graphs["unet_forward"], tiny_graphs["unet_reverse"]
    assert same_structure(fwd, rev)
    assert not same_structure(fwd, tiny_graphs["unet_reverse_edit"])  # another wrapper (P2P controls)

    other = copy.deepcopy(rev)
    other.unet.set_attn_processor(AttnProcessor2_0())  # another attention code path
    assert not same_structure(fwd, other)

    other = copy.deepcopy(rev)
    other.unet.time_embedding.linear_1.weight.data = other.unet.time_embedding.linear_1.weight.data.half()
    assert not same_structure(fwd, other)  # a dtype differs

    other = copy.deepcopy(rev)
    other.unet.conv_in.padding = (0, 0)  # a plain attribute the trace bakes in
    assert not same_structure(fwd, other)

    feeds = _feeds()
    args = tuple(torch.from_numpy(feeds[n]) for n in INPUTS)
    template = Template.of(trace_graph(fwd, args, INPUTS, ["eps"], "unet_forward", 18), fwd)
    with pytest.raises(ExportError, match="structure differs"):
        retarget(template, other)


def test_weights_externalised_before_serialising_equal_the_proto_path(tmp_path):
    """write_program moves each tensor to the weight file from the IR model (no second copy of the
    weights in a proto): same bytes, offsets and graph as externalising the serialised proto."""
    import onnx

    torch.manual_seed(0)
    shared = torch.nn.Linear(64, 64)
    module = torch.nn.Sequential(shared, torch.nn.ReLU(), shared, torch.nn.Linear(64, 3)).eval()
    args = (torch.randn(2, 64),)
    program = trace_graph(module, args, ["x"], ["y"], "toy", 18)
    program.optimize()
    proto = program.model_proto
    old = WeightStore(tmp_path / "old.weights")
    old.externalize(proto)
    old.close()
    new = WeightStore(tmp_path / "new.weights")
    new.externalize_ir(program.model)
    new.close()
    assert (tmp_path / "old.weights").read_bytes() == (tmp_path / "new.weights").read_bytes()
    got = program.model_proto
    assert got.graph.SerializeToString() == proto.graph.SerializeToString().replace(b"old.weights", b"new.weights")
    external = [t for t in got.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and not any(t.raw_data for t in external)
    onnx.save_model(got, str(tmp_path / "toy.onnx"))
    ref = module(*args).detach().numpy()
    np.testing.assert_allclose(_run(tmp_path / "toy.onnx", {"x": args[0].numpy()}), ref, rtol=1e-5, atol=1e-6)
