"""Build one TensorRT engine from an ONNX graph; shared by the export target and the runtime.

Imports neither torch nor tensorrt at module level: the caller passes the ``tensorrt``
module in, so the runtime can build lazily on the target device and tests can pass a fake.
The engine, its metadata sidecar and the timing cache are each written atomically; the
metadata is written after the engine, so an engine without matching metadata is never used.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from icd_edge.atomic import write_bytes_atomic
from icd_edge.bundle.store import sha256_file
from icd_edge.errors import BackendUnavailable
from icd_edge.runtimes.trt.plan import PrecisionPlan, engine_key, meta_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildRequest:
    """One engine to build.

    Attributes:
        graph: graph name (for messages).
        onnx_path: the ONNX file (its external weights are resolved relative to it).
        plan: precision plan (source, strong typing, builder flags).
        profile: ``((input name, fixed shape), ...)`` from the manifest.
        material: the cache key material (written into the sidecar).
        engine_path: where the serialized engine goes.
        timing_cache: timing cache file to read and update, or None.
        workspace_bytes: ``MemoryPoolType.WORKSPACE`` limit, or None for TensorRT's default.
    """

    graph: str
    onnx_path: Path
    plan: PrecisionPlan
    profile: tuple
    material: dict
    engine_path: Path
    timing_cache: Path | None = None
    workspace_bytes: int | None = None


def build_engine(trt, req: BuildRequest, trt_logger) -> dict:
    """Parse, configure, build and write one engine; return the metadata written beside it.

    Raises:
        BackendUnavailable: parsing or building failed (the message has TensorRT's errors).
    """
    t0 = time.perf_counter()
    builder = trt.Builder(trt_logger)
    flags = 0
    if req.plan.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    # parse_from_file (not parse(bytes)) so external weights resolve next to the .onnx file.
    if not parser.parse_from_file(str(req.onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no detail"
        raise BackendUnavailable(f"TensorRT cannot parse {req.onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    for flag in req.plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if req.workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(req.workspace_bytes))
    _add_profile(builder, network, config, req)

    cache = None
    if req.timing_cache is not None:
        previous = req.timing_cache.read_bytes() if req.timing_cache.is_file() else b""
        cache = config.create_timing_cache(previous)
        config.set_timing_cache(cache, ignore_mismatch=False)

    logger.info(
        "building TensorRT engine %s (%s, %s) from %s",
        req.graph,
        req.plan.precision,
        "strongly typed" if req.plan.strongly_typed else "flags " + ",".join(req.plan.builder_flags),
        req.onnx_path.name,
    )
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise BackendUnavailable(
            f"TensorRT could not build {req.graph} ({req.plan.precision}); run with -v for the "
            "builder log; out-of-memory during tactic selection is common: lower workspace_mb"
        )
    req.engine_path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(req.engine_path, blob)  # IHostMemory has the buffer protocol: no copy
    size = req.engine_path.stat().st_size
    meta = {
        "key": engine_key(req.material),
        "material": req.material,
        "engine_bytes": size,
        "engine_sha256": sha256_file(req.engine_path),
        "build_s": round(time.perf_counter() - t0, 2),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_bytes_atomic(meta_path(req.engine_path), json.dumps(meta, indent=1, sort_keys=True).encode())
    if cache is not None:
        req.timing_cache.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(req.timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    logger.info("built %s in %.1f s (%d bytes)", req.engine_path.name, meta["build_s"], size)
    return meta


def _add_profile(builder, network, config, req: BuildRequest) -> None:
    """Fixed min = opt = max shapes for dynamic inputs; static inputs must equal the manifest."""
    wanted = dict(req.profile)
    profile = None
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name not in wanted:
            raise BackendUnavailable(
                f"{req.onnx_path.name} has input {tensor.name!r}, which the manifest does not list; "
                "re-export the bundle"
            )
        dims, shape = tuple(tensor.shape), wanted[tensor.name]
        if len(dims) != len(shape) or any(d not in (-1, s) for d, s in zip(dims, shape)):
            raise BackendUnavailable(
                f"{req.onnx_path.name} input {tensor.name!r} has shape {dims}, the manifest says "
                f"{shape}; re-export the bundle"
            )
        if -1 in dims:
            profile = profile or builder.create_optimization_profile()
            profile.set_shape(tensor.name, shape, shape, shape)
    if profile is not None:
        config.add_optimization_profile(profile)
