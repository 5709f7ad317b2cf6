"""Export stage (needs torch, diffusers, transformers, onnx): ``python -m icd_edge.export``.

Loads SD1.5 parts, the CFG-distilled teacher UNet and the iCD forward/reverse LoRAs, fuses
them, traces every graph of :mod:`icd_edge.bundle.spec` and writes a verified bundle.
"""
