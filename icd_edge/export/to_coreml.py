"""torch → Core ML ML programs (``coreml/<graph>.mlpackage``), fp16 compute, optional weight compression.

Capture is ``torch.export``: for the full SD1.5 UNet it took 6 s and 6.5 GB peak RSS against
65 s and 10.2 GB for ``torch.jit.trace`` (coremltools 9.0, our measurement), and unlike the jit
frontend it works with numpy ≥ 2.4. Input names come
from the wrappers' forward arguments, which are the spec's names; outputs are named explicitly
and kept float32. Core ML ML programs take no int64, so ``input_ids`` becomes int32: every
artifact entry records the I/O the package really has, read back from the saved package, and
the ``coreml`` runtime casts feeds to it. Conversion and compression run on Linux; nothing here
predicts (that needs macOS), so Core ML numeric parity is not checked at export.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from pathlib import Path

import numpy as np
import torch

from icd_edge.bundle import spec
from icd_edge.bundle.schema import Artifact
from icd_edge.errors import ExportError
from icd_edge.export.config import COREML_ATTENTIONS as ATTENTIONS
from icd_edge.export.config import COREML_COMPRESSIONS as COMPRESSIONS

logger = logging.getLogger(__name__)

# standard: attention as matmul/softmax/matmul (macOS 14). sliced-q: keep Core ML's fused
# scaled_dot_product_attention op (macOS 15) and let coremltools' sliced-Q pass split the query
# axis of the full-latent-resolution attention layers into chunks, which bounds the size of the
# (queries × keys) score matrix; the speed effect on the Neural Engine has not been measured.
# Features used: ML program with fp16 compute (macOS 12+), per-channel int8 and per-tensor LUT
# weights (macOS 13+). macOS 14 is the floor we chose (every Apple-silicon Mac can run it); only
# the fused attention op of sliced-q needs macOS 15.
TARGETS = {"standard": "macOS14", "sliced-q": "macOS15"}
SLICED_Q_CHUNKS = 16  # coremltools' default seq_length_divider
# Core ML array types (ArrayFeatureType.ArrayDataType names) as numpy dtype names.
ARRAY_DTYPES = {"FLOAT32": "float32", "FLOAT16": "float16", "DOUBLE": "float64", "INT32": "int32", "INT8": "int8"}
# What the converter turns a manifest dtype into; anything else must come out unchanged.
CONVERTED_DTYPES = {"int64": "int32"}


def check_available(compression: str) -> None:
    """Fail before any work when coremltools (or scikit-learn for k-means) is missing."""
    import importlib.util

    if importlib.util.find_spec("coremltools") is None:
        raise ExportError(
            "--targets coreml needs coremltools: pip install -c constraints.txt 'icd_edge[export,coreml]'"
        )
    if compression.startswith("palettize") and importlib.util.find_spec("sklearn") is None:
        raise ExportError(
            f"--coreml-compression {compression} runs k-means, which needs scikit-learn: "
            "pip install -c constraints.txt 'icd_edge[coreml]'"
        )


@contextlib.contextmanager
def _quiet_progress():
    """WAR: coremltools 9.0 draws tqdm bars for every conversion pass with no switch to turn them
    off; they go to ``sys.stderr``, so it is swapped for a buffer (logged at DEBUG) and restored."""
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        yield
    if buf.getvalue().strip():
        logger.debug("coremltools progress output:\n%s", buf.getvalue()[-4000:])


def capture(module: torch.nn.Module, args: tuple, graph: str):
    """``torch.export`` of ``module`` at the shapes of ``args``, decomposed for coremltools."""
    try:
        with torch.no_grad():
            program = torch.export.export(module, args).run_decompositions({})
    except Exception as exc:  # torch.export raises many internal error types
        raise ExportError(f"torch.export of {graph} failed: {type(exc).__name__}: {exc}") from exc
    # WAR: CLIP's `position_ids[:, :77]` full slice exports as aten.alias, which coremltools 9.0
    # rejects ("Unsupported fx node alias"). alias is a no-op view: use its input instead.
    changed = False
    for node in list(program.graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            program.graph.erase_node(node)
            changed = True
    if changed:
        program.graph_module.recompile()
    return program


def convert(program, output_names: list[str], graph: str, attention: str = "standard", min_queries: int = 0):
    """An ML program with fp16 compute, float32 outputs named ``output_names``.

    Args:
        attention: one of :data:`ATTENTIONS`.
        min_queries: with ``sliced-q``, attention layers with at least this many queries are sliced.
    """
    import coremltools as ct

    pipeline = ct.PassPipeline.DEFAULT
    if attention == "sliced-q":
        pipeline.append_pass("common::scaled_dot_product_attention_sliced_q")
        pipeline.set_options(
            "common::scaled_dot_product_attention_sliced_q",
            {"min_seq_length": int(min_queries), "seq_length_divider": SLICED_Q_CHUNKS},
        )
    elif attention != "standard":
        raise ExportError(f"unknown Core ML attention {attention!r}; choose one of {', '.join(ATTENTIONS)}")
    try:
        with _quiet_progress():
            return ct.convert(
                program,
                outputs=[ct.TensorType(name=n, dtype=np.float32) for n in output_names],
                convert_to="mlprogram",
                compute_precision=ct.precision.FLOAT16,
                minimum_deployment_target=getattr(ct.target, TARGETS[attention]),
                pass_pipeline=pipeline,
            )
    except Exception as exc:  # the converter raises NotImplementedError, ValueError, RuntimeError, ...
        raise ExportError(f"Core ML conversion of {graph} failed: {type(exc).__name__}: {exc}") from exc


def compress(mlmodel, compression: str):
    """Weight compression of an ML program (also works on ``MLModel(path, skip_model_load=True)``).

    ``linear8``: int8 symmetric per-channel; ``palettize8``/``palettize6``: per-tensor k-means LUT
    of 256/64 entries. Weights under 2048 elements stay fp16 (coremltools' default threshold).
    """
    if compression == "none":
        return mlmodel
    import coremltools.optimize.coreml as cto

    if compression == "linear8":
        config = cto.OptimizationConfig(
            global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8")
        )
        fn = cto.linear_quantize_weights
    elif compression in ("palettize8", "palettize6"):
        config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="kmeans", nbits=int(compression[-1])))
        fn = cto.palettize_weights
    else:
        raise ExportError(f"unknown Core ML compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")
    try:
        with _quiet_progress():
            return fn(mlmodel, config=config)
    except ModuleNotFoundError as exc:
        raise ExportError(f"{compression} needs {exc.name}: pip install -c constraints.txt 'icd_edge[coreml]'") from exc


def package_io(mlmodel) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs of a package as ``{name, dtype, shape}``, read from its spec."""
    from coremltools.proto import FeatureTypes_pb2

    def one(feature) -> dict:
        arr = feature.type.multiArrayType
        code = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(arr.dataType)
        return {
            "name": feature.name,
            "dtype": ARRAY_DTYPES.get(code, code.lower()),
            "shape": [int(d) for d in arr.shape],
        }

    desc = mlmodel.get_spec().description
    return [one(f) for f in desc.input], [one(f) for f in desc.output]


def check_io(graph: str, entry, inputs: list[dict], outputs: list[dict]) -> None:
    """The package's I/O must be the manifest's: same names in order, same shapes, same dtypes
    (except the documented int64 → int32). Raise ExportError naming the first difference."""
    for kind, want, got in (("input", entry.inputs, inputs), ("output", entry.outputs, outputs)):
        if [s.name for s in want] != [s["name"] for s in got]:
            raise ExportError(
                f"coreml/{graph}.mlpackage has {kind}s {[s['name'] for s in got]}, "
                f"the manifest declares {[s.name for s in want]}; the wrapper's forward signature changed"
            )
        for w, g in zip(want, got):
            dtype = CONVERTED_DTYPES.get(w.dtype, w.dtype)
            if list(w.shape) != list(g["shape"]) or g["dtype"] != dtype:
                raise ExportError(
                    f"coreml/{graph}.mlpackage {kind} {w.name} is {g['dtype']}{tuple(g['shape'])}, "
                    f"expected {dtype}{tuple(w.shape)} from the manifest"
                )


def package_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _stamp(mlmodel, graph: str, compression: str) -> None:
    import importlib.metadata

    mlmodel.author = "icd_edge"
    mlmodel.short_description = f"iCD {graph}: fp16 compute, weights {compression}"
    mlmodel.version = importlib.metadata.version("icd_edge")
    mlmodel.user_defined_metadata.update({"icd_edge.graph": graph, "icd_edge.compression": compression})


def export_graph(
    module: torch.nn.Module,
    args: tuple,
    entry,
    graph: str,
    compression: str,
    out_path: Path,
    attention: str = "standard",
    min_queries: int = 0,
) -> dict:
    """Capture, convert, compress and save one graph; returns its ``artifacts["coreml"]`` entry."""
    t0 = time.perf_counter()
    program = capture(module, args, graph)
    t_capture = time.perf_counter() - t0
    mlmodel = convert(program, [s.name for s in entry.outputs], graph, attention, min_queries)
    del program
    t_convert = time.perf_counter() - t0 - t_capture
    mlmodel = compress(mlmodel, compression)
    t_compress = time.perf_counter() - t0 - t_capture - t_convert
    _stamp(mlmodel, graph, compression)
    inputs, outputs = package_io(mlmodel)
    check_io(graph, entry, inputs, outputs)
    mlmodel.save(str(out_path))
    return {
        "file": f"coreml/{out_path.name}",
        "format": "mlprogram",
        "precision": "fp16",
        "compression": compression,
        "minimum_deployment_target": TARGETS[attention],
        "attention": attention,
        "capture": "torch.export",
        "inputs": inputs,
        "outputs": outputs,
        "bytes": package_bytes(out_path),
        "seconds": {"capture": round(t_capture, 2), "convert": round(t_convert, 2), "compress": round(t_compress, 2)},
        "parity": "not run: Core ML predicts only on macOS",
    }


def export_target(ctx) -> None:
    """Every graph of ``ctx.graphs`` to ``coreml/<graph>.mlpackage``."""
    compression, attention = ctx.cfg.coreml_compression, ctx.cfg.coreml_attention
    check_available(compression)
    # sliced-q acts on the layers at full latent resolution (h² queries: 4096 at 512 px), the
    # ones whose score matrices are largest.
    min_queries = ctx.dims["h"] ** 2
    (ctx.out_dir / "coreml").mkdir(exist_ok=True)
    for name, module in ctx.graphs.items():
        ctx.step(f"coreml {name}")
        inputs, _ = spec.graph_table(ctx.manifest.family)[name]
        args = tuple(torch.from_numpy(ctx.samples[name][s.name]) for s in inputs)
        t0 = time.perf_counter()
        entry = ctx.manifest.graphs[name]
        art = export_graph(
            module, args, entry, name, compression, ctx.out_dir / "coreml" / f"{name}.mlpackage", attention, min_queries
        )
        entry.artifacts["coreml"] = Artifact(art.pop("precision"), file=art.pop("file"), details=art)
        ctx.timings[f"coreml_{name}_s"] = time.perf_counter() - t0
    if ctx.progress is not None:
        ctx.progress.update(1)
