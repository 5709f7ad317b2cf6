"""TensorRT engine planning as pure data: no tensorrt, torch or CUDA import (runs in CI).

Everything the TensorRT backend and the ``tensorrt`` export target decide before touching
TensorRT lives here, so it is unit-tested without TensorRT:

* which ONNX artifact an engine is built from and with which precision flags
  (:func:`plan_precision`);
* the fixed-shape optimization profile, taken from the manifest (:func:`profile_shapes`);
* the engine cache key and file names (:func:`key_material`, :func:`engine_key`);
* whether a cached engine is stale (:func:`stale_reason`);
* the I/O binding plan: tensor names, dtypes, shapes and byte sizes (:func:`binding_plan`)
  and its check against what a deserialized engine reports (:func:`engine_io_problems`).

Precision rules (TensorRT 10 and 11 differ):

* ``fp32``: the fp32 ONNX graph, strongly typed (precision comes from the graph).
* ``fp16``: an fp16 ONNX artifact if the bundle has one (strongly typed); otherwise the fp32
  graph with ``BuilderFlag.FP16`` (weakly typed). TensorRT 11 removed ``BuilderFlag.FP16``, so
  there only an fp16 ONNX artifact can give an fp16 engine.
* ``int8``: only from an explicit-quantization (Q/DQ) ONNX artifact, strongly typed; implicit
  int8 calibration is deprecated in TensorRT 10 and removed in 11, and is not offered.
* ``auto``: fp16 where one of the fp16 rules applies, else fp32 (never int8). The resolved
  precision is logged and written into the engine's metadata.

ONNX artifacts are found under ``artifacts[key]`` where ``key`` is ``"onnx"`` or starts with
``"onnx_"`` (e.g. ``"onnx_int8"``) and the entry names a ``.onnx`` file; its ``precision`` field
says ``fp32``, ``fp16`` or ``int8`` (int8 means Q/DQ, see above).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from icd_edge.errors import BackendUnavailable

PRECISIONS = ("auto", "fp32", "fp16", "int8")
KEY_SCHEMA = 1
# First TensorRT major without BuilderFlag.FP16/INT8 (weak typing removed).
STRONG_TYPING_ONLY_MAJOR = 11

# trt.DataType member name -> numpy dtype name.
TRT_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "int32": 4, "int64": 8, "bool": 1}
# Engine I/O dtypes the session converts to/from the manifest's dtype on the host.
_CASTABLE = {("float32", "float16")}


@dataclass(frozen=True)
class Source:
    """An ONNX artifact of one graph: ``fmt`` is its artifacts key, ``file``/``weights`` bundle paths."""

    fmt: str
    file: str
    weights: str | None
    precision: str


@dataclass(frozen=True)
class PrecisionPlan:
    """How one engine is built.

    Attributes:
        precision: what the engine computes in (fp32, fp16, int8).
        source: the ONNX artifact it is parsed from.
        strongly_typed: create the network with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``.
        builder_flags: ``trt.BuilderFlag`` member names to set (``FP16``, ``REFIT``).
    """

    precision: str
    source: Source
    strongly_typed: bool
    builder_flags: tuple[str, ...]


@dataclass(frozen=True)
class GpuInfo:
    """The device an engine is built for: name and compute capability ``"major.minor"``."""

    name: str
    compute_capability: str


@dataclass(frozen=True)
class Binding:
    """One engine I/O tensor as the session binds it.

    Attributes:
        name: tensor name (the manifest's, which is the ONNX graph's).
        is_input: input or output.
        dtype: numpy dtype name the caller sees (manifest).
        engine_dtype: numpy dtype name of the engine tensor (equal unless cast on the host).
        shape: fixed shape.
        nbytes: size of the device buffer.
    """

    name: str
    is_input: bool
    dtype: str
    engine_dtype: str
    shape: tuple[int, ...]
    nbytes: int


def trt_major(version: str) -> int:
    """``"10.13.2.6"`` -> 10."""
    m = re.match(r"(\d+)", str(version))
    if not m:
        raise BackendUnavailable(f"cannot read the TensorRT version {version!r}; expected e.g. '10.13.2'")
    return int(m.group(1))


MIN_TRT_MAJOR = 10  # named-tensor API, explicit batch by default, STRONGLY_TYPED


def version_problem(version: str) -> str | None:
    """Why this TensorRT cannot be used (None: it can). JetPack 5.x and 6.0 ship TensorRT 8."""
    try:
        major = trt_major(version)
    except BackendUnavailable as exc:
        return str(exc)
    if major < MIN_TRT_MAJOR:
        return (
            f"TensorRT {version} is older than {MIN_TRT_MAJOR}.0, which this backend needs (on Jetson: JetPack 6.1 "
            "or later); use the onnxruntime backend or upgrade TensorRT"
        )
    return None


def onnx_sources(entry: dict) -> list[Source]:
    """Every ONNX artifact of a manifest graph entry (``artifacts`` keys ``onnx`` / ``onnx_*``)."""
    out = []
    for fmt, art in entry.artifacts.items():
        if (fmt == "onnx" or fmt.startswith("onnx_")) and str(art.file or "").endswith(".onnx"):
            out.append(Source(fmt, art.file, art.weights, art.precision))
    return out


def plan_precision(graph: str, entry: dict, requested: str, trt_version: str, refit: bool = False) -> PrecisionPlan:
    """Pick the ONNX source and TensorRT flags for ``requested`` precision (see module docstring).

    Raises:
        BackendUnavailable: the precision cannot be built from this bundle with this TensorRT.
    """
    if requested not in PRECISIONS:
        raise BackendUnavailable(f"tensorrt precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    by_prec = {}
    for s in onnx_sources(entry):
        by_prec.setdefault(s.precision, s)
    major = trt_major(trt_version)
    extra = ("REFIT",) if refit else ()

    def strong(src: Source) -> PrecisionPlan:
        return PrecisionPlan(src.precision, src, True, extra)

    if requested == "int8":
        if "int8" not in by_prec:
            raise BackendUnavailable(
                f"{graph}: int8 needs an explicitly quantized (Q/DQ) ONNX graph in the bundle (artifacts "
                f"'onnx_*' with precision int8); this bundle has {sorted(by_prec) or 'no ONNX'}. "
                "Export one with the int8 target, or use precision='fp16'"
            )
        return strong(by_prec["int8"])
    if requested in ("fp16", "auto"):
        if "fp16" in by_prec:
            return strong(by_prec["fp16"])
        if "fp32" in by_prec and major < STRONG_TYPING_ONLY_MAJOR:
            return PrecisionPlan("fp16", by_prec["fp32"], False, ("FP16",) + extra)
        if requested == "fp16":
            raise BackendUnavailable(
                f"{graph}: TensorRT {trt_version} builds fp16 only from an fp16 ONNX graph (BuilderFlag.FP16 was "
                "removed in TensorRT 11) and this bundle has only fp32 ONNX; use precision='fp32' or TensorRT 10"
            )
    if "fp32" not in by_prec:
        raise BackendUnavailable(
            f"{graph}: the bundle has no fp32 ONNX graph to build a TensorRT engine from; re-export it"
        )
    return strong(by_prec["fp32"])


def profile_shapes(entry: dict) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The fixed shape of every input, in manifest order: the profile's min = opt = max."""
    return tuple((s.name, tuple(int(d) for d in s.shape)) for s in entry.inputs)


