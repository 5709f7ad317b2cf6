"""onnxruntime's CUDA provider, tuned for the iCD graphs.

What a CUDA session gets that a plain one does not (see docs/gpu.md for the measurements):

* **ONNX Runtime's Stable Diffusion fusions** (``onnxruntime.transformers``: MultiHeadAttention,
  NHWC GroupNorm / SkipGroupNorm, BiasSplitGelu, BiasAdd, NhwcConv), applied once per graph on
  the machine that runs it and cached under ``$ICD_EDGE_CACHE/ort-cuda``. They produce
  ``com.microsoft`` operators that only the CUDA provider runs, so the bundle keeps its standard
  ONNX graphs and the fused copies live in the cache, keyed by the graph's sha256, the
  onnxruntime version and :data:`OPTIMIZER_VERSION`.
* **Fixed device buffers** for every input and output (IO binding), so that
* **CUDA graph capture** (``enable_cuda_graph``) can replay the whole graph in one launch.
* cuDNN's heuristic convolution algorithm choice (as fast as the exhaustive search on these
  graphs, 2 s less to the first edit) and its largest workspace.

The step arithmetic stays on the host (numpy): one step moves ~0.5 MB across PCIe, a few tens
of microseconds against milliseconds of UNet (``bench_gpu.py --phase ort`` records it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from icd_edge.cache import material_key as entry_key
from icd_edge.errors import BundleError

logger = logging.getLogger(__name__)

OPTIMIZER_VERSION = 3  # bump when what optimize_graph writes changes: old cache entries go stale
CACHE_KIND = "ort-cuda"
# ONNX Runtime's optimizer model type per graph (its fusions differ between UNet, VAE and CLIP)
MODEL_TYPES = {
    "text_encoder": "clip",
    "text_encoder_2": "clip",
    "vae_encoder": "vae",
    "vae_decoder": "vae",
    "taesd_decoder": "vae",
    "taesd_encoder": "vae",
}
PROVIDER = "CUDAExecutionProvider"
# failures that mean "these nodes cannot be captured", not "this graph is broken"
_GRAPH_UNSUPPORTED = re.compile(r"cuda ?graph|CUDA Graph|partitioned|capture", re.IGNORECASE)
_MISSING_LIB = re.compile(r"(lib[\w.+-]+?\.so(?:\.[\d.]+)?)\s*:\s*cannot open shared object file")


def graph_unsupported(message: str) -> bool:
    """Whether onnxruntime's error says the graph cannot be captured (run it without capture)."""
    return bool(_GRAPH_UNSUPPORTED.search(message))


def model_type(graph: str) -> str:
    """The optimizer's model type of one of our graphs (every UNet variant is ``unet``)."""
    return MODEL_TYPES.get(graph, "unet")


CONV_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")


def provider_options(device_id: int, conv_algo_search: str, cuda_graph: bool, extra=()) -> dict[str, str]:
    """The CUDA provider's options for one session; ``extra`` (pairs or a mapping) adds or
    overrides any of onnxruntime's CUDA provider options, e.g. ``{"prefer_nhwc": "1"}``."""
    if conv_algo_search not in CONV_ALGO_SEARCH:
        from icd_edge.errors import InputError

        raise InputError(
            f"cudnn_conv_algo_search must be one of {', '.join(CONV_ALGO_SEARCH)}, not {conv_algo_search!r}",
            param="cudnn_conv_algo_search",
        )
    return {
        "device_id": str(device_id),
        # EXHAUSTIVE times every cuDNN algorithm once per convolution shape (first run only);
        # HEURISTIC asks cuDNN's heuristics: the same speed here, a quicker first edit
        "cudnn_conv_algo_search": conv_algo_search,
        "cudnn_conv_use_max_workspace": "1",
        "do_copy_in_default_stream": "1",
        "enable_cuda_graph": "1" if cuda_graph else "0",
        **{str(k): str(v) for k, v in (extra.items() if hasattr(extra, "items") else extra)},
    }


# ---------------------------------------------------------------------------- the fused graphs
def key_material(graph: str, digests: dict[str, str], ort_version: str, fusions: str = "all") -> dict:
    """Everything a fused graph depends on: equal material <=> the cached file may be reused."""
    return {
        "schema": 1,
        "graph": graph,
        "sources": dict(sorted(digests.items())),
        "onnxruntime": ort_version,
        "optimizer": OPTIMIZER_VERSION,
        "model_type": model_type(graph),
        "fusions": fusions,
    }


