"""The ``torch`` backend: the eager reference (ground truth for parity).

It runs the very modules the export traces (:mod:`icd_edge.graphs.wrappers`, P2P processors
included) on the diffusers/transformers classes, from a bundle's ``torch/`` weights or from
modules handed over in memory. Needs the ``export`` extra.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from icd_edge.bundle.spec import check_feeds
from icd_edge.errors import BackendUnavailable
from icd_edge.runtimes import Availability, build_options


def _has_module(name: str) -> bool:
    """Whether ``name`` can be imported, without importing it (a broken finder counts as missing)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class TorchSession:
    def __init__(self, graph: str, module, inputs, outputs, device: str):
        self.graph, self.module, self.device = graph, module, device
        self._inputs, self._outputs = inputs, outputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        check_feeds(self.graph, dict(feeds), self._inputs)
        # np.require copies read-only arrays (a cached inversion's): torch.from_numpy wants them writable
        arrays = [np.require(feeds[s.name], requirements=["C", "W"]) for s in self._inputs]
        args = [torch.from_numpy(a).to(self.device) for a in arrays]
        with torch.inference_mode():
            out = self.module(*args)
        out = out if isinstance(out, tuple) else (out,)
        return {s.name: o.float().cpu().numpy() for s, o in zip(self._outputs, out)}

    def close(self) -> None:
        self.module = None


@dataclass(frozen=True)
class TorchOptions:
    """Attributes: device: where the reference runs (``cpu`` unless checking a GPU)."""

    device: str = "cpu"


class TorchBackend:
    """Args: graphs: optional in-memory ``{graph: nn.Module}`` (export-time parity); options."""

    name = "torch"
    fmt = "torch"
    Options = TorchOptions
    memory_policies = ("resident", "sequential")

    def __init__(self, graphs: dict | None = None, options: TorchOptions | None = None, **fields):
        self._graphs = graphs
        self.options = build_options(TorchOptions, options, fields, self.name)
        self.device = self.options.device
        self._lock = threading.Lock()

    @staticmethod
    def auto_skip(bundle, memory: str) -> str | None:
        return None

    def configure(self, bundle, memory: str) -> None:
        pass  # the reference keeps its modules loaded under every policy

    def probe(self) -> Availability:
        missing = [m for m in ("torch", "diffusers", "transformers") if not _has_module(m)]
        if missing:
            return Availability(False, f"not installed ({', '.join(missing)} missing; pip install 'icd_edge[export]')")
        import importlib.metadata

        # the version from the package metadata: doctor and auto must not pay torch's import
        return Availability(True, f"torch {importlib.metadata.version('torch')} (reference, {self.device})")

    def _load_graphs(self, bundle) -> dict:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        from icd_edge.graphs.wrappers import build_graphs

        def part(name):
            art = bundle.artifact(name, "torch")
            if art is None:
                raise BackendUnavailable(
                    f"bundle {bundle.root} has no torch weights for {name}; re-export with --targets onnx,torch"
                )
            return bundle.path(art.dir)

        # safetensors only: a bundle never unpickles anything
        text = CLIPTextModel.from_pretrained(part("text_encoder"), use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(part("vae_encoder"), use_safetensors=True)
        fwd = UNet2DConditionModel.from_pretrained(part("unet_forward"), use_safetensors=True)
        rev = UNet2DConditionModel.from_pretrained(part("unet_reverse"), use_safetensors=True)
        if bundle.manifest.family == "sdxl":
            from transformers import CLIPTextModelWithProjection

            from icd_edge.graphs.wrappers import build_xl_graphs

            text_2 = CLIPTextModelWithProjection.from_pretrained(part("text_encoder_2"), use_safetensors=True)
            graphs = build_xl_graphs(text, text_2, vae, fwd, rev)
        else:
            taesd = None
            if "taesd_decoder" in bundle.graphs and bundle.artifact("taesd_decoder", "torch") is not None:
                from diffusers import AutoencoderTiny

                taesd = AutoencoderTiny.from_pretrained(part("taesd_decoder"), use_safetensors=True)
            graphs = build_graphs(text, vae, fwd, rev, bundle.dims, taesd)
        return {k: v.to(self.device) for k, v in graphs.items()}

    def open_session(self, bundle, graph: str) -> TorchSession:
        with self._lock:
            if self._graphs is None:
                self._graphs = self._load_graphs(bundle)
        entry = bundle.graphs[graph]
        return TorchSession(graph, self._graphs[graph], entry.inputs, entry.outputs, self.device)


BACKEND = TorchBackend
