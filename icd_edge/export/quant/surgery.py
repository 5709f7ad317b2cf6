"""Pure ONNX graph edits and queries on the int8 path (numpy and onnx only, no ONNX Runtime):
embedding tables and Gemm weights stored as int8 behind a dequantisation, and the attention
MatMuls the static quantiser must leave float."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx


def quantize_embeddings(model: onnx.ModelProto, min_rows: int = 256) -> list[str]:
    """Embedding tables (a Gather over a float or float16 initializer of at least ``min_rows``
    rows: the CLIP token embedding, 49408 x 768, 152 MB in fp32, 76 MB in fp16) stored as int8 rows
    with one scale per row (in the table's float type): ``Gather(table) -> Gather(q) * Gather(scale)``.
    The quantiser leaves Gather alone (its QDQ form would quantise the table per tensor as an
    activation). Returns the tables rewritten."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    done = []
    for node in list(graph.node):
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if (
            table is None
            or axis != 0
            or table.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16)
            or len(table.dims) != 2
            or table.dims[0] < min_rows
            or uses[table.name] != 1
        ):
            continue
        values = numpy_helper.to_array(table)
        q, scale = _symmetric_int8(values.astype(np.float32), axis=0)
        scale = scale[:, None].astype(values.dtype)  # one per row, broadcast over the gathered rows
        name, ids, out, dtype = table.name, node.input[1], node.output[0], table.data_type
        graph.initializer.remove(table)
        graph.initializer.extend(
            [numpy_helper.from_array(q, f"{name}_int8"), numpy_helper.from_array(scale, f"{name}_row_scale")]
        )
        pos = list(graph.node).index(node)
        graph.node.remove(node)
        for j, new in enumerate(
            [
                helper.make_node("Gather", [f"{name}_int8", ids], [f"{out}_q"], name=f"{node.name}_int8", axis=0),
                helper.make_node("Cast", [f"{out}_q"], [f"{out}_f"], name=f"{node.name}_cast", to=dtype),
                helper.make_node("Gather", [f"{name}_row_scale", ids], [f"{out}_s"], name=f"{node.name}_scale", axis=0),
                helper.make_node("Mul", [f"{out}_f", f"{out}_s"], [out], name=f"{node.name}_dequant"),
            ]
        ):
            graph.node.insert(pos + j, new)
        done.append(name)
    return done


def _symmetric_int8(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """A 2-D ``w`` as int8 in [-127, 127] with one float32 scale per index of ``axis``."""
    scale = (np.abs(w).max(axis=1 - axis) / np.float32(127)).astype(np.float32)
    scale[scale == 0] = 1
    q = np.clip(np.rint(w / np.expand_dims(scale, 1 - axis)), -127, 127).astype(np.int8)
    return q, scale


def quantize_gemm_weights(model: onnx.ModelProto, min_elements: int = 4096) -> list[str]:
    """Weight-only int8 for the float weights of Gemm nodes (at least ``min_elements``): the static
    quantiser's operator list (Conv, MatMul) leaves them float, and in the UNet they are the time
    embedding's linear layers (1280x1280 per ResNet, 114 MB in fp32; one row of activations, so
    their speed does not matter). Per output channel, symmetric: ``DequantizeLinear(int8, scale)``
    feeds the Gemm. Returns the weights rewritten."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    done = []
    for name, t in list(inits.items()):
        nodes = users.get(name, [])
        if (
            t.data_type != TensorProto.FLOAT
            or len(t.dims) != 2
            or int(np.prod(t.dims)) < min_elements
            or not nodes
            or any(n.op_type != "Gemm" or list(n.input).index(name) != 1 for n in nodes)
        ):
            continue
        trans = {next((a.i for a in n.attribute if a.name == "transB"), 0) for n in nodes}
        if len(trans) != 1:
            continue
        axis = 0 if trans.pop() else 1  # the output-channel axis of B
        q, scale = _symmetric_int8(numpy_helper.to_array(t), axis)
        graph.initializer.remove(t)
        graph.initializer.extend(
            [numpy_helper.from_array(q, f"{name}_int8"), numpy_helper.from_array(scale, f"{name}_scale")]
        )
        first = min(list(graph.node).index(n) for n in nodes)
        graph.node.insert(
            first,
            helper.make_node(
                "DequantizeLinear", [f"{name}_int8", f"{name}_scale"], [name], name=f"{name}_weight_dq", axis=axis
            ),
        )
        done.append(name)
    return done


def activation_matmuls(path: Path) -> list[str]:
    """MatMul nodes with no weight input: attention's Q·Kᵀ and P·V. They stay float. Quantised,
    ONNX Runtime runs them as QLinearMatMul and fuses the Softmax between them into QLinearSoftmax;
    in the 512 px int8 forward UNet those two took 39 % + ~25 % of the time and made it slower than
    fp32 (benchmarks/profile_ort.py). Calibrating them also kept every attention map of a run as a
    calibrator output (gigabytes at 512 px)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    weights |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in graph.node if n.op_type == "MatMul" and not any(i in weights for i in n.input)]