def source_digests(bundle, graph: str) -> dict[str, str]:
    """sha256 of the graph's ONNX file, and the bundle's id (which covers the weight files the
    graph may share with others), from the bundle's file table."""
    art = bundle.artifact(graph, "onnx")
    files = bundle.manifest.files
    if art is None or art.file not in files:
        raise BundleError(f"the file table of {bundle.root} does not list the ONNX graph of {graph}; re-export it")
    return {art.file: files[art.file].sha256, "bundle_id": bundle.bundle_id}


FUSIONS = ("all", "attention", "none")


def optimize_graph(src: Path, graph: str, dst: Path, fusions: str = "all") -> dict[str, int]:
    """Write ``src`` fused for the CUDA provider to ``dst`` (weights in ``dst``'s external data
    file); returns the fused operator counts.

    ``attention``: plain attention as ``com.microsoft.MultiHeadAttention`` (flash attention on
    the GPU; :mod:`icd_edge.runtimes.ort.attention`, which also matches the fused-P2P layers).
    ``all``: that, then ONNX Runtime's Stable Diffusion fusions, after rewriting the GroupNorm
    pattern into the form those fusions match (our graphs have constant shapes)."""
    import onnx

    from icd_edge.runtimes.ort.attention import fuse_attention

    proto = onnx.load(str(src), load_external_data=True)
    stats = {"MultiHeadAttention": fuse_attention(proto)}
    if fusions == "all":
        stats["GroupNormPattern"] = canonical_group_norms(proto)
        stats["BiasSplitGelu"] = bias_split_gelus(proto)
        stats["MergedRowProjections"] = merge_row_projections(proto)
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        kind = model_type(graph)
        options = FusionOptions(kind)
        options.enable_attention = False  # done above: the optimizer's patterns miss ours
        if _too_big_to_serialise(proto):  # onnx's shape inference serialises the model: under 2 GB only
            options.enable_shape_inference = False
        with _quiet_optimizer():
            m = optimize_model(
                proto,
                model_type=kind,
                num_heads=0,  # read off the graph
                hidden_size=0,
                opt_level=0,  # the fusions only; the session applies ORT's own passes at load
                optimization_options=options,
                use_gpu=True,
            )
        stats.update({k: int(v) for k, v in (m.get_fused_operator_statistics() or {}).items() if v})
        proto = m.model
        stats["UnfusedGroupNormCasts"] = fix_fp32_params(proto)
        stats["ConvBiasesInGroupNorm"] = conv_biases_into_group_norms(proto)
    stats = {k: v for k, v in stats.items() if v}
    onnx.save_model(
        proto, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=dst.name + ".data"
    )
    return stats


def _too_big_to_serialise(proto) -> bool:
    """Over protobuf's 2 GB limit (an fp32 UNet with its weights loaded); some protobuf builds
    raise from ``ByteSize`` itself on such a message rather than return the size."""
    try:
        return proto.ByteSize() >= 2**31 - 1
    except Exception:
        return True


# the hidden sizes ONNX Runtime's CUDA BiasSplitGelu kernel is built for (it rejects others at run)
SPLIT_GELU_SIZES = (2560, 5120, 10240)


