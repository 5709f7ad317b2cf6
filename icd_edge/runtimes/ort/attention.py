"""Fused attention for ONNX Runtime's CPU provider, applied when a session is opened.

The bundle's graphs keep standard ONNX (TensorRT and Core ML read them): at opset 18 torch's
exporter writes ``scaled_dot_product_attention`` as MatMul → Softmax → MatMul, which makes ONNX
Runtime materialise every (heads × queries × keys) probability map: 1.07 GB per 64×64
self-attention layer for a batch-2 UNet at 512 px. ONNX Runtime's ``com.microsoft``
MultiHeadAttention runs the same math tiled on the CPU (flash attention, no maps): a batch-2
4096-token layer took 31 MB instead. One isolated layer ran 1.45× faster (2-core development CPU,
measured with an export running alongside); over a whole 512 px edit the difference stayed within
that machine's run-to-run variation, so the gain to count on is memory.

:func:`fuse_attention` rewrites the decomposed form, matched structurally, into that operator;
layers whose probabilities are edited in-graph (Prompt-to-Prompt) do not match and stay as they
are. Only graph structure is read: the weights stay in their external files.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"


def graph_index(graph) -> tuple[dict, dict]:
    """``(producer of each tensor, consumers of each tensor)`` of an ONNX graph's nodes."""
    prod = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return prod, consumers


def fuse_attention(model) -> int:
    """Rewrite every plain decomposed attention of ``model`` (an ``onnx.ModelProto``) in place
    into ``com.microsoft.MultiHeadAttention``; returns how many were rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    prod, consumers = graph_index(graph)
    consts = {t.name: t for t in graph.initializer if not t.external_data}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = n.attribute[0].t

    def const(name):
        t = consts.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def node(name, op, **attrs):
        n = prod.get(name)
        if n is None or n.op_type != op:
            return None
        for k, v in attrs.items():
            a = next((a for a in n.attribute if a.name == k), None)
            if a is None or list(helper.get_attribute_value(a)) != v:
                return None
        return n

    def heads_in(name):
        """``Transpose[0,2,1,3](Reshape(x3, [B, L, N, D]))`` → (x3, N, D)."""
        t = node(name, "Transpose", perm=[0, 2, 1, 3])
        r = t and node(t.input[0], "Reshape")
        shape = const(r.input[1]) if r is not None else None
        if shape is None or shape.shape != (4,) or shape[2] <= 0 or shape[3] <= 0:
            return None
        return r.input[0], int(shape[2]), int(shape[3])

    def keys_t(name):
        """Kᵀ as (B, N, D, L) from the keys' head split: the exporter's Reshape/Transpose chain."""
        t = node(name, "Transpose", perm=[0, 1, 3, 2])
        if t is not None:
            return heads_in(t.input[0])
        r1 = node(name, "Reshape")
        t1 = r1 and node(r1.input[0], "Transpose", perm=[0, 2, 1])
        r0 = t1 and node(t1.input[0], "Reshape")
        return heads_in(r0.input[0]) if r0 is not None else None

    def scale_of(mul):
        """(tensor, scalar) of ``Mul(tensor, scalar)``."""
        for a, b in ((0, 1), (1, 0)):
            c = const(mul.input[b])
            if c is not None and c.size == 1:
                return mul.input[a], float(c.reshape(()))
        return None

    fused = 0
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    for pv in [n for n in graph.node if n.op_type == "MatMul"]:
        sm = node(pv.input[0], "Softmax")
        if sm is None or next((a.i for a in sm.attribute if a.name == "axis"), -1 if opset >= 13 else 1) != -1:
            continue
        if len(consumers.get(sm.output[0], [])) != 1:
            continue  # the probabilities are used elsewhere (P2P blend maps)
        qk = node(sm.input[0], "MatMul")
        v = heads_in(pv.input[1])
        if qk is None or v is None:
            continue
        scale = 1.0
        q_side, k_side = qk.input
        parts = []
        for side in (q_side, k_side):
            mul = node(side, "Mul")
            found = mul is not None and scale_of(mul)
            if found:
                side, s = found
                scale *= s
            parts.append(side)
        q, k = heads_in(parts[0]), keys_t(parts[1])
        if q is None or k is None or not (q[1] == k[1] == v[1] and q[2] == k[2] == v[2]):
            continue
        heads, dim = q[1], q[2]
        out = pv.output[0]
        base = f"icd_mha_{fused}"
        new = [
            helper.make_node(
                "MultiHeadAttention",
                [q[0], k[0], v[0]],
                [f"{base}_bsh"],
                name=base,
                domain=MS_DOMAIN,
                num_heads=heads,
                scale=scale,
            ),
            # back to (B, N, L, D) for the graph's own head merge (ORT cancels the transpose pair)
            helper.make_node("Reshape", [f"{base}_bsh", f"{base}_shape"], [f"{base}_bsnd"], name=f"{base}_reshape"),
            helper.make_node("Transpose", [f"{base}_bsnd"], [out], name=f"{base}_transpose", perm=[0, 2, 1, 3]),
        ]
        graph.initializer.append(numpy_helper.from_array(np.array([0, 0, heads, dim], np.int64), f"{base}_shape"))
        pos = list(graph.node).index(pv)
        graph.node.remove(pv)
        for j, n in enumerate(new):
            graph.node.insert(pos + j, n)
        fused += 1
    if fused:
        _drop_dead_nodes(graph)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return fused


def fused_source(path, so) -> tuple[str | bytes, int]:
    """What to hand ``onnxruntime.InferenceSession`` for the graph file ``path``: its bytes with
    plain attention fused (``so`` learns where the weight files are), or the path itself when
    nothing matched; and how many layers were fused."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    fused = fuse_attention(proto)
    if not fused:
        return str(path), 0
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent.resolve()))
    return proto.SerializeToString(), fused


def _drop_dead_nodes(graph) -> None:
    """Remove nodes none of whose outputs is used (the replaced attention internals), then the
    initializers only they read (scales, shapes) and the annotations of the tensors they made."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    read = {i for n in graph.node for i in n.input} | outputs
    for t in [t for t in graph.initializer if t.name not in read]:
        graph.initializer.remove(t)
    made = {o for n in graph.node for o in n.output}
    stale = [vi for vi in graph.value_info if vi.name not in made]
    for vi in stale:
        graph.value_info.remove(vi)
