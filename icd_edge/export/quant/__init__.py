"""fp16 and int8 ONNX graphs from the fp32 export.

:mod:`.policy` picks each graph's precision and holds the int8 scheme, :mod:`.stage` converts one
graph (:mod:`.fp16`, or :mod:`.int8` in a child process), :mod:`.calibration` records the int8
calibration feeds and ranges, :mod:`.surgery` edits ONNX graphs directly.
"""

from icd_edge.export.quant.calibration import CALIBRATION, calibrate_ranges, calibration_cases, record_trajectories
from icd_edge.export.quant.policy import (
    DEFAULT_E2E_GATE_DB,
    DEFAULT_INT8_WEIGHTS,
    INT8_DEFAULT,
    INT8_WEIGHT_RANGES,
    PRECISIONS,
    UNETS,
    graph_precisions,
    int8_scheme,
)
from icd_edge.export.quant.stage import convert
from icd_edge.export.quant.surgery import activation_matmuls, quantize_embeddings, quantize_gemm_weights

__all__ = [
    "CALIBRATION",
    "DEFAULT_E2E_GATE_DB",
    "DEFAULT_INT8_WEIGHTS",
    "INT8_DEFAULT",
    "INT8_WEIGHT_RANGES",
    "PRECISIONS",
    "UNETS",
    "activation_matmuls",
    "calibrate_ranges",
    "calibration_cases",
    "convert",
    "graph_precisions",
    "int8_scheme",
    "quantize_embeddings",
    "quantize_gemm_weights",
    "record_trajectories",
]
