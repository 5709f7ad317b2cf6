"""Parity measures between a backend's output and the torch reference."""

from __future__ import annotations

import numpy as np

# Per-graph gates (fp32). An ONNX graph that misses its gate fails the export.
GRAPH_MIN_PSNR_DB = 60.0
# End to end, decoded image in [0, 1] (issue: ≥ 45 dB in fp32).
E2E_MIN_PSNR_DB = 45.0


def psnr_db(reference: np.ndarray, test: np.ndarray, peak: float | None = None) -> float:
    """``20·log10(peak / RMSE)``; ``peak`` defaults to max |reference| (1.0 for images in [0, 1]).

    Identical arrays give +inf, reported as 999.0 so the manifest stays valid JSON.
    """
    ref = np.asarray(reference, dtype=np.float64)
    tst = np.asarray(test, dtype=np.float64)
    if ref.shape != tst.shape:
        raise ValueError(f"shapes differ: {ref.shape} vs {tst.shape}")
    peak = float(np.abs(ref).max()) if peak is None else peak
    rmse = float(np.sqrt(np.mean((ref - tst) ** 2)))
    if rmse == 0.0:
        return 999.0
    return float(20.0 * np.log10(max(peak, 1e-12) / rmse))


def max_abs_err(reference: np.ndarray, test: np.ndarray) -> float:
    return float(np.abs(np.asarray(reference, np.float64) - np.asarray(test, np.float64)).max())


def compare(reference: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> dict:
    """Per-output PSNR and max-abs error, plus the worst PSNR as ``psnr_db``."""
    out = {}
    for name, ref in reference.items():
        out[name] = {"psnr_db": round(psnr_db(ref, test[name]), 2), "max_abs_err": max_abs_err(ref, test[name])}
    return {"psnr_db": min(v["psnr_db"] for v in out.values()), "outputs": out}
