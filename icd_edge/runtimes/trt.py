"""The ``tensorrt`` backend: probe only in this version (engine building and running are not built yet)."""

from __future__ import annotations

import importlib.util

from icd_edge.errors import BackendUnavailable
from icd_edge.runtimes import Availability


class TensorRTBackend:
    name = "tensorrt"
    fmt = "tensorrt"

    def probe(self) -> Availability:
        if importlib.util.find_spec("tensorrt") is None:
            return Availability(False, "not installed")
        return Availability(False, "tensorrt is installed, but this icd_edge version has no TensorRT backend yet")

    def open_session(self, bundle, graph):
        raise BackendUnavailable(f"tensorrt: {self.probe().reason}")


BACKEND = TensorRTBackend
