"""Backends behind one small interface, imported lazily (house style rules 4-5).

A backend has ``name``, ``fmt`` (the bundle artifact format it runs), ``probe()`` and
``open_session(bundle, graph)``. A session has ``run(feeds) -> outputs`` and ``close()``.
Selection: the user's choice, else the first backend in :data:`AUTO_ORDER` that probes OK
and whose format the bundle holds. A backend that was asked for and cannot run raises
:class:`~icd_edge.errors.BackendUnavailable` with the probe's reason; nothing falls back silently.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Mapping, Protocol

import numpy as np

from icd_edge.errors import BackendUnavailable, InputError

REGISTRY = {
    "onnxruntime": "icd_edge.runtimes.ort",
    "openvino": "icd_edge.runtimes.openvino",
    "torch": "icd_edge.runtimes.torch_ref",
    "tensorrt": "icd_edge.runtimes.trt",
    "coreml": "icd_edge.runtimes.coreml",
}
# openvino before onnxruntime for bundles with int8 UNets on the CPU classes where it measured faster
# (INT8_CPU_BACKEND); onnxruntime is faster for fp32/fp16 UNets, leaner in the sequential policy, and
# wins when it has a CUDA provider (docs/backends.md has the numbers)
AUTO_ORDER = ("tensorrt", "coreml", "openvino", "onnxruntime", "torch")
# The faster CPU backend for an int8 edit, per ISA class (icd_edge.cpu.isa_class), from full-size
# int8 edits on 2-core VMs (docs/backends.md): AMX Xeon openvino 19.0 s vs onnxruntime 29.6 s;
# AVX-512 VNNI EPYC 14.5 vs 26.4 s; AVX2-only EPYC onnxruntime 77.9 s vs openvino 94.9 s. Classes not measured take the
# measured class they share int8 kernels with: avx512 (no VNNI) and older x86 the AVX2 one; ARM
# boards stay on onnxruntime, the backend tested there.
INT8_CPU_BACKEND = {"amx": "openvino", "avx512-vnni": "openvino", "avx-vnni": "openvino",
                    "avx512": "onnxruntime", "avx2": "onnxruntime", "x86": "onnxruntime",
                    "arm-dotprod": "onnxruntime", "arm": "onnxruntime"}


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str


class Session(Protocol):
    graph: str

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class Backend(Protocol):
    name: str
    fmt: str

    def probe(self) -> Availability: ...

    def open_session(self, bundle, graph: str) -> Session: ...


def backend_class(name: str):
    if name not in REGISTRY:
        raise InputError(f"unknown backend {name!r}; choose one of: auto, {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name]).BACKEND


def probe_all() -> dict[str, Availability]:
    """Every registered backend's availability (imports only what each probe needs)."""
    return {name: backend_class(name)().probe() for name in REGISTRY}


def select_backend(name: str, bundle, low_memory: bool = False, **options) -> Backend:
    """The backend to run ``bundle`` with; ``name`` is a registry name or ``"auto"``.

    ``low_memory`` (the sequential policy) tells auto to prefer the backend with the lower peak
    memory where two could run the bundle."""
    formats = bundle.formats()
    if name != "auto":
        backend = backend_class(name)(**options)
        avail = backend.probe()
        if not avail.ok:
            raise BackendUnavailable(f"backend {name!r} is not available: {avail.reason}. Run `icd-edge doctor` to see what can run here.")
        if backend.fmt not in formats:
            raise BackendUnavailable(
                f"bundle {bundle.root} has no {backend.fmt!r} graphs for backend {name!r} (it has: {', '.join(sorted(formats))}); "
                f"re-export with --targets {backend.fmt} or pick another backend"
            )
        return backend
    reasons = []
    for candidate in AUTO_ORDER:
        if candidate == "openvino":
            why = _openvino_skip(bundle, low_memory)
            if why:
                reasons.append(f"openvino: {why}")
                continue
        cls = backend_class(candidate)
        # the options auto forwards are the CPU backends' (Editor.open / CLI); each gets those it takes
        backend = cls(**(_accepted(cls, options) if candidate in ("onnxruntime", "openvino") else {}))
        avail = backend.probe()
        if avail.ok and backend.fmt in formats:
            return backend
        reasons.append(f"{candidate}: {avail.reason if not avail.ok else 'bundle has no ' + backend.fmt + ' graphs'}")
    raise BackendUnavailable("no backend can run this bundle here (" + "; ".join(reasons) + ")")


def _accepted(cls, options: dict) -> dict:
    """The ``options`` that ``cls``'s constructor takes (auto passes each backend its own)."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in options.items() if k in params}


def _openvino_skip(bundle, low_memory: bool) -> str | None:
    """Why auto passes over openvino for this bundle (None: it does not)."""
    # the edit UNet (four batch-2 calls an edit) decides; int8 bundles keep the forward UNet fp32 by default
    edit = next((g for g in ("unet_reverse_edit", "unet_reverse") if g in bundle.graphs), None)
    if edit is None or not str((bundle.artifact(edit, "onnx") or {}).get("precision", "fp32")).startswith("int8"):
        return "onnxruntime is faster for fp32/fp16 UNets on the CPU"
    if low_memory:
        return "onnxruntime has the lower peak memory in the sequential policy"
    if _onnxruntime_has_gpu():
        return "onnxruntime runs on a GPU here"
    isa = _isa_class()
    if INT8_CPU_BACKEND.get(isa, "openvino") != "openvino":
        return f"onnxruntime runs int8 faster on this CPU class ({isa})"
    return None


def _isa_class() -> str:
    from icd_edge.cpu import info

    return info()["isa"]


def _onnxruntime_has_gpu() -> bool:
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