def bias_split_gelus(model) -> int:
    """Rewrite each GEGLU of the feed-forward layers, as torch exports ``h, g = (x·W + b).chunk(2)``
    ``→ h · gelu(g)`` (erf form: ``Add → Split → g·0.5·(1 + erf(g/√2))`` in any association), into
    ``com.microsoft.BiasSplitGelu(x·W, b)``: one kernel instead of eight. ONNX Runtime's own
    fusion looks for Slice nodes and a Gelu node, which this export does not have. Only 3-D
    inputs whose last size the CUDA kernel supports are rewritten. Returns how many were."""
    from onnx import helper, numpy_helper

    from icd_edge.runtimes.ort.attention import MS_DOMAIN, graph_index

    graph = model.graph
    prod, consumers = graph_index(graph)
    inits = {t.name: t for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            inits[n.output[0]] = n.attribute[0].t
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in list(graph.value_info) + list(graph.input)}

    def rank(name, depth=0):
        """The tensor's rank from value_info, else through a MatMul by a 2-D weight."""
        if name in ranks or depth > 4:
            return ranks.get(name)
        p = prod.get(name)
        if p is not None and p.op_type == "MatMul" and p.input[1] in inits and len(inits[p.input[1]].dims) == 2:
            return rank(p.input[0], depth + 1)
        return None

    def scalar(name):
        t = inits.get(name)
        if t is None or t.external_data or len(t.dims) > 1 or (t.dims and t.dims[0] != 1):
            return None
        return float(numpy_helper.to_array(t).reshape(-1)[0])

    def const_operand(node):
        """(the other input, the scalar) of a binary node with one scalar constant input."""
        a, b = node.input
        if scalar(b) is not None:
            return a, scalar(b)
        if scalar(a) is not None and node.op_type != "Div":
            return b, scalar(a)
        return None, None

    def only_consumer(name, node) -> bool:
        return [id(c) for c in consumers.get(name, [])] == [id(node)] and name not in outputs

    def gelu_of(g: str, out: str) -> list | None:
        """The five nodes computing ``out = gelu(g)`` (erf form), or None."""
        top = prod.get(out)
        if top is None or top.op_type != "Mul":
            return None
        nodes, pending = [top], [top]
        while pending:  # everything between g and out, each intermediate read once, inside
            n = pending.pop()
            for inp in n.input:
                if inp == g or scalar(inp) is not None:
                    continue
                p = prod.get(inp)
                if p is None or p.op_type not in ("Mul", "Add", "Erf", "Div") or not only_consumer(inp, n):
                    return None
                nodes.append(p)
                pending.append(p)
                if len(nodes) > 5:
                    return None
        if sorted(n.op_type for n in nodes) != ["Add", "Div", "Erf", "Mul", "Mul"]:
            return None
        div, add, erf = (next(n for n in nodes if n.op_type == op) for op in ("Div", "Add", "Erf"))
        x, k = const_operand(div)
        y, one = const_operand(add)
        halves = [const_operand(n)[1] for n in nodes if n.op_type == "Mul"]
        ok = (
            x == g
            and k is not None
            and abs(k - 2**0.5) < 1e-3
            and erf.input[0] == div.output[0]
            and y == erf.output[0]
            and one is not None
            and abs(one - 1.0) < 1e-3
            # one Mul scales by 0.5, the other multiplies by g: u = 1 + erf, then g·u·0.5 any order
            and sorted(v for v in halves if v is not None) == [0.5]
            and sum(g in n.input for n in nodes if n.op_type == "Mul") == 1
        )
        return nodes if ok else None

    outputs = {o.name for o in graph.output}
    done = 0
    for split in [n for n in graph.node if n.op_type == "Split" and len(n.output) == 2]:
        add = prod.get(split.input[0])
        axis = next((helper.get_attribute_value(a) for a in split.attribute if a.name == "axis"), 0)
        if add is None or add.op_type != "Add" or not only_consumer(add.output[0], split):
            continue
        bias_i = next((i for i, name in enumerate(add.input) if name in inits and len(inits[name].dims) == 1), None)
        if bias_i is None:
            continue
        x, bias = add.input[1 - bias_i], add.input[bias_i]
        size = inits[bias].dims[0]
        if size not in SPLIT_GELU_SIZES or rank(x) != 3 or axis not in (-1, 2):
            continue
        if len(split.input) > 1 and split.input[1]:
            halves = inits.get(split.input[1])
            if halves is None or numpy_helper.to_array(halves).tolist() != [size // 2, size // 2]:
                continue
        h, g = split.output
        muls = [c for c in consumers.get(h, []) if c.op_type == "Mul"]
        if len(muls) != 1 or len(consumers.get(h, [])) != 1 or h in outputs or g in outputs:
            continue
        final = muls[0]
        other = final.input[1] if final.input[0] == h else final.input[0]
        gelu = gelu_of(g, other)
        if gelu is None or any(id(c) not in {id(n) for n in gelu} for c in consumers.get(g, [])):
            continue
        name = f"icd_bias_split_gelu_{done}"
        fused = helper.make_node("BiasSplitGelu", [x, bias], [final.output[0]], name=name, domain=MS_DOMAIN)
        pos = list(graph.node).index(final)
        graph.node.insert(pos, fused)
        for n in [add, split, final, *gelu]:
            graph.node.remove(n)
        done += 1
    if done and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return done


def merge_row_projections(model) -> int:
    """``Concat₀(x₁·W + b, x₂·W + b, …)`` → ``Concat₀(x₁, x₂, …)·W + b``: the Prompt-to-Prompt
    layers of the edit graph compute each row's attention on its own and project each with the
    same output layer; one projection of the stacked rows is one GEMM instead of several, and its
    bias joins the SkipLayerNormalization that follows (ONNX Runtime's fusion matches that form).
    The same numbers: a matrix product acts on each row separately. Returns how many merged."""
    from onnx import helper

    from icd_edge.runtimes.ort.attention import graph_index

    graph = model.graph
    prod, consumers = graph_index(graph)
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    done = 0
    for cat in [n for n in graph.node if n.op_type == "Concat" and len(n.input) > 1]:
        axis = next((helper.get_attribute_value(a) for a in cat.attribute if a.name == "axis"), None)
        if axis != 0:
            continue
        pairs = []
        for name in cat.input:
            add = prod.get(name)
            mm = prod.get(add.input[0]) if add is not None and add.op_type == "Add" else None
            if mm is None or mm.op_type != "MatMul" or add.input[1] not in inits:
                break
            if any(len(consumers.get(t, [])) != 1 or t in outputs for t in (name, mm.output[0])):
                break
            pairs.append((mm, add))
        if len(pairs) != len(cat.input):
            continue
        weights = {mm.input[1] for mm, _ in pairs}
        biases = {add.input[1] for _, add in pairs}
        if len(weights) != 1 or len(biases) != 1 or len(inits[next(iter(biases))].dims) != 1:
            continue
        name = f"icd_rows_{done}"
        new = [
            helper.make_node("Concat", [mm.input[0] for mm, _ in pairs], [name + "_in"], name=name + "_cat", axis=0),
            helper.make_node("MatMul", [name + "_in", weights.pop()], [name + "_mm"], name=name + "_mm"),
            helper.make_node("Add", [name + "_mm", biases.pop()], [cat.output[0]], name=name + "_bias"),
        ]
        pos = list(graph.node).index(cat)
        for k, n in enumerate(new):
            graph.node.insert(pos + k, n)
        for n in [cat, *(x for pair in pairs for x in pair)]:
            graph.node.remove(n)
        done += 1
    return done


def canonical_group_norms(model) -> int:
    """Give each GroupNorm pattern ``Reshape(x, [B, G, -1]) → InstanceNormalization →
    Reshape(·, const) → Mul → Add`` the ``Shape(x)`` second reshape that ONNX Runtime's GroupNorm
    fusion looks for (torch's constant-folded export writes the 4-D shape as a constant); the
    result is the same tensor. Returns how many were rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    from icd_edge.runtimes.ort.attention import graph_index

    graph = model.graph
    prod, consumers = graph_index(graph)
    consts = {t.name: t for t in graph.initializer}
    shapes = {}
    for vi in list(graph.value_info) + list(graph.input):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    done = 0
    for norm in [n for n in graph.node if n.op_type == "InstanceNormalization"]:
        first = prod.get(norm.input[0])
        after = consumers.get(norm.output[0], [])
        if first is None or first.op_type != "Reshape" or len(after) != 1 or after[0].op_type != "Reshape":
            continue
        second = after[0]
        shape_name = second.input[1]
        if shape_name not in consts or (shape_name in prod and prod[shape_name].op_type == "Shape"):
            continue
        target = numpy_helper.to_array(consts[shape_name]).tolist()
        root = first.input[0]
        known = shapes.get(root)
        if len(target) != 4 or min(target) <= 0 or (known and None not in known and known != target):
            continue
        mul = consumers.get(second.output[0], [])
        add = consumers.get(mul[0].output[0], []) if len(mul) == 1 and mul[0].op_type == "Mul" else []
        if len(add) != 1 or add[0].op_type != "Add":
            continue
        name = f"icd_gn_shape_{done}"
        pos = list(graph.node).index(second)
        graph.node.insert(pos, helper.make_node("Shape", [root], [name], name=name))
        second.input[1] = name
        # the fusion writes gamma/beta as float32 from the constants' values: hand it float32
        # copies (fp16 graphs); fix_fp32_params puts a Cast back where a pattern stayed unfused
        for node in (mul[0], add[0]):
            for j, inp in enumerate(node.input):
                t = consts.get(inp)
                if t is not None and t.data_type == onnx.TensorProto.FLOAT16:
                    copy = numpy_helper.from_array(numpy_helper.to_array(t).astype("float32"), inp + FP32_SUFFIX)
                    graph.initializer.append(copy)
                    consts[copy.name] = copy
                    node.input[j] = copy.name
        done += 1
    return done


FP32_SUFFIX = "_icd_fp32"


def fix_fp32_params(model) -> int:
    """Cast the float32 parameter copies of :func:`canonical_group_norms` back to float16 for any
    node other than a fused GroupNorm that still reads one; returns how many casts were added."""
    import onnx
    from onnx import helper

    graph = model.graph
    fused = ("GroupNorm", "SkipGroupNorm")
    casts: dict[str, str] = {}
    for node in list(graph.node):
        if node.op_type in fused:
            continue
        for j, inp in enumerate(node.input):
            if inp.endswith(FP32_SUFFIX):
                if inp not in casts:
                    casts[inp] = inp + "_fp16"
                    graph.node.insert(
                        0, helper.make_node("Cast", [inp], [casts[inp]], name=casts[inp], to=onnx.TensorProto.FLOAT16)
                    )
                node.input[j] = casts[inp]
    return len(casts)


def conv_biases_into_group_norms(model) -> int:
    """Drop the bias of each ``NhwcConv`` whose one consumer is a ``SkipGroupNorm`` (as its input
    or its skip) and give it to that node's own bias input instead: ``SkipGroupNorm`` adds
    ``x + skip + bias`` in the kernel that normalises, so the conv's separate bias-add kernel (one
    per conv, about 8 µs each on the 512 px UNet) goes. Its sum output ``S`` is the same tensor.
    Two convs feeding one node (a resnet's conv2 and its 1×1 shortcut) give the sum of their
    biases. Returns how many conv biases moved."""
    import numpy as np
    from onnx import numpy_helper

    from icd_edge.runtimes.ort.attention import graph_index

    graph = model.graph
    prod, consumers = graph_index(graph)
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    moved = 0
    for norm in [n for n in graph.node if n.op_type == "SkipGroupNorm"]:
        if len(norm.input) < 4 or not norm.input[3] or (len(norm.input) > 4 and norm.input[4]):
            continue
        convs = []
        for slot in (0, 3):
            conv = prod.get(norm.input[slot])
            if conv is None or conv.op_type != "NhwcConv" or len(conv.input) < 3 or conv.input[2] not in inits:
                continue
            if len(consumers.get(conv.output[0], [])) != 1 or conv.output[0] in outputs:
                continue
            if norm.input[0] == norm.input[3] or len(inits[conv.input[2]].dims) != 1:
                continue
            convs.append(conv)
        if not convs:
            continue
        values = [numpy_helper.to_array(inits[c.input[2]]) for c in convs]
        total = np.sum([v.astype(np.float32) for v in values], axis=0).astype(values[0].dtype)
        name = f"{norm.name or norm.output[0]}_icd_conv_bias"
        graph.initializer.append(numpy_helper.from_array(total, name))
        while len(norm.input) < 5:
            norm.input.append("")
        norm.input[4] = name
        for conv in convs:
            del conv.input[2]
        moved += len(convs)
    if moved:  # drop the conv biases no node reads any more
        used = {i for n in graph.node for i in n.input}
        for t in [t for t in graph.initializer if t.name not in used]:
            graph.initializer.remove(t)
    return moved


@contextlib.contextmanager
def _quiet_optimizer():
    """The optimizer logs every fusion at INFO level and draws its own progress bar on stderr:
    keep its loggers at WARNING and its bar out of the user's terminal (logged at debug level)."""
    import io

    names = ("onnxruntime.transformers", "fusion_base", "onnx_model", "optimizer")
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    text = io.StringIO()
    try:
        with contextlib.redirect_stderr(text):
            yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)
        if text.getvalue().strip():
            logger.debug("optimizer: %s", text.getvalue().strip()[-2000:])


