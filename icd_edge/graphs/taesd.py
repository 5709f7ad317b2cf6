"""The TAESD decoder as a graph: the tiny preview/fast decoder traced by the export."""

from __future__ import annotations

import torch


class TaesdDecoderGraph(torch.nn.Module):
    def __init__(self, taesd):
        super().__init__()
        self.taesd = taesd

    def forward(self, latent):
        """latent (1, 4, h, w) in UNet space (not divided by 0.18215) → image (1, 3, 8h, 8w) in [-1, 1]."""
        return self.taesd.decoder(latent)
