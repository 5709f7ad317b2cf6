"""torch → ONNX (dynamo exporter, fixed shapes) with weights moved into shared data files.

Graphs that hold the same weights (``unet_reverse`` and ``unet_reverse_edit``) point into one
data file, so the bundle stores the reverse UNet once. Tensors are deduplicated by content
and aligned to 4 KiB so onnxruntime can map them.

A graph whose module has the structure of one traced before (the reverse UNet after the forward
UNet) is not traced again: the kept unoptimised trace gets the module's weights (``retarget``).
Graphs are optimised, stripped and externalised in memory, never saved and reloaded whole.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from icd_edge.atomic import scratch_dir
from icd_edge.bundle.schema import Artifact, Int8Scheme
from icd_edge.errors import ExportError
from icd_edge.graphs.wrappers import HalfGraph

logger = logging.getLogger(__name__)

INLINE_MAX_BYTES = 1024
ALIGN = 4096


class WeightStore:
    """An append-only external-data file with content deduplication."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "wb")
        self._index: dict[str, tuple[int, int]] = {}
        self._offset = 0

    def put(self, raw: bytes) -> tuple[int, int]:
        key = hashlib.sha256(raw).hexdigest()
        if key not in self._index:
            pad = (-self._offset) % ALIGN
            self._f.write(b"\0" * pad)
            self._offset += pad
            self._f.write(raw)
            self._index[key] = (self._offset, len(raw))
            self._offset += len(raw)
        return self._index[key]

    def externalize(self, model: onnx.ModelProto) -> None:
        """Move every initializer larger than 1 KiB of ``model`` into this file."""
        for tensor in _all_initializers(model.graph):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                raise ExportError(f"initializer {tensor.name} still points to external data; load it first")
            arr = numpy_helper.to_array(tensor)
            raw = np.ascontiguousarray(arr).tobytes()
            if len(raw) <= INLINE_MAX_BYTES:
                continue
            offset, length = self.put(raw)
            fresh = onnx.TensorProto()
            fresh.name, fresh.data_type = tensor.name, tensor.data_type
            fresh.dims.extend(tensor.dims)
            fresh.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
                entry = fresh.external_data.add()
                entry.key, entry.value = k, v
            tensor.CopyFrom(fresh)

    def externalize_ir(self, model) -> None:
        """:meth:`externalize` for an ``onnx_ir`` model, before it becomes a proto: each tensor's
        bytes go to this file one at a time, where serialising first would hold a second copy of
        every weight (10 GB for a float32 SDXL UNet)."""
        import onnx_ir as ir

        for graph in model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if tensor is None:
                    continue
                if isinstance(tensor, ir.ExternalTensor):
                    raise ExportError(f"initializer {value.name} still points to external data; load it first")
                raw = tensor.tobytes()
                if len(raw) <= INLINE_MAX_BYTES:
                    continue
                offset, length = self.put(raw)
                del raw
                value.const_value = ir.ExternalTensor(
                    self.path.name,
                    offset,
                    length,
                    tensor.dtype,
                    shape=tensor.shape,
                    name=value.name,
                    base_dir=self.path.parent,
                )

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            self._f.close()


