"""Backends behind one small interface, imported lazily (house style rules 4-5).

A backend has ``name``, ``fmt`` (the bundle artifact format it runs), ``probe()`` and
``open_session(bundle, graph)``. A session has ``run(feeds) -> outputs`` and ``close()``.
Selection: the user's choice, else the first backend in :data:`AUTO_ORDER` that probes OK
and whose format the bundle holds. A backend that was asked for and cannot run raises
:class:`~icd_edge.errors.BackendUnavailable` with the probe's reason; nothing falls back silently.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Mapping, Protocol

import numpy as np

from icd_edge.errors import BackendUnavailable, InputError

REGISTRY = {
    "onnxruntime": "icd_edge.runtimes.ort",
    "torch": "icd_edge.runtimes.torch_ref",
    "tensorrt": "icd_edge.runtimes.trt",
    "coreml": "icd_edge.runtimes.coreml",
}
AUTO_ORDER = ("tensorrt", "coreml", "onnxruntime", "torch")


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


def select_backend(name: str, bundle, **options) -> Backend:
    """The backend to run ``bundle`` with; ``name`` is a registry name or ``"auto"``."""
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
        backend = backend_class(candidate)(**(options if candidate == "onnxruntime" else {}))
        avail = backend.probe()
        if avail.ok and backend.fmt in formats:
            return backend
        reasons.append(f"{candidate}: {avail.reason if not avail.ok else 'bundle has no ' + backend.fmt + ' graphs'}")
    raise BackendUnavailable("no backend can run this bundle here (" + "; ".join(reasons) + ")")
