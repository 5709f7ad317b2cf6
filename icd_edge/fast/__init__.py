"""The compiled GPU editor (torch, CUDA): the same iCD loop with the step math on the device."""

from icd_edge.fast.editor import FastEditor, FastOptions

__all__ = ["FastEditor", "FastOptions"]
