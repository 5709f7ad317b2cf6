"""onnxruntime backend: provider choice (incl. CUDA / CoreML, which CI cannot run) and IO binding."""

import numpy as np

from icd_edge.edit.editor import Editor
from icd_edge.runtimes.ort import OrtBackend, OrtSession, choose_providers


def test_provider_choice():
    cpu = ["CPUExecutionProvider"]
    assert choose_providers(cpu, "Linux") == cpu
    assert choose_providers(
        ["CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"], "Linux"
    ) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["CoreMLExecutionProvider", "CPUExecutionProvider"], "Darwin") == [
        "CoreMLExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert choose_providers(["CoreMLExecutionProvider", "CPUExecutionProvider"], "Linux") == cpu


def test_io_binding_equals_plain_run(tiny_bundle, photo):
    """The IO-binding path (used on CUDA) runs here on the CPU provider and gives identical images."""
    images = []
    for binding in (False, True):
        with Editor.open(tiny_bundle, backend="onnxruntime", io_binding=binding) as ed:
            inv = ed.invert(photo, "a photo of a cat", seed=2)
            images.append(ed.edit(inv, "a photo of a dog", blend=("cat", "dog"), output_type="np"))
            sess = ed.session("unet_reverse_edit")
            assert isinstance(sess, OrtSession) and sess.io_binding == binding
    np.testing.assert_array_equal(images[0], images[1])


def test_binding_defaults_on_only_for_cuda(tiny_bundle):
    from icd_edge.bundle.store import open_bundle

    sess = OrtBackend().open_session(open_bundle(tiny_bundle), "text_encoder")
    assert sess.providers[0] == "CPUExecutionProvider" and not sess.io_binding


def _softmaxes(bundle, graph):
    import onnx

    return sum(
        n.op_type == "Softmax"
        for n in onnx.load(str(bundle / "onnx" / f"{graph}.onnx"), load_external_data=False).graph.node
    )


def test_attention_fused_for_the_cpu_provider(tiny_bundle, photo):
    """On the CPU provider plain attention runs as com.microsoft MultiHeadAttention (no probability
    maps); P2P-edited layers and the text encoder's masked attention keep their explicit form;
    the images equal the explicit graphs' to float rounding."""
    from icd_edge.export.parity import psnr_db

    images, counts = [], []
    for fuse in (False, True):
        # the batch-2 edit graph (source_cache off); the re-edit graphs are checked below
        with Editor.open(tiny_bundle, backend="onnxruntime", fuse_attention=fuse, source_cache="off") as ed:
            inv = ed.invert(photo, "a photo of a cat", seed=2)
            images.append(ed.edit(inv, "a photo of a dog", blend=("cat", "dog"), output_type="np"))
            ed.reconstruct(inv)
            counts.append({g: ed.session(g).fused_attention for g in ed.loaded_graphs()})
    assert all(v == 0 for v in counts[0].values())
    fused = counts[1]
    # every attention layer of the plain UNets (8 in the tiny model), none of the masked text encoder's
    assert fused["unet_forward"] == fused["unet_reverse"] == _softmaxes(tiny_bundle, "unet_forward") > 0
    assert fused["text_encoder"] == 0 and _softmaxes(tiny_bundle, "text_encoder") > 0
    # the edit UNet: its top-resolution self-attention (more keys than P2P injects into) is fused,
    # the P2P-edited layers are not
    assert 0 < fused["unet_reverse_edit"] < _softmaxes(tiny_bundle, "unet_reverse_edit")
    assert fused["vae_decoder"] == _softmaxes(tiny_bundle, "vae_decoder")
    assert psnr_db(images[0], images[1], peak=1.0) > 60
    with Editor.open(tiny_bundle, backend="onnxruntime", fuse_attention=True) as ed:
        ed.edit(ed.invert(photo, "a photo of a cat", seed=2), "a photo of a dog", blend=("cat", "dog"))
        for g in ("unet_reverse_source", "unet_reverse_target"):  # plain and fused-P2P attentions fuse too
            assert 0 < ed.session(g).fused_attention <= _softmaxes(tiny_bundle, g), g


def test_fuse_attention_matches_only_plain_attention():
    """A decomposed attention (exporter's opset-18 form) becomes one MultiHeadAttention with the
    same output; the same graph whose probabilities are also used elsewhere is left alone."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from icd_edge.runtimes.ort.attention import fuse_attention

    B, L, N, D = 2, 24, 4, 8

    def graph(extra_use: bool):
        c = numpy_helper.from_array(np.array([D**-0.25], np.float32), "c")
        split = numpy_helper.from_array(np.array([B, L, N, D], np.int64), "split")
        k3d = numpy_helper.from_array(np.array([-1, L, D], np.int64), "k3d")
        kt4 = numpy_helper.from_array(np.array([B, N, D, L], np.int64), "kt4")
        merge = numpy_helper.from_array(np.array([B, L, N * D], np.int64), "merge")
        nodes = [helper.make_node("Reshape", [x, "split"], [f"{x}4"]) for x in "qkv"]
        nodes += [helper.make_node("Transpose", [f"{x}4"], [f"{x}h"], perm=[0, 2, 1, 3]) for x in "qkv"]
        nodes += [
            helper.make_node("Reshape", ["kh", "k3d"], ["k3"]),
            helper.make_node("Transpose", ["k3"], ["k3t"], perm=[0, 2, 1]),
            helper.make_node("Reshape", ["k3t", "kt4"], ["kt"]),
            helper.make_node("Mul", ["qh", "c"], ["qs"]),
            helper.make_node("Mul", ["kt", "c"], ["ks"]),
            helper.make_node("MatMul", ["qs", "ks"], ["s"]),
            helper.make_node("Softmax", ["s"], ["p"], axis=-1),
            helper.make_node("MatMul", ["p", "vh"], ["o4"]),
            helper.make_node("Transpose", ["o4"], ["o4t"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", ["o4t", "merge"], ["y"]),
        ]
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, L, N * D])]
        if extra_use:
            nodes.append(helper.make_node("Identity", ["p"], ["pm"]))
            outputs.append(helper.make_tensor_value_info("pm", TensorProto.FLOAT, None))
        g = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info(x, TensorProto.FLOAT, [B, L, N * D]) for x in "qkv"],
            outputs,
            [c, split, k3d, kt4, merge],
        )
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])

    rng = np.random.default_rng(0)
    feeds = {x: rng.standard_normal((B, L, N * D)).astype(np.float32) for x in "qkv"}
    plain = graph(False)
    want = ort.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], feeds)[0]
    assert fuse_attention(plain) == 1
    onnx.checker.check_model(plain)
    ops = [n.op_type for n in plain.graph.node]
    assert "MultiHeadAttention" in ops and "Softmax" not in ops
    got = ort.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], feeds)[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert fuse_attention(graph(True)) == 0
