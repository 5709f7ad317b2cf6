"""Which precision each graph gets, and the int8 scheme's constants: no ONNX work here.

By default int8 applies to the reverse UNets (plain, edit and the re-edit pair). The forward UNet
stays fp32: its error in x_999 is amplified by the reverse jumps (Π c1 ≈ 14.6 over the 4 reverse
steps), which on the tiny model cost 5 dB end to end; ``--graph-precision unet_forward=int8``
overrides. The VAE and text encoder stay fp32 unless overridden.
"""

from __future__ import annotations

from icd_edge import precision
from icd_edge.errors import ExportError

PRECISIONS = (precision.FP32, precision.FP16, precision.INT8, precision.INT8_DYNAMIC)  # the export stores these
UNETS = ("unet_forward", "unet_reverse", "unet_reverse_edit", "unet_reverse_source", "unet_reverse_target")
INT8_DEFAULT = ("unet_reverse", "unet_reverse_edit", "unet_reverse_source", "unet_reverse_target")
# Conv and MatMul carry almost all UNet FLOPs; the time-embedding Gemms are tiny and sensitive
# (left out, their weights are stored weight-only int8 instead).
DEFAULT_INT8_OPS = ("Conv", "MatMul")
# what --int8-ops may name: the ops whose weights the static path quantises
INT8_OP_CHOICES = ("Conv", "MatMul", "Gemm")
DEFAULT_E2E_GATE_DB = {"fp32": 45.0, "fp16": 35.0, "int8": 25.0, "int8-dynamic": 25.0}
# Largest |weight| of the quantised Conv/MatMul weights. Without VNNI, x86 int8 kernels (ONNX Runtime's
# and OpenVINO's) add two u8·s8 products in a signed 16-bit lane (vpmaddubsw): 2·255·127 saturates it,
# 2·255·64 = 32640 does not. "8bit" is exact only on CPUs with VNNI/AMX (and non-x86).
INT8_WEIGHT_RANGES = {"7bit": 64, "8bit": 127}
DEFAULT_INT8_WEIGHTS = "7bit"


def int8_scheme(weights: str, per_channel: bool = True) -> dict:
    """What the manifest records about how the int8 graphs' integer products are formed."""
    wmax = INT8_WEIGHT_RANGES[weights]
    scales = "per output channel" if per_channel else "per tensor"
    return {
        "activations": "uint8, per tensor",
        "weights": f"int8, symmetric, {scales}",
        "weight_range": weights,
        "weight_max": wmax,
        "exact_without_vnni": 2 * 255 * wmax <= 32767,
    }


XL_FP32_GRAPHS = ("vae_encoder", "vae_decoder")  # SDXL's VAE overflows in fp16 (the official code upcasts it)


def graph_precisions(
    precision: str, overrides: dict[str, str], graphs, family: str = "sd15", fp16_vae: bool = False
) -> dict[str, str]:
    """Precision per graph: the global one (int8 only for UNets; SDXL's VAE fp32 unless it is an
    fp16-safe one, ``fp16_vae``), then ``overrides``."""
    for p in [precision, *overrides.values()]:
        if p not in PRECISIONS:
            raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {p!r}")
    unknown = set(overrides) - set(graphs)
    if unknown:
        raise ExportError(f"--graph-precision names unknown graphs {sorted(unknown)}; graphs are {', '.join(graphs)}")
    out = {g: (precision if precision in ("fp32", "fp16") or g in INT8_DEFAULT else "fp32") for g in graphs}
    if family == "sdxl" and not fp16_vae:
        out.update({g: "fp32" for g in XL_FP32_GRAPHS if g in out})
    out.update(overrides)
    return out
