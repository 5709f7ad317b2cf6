"""One vocabulary of numeric precisions, mapped to each library's own names where they differ.

``fp32``, ``fp16``, ``bf16``, ``int8`` (static Q/DQ), ``int8-dynamic``; ``auto`` where a backend
chooses. The spellings other tools use (``f32``, ``float16``, ``half``...) are accepted as input.
"""

from __future__ import annotations

from icd_edge.errors import InputError

FP32, FP16, BF16, INT8, INT8_DYNAMIC, AUTO = "fp32", "fp16", "bf16", "int8", "int8-dynamic", "auto"
ALL = (FP32, FP16, BF16, INT8, INT8_DYNAMIC)
FLOATS = (FP32, FP16, BF16)
ALIASES = {
    "f32": FP32,
    "float32": FP32,
    "float": FP32,
    "f16": FP16,
    "float16": FP16,
    "half": FP16,
    "bfloat16": BF16,
    "i8": INT8,
}
# per-library names
OPENVINO = {FP32: "f32", FP16: "f16", BF16: "bf16"}  # INFERENCE_PRECISION_HINT
TORCH = {FP32: "float32", FP16: "float16", BF16: "bfloat16"}  # torch dtype attribute names


def canonical(value, allowed: tuple[str, ...], what: str = "precision", param: str = "precision") -> str:
    """``value`` in this vocabulary (aliases mapped), or an InputError listing ``allowed``."""
    name = ALIASES.get(value.lower(), value.lower()) if isinstance(value, str) else value
    if name not in allowed:
        raise InputError(f"{what} must be one of {', '.join(allowed)}, got {value!r}", param=param)
    return name


def is_int8(precision: str | None) -> bool:
    return bool(precision) and str(precision).startswith(INT8)


def from_library(name: str) -> str:
    """Our name of a library's precision name (``f32`` → ``fp32``); unknown names pass through."""
    return ALIASES.get(name, name)