def _all_initializers(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_initializers(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_initializers(g)


def strip_debug_metadata(graph: onnx.GraphProto) -> None:
    """Drop the exporter's per-node debug metadata (stack trace, class hierarchy, name scopes,
    namespace): 5.8 MB of a 512 px UNet graph's 6.9 MB, repeated in every graph file and parsed at
    every session load; nothing reads it at run time."""
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                strip_debug_metadata(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    strip_debug_metadata(g)


def trace_graph(
    module: torch.nn.Module, args: tuple, input_names: list[str], output_names: list[str], name: str, opset: int
):
    """Trace ``module`` at the shapes of ``args`` into an unoptimised ``torch.onnx.ONNXProgram``:
    its initializers still carry the module's parameter and buffer names, so
    :func:`retarget` can give the same graph another module's weights."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=input_names,
                output_names=output_names,
                optimize=False,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many internal error types
            raise ExportError(f"ONNX export of {name} failed: {type(exc).__name__}: {exc}") from exc


def same_structure(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether tracing ``b`` would give ``a``'s graph with other weights: the same module tree
    (types, plain attributes, attention processor types, unregistered tensors by value) and
    parameters and buffers of the same names, shapes and dtypes."""
    ma, mb = dict(a.named_modules()), dict(b.named_modules())
    if ma.keys() != mb.keys():
        return False
    for key, x in ma.items():
        y = mb[key]
        if type(x) is not type(y):
            return False
        vx, vy = vars(x), vars(y)
        if vx.keys() != vy.keys():
            return False
        for k, v in vx.items():
            w = vy[k]
            if k in ("_parameters", "_buffers", "_modules"):
                continue
            if isinstance(v, torch.Tensor):
                if not (
                    isinstance(w, torch.Tensor) and v.shape == w.shape and v.dtype == w.dtype and torch.equal(v, w)
                ):
                    return False
            elif isinstance(v, (bool, int, float, str, bytes, type(None), tuple, list, dict, set)):
                try:
                    if bool(v != w):
                        return False
                except Exception:  # containers holding tensors or other uncomparable things
                    return False
            elif type(v) is not type(w):  # e.g. a diffusers attention processor: its type picks the code path
                return False
    ta, tb = _named_tensors(a), _named_tensors(b)
    return ta.keys() == tb.keys() and all(t.shape == tb[n].shape and t.dtype == tb[n].dtype for n, t in ta.items())


def _named_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        **dict(module.named_parameters(remove_duplicate=False)),
        **dict(module.named_buffers(remove_duplicate=False)),
    }


@dataclasses.dataclass
class Template:
    """An unoptimised traced program kept to :func:`retarget` (its tensors are shared, not copied)."""

    program: object  # torch.onnx.ONNXProgram
    module: torch.nn.Module  # what was traced: another module must have the same structure
    names: frozenset  # the traced module's parameter and buffer names

    @classmethod
    def of(cls, program, module: torch.nn.Module) -> Template:
        return cls(
            torch.onnx.ONNXProgram(program.model.clone(), program.exported_program),
            module,
            frozenset(_named_tensors(module)),
        )


def retarget(template: Template, module: torch.nn.Module):
    """A copy of ``template``'s program carrying ``module``'s weights, for a module of
    :func:`same_structure` as the traced one: a fraction of a full trace's time."""
    if not same_structure(template.module, module):
        raise ExportError("cannot reuse the traced graph: the module's structure differs")
    model = template.program.model.clone()
    tensors = _named_tensors(module)
    named = [n for n in model.graph.initializers if n in template.names]
    if not named:
        raise ExportError("cannot reuse the traced graph: none of its initializers is a module weight")
    program = torch.onnx.ONNXProgram(model, template.program.exported_program)
    with torch.no_grad():
        program.apply_weights({n: tensors[n].detach() for n in named})
    return program


def write_program(program, out_path: Path, store: WeightStore) -> None:
    """Optimise ``program`` (constant folding), drop debug metadata, put its weights into ``store``
    and write ``out_path``: in memory, without a temporary save and reload of the weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        program.optimize()
    store.externalize_ir(program.model)
    model = program.model_proto
    strip_debug_metadata(model.graph)
    onnx.save_model(model, str(out_path))
    del model
    try:
        onnx.checker.check_model(str(out_path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported graph {out_path.name} is not valid ONNX: {exc}") from exc


# inputs a float16 trace keeps in float32: diffusers embeds the timestep in float32, and SDXL's added
# condition concatenates the pooled text with its float32 time_ids embedding (the trace would
# otherwise hold a Concat of float16 and float32)
FP32_INPUTS = ("timestep", "text_embeds", "time_ids")
WEIGHT_GROUPS = {g: "unet_reverse" for g in ("unet_reverse_edit", "unet_reverse_source", "unet_reverse_target")}


def export_target(ctx) -> None:
    """Every graph to ``onnx/<graph>.onnx`` at its precision, weights in ``onnx/<group>.weights``.

    fp32 graphs are traced straight into the bundle, fp16 UNets are traced in float16; other
    graphs and precisions are converted from an fp32 export in a scratch folder (int8 after
    recording calibration feeds on the torch reference).
    """
    from icd_edge.bundle import spec
    from icd_edge.export.quant.policy import UNETS, graph_precisions

    fp16_vae = ctx.cfg.vae is not None  # SDXL with an fp16-safe VAE (--vae)
    precisions = graph_precisions(
        ctx.cfg.precision, dict(ctx.cfg.graph_precision), ctx.graphs, ctx.manifest.family, fp16_vae
    )
    table = spec.graph_table(ctx.manifest.family)
    groups = dict(WEIGHT_GROUPS)
    if ctx.cfg.unet_weights == "shared-base":  # one file: identical teacher tensors are stored once
        groups.update({g: "unet_base" for g in ("unet_forward", *WEIGHT_GROUPS, "unet_reverse")})
    out = ctx.out_dir / "onnx"
    out.mkdir()
    # fp16 UNets are traced in float16 (half the tracing memory, no conversion pass over 3.4 GB
    # graphs); the small graphs are cheap to convert and keep the tested converter path
    # (fused UNets only: a float16 trace of the shared-base LoRA branches failed at run time in
    # ONNX Runtime with a broadcast error in a Mul, so those go through the converter)
    # SDXL's text encoders too: their output is the penultimate layer's hidden states, which the last
    # layer also reads, and the converter's keep_io_types then feeds that layer its fp32 copy
    xl_text = ("text_encoder", "text_encoder_2") if ctx.manifest.family == "sdxl" else ()
    fused = ctx.cfg.unet_weights == "fused"
    direct = {g for g, p in precisions.items() if p == "fp16" and ((g in UNETS and fused) or g in xl_text)}
    staged = set(precisions.values()) != {"fp32"}  # other precisions start from an fp32 graph
    final: dict[str, WeightStore] = {}
    # a graph whose module has the structure of an earlier one (the reverse UNet after the
    # forward UNet: same architecture, other fused weights) reuses that trace with its own weights
    reuse = _reuse_plan(ctx.graphs)
    templates: dict[str, Template] = {}
    names = list(ctx.graphs)
    with scratch_dir("fp32") as scratch:
        fp32_stores: dict[str, WeightStore] = {}
        try:
            for name, module in ctx.graphs.items():
                ctx.step(f"onnx {name}")
                inputs, outputs = table[name]
                group = groups.get(name, name)
                args = tuple(torch.from_numpy(ctx.samples[name][s.name]) for s in inputs)
                if name in direct:
                    module = HalfGraph(
                        copy.deepcopy(module), keep=tuple(i for i, s in enumerate(inputs) if s.name in FP32_INPUTS)
                    )
                    stores, folder = final, out
                else:
                    stores, folder = (fp32_stores, Path(scratch)) if staged else (final, out)
                if group not in stores:
                    stores[group] = WeightStore(folder / f"{group}.weights")
                t0 = time.perf_counter()
                source = reuse.get(name)
                template = templates.get(source) if source else None
                if source and not any(reuse.get(later) == source for later in names[names.index(name) + 1 :]):
                    templates.pop(source, None)  # its last user: free the kept trace
                program = None
                if template is not None:
                    try:
                        program = retarget(template, module)
                        ctx.manifest.info.setdefault("export", {}).setdefault("reused_traces", {})[name] = source
                    except ExportError:  # e.g. fp16 forward, fp32 reverse: trace it
                        program = None
                if program is None:
                    program = trace_graph(
                        module, args, [s.name for s in inputs], [s.name for s in outputs], name, ctx.cfg.opset
                    )
                del template
                if name in reuse.values():
                    templates[name] = Template.of(program, module)
                    # written from a clone like the graphs that reuse it: the optimiser then names
                    # its folded constants alike in all of them (TensorRT refits by name)
                    program = retarget(templates[name], module)
                write_program(program, folder / f"{name}.onnx", stores[group])
                ctx.timings[f"onnx_{name}_s"] = time.perf_counter() - t0
                del module, program
                if ctx.progress is not None:
                    ctx.progress.update(1)
            for store in fp32_stores.values():
                store.close()
            if staged:
                _convert_all(
                    ctx, Path(scratch), {g: p for g, p in precisions.items() if g not in direct}, groups, final
                )
        finally:
            for store in [*fp32_stores.values(), *final.values()]:
                store.close()
    for name in ctx.graphs:
        group = groups.get(name, name)
        details = {"opset": ctx.cfg.opset}
        if name in ("unet_reverse_edit", "unet_reverse_target"):
            details["p2p_attention"] = ctx.cfg.p2p_attention
        if precisions[name] == "fp16":
            details["fp16_method"] = "traced in float16" if name in direct else "onnxconverter-common (keep_io_types)"
        ctx.manifest.graphs[name].artifacts["onnx"] = Artifact(
            precisions[name], file=f"onnx/{name}.onnx", weights=f"onnx/{group}.weights", details=details
        )
    ctx.manifest.info["precision"] = {"requested": ctx.cfg.precision, "graphs": precisions}
    if ctx.cfg.unet_weights == "shared-base":
        ctx.manifest.info["shared_initializers"] = shared_initializer_table(ctx.out_dir, ctx.manifest.graphs)


def _reuse_plan(graphs: dict[str, torch.nn.Module]) -> dict[str, str]:
    """graph → the earlier graph whose trace it can reuse (same module structure)."""
    plan: dict[str, str] = {}
    names = list(graphs)
    for i, name in enumerate(names):
        earlier = next((e for e in names[:i] if e not in plan and same_structure(graphs[e], graphs[name])), None)
        if earlier is not None:
            plan[name] = earlier
    return plan


def shared_initializer_table(root: Path, graphs: dict) -> dict[str, list]:
    """Per graph, the external initializers whose bytes another graph also uses:
    ``[name, file, offset, length, dtype, dims]`` (the runtime maps each once and shares it)."""
    refs: dict[tuple, set] = {}
    per_graph: dict[str, list] = {}
    for name, entry in graphs.items():
        art = entry.artifacts.get("onnx")
        if art is None:
            continue
        model = onnx.load(str(root / art.file), load_external_data=False)
        rows = []
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            ext = {e.key: e.value for e in t.external_data}
            key = (f"{Path(art.file).parent.as_posix()}/{ext['location']}", int(ext["offset"]), int(ext["length"]))
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name
            rows.append([t.name, *key, dtype, list(t.dims)])
            refs.setdefault(key, set()).add(name)
        per_graph[name] = rows
    return {g: [r for r in rows if len(refs[tuple(r[1:4])]) > 1] for g, rows in per_graph.items()}


def _convert_all(ctx, scratch: Path, precisions: dict[str, str], groups: dict[str, str], stores: dict) -> None:
    """Convert the fp32 graphs in ``scratch`` to their precisions, weights into ``stores`` (the caller closes them)."""
    from icd_edge.bundle.store import Bundle
    from icd_edge.export.quant.calibration import calibration_cases, record_trajectories
    from icd_edge.export.quant.policy import int8_scheme
    from icd_edge.export.quant.stage import convert

    calibration = {}
    if any(p == "int8" for p in precisions.values()):
        ctx.step("int8 calibration")
        t0 = time.perf_counter()
        cases = calibration_cases(ctx.cfg.calibration, ctx.dims["H"], ctx.cfg.calibration_count)
        bundle = Bundle(ctx.out_dir, ctx.manifest.with_(files={}, complete=True))
        calibration = record_trajectories(bundle, ctx.graphs, cases)
        ctx.timings["int8_calibration_s"] = time.perf_counter() - t0
        ctx.manifest.info["calibration"] = {
            "cases": [{"source": c[1], "target": c[2]} for c in cases],
            "feeds": {g: len(v) for g, v in calibration.items()},
        }
    if any(p.startswith("int8") for p in precisions.values()):
        scheme = int8_scheme(ctx.cfg.int8_weights, ctx.cfg.int8_per_channel)
        ctx.manifest = ctx.manifest.with_(int8_scheme=Int8Scheme.from_json(scheme))
        # a batch-2 UNet's quantisation peaks at 9.3 GB RSS; the fp32 torch modules (7.5 GB at SD1.5
        # size, needed again for parity) would push a 24 GB machine out of memory
        _page_out_modules(ctx, scratch)
    for name, p in precisions.items():  # one quantisation at a time (each in its own process)
        ctx.step(f"{p} {name}")
        group = groups.get(name, name)
        if group not in stores:
            stores[group] = WeightStore(ctx.out_dir / "onnx" / f"{group}.weights")
        t0 = time.perf_counter()
        info = convert(
            scratch / f"{name}.onnx",
            ctx.out_dir / "onnx" / f"{name}.onnx",
            p,
            stores[group],
            calibration.get(name),
            int8_embeddings=ctx.cfg.embeddings == "int8",
            int8_weights=ctx.cfg.int8_weights,
            int8_ops=ctx.cfg.int8_ops,
            int8_per_channel=ctx.cfg.int8_per_channel,
        )
        ctx.timings[f"{p}_{name}_s"] = time.perf_counter() - t0
        if info.get("peak_rss_gb") is not None:  # the quantiser's own peak, for memory planning
            ctx.manifest.info.setdefault("quantiser_peak_rss_gb", {})[name] = info["peak_rss_gb"]
        if info.get("int8_embeddings"):
            ctx.manifest.info.setdefault("int8_embeddings", {})[name] = info["int8_embeddings"]
        if info.get("int8_gemm_weights"):  # weight-only int8 (time-embedding linears)
            ctx.manifest.info.setdefault("int8_gemm_weights", {})[name] = len(info["int8_gemm_weights"])


def _page_out_modules(ctx, scratch: Path) -> None:
    """Page the torch modules out to memory-mapped files in ``scratch`` (:mod:`icd_edge.export.paging`):
    they keep their values for parity, but the kernel can drop their pages while a quantiser needs
    the RAM. Modules shared by several graphs, or paged out already when loaded, are skipped."""
    from icd_edge.export import paging

    seen: set[int] = set()
    for i, module in enumerate(m for m in _source_modules(ctx) if id(m) not in seen and not seen.add(id(m))):
        if paging.paged_file(module) is None:
            paging.page_out(module, scratch / f"paged_{i}.pt")


def _source_modules(ctx):
    for name in ("text_encoder", "text_encoder_2", "vae", "unet_forward", "unet_reverse"):
        m = getattr(ctx.src, name, None)
        if isinstance(m, torch.nn.Module):
            yield m
    if "taesd_decoder" in ctx.graphs:  # only its graph wrapper holds the TAESD decoder
        yield ctx.graphs["taesd_decoder"]
