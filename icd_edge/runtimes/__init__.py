"""Backends behind one small interface, imported lazily.

A backend class has ``name``, ``fmt`` (the bundle artifact format it runs), ``Options`` (its typed
options), ``memory_policies`` (the Editor policies it can serve), ``probe()``, ``auto_skip(bundle,
memory)`` (why ``auto`` should pass it over, or None), ``configure(bundle, memory)`` (called once by
an Editor: the policy's meaning for this backend, warnings about the bundle) and
``open_session(bundle, graph)``. A session has ``run(feeds) -> outputs`` and ``close()``.
Selection: the user's choice, else the first backend in :data:`AUTO_ORDER` that does not skip,
probes OK and whose format the bundle holds; on the CPU, ``auto`` then sends the int8 graphs that
run faster on the other CPU backend there (:data:`INT8_CPU_GRAPH_BACKEND`) to that one
(:mod:`icd_edge.runtimes.mixed`). A backend that was asked for and cannot run raises
:class:`~icd_edge.errors.BackendUnavailable` with the probe's reason; nothing falls back silently.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
from dataclasses import dataclass
from typing import Iterable, Mapping, Protocol, runtime_checkable

import numpy as np

from icd_edge.errors import BackendUnavailable, InputError

# the int8 warning is about the user's edits, so it is logged where the Editor logs
_edit_logger = logging.getLogger("icd_edge.edit")
_WARNED: set[tuple[str, str]] = set()  # (bundle id, backend) pairs already warned about

REGISTRY = {
    "onnxruntime": "icd_edge.runtimes.ort",
    "openvino": "icd_edge.runtimes.openvino",
    "torch": "icd_edge.runtimes.torch_ref",
    "tensorrt": "icd_edge.runtimes.trt",
    "coreml": "icd_edge.runtimes.coreml",
}
AUTO_ORDER = ("tensorrt", "coreml", "openvino", "onnxruntime", "torch")
# The faster CPU backend for an int8 edit, per ISA class (icd_edge.cpu.isa_class), measured on
# full-size int8 edits (docs/backends.md has the figures). Classes not measured take the measured
# class they share int8 kernels with: avx512 without VNNI and older x86 the AVX2 one; ARM boards
# stay on onnxruntime, the backend tested there.
INT8_CPU_BACKEND = {
    "amx": "openvino",
    "avx512-vnni": "openvino",
    "avx-vnni": "openvino",
    "avx512": "onnxruntime",
    "avx2": "onnxruntime",
    "x86": "onnxruntime",
    "arm-dotprod": "onnxruntime",
    "arm": "onnxruntime",
}
# Graphs that run faster on the other CPU backend than the one INT8_CPU_BACKEND picks, per ISA class:
# int8 graphs of a full-size SD1.5 bundle timed one graph at a time on both backends, interleaved
# (benchmarks/cpu_graph_backends.py; docs/backends.md). Resident policy only: two runtimes' arenas.
INT8_CPU_GRAPH_BACKEND = {
    # OpenVINO 0.96x onnxruntime's time on the VAE decoder, 0.81x on TAESD's; the encoder a tie (1.01x),
    # the UNets 1.19-1.31x: those stay on onnxruntime
    "avx2": {"vae_decoder": "openvino", "taesd_decoder": "openvino"},
    # avx512-vnni: OpenVINO 0.67-0.79x onnxruntime's time on every int8 graph, so no entry
}


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str


class Session(Protocol):
    graph: str

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


@runtime_checkable
class Backend(Protocol):
    name: str
    fmt: str
    memory_policies: tuple[str, ...]

    def probe(self) -> Availability: ...

    def auto_skip(self, bundle, memory: str) -> str | None: ...

    def configure(self, bundle, memory: str) -> None: ...

    def open_session(self, bundle, graph: str) -> Session: ...


def backend_class(name: str):
    if name not in REGISTRY:
        raise InputError(f"unknown backend {name!r}; choose one of: auto, {', '.join(REGISTRY)}", param="backend")
    return importlib.import_module(REGISTRY[name]).BACKEND


def build_options(options_cls, given=None, fields: Mapping | None = None, backend: str = ""):
    """A backend's typed options: ``given`` (an instance of ``options_cls``, or None for the
    defaults) with keyword ``fields`` applied; an unknown field is an InputError naming the known ones."""
    if given is None:
        given = options_cls()
    elif not isinstance(given, options_cls):
        raise InputError(
            f"the {backend} backend takes {options_cls.__name__}, not {type(given).__name__}", param="options"
        )
    if fields:
        known = [f.name for f in dataclasses.fields(options_cls)]
        unknown = sorted(set(fields) - set(known))
        if unknown:
            raise InputError(
                f"the {backend} backend has no option {', '.join(map(repr, unknown))}; "
                f"its options are {', '.join(known)}",
                param="options",
            )
        given = dataclasses.replace(given, **fields)
    return given


def probe_all() -> dict[str, Availability]:
    """Every registered backend's availability (imports only what each probe needs)."""
    return {name: backend_class(name)().probe() for name in REGISTRY}


