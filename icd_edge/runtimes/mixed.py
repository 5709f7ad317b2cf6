"""One Editor, graphs on two CPU backends: what ``auto`` builds where a graph runs faster elsewhere.

The Editor and its session pool see one backend: :class:`RoutedBackend` opens each graph's session
on the backend its route names and passes everything else (probe, configure) to each member.
Only ``auto`` builds one (:func:`icd_edge.runtimes.select_backend`), from the measured per-graph
table :data:`icd_edge.runtimes.INT8_CPU_GRAPH_BACKEND`; a backend named by the user runs every graph.
"""

from __future__ import annotations

from typing import Mapping

from icd_edge.runtimes import Availability


class RoutedBackend:
    """``primary`` runs every graph but those ``routes`` sends to another member.

    ``name`` is ``"primary+other"``; :meth:`backend_for` says which member runs a graph."""

    fmt = "onnx"

    def __init__(self, primary, others: Mapping[str, object], routes: Mapping[str, str]):
        self.primary = primary
        self.members = {primary.name: primary, **others}
        unknown = sorted(set(routes.values()) - set(self.members))
        if unknown:  # a programming error: a route to a backend that was not built
            raise ValueError(f"routes name backends {unknown} that are not members")
        self.routes = dict(routes)
        self.name = "+".join(self.members)
        self.memory_policies = tuple(
            p for p in primary.memory_policies if all(p in m.memory_policies for m in self.members.values())
        )
        self.options = primary.options

    def backend_for(self, graph: str):
        return self.members[self.routes.get(graph, self.primary.name)]

    def describe(self) -> str:
        """``onnxruntime (vae_encoder, vae_decoder on openvino)``: for logs and reports."""
        by_backend: dict[str, list[str]] = {}
        for graph, name in self.routes.items():
            by_backend.setdefault(name, []).append(graph)
        rest = "; ".join(f"{', '.join(graphs)} on {name}" for name, graphs in by_backend.items())
        return f"{self.primary.name} ({rest})" if rest else self.primary.name

    def probe(self) -> Availability:
        probes = {name: m.probe() for name, m in self.members.items()}
        bad = [f"{name}: {a.reason}" for name, a in probes.items() if not a.ok]
        if bad:
            return Availability(False, "; ".join(bad))
        return Availability(True, "; ".join(a.reason for a in probes.values()))

    @staticmethod
    def auto_skip(bundle, memory: str) -> str | None:
        return None

    def configure(self, bundle, memory: str) -> None:
        for m in self.members.values():
            m.configure(bundle, memory)

    def open_session(self, bundle, graph: str):
        return self.backend_for(graph).open_session(bundle, graph)