class FusedGraphCache:
    """Fused copies of a bundle's graphs for the CUDA provider: ``root/<graph>.<key16>/``
    holding ``model.onnx``, its weights and ``meta.json`` (the key material and file sizes)."""

    def __init__(self, root: Path | None = None):
        if root is None:
            from icd_edge.cache import cache_dir

            root = cache_dir(CACHE_KIND)
        self.root = Path(root)

    def entry(self, graph: str, material: dict) -> Path:
        return self.root / f"{graph}.{entry_key(material)[:16]}"

    def stale_reason(self, folder: Path, material: dict) -> str | None:
        """Why the entry at ``folder`` cannot be used (None: use it)."""
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return "no entry"
        except (OSError, ValueError):
            return "its meta.json is unreadable"
        if meta.get("material") != material:
            return "it was made for other inputs"
        for name, size in (meta.get("files") or {}).items():
            p = folder / name
            if not p.is_file() or p.stat().st_size != size:
                return f"{name} is missing or has the wrong size"
        return None if meta.get("files") else "it lists no files"

    def get(self, bundle, graph: str, ort_version: str, fusions: str = "all", progress=None) -> tuple[Path, dict]:
        """The fused model of ``graph`` (made now if the cache has no current entry) and the
        entry's metadata."""
        material = key_material(graph, source_digests(bundle, graph), ort_version, fusions)
        folder = self.entry(graph, material)
        why = self.stale_reason(folder, material)
        if why is None:
            return folder / "model.onnx", json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if why != "no entry":
            logger.warning("rebuilding the CUDA graph cache entry %s: %s", folder, why)
        return self.build(bundle, graph, material, folder, progress)

    def build(self, bundle, graph: str, material: dict, folder: Path, progress=None) -> tuple[Path, dict]:
        from icd_edge.cache import write_entry

        src = bundle.path(bundle.artifact(graph, "onnx").file)
        msg = f"fusing {graph} for the CUDA provider (once per bundle and onnxruntime version; cached in {self.root})"
        logger.info(msg)
        if progress is not None:
            progress(graph)
        t0 = time.perf_counter()
        with write_entry(folder, "CUDA graph cache") as tmp:
            stats = optimize_graph(src, graph, tmp / "model.onnx", material["fusions"])
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
            meta = {
                "material": material,
                "files": files,
                "fused": stats,
                "seconds": round(time.perf_counter() - t0, 2),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        logger.info("%s fused in %.1f s: %s", graph, meta["seconds"], stats or "nothing matched")
        return folder / "model.onnx", meta

    def remove(self, model: Path) -> None:
        shutil.rmtree(Path(model).parent, ignore_errors=True)


# ---------------------------------------------------------------------------- the provider
_PRELOADED = False


def preload() -> None:
    """Load the CUDA and cuDNN libraries onnxruntime-gpu was built for from the pip-installed
    nvidia packages (or what torch already loaded), so the provider finds them."""
    global _PRELOADED
    if _PRELOADED:
        return
    _PRELOADED = True
    import onnxruntime as ort

    fn = getattr(ort, "preload_dlls", None)
    if fn is not None:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # it prints warnings
            try:
                fn()
            except Exception as exc:  # a best effort: the session reports what is still missing
                logger.debug("onnxruntime.preload_dlls failed: %s", exc)


def missing_library(log: str) -> str | None:
    """The shared library the CUDA provider could not load, from onnxruntime's log text."""
    m = _MISSING_LIB.search(log)
    return m.group(1) if m else None


def explain_missing(lib: str | None, cuda_version: str | None) -> str:
    """One line: what is missing and how to get it."""
    cuda = cuda_version or "?"
    major = cuda.split(".")[0]
    if lib is None:
        return (
            "the CUDA provider did not start (onnxruntime logged why above); check that the NVIDIA driver, "
            f"CUDA {cuda} and cuDNN 9 libraries are installed"
        )
    if "cudnn" in lib:
        how = f"pip install nvidia-cudnn-cu{major}"
    elif "cublas" in lib:
        how = f"pip install nvidia-cublas-cu{major}" if major == "12" else "pip install nvidia-cublas"
    elif "libcuda.so" in lib:
        how = "install the NVIDIA driver"
    else:
        how = f"install the CUDA {cuda} runtime libraries (or import torch built for CUDA {major} first)"
    return f"the CUDA provider cannot load {lib} (onnxruntime-gpu is built for CUDA {cuda}): {how}"


@contextlib.contextmanager
def captured_stderr():
    """Collect what native code writes to file descriptor 2 (onnxruntime's logger) meanwhile;
    yields a list that holds the text afterwards."""
    out: list[str] = []
    try:
        saved = os.dup(2)
    except OSError:
        yield out
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace")
            out.append(text)
            if text.strip():
                logger.debug("onnxruntime: %s", text.strip())


def cuda_version() -> str | None:
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        return None
    return getattr(info, "cuda_version", None)


def probe_model() -> bytes:
    """A one-node float graph (``y = x + x``) to check that the provider starts."""
    return bytes.fromhex(PROBE_MODEL_HEX)


# y = Add(x, x), x/y float[1], opset 17: written once with onnx.helper (tests check it)
PROBE_MODEL_HEX = (
    "080812086963645f656467653a390a0e0a01780a01781201792203416464120570726f62655a0f0a0178120a0a08"
    "080112040a020801620f0a0179120a0a08080112040a02080142040a001011"
)


def check_provider() -> dict:
    """Start the CUDA provider on a one-node graph: ``{"ok", "reason", "cuda_version"}``."""
    import numpy as np
    import onnxruntime as ort

    version = cuda_version()
    if PROVIDER not in ort.get_available_providers():
        return {
            "ok": False,
            "reason": "this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)",
            "cuda_version": version,
        }
    preload()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    with captured_stderr() as log:
        try:
            sess = ort.InferenceSession(probe_model(), sess_options=so, providers=[PROVIDER, "CPUExecutionProvider"])
            ok = PROVIDER in sess.get_providers()
            if ok:
                sess.run(None, {"x": np.ones(1, np.float32)})
        except Exception as exc:
            ok, log = False, [str(exc)]
    if ok:
        return {
            "ok": True,
            "reason": f"CUDA provider runs (onnxruntime-gpu built for CUDA {version})",
            "cuda_version": version,
        }
    return {"ok": False, "reason": explain_missing(missing_library("".join(log)), version), "cuda_version": version}


def gpus() -> list[dict]:
    """The NVIDIA GPUs ``nvidia-smi`` lists (name, memory, driver); [] without the tool."""
    import shutil as _shutil
    import subprocess

    exe = _shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total,driver_version,compute_cap", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_nvidia_smi(out.stdout) if out.returncode == 0 else []


def parse_nvidia_smi(text: str) -> list[dict]:
    rows = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3:
            continue
        row = {"name": parts[0], "driver": parts[2]}
        with contextlib.suppress(ValueError):
            row["memory_gib"] = round(float(parts[1]) / 1024, 1)
        if len(parts) > 3:
            row["compute_capability"] = parts[3]
        rows.append(row)
    return rows


def doctor() -> dict:
    """What ``icd-edge doctor`` says about onnxruntime on the GPU."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"provider": False, "reason": "onnxruntime is not installed", "gpus": gpus()}
    check = check_provider()
    return {
        "provider": check["ok"],
        "reason": check["reason"],
        "onnxruntime": ort.__version__,
        "cuda_version": check["cuda_version"],
        "gpus": gpus(),
    }


def graphs_to_prepare(bundle) -> list[str]:
    """The bundle's graphs that have an ONNX artifact, largest first (so parallel work ends together)."""
    names = [g for g in bundle.graphs if bundle.artifact(g, "onnx") is not None]

    def size(g: str) -> int:
        art = bundle.artifact(g, "onnx")
        return sum(bundle.manifest.files[r].bytes for r in (art.file, art.weights) if r in bundle.manifest.files)

    return sorted(names, key=size, reverse=True)


def _prepare_one(root: str, cache: str, graph: str, ort_version: str, fusions: str) -> tuple[str, dict]:
    from icd_edge.bundle.store import open_bundle

    bundle = open_bundle(root, verify=False)
    _, meta = FusedGraphCache(Path(cache)).get(bundle, graph, ort_version, fusions)
    return graph, meta


def prepare(bundle, fusions: str = "all", jobs: int = 1, cache_root: Path | None = None, progress=None) -> dict:
    """Make the fused CUDA copies of every graph of ``bundle`` now (``jobs`` processes), so the
    first edit on the GPU does not wait for them; returns ``{graph: entry metadata}``."""
    import concurrent.futures as cf

    import onnxruntime as ort

    cache = FusedGraphCache(cache_root)
    graphs = graphs_to_prepare(bundle)
    out: dict[str, dict] = {}
    if jobs <= 1:
        for g in graphs:
            out[g] = cache.get(bundle, g, ort.__version__, fusions)[1]
            if progress is not None:
                progress(g)
        return out
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no forked onnxruntime state in the workers
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [
            pool.submit(_prepare_one, str(bundle.root), str(cache.root), g, ort.__version__, fusions) for g in graphs
        ]
        for fut in cf.as_completed(futures):
            g, meta = fut.result()
            out[g] = meta
            if progress is not None:
                progress(g)
    return out
