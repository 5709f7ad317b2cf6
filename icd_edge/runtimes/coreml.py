"""The ``coreml`` backend: a bundle's ``coreml/<graph>.mlpackage`` files through coremltools, macOS only.

Availability is decided up front from the platform and the installed packages; nothing is
predicted to find out. Each package is compiled once to ``.mlmodelc`` and kept in a cache
folder keyed by the package content, the coremltools version and the macOS version, so later
sessions load the compiled model directly instead of compiling the package again.

The other way to use Core ML is the ``onnxruntime`` backend: on macOS it adds onnxruntime's
CoreML execution provider when the installed onnxruntime has it, and runs the bundle's ONNX
graphs (operators the provider lacks fall back to the CPU).

Never imports torch.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from icd_edge.bundle.spec import check_feeds
from icd_edge.errors import BackendUnavailable, BundleError, InputError, ShapeMismatch
from icd_edge.runtimes import Availability, build_options

logger = logging.getLogger(__name__)

COMPUTE_UNITS = ("ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY")
MIN_MACOS = (14, 0)  # the lowest minimum_deployment_target the export writes (icd_edge.export.to_coreml.TARGETS)


@dataclass(frozen=True)
class CoreMLOptions:
    """Options only this backend understands.

    Attributes:
        compute_units: ``ALL`` (CPU, GPU and Neural Engine), ``CPU_AND_NE``, ``CPU_AND_GPU`` or
            ``CPU_ONLY``; Core ML decides per layer within the allowed units.
        cache_dir: where compiled models are kept; None uses :func:`default_cache_dir`.
    """

    compute_units: str = "ALL"
    cache_dir: Path | None = None

    def __post_init__(self):
        if self.compute_units not in COMPUTE_UNITS:
            raise InputError(f"compute_units must be one of {', '.join(COMPUTE_UNITS)}, got {self.compute_units!r}")
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def availability(
    system: str, mac_version: str, coremltools_version: str | None, native_lib: bool | None
) -> Availability:
    """The probe's decision from plain facts (pure, so it is tested on every platform).

    Args:
        system: ``platform.system()``.
        mac_version: ``platform.mac_ver()[0]`` ("" off macOS).
        coremltools_version: the installed version, None if it is not installed.
        native_lib: whether coremltools loaded its macOS library (None: not checked).
    """
    if system != "Darwin":
        return Availability(False, "Core ML runs only on macOS")
    if coremltools_version is None:
        return Availability(False, "not installed (pip install 'icd_edge[coreml]')")
    have = _version_tuple(mac_version)
    if have and have < MIN_MACOS:
        return Availability(
            False, f"the Core ML packages need macOS {MIN_MACOS[0]} or newer, this is macOS {mac_version}"
        )
    if native_lib is False:
        return Availability(
            False,
            f"coremltools {coremltools_version} has no native library here (libcoremlpython did not "
            "load): install a coremltools wheel built for this macOS and Python",
        )
    return Availability(True, f"coremltools {coremltools_version}, macOS {mac_version}")


def check_target(graph: str, target: str, mac_version: str) -> None:
    """Refuse a package whose ``minimum_deployment_target`` (``"macOS15"``) is newer than this macOS."""
    need = _version_tuple(target.removeprefix("macOS"))
    have = _version_tuple(mac_version)
    if not need or target != f"macOS{target.removeprefix('macOS')}":
        raise BundleError(
            f"the Core ML package of {graph} has an unknown deployment target {target!r}; re-export the bundle"
        )
    if have and have < need:
        raise BackendUnavailable(
            f"the Core ML package of {graph} needs {target} or newer, this is macOS {mac_version}; "
            "re-export with --coreml-attention standard (macOS 14) or use --backend onnxruntime"
        )


def default_cache_dir(
    system: str | None = None, env: Mapping[str, str] | None = None, home: Path | None = None
) -> Path:
    """``$ICD_EDGE_CACHE/coreml``, else ``~/Library/Caches/icd_edge/coreml`` on macOS (see
    :mod:`icd_edge.cache`)."""
    from icd_edge.cache import cache_dir

    return cache_dir("coreml", env, system, home)


def package_files(bundle_files: Mapping, package: str) -> dict[str, str]:
    """``{path inside the package: sha256}`` from the bundle's file table (no re-hashing)."""
    prefix = package.rstrip("/") + "/"
    table = {rel[len(prefix) :]: meta.sha256 for rel, meta in bundle_files.items() if rel.startswith(prefix)}
    if not table:
        raise BundleError(f"the bundle's file table lists no files under {package}; re-export the bundle")
    return table


