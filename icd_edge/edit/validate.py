"""Argument checks shared by the editors: each raises :class:`InputError` naming the parameter."""

from __future__ import annotations

import math

import numpy as np

from icd_edge.errors import InputError
from icd_edge.rng import RNGS


def check_prompt(prompt, what: str) -> str:
    if not isinstance(prompt, str):
        raise InputError(f"{what} must be a string, got {type(prompt).__name__}", param=what)
    try:  # lone surrogates: what Python makes of undecodable bytes in argv, or a broken str
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(
            f"{what} is not valid text (undecodable bytes or lone surrogates); pass UTF-8 text", param=what
        ) from None
    if not prompt.strip():
        raise InputError(f"{what} is empty; describe the picture, e.g. 'a photo of a cat'", param=what)
    if any(ord(c) < 32 and c not in "\t\n\r" for c in prompt):
        raise InputError(f"{what} contains control characters; remove them", param=what)
    return prompt


def check_range(value, lo: float, hi: float, what: str, hint: str = "", param: str | None = None) -> float:
    param = param or what
    if isinstance(value, bool):
        raise InputError(f"{what} must be a number in [{lo:g}, {hi:g}], got {value!r}", param=param)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number in [{lo:g}, {hi:g}], got {value!r}", param=param) from None
    if not (math.isfinite(v) and lo <= v <= hi):
        raise InputError(f"{what} must be in [{lo:g}, {hi:g}], got {value!r}{hint}", param=param)
    return v


def check_rng(rng) -> str:
    if rng not in RNGS:
        raise InputError(f"rng must be one of {', '.join(RNGS)}, got {rng!r}", param="rng")
    return rng


def check_array(value, shape: tuple, what: str) -> np.ndarray:
    """A float array of exactly ``shape`` (a leading batch axis of 1 may be left out), finite."""
    arr = np.asarray(value)
    if arr.shape == shape[1:] and shape[0] == 1:
        arr = arr[None]
    if arr.shape != shape:
        raise InputError(f"{what} must have shape {shape}, got {arr.shape}", param=what)
    if arr.dtype.kind != "f":
        raise InputError(f"{what} must be a float array, got {arr.dtype}", param=what)
    if not np.isfinite(arr).all():
        raise InputError(f"{what} holds NaN or infinity", param=what)
    return np.ascontiguousarray(arr, dtype=np.float32)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**63:
        raise InputError(f"seed must be an integer in [0, 2^63), got {seed!r}", param="seed")
    return int(seed)