def binding_plan(entry: dict, engine_dtypes: dict[str, str] | None = None) -> tuple[Binding, ...]:
    """Inputs then outputs in manifest order, with device buffer sizes.

    Args:
        entry: ``manifest["graphs"][graph]``.
        engine_dtypes: numpy dtype names the engine reports per tensor (default: the manifest's).
    """
    out = []
    for is_input, specs in ((True, entry.inputs), (False, entry.outputs)):
        for s in specs:
            shape = tuple(int(d) for d in s.shape)
            engine_dtype = (engine_dtypes or {}).get(s.name, s.dtype)
            count = 1
            for d in shape:
                count *= d
            out.append(Binding(s.name, is_input, s.dtype, engine_dtype, shape, count * _ITEMSIZE[engine_dtype]))
    return tuple(out)


def engine_io_problems(entry: dict, engine_io: dict[str, tuple[bool, str, tuple[int, ...]]]) -> list[str]:
    """What differs between the manifest's I/O and an engine's (empty list: they match).

    Args:
        engine_io: ``name -> (is_input, numpy dtype name, shape)`` as the engine reports it.
    """
    problems = []
    expected = {s.name: (True, s) for s in entry.inputs} | {s.name: (False, s) for s in entry.outputs}
    for name in sorted(set(expected) - set(engine_io)):
        problems.append(f"engine lacks tensor {name!r}")
    for name in sorted(set(engine_io) - set(expected)):
        problems.append(f"engine has unexpected tensor {name!r}")
    for name in sorted(set(expected) & set(engine_io)):
        is_input, spec = expected[name]
        got_input, got_dtype, got_shape = engine_io[name]
        if got_input != is_input:
            problems.append(
                f"{name!r} is an {'input' if got_input else 'output'} of the engine, the manifest says otherwise"
            )
        if got_dtype != spec.dtype and (spec.dtype, got_dtype) not in _CASTABLE:
            problems.append(f"{name!r} is {got_dtype} in the engine, {spec.dtype} in the manifest")
        if tuple(got_shape) != tuple(spec.shape) and not _fits(tuple(got_shape), tuple(spec.shape)):
            problems.append(f"{name!r} has shape {tuple(got_shape)} in the engine, {tuple(spec.shape)} in the manifest")
    return problems