def _pick(cls, options: Iterable) -> object | None:
    """The options object of ``cls``'s type among ``options`` (None: its defaults)."""
    hits = [o for o in options if isinstance(o, cls.Options)]
    return hits[0] if hits else None


def select_backend(name: str, bundle, memory: str = "resident", options=(), **fields) -> Backend:
    """The backend to run ``bundle`` with under the memory policy ``memory``.

    ``name`` is a registry name or ``"auto"``; ``options`` one typed options object, or several
    for ``auto`` (each backend takes the one of its type); ``fields`` set options of a named backend."""
    formats = bundle.formats()
    options = tuple(options) if isinstance(options, (list, tuple)) else (options,)
    if name != "auto":
        cls = backend_class(name)
        if memory not in cls.memory_policies:
            raise InputError(
                f"backend {name!r} does not run the {memory} memory policy (it runs: {', '.join(cls.memory_policies)})",
                param="memory",
            )
        backend = cls(options=_pick(cls, options), **fields)
        avail = backend.probe()
        if not avail.ok:
            raise BackendUnavailable(
                f"backend {name!r} is not available: {avail.reason}. Run `icd-edge doctor` to see what can run here."
            )
        if backend.fmt not in formats:
            raise BackendUnavailable(
                f"bundle {bundle.root} has no {backend.fmt!r} graphs for backend {name!r} "
                f"(it has: {', '.join(sorted(formats))}); "
                f"re-export with --targets {backend.fmt} or pick another backend"
            )
        return backend
    if fields:
        raise InputError(
            f"backend options {', '.join(sorted(fields))} need a named backend; with auto pass typed "
            "options (e.g. options=OvOptions(...))",
            param="options",
        )
    reasons = []
    for candidate in AUTO_ORDER:
        cls = backend_class(candidate)
        why = (
            "it does not run this memory policy" if memory not in cls.memory_policies else cls.auto_skip(bundle, memory)
        )
        if why:
            reasons.append(f"{candidate}: {why}")
            continue
        backend = cls(options=_pick(cls, options))
        avail = backend.probe()
        if avail.ok and backend.fmt in formats:
            return route_graphs(backend, bundle, memory, options)
        reasons.append(f"{candidate}: {avail.reason if not avail.ok else 'bundle has no ' + backend.fmt + ' graphs'}")
    raise BackendUnavailable("no backend can run this bundle here (" + "; ".join(reasons) + ")")


