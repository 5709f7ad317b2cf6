"""The ``tensorrt`` export target: engines for this machine's GPU, built from the bundle's ONNX.

Runs after the ONNX target. Every graph gets ``tensorrt/<graph>.<precision>.<key16>.plan``,
recorded under ``artifacts["tensorrt"]`` with its cache key and key material (ONNX sha256s,
precision, profile, GPU name, compute capability, TensorRT version). At run time the backend
uses such an engine only when the key it computes on that machine is the same; otherwise it
builds its own. One timing cache per (GPU, TensorRT version), in the runtime's engine cache
folder, is shared by the builds of one export, later exports and lazy runtime builds.

Without TensorRT this target fails before anything is loaded (see :func:`check_target`).
Not executed by the project's tests against a real TensorRT (none is installable there).
"""

from __future__ import annotations

import importlib.util
import logging

from icd_edge.bundle.schema import Artifact
from icd_edge.bundle.store import sha256_file
from icd_edge.errors import BackendUnavailable, ExportError
from icd_edge.runtimes.trt.build import BuildRequest, build_engine
from icd_edge.runtimes.trt.plan import (
    PRECISIONS,
    default_cache_dir,
    engine_filename,
    engine_key,
    key_material,
    plan_precision,
    profile_shapes,
    timing_cache_name,
)

logger = logging.getLogger(__name__)

NOT_INSTALLED = (
    "tensorrt is not installed; install TensorRT from NVIDIA's index (see docs/tensorrt.md) or leave "
    "the tensorrt target out; the runtime can build engines lazily on the GPU"
)


def check_target(cfg) -> None:
    """Called by ``pipeline.validate`` before any download: TensorRT importable, options valid."""
    precision = cfg.trt_precision
    if precision not in PRECISIONS:
        raise ExportError(f"--trt-precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    workspace = cfg.trt_workspace_mb
    if workspace is not None and (not isinstance(workspace, int) or workspace <= 0):
        raise ExportError(f"--trt-workspace-mb must be a positive integer, got {workspace!r}")
    if importlib.util.find_spec("tensorrt") is None:
        raise ExportError(NOT_INSTALLED)


def export_target(ctx) -> None:
    """Build one engine per graph into ``ctx.out_dir/tensorrt`` and record them in the manifest."""
    check_target(ctx.cfg)
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError/OSError when libnvinfer is missing
        raise ExportError(
            f"tensorrt is installed but cannot be imported ({exc}); fix the TensorRT install "
            "or leave the tensorrt target out"
        ) from exc
    from icd_edge.runtimes.trt.cuda import Cuda

    precision = ctx.cfg.trt_precision
    workspace_mb = ctx.cfg.trt_workspace_mb
    try:
        gpu = Cuda().gpu_info()
        version = str(trt.__version__)
        trt_logger = trt.Logger(trt.Logger.WARNING)
        timing_cache = default_cache_dir() / timing_cache_name(gpu, version)
        (ctx.out_dir / "tensorrt").mkdir(exist_ok=True)
        for graph, entry in ctx.manifest.graphs.items():
            ctx.step(f"tensorrt {graph}")
            plan = plan_precision(graph, entry, precision, version)
            profile = profile_shapes(entry)
            rels = [plan.source.file] + ([plan.source.weights] if plan.source.weights else [])
            digests = {rel: sha256_file(ctx.out_dir / rel) for rel in rels}
            material = key_material(graph, digests, plan, profile, gpu, version)
            key = engine_key(material)
            rel = f"tensorrt/{engine_filename(graph, plan.precision, key)}"
            meta = build_engine(
                trt,
                BuildRequest(
                    graph,
                    ctx.out_dir / plan.source.file,
                    plan,
                    profile,
                    material,
                    ctx.out_dir / rel,
                    timing_cache,
                    workspace_mb * (1 << 20) if workspace_mb else None,
                ),
                trt_logger,
            )
            ctx.timings[f"tensorrt_{graph}_s"] = meta["build_s"]
            entry.artifacts["tensorrt"] = Artifact(plan.precision, file=rel, details={"key": key, "material": material})
    except BackendUnavailable as exc:
        raise ExportError(str(exc)) from exc
    if ctx.progress is not None:
        ctx.progress.update(1)