def _fits(engine_shape: tuple, shape: tuple) -> bool:
    """A dynamic engine dim (-1) accepts any manifest value."""
    return len(engine_shape) == len(shape) and all(e in (-1, s) for e, s in zip(engine_shape, shape))


def source_digests(files: dict, source: Source) -> dict[str, str]:
    """sha256 of the ONNX file (and its weights file) from a bundle's ``files`` table."""
    rels = [source.file] + ([source.weights] if source.weights else [])
    missing = [r for r in rels if r not in files]
    if missing:
        raise BackendUnavailable(f"the bundle's file table lacks {missing}; re-export the bundle")
    return {r: files[r].sha256 for r in rels}


def key_material(
    graph: str, digests: dict[str, str], plan: PrecisionPlan, profile, gpu: GpuInfo, trt_version: str
) -> dict:
    """Everything an engine depends on; equal material <=> the same engine may be reused."""
    return {
        "schema": KEY_SCHEMA,
        "graph": graph,
        "sources": dict(sorted(digests.items())),
        "precision": plan.precision,
        "strongly_typed": plan.strongly_typed,
        "builder_flags": sorted(plan.builder_flags),
        "profile": [[name, list(shape)] for name, shape in profile],
        "gpu": gpu.name,
        "compute_capability": gpu.compute_capability,
        "tensorrt": str(trt_version),
    }


def engine_key(material: dict) -> str:
    """sha256 over the canonical JSON of the key material."""
    return hashlib.sha256(json.dumps(material, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def engine_filename(graph: str, precision: str, key: str) -> str:
    return f"{graph}.{precision}.{key[:16]}.plan"


def meta_path(engine_path: str | Path) -> Path:
    """The JSON sidecar that records an engine's key material, size and sha256."""
    return Path(engine_path).with_suffix(".json")


def describe_difference(old: dict, new: dict) -> str:
    """``"gpu: 'A' -> 'B'; tensorrt: '10.3' -> '10.8'"`` for the fields that differ."""
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "; ".join(diffs) or "no field differs"


def stale_reason(meta: dict | None, material: dict, engine_path: Path, sha256) -> str | None:
    """Why the engine at ``engine_path`` must not be used (None: it is current).

    Args:
        meta: the parsed sidecar, or None when it is missing or unreadable.
        material: the key material wanted now.
        sha256: ``path -> hex digest`` (injected so callers can cache or fake it).
    """
    if not engine_path.is_file():
        return "no engine file"
    if meta is None:
        return "no readable metadata next to the engine"
    if meta.get("key") != engine_key(material) or meta.get("material") != material:
        return "it was built for other inputs (" + describe_difference(meta.get("material") or {}, material) + ")"
    if meta.get("engine_bytes") != engine_path.stat().st_size:
        return (
            f"the engine file has {engine_path.stat().st_size} bytes, its metadata records {meta.get('engine_bytes')}"
        )
    if meta.get("engine_sha256") != sha256(engine_path):
        return "the engine file does not match the sha256 in its metadata"
    return None


def read_meta(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def default_cache_dir() -> Path:
    """``$ICD_EDGE_CACHE/trt``, else the user cache (see :mod:`icd_edge.cache`)."""
    from icd_edge.cache import cache_dir

    return cache_dir("trt")


def timing_cache_name(gpu: GpuInfo, trt_version: str) -> str:
    """Timing caches hold per-device, per-version tactic timings: one file per (GPU, TensorRT)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu.name).strip("-").lower() or "gpu"
    return f"timing-trt{trt_version}-{slug}-cc{gpu.compute_capability}.cache"