def cache_key(files: Mapping[str, str], coremltools_version: str, macos_version: str) -> str:
    """sha256 over canonical JSON of the package content (file → sha256), the coremltools
    version and the macOS version: a new package, coremltools or OS compiles afresh."""
    blob = json.dumps(
        {"package": dict(sorted(files.items())), "coremltools": coremltools_version, "macos": macos_version},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def cast_feeds(graph: str, feeds: Mapping[str, np.ndarray], package_inputs: list[dict]) -> dict[str, np.ndarray]:
    """Feeds in the dtypes the package takes (``input_ids`` int64 → int32, range-checked)."""
    out = {}
    for spec in package_inputs:
        arr = feeds[spec["name"]]
        want = np.dtype(spec["dtype"])
        if arr.dtype != want:
            if np.issubdtype(want, np.integer):
                info = np.iinfo(want)
                if arr.size and (arr.min() < info.min or arr.max() > info.max):
                    raise ShapeMismatch(
                        f"{graph}.{spec['name']}: values outside the {want} range the Core ML package takes"
                    )
            arr = arr.astype(want)
        out[spec["name"]] = np.ascontiguousarray(arr)
    return out


class CoreMLSession:
    """One graph. ``model`` is anything with ``predict(dict) -> dict`` (a coremltools model)."""

    def __init__(self, graph: str, model, inputs, outputs, package_inputs: list[dict]):
        self.graph = graph
        self._model = model
        self._inputs, self._outputs = inputs, outputs
        self._package_inputs = package_inputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.graph, dict(feeds), self._inputs)
        got = self._model.predict(cast_feeds(self.graph, feeds, self._package_inputs))
        result = {}
        for spec in self._outputs:
            if spec.name not in got:
                raise BundleError(
                    f"Core ML {self.graph} returned {sorted(got)}, not {spec.name!r}; re-export the bundle"
                )
            arr = np.asarray(got[spec.name], dtype=np.float32)
            if tuple(arr.shape) != tuple(spec.shape):
                raise ShapeMismatch(
                    f"Core ML {self.graph}.{spec.name} came back {tuple(arr.shape)}, "
                    f"the manifest declares {tuple(spec.shape)}; re-export the bundle"
                )
            result[spec.name] = arr
        return result

    def close(self) -> None:
        self._model = None


def compile_cached(package: Path, key: str, cache_dir: Path) -> Path:
    """The compiled ``<cache_dir>/<key>.mlmodelc`` of ``package``, compiling it once (macOS).

    The compiler writes into a private temporary folder that is renamed into place only when it
    finished, so a present ``<key>.mlmodelc`` is always a whole compile of exactly that content.
    """
    from coremltools.models.utils import compile_model

    target = cache_dir / f"{key}.mlmodelc"
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.tmp-", dir=cache_dir))
    try:
        compiled = compile_model(str(package), destination_path=str(tmp / "model.mlmodelc"))
        try:
            os.replace(compiled, target)
        except OSError:
            if not target.is_dir():  # another process may have published the same key first
                raise
    except Exception as exc:  # coremltools raises bare Exception on compile failures
        raise BackendUnavailable(
            f"Core ML could not compile {package}: {exc}. Re-export the bundle or clear {cache_dir}"
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class CoreMLBackend:
    name = "coreml"
    fmt = "coreml"

    Options = CoreMLOptions
    memory_policies = ("resident", "sequential")

    def __init__(self, options: CoreMLOptions | None = None, **fields):
        self.options = build_options(CoreMLOptions, options, fields, self.name)

    @staticmethod
    def auto_skip(bundle, memory: str) -> str | None:
        return None

    def configure(self, bundle, memory: str) -> None:
        pass

    def probe(self) -> Availability:
        system = platform.system()
        if system != "Darwin":  # decided here, before anything is imported or predicted
            return availability(system, "", None, None)
        try:
            version = importlib.metadata.version("coremltools")
        except importlib.metadata.PackageNotFoundError:
            version = None
        native = None
        if version is not None and importlib.util.find_spec("coremltools") is not None:
            from coremltools.models import model as ct_model

            native = ct_model._MLModelProxy is not None
        return availability(system, platform.mac_ver()[0], version, native)

    def open_session(self, bundle, graph: str) -> CoreMLSession:
        avail = self.probe()
        if not avail.ok:
            raise BackendUnavailable(f"coreml: {avail.reason}")
        art = bundle.artifact(graph, self.fmt)
        if art is None:
            raise BackendUnavailable(
                f"bundle {bundle.root} has no Core ML package for {graph}; re-export with --targets onnx,coreml"
            )
        check_target(graph, art.details.get("minimum_deployment_target", "macOS14"), platform.mac_ver()[0])
        import coremltools as ct

        key = cache_key(package_files(bundle.manifest.files, art.file), ct.__version__, platform.mac_ver()[0])
        cache_dir = self.options.cache_dir or default_cache_dir()
        compiled = compile_cached(bundle.path(art.file), key, cache_dir)
        try:
            model = ct.models.CompiledMLModel(
                str(compiled), compute_units=getattr(ct.ComputeUnit, self.options.compute_units)
            )
        except Exception as exc:  # coremltools raises bare Exception on load failures
            raise BackendUnavailable(
                f"Core ML could not load {compiled} for {graph}: {exc}. Delete that folder to recompile it."
            ) from exc
        entry = bundle.graphs[graph]
        logger.info("coreml %s: %s (compute units %s)", graph, compiled, self.options.compute_units)
        return CoreMLSession(graph, model, entry.inputs, entry.outputs, art.details["inputs"])


BACKEND = CoreMLBackend
