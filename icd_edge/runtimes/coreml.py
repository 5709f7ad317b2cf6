"""The ``coreml`` backend: probe only in this version (conversion and prediction are not built yet)."""

from __future__ import annotations

import platform

from icd_edge.errors import BackendUnavailable
from icd_edge.runtimes import Availability


class CoreMLBackend:
    name = "coreml"
    fmt = "coreml"

    def probe(self) -> Availability:
        if platform.system() != "Darwin":
            return Availability(False, "Core ML runs only on macOS")
        return Availability(False, "this icd_edge version has no Core ML backend yet")

    def open_session(self, bundle, graph):
        raise BackendUnavailable(f"coreml: {self.probe().reason}")


BACKEND = CoreMLBackend