def route_graphs(backend, bundle, memory: str = "resident", options=()):
    """``backend``, or a :class:`~icd_edge.runtimes.mixed.RoutedBackend` sending the int8 graphs
    that :data:`INT8_CPU_GRAPH_BACKEND` lists for this CPU class to the faster backend (when it is
    installed): what ``auto`` runs on the CPU."""
    from icd_edge.precision import is_int8

    if memory != "resident" or backend.name not in ("onnxruntime", "openvino"):
        return backend
    if backend.name == "onnxruntime" and not backend.runs_on_cpu():
        return backend
    table = INT8_CPU_GRAPH_BACKEND.get(isa_class(), {})
    routes = {
        g: name
        for g, name in table.items()
        if g in bundle.graphs and name != backend.name and is_int8(bundle.precision(g))
    }
    others = {}
    for name in sorted(set(routes.values())):
        cls = backend_class(name)
        other = cls(options=_pick(cls, options))
        if memory in cls.memory_policies and other.fmt in bundle.formats() and other.probe().ok:
            others[name] = other
    routes = {g: name for g, name in routes.items() if name in others}
    if not routes:
        return backend
    from icd_edge.runtimes.mixed import RoutedBackend

    return RoutedBackend(backend, others, routes)


def edit_unet_precision(bundle) -> str:
    """The stored precision of the edit UNet (four batch-2 calls an edit): what decides speed."""
    edit = next((g for g in ("unet_reverse_edit", "unet_reverse") if g in bundle.graphs), None)
    return (bundle.precision(edit) or "fp32") if edit is not None else "fp32"


def describe_backend(backend) -> str:
    """A backend's name, or for a routed one which graphs run where (for logs and reports)."""
    return backend.describe() if hasattr(backend, "describe") else backend.name


def int8_cpu_backend(isa: str) -> str:
    """The faster CPU backend for int8 edit UNets on ``isa`` (openvino for classes not in the table)."""
    return INT8_CPU_BACKEND.get(isa, "openvino")


def auto_cpu_plan(isa: str | None = None, available=None) -> dict:
    """What ``auto`` runs an int8 bundle with on a CPU class (resident policy, onnxruntime without
    CUDA), from the measured tables; ``available``: backend name -> installed here (None: probe).
    fp32/fp16 bundles and the sequential policy run on onnxruntime."""
    isa = isa or isa_class()
    if available is None:
        available = {n: backend_class(n)().probe().ok for n in ("onnxruntime", "openvino")}
    fastest = int8_cpu_backend(isa)
    backend = fastest if available.get(fastest) else "onnxruntime"
    routes = {g: b for g, b in INT8_CPU_GRAPH_BACKEND.get(isa, {}).items() if b != backend and available.get(b)}
    return {"isa": isa, "int8_fastest": fastest, "int8_backend": backend, "int8_graph_routes": routes}


def isa_class() -> str:
    from icd_edge.cpu import info

    return info()["isa"]


def onnxruntime_has_gpu() -> bool:
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def warn_if_int8_saturates(bundle, backend_name: str) -> None:
    """Warn once per bundle and CPU backend when the bundle's int8 weights are wider than this CPU's
    int8 kernels sum exactly (full 8-bit weights on a CPU without VNNI), measured on one-node graphs."""
    from icd_edge.precision import is_int8
    from icd_edge.runtimes import int8_kernels

    key = (bundle.bundle_id, backend_name)
    if (
        backend_name not in int8_kernels.BACKENDS
        or key in _WARNED
        or not any(is_int8(bundle.precision(g)) for g in bundle.graphs)
    ):
        return
    # bundles written before the manifest recorded the scheme used the full 8-bit range
    wmax = bundle.manifest.int8_scheme.weight_max if bundle.manifest.int8_scheme else 127
    if 2 * 255 * wmax <= 32767 or not int8_kernels.saturates(backend_name, wmax):
        return
    _WARNED.add(key)
    _edit_logger.warning(
        "this bundle's int8 weights use the range [-%d, %d], which %s's int8 kernels on this CPU (no VNNI) sum with "
        "saturation: edits lose quality. Re-export it with --int8-weights 7bit (the default), or run an fp16/fp32 "
        "bundle",
        wmax,
        wmax,
        backend_name,
    )
