"""One graph from its fp32 export to its precision, written into the bundle: the step the ONNX
target runs per graph."""

from __future__ import annotations

from pathlib import Path

import onnx

from icd_edge.export.quant.fp16 import to_fp16
from icd_edge.export.quant.int8 import quantize
from icd_edge.export.quant.policy import DEFAULT_INT8_OPS, DEFAULT_INT8_WEIGHTS
from icd_edge.export.quant.surgery import quantize_embeddings, quantize_gemm_weights


def convert(
    src: Path,
    dst: Path,
    precision: str,
    store,
    calibration: list[dict] | None = None,
    int8_embeddings: bool = False,
    int8_weights: str = DEFAULT_INT8_WEIGHTS,
    int8_ops: tuple[str, ...] = DEFAULT_INT8_OPS,
    int8_per_channel: bool = True,
) -> dict:
    """Write ``dst`` (weights into ``store``) as ``precision`` from the fp32 graph ``src``;
    ``int8_embeddings`` also stores an fp16 graph's embedding tables as int8 rows (int8 graphs always);
    ``int8_weights`` is the range of the quantised Conv/MatMul weights (:data:`.policy.INT8_WEIGHT_RANGES`),
    ``int8_ops`` the ops static int8 quantises, ``int8_per_channel`` whether their weights get a
    scale per output channel (else one per tensor).

    Returns what is worth recording: the quantiser's peak RSS (``peak_rss_gb``) for int8."""
    info = {}
    if precision == "fp32":
        model = onnx.load(str(src), load_external_data=True)
    elif precision == "fp16":
        model = to_fp16(src)
        if int8_embeddings:
            info["int8_embeddings"] = quantize_embeddings(model)
    else:
        model, info["peak_rss_gb"] = quantize(src, precision, calibration, int8_weights, int8_ops, int8_per_channel)
        info["int8_embeddings"] = quantize_embeddings(model)
        if precision == "int8":  # the dynamic quantiser already covers Gemm
            info["int8_gemm_weights"] = quantize_gemm_weights(model)
    store.externalize(model)
    onnx.save_model(model, str(dst))
    onnx.checker.check_model(str(dst))
    return info
