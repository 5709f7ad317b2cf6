"""fp16 graphs by onnxconverter-common's float16 conversion, with fp32 inputs/outputs kept
(``keep_io_types``), so host math and feeds stay float32."""

from __future__ import annotations

from pathlib import Path

import onnx


def to_fp16(src: Path) -> onnx.ModelProto:
    """The fp32 graph ``src`` (weights read from its external data) converted to float16."""
    from onnxconverter_common import float16

    # the path API infers shapes from the file: a > 2 GB UNet cannot be serialised in memory
    return float16.convert_float_to_float16_model_path(str(src), keep_io_types=True)
