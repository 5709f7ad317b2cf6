"""Noise for inversions and generations, without torch.

Two generators:

* ``torch`` (default, as the official code): :func:`torch_randn` returns exactly
  ``torch.randn(shape, generator=torch.Generator().manual_seed(seed))`` on the CPU, float32, bit
  for bit, so a seed gives the same picture as the official implementation.
* ``numpy``: numpy's PCG64 ``standard_normal`` (what icd_edge used before; kept for old seeds).

How torch draws (and what :func:`torch_randn` replays): a Mersenne twister (MT19937, seeded with
the seed's low 32 bits) fills the tensor with float uniforms ``(u32 & 0xFFFFFF) · 2⁻²⁴``, then
Box–Muller turns each block of 16 into normals, pairs (j, j+8); when the size is not a multiple of
16 the last 16 values are redrawn and transformed again. Tensors of fewer than 16 elements take a
different path: double-precision Box–Muller on 53-bit uniforms, the sine half kept for the next
element. Which Box–Muller arithmetic runs depends on the CPU kernel torch dispatches:

* ``vectorized``: x86 CPUs with AVX2 (or AVX-512): torch's AVX2 kernel with Cephes polynomial
  ``log``/``sincos`` in float32 and fused multiply-adds. Replayed here in numpy; an FMA is a float64
  multiply-add rounded to float32 (the product of two floats is exact in float64).
* ``default``: every other CPU torch runs on (ARM, Apple silicon, x86 without AVX2): float32
  ``logf``/``cosf``/``sinf`` of the platform's C library, called through ctypes here.

``kernel="auto"`` picks what torch picks on this machine, so the two always agree where they run;
pass the other one to reproduce noise made on another kind of machine (official results computed
on an x86 GPU server used ``vectorized``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import platform

import numpy as np

from icd_edge.errors import InputError

RNGS = ("torch", "numpy")
KERNELS = ("auto", "vectorized", "default")
_F = np.float32


def noise(shape, seed: int, rng: str = "torch") -> np.ndarray:
    """Standard normal noise of ``shape`` (float32) from ``rng`` (``torch`` or ``numpy``)."""
    if rng == "torch":
        if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            # an app re-inverts with the same seed: replaying the twister costs ~1 ms an edit
            shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
            return _torch_randn_cached(shape, int(seed), torch_kernel()).copy()
        return torch_randn(shape, seed)
    if rng == "numpy":
        return np.random.default_rng(seed).standard_normal(tuple(shape), dtype=np.float32)
    raise InputError(f"rng must be one of {', '.join(RNGS)}, got {rng!r}", param="rng")


def torch_randn(shape, seed: int, kernel: str = "auto") -> np.ndarray:
    """``torch.randn(shape, generator=torch.Generator().manual_seed(seed))`` on the CPU, bit for
    bit, as a float32 numpy array (see the module docstring for ``kernel``)."""
    shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise InputError(f"shape must have non-negative sizes, got {shape}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}", param="seed")
    if kernel not in KERNELS:
        raise InputError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    n = int(np.prod(shape, dtype=np.int64))
    seed32 = int(seed) & 0xFFFFFFFF  # torch's MT19937 takes the low 32 bits
    if n < 16:
        return _small(seed32, n).reshape(shape)
    return _normals(_mt19937(seed32, _words(n)), n, kernel).reshape(shape)


@functools.lru_cache(maxsize=8)
def _torch_randn_cached(shape: tuple, seed: int, kernel: str) -> np.ndarray:
    out = torch_randn(shape, seed, kernel)
    out.setflags(write=False)
    return out


def torch_randn_sequence(shapes, seed: int, kernel: str = "auto") -> list[np.ndarray]:
    """Consecutive ``torch.randn`` draws of ``shapes`` from one generator seeded with ``seed``
    (SDXL's encode samples the posterior, then draws the start noise from the same generator).
    Each draw takes its own words of the twister; shapes of fewer than 16 elements are refused
    (torch draws those through a path with carried state)."""
    shapes = [tuple(int(d) for d in sh) for sh in shapes]
    sizes = [int(np.prod(sh, dtype=np.int64)) for sh in shapes]
    if any(n < 16 for n in sizes):
        raise InputError(f"each draw of a sequence needs at least 16 elements, got shapes {shapes}")
    first = torch_randn(shapes[0], seed, kernel)  # validates seed and kernel
    words = _mt19937(int(seed) & 0xFFFFFFFF, sum(_words(n) for n in sizes))
    out, at = [first], _words(sizes[0])
    for sh, n in zip(shapes[1:], sizes[1:]):
        out.append(_normals(words[at : at + _words(n)], n, kernel).reshape(sh))
        at += _words(n)
    return out


def _words(n: int) -> int:
    """Twister outputs one draw of n ≥ 16 normals consumes: one per element, 16 more for a redrawn tail."""
    return n + (16 if n % 16 else 0)


def _normals(words: np.ndarray, n: int, kernel: str) -> np.ndarray:
    kernel = torch_kernel() if kernel == "auto" else kernel
    out = _uniform(words[:n])
    fill = _fill_vectorized if kernel == "vectorized" else _fill_default
    k = n // 16
    out[: k * 16] = fill(out[: k * 16].reshape(k, 16)).reshape(-1)
    if n % 16:
        out[n - 16 :] = fill(_uniform(words[n : n + 16])[None])[0]
    return out


@functools.lru_cache(maxsize=1)
def torch_kernel() -> str:
    """The Box–Muller kernel torch's CPU ``randn`` uses on this machine."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        from icd_edge.cpu import info

        return "vectorized" if "avx2" in info()["features"] else "default"
    return "default"


def _mt19937(seed: int, n: int) -> np.ndarray:
    """The first ``n`` 32-bit outputs of MT19937 with the reference (Knuth) seeding."""
    bits = np.random.MT19937(0)
    bits._legacy_seeding(seed)  # init_genrand(seed): the reference seeding, as torch's at::mt19937
    return bits.random_raw(n).astype(np.uint32)


def _uniform(words: np.ndarray) -> np.ndarray:
    return (words & np.uint32(0xFFFFFF)).astype(_F) * _F(2.0**-24)


def _fma(a, b, c) -> np.ndarray:
    """float32 fused multiply-add."""
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(_F)


def _log_cephes(x: np.ndarray) -> np.ndarray:
    """Cephes' float32 logarithm as torch's AVX2 kernel computes it (exponent split, degree-9
    polynomial in the mantissa around 1, ln 2 in two parts), with its fused multiply-adds."""
    x = np.maximum(x, np.array(0x00800000, np.uint32).view(_F))
    bits = x.view(np.uint32)
    e = ((bits >> np.uint32(23)).astype(np.int32) - 0x7F).astype(_F) + _F(1)
    x = ((bits & ~np.uint32(0x7F800000)) | _F(0.5).view(np.uint32)).view(_F)  # mantissa in [0.5, 1)
    small = x < _F(0.707106781186547524)
    keep = np.where(small, x, _F(0))
    x = (x - _F(1)).astype(_F)
    e = np.where(small, e - _F(1), e).astype(_F)
    x = (x + keep).astype(_F)  # 2x - 1 below sqrt(1/2), else x - 1
    z = (x * x).astype(_F)
    y = np.full_like(x, _F(7.0376836292e-2))
    for c in (
        -1.1514610310e-1,
        1.1676998740e-1,
        -1.2420140846e-1,
        1.4249322787e-1,
        -1.6668057665e-1,
        2.0000714765e-1,
        -2.4999993993e-1,
        3.3333331174e-1,
    ):
        y = _fma(y, x, _F(c))
    y = (y * x).astype(_F)
    y = _fma(y, z, (e * _F(-2.12194440e-4)).astype(_F))
    y = _fma(z, _F(-0.5), y)
    return _fma(e, _F(0.693359375), (x + y).astype(_F))


def _sincos_cephes(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cephes' float32 sine and cosine as torch's AVX2 kernel computes them (octant reduction by
    π/4 in three parts, the two minimax polynomials, signs from the octant)."""
    bits = theta.view(np.uint32)
    sign_sin = bits & np.uint32(0x80000000)
    x = (bits & np.uint32(0x7FFFFFFF)).view(_F)
    octant = (x * _F(1.27323954473516)).astype(_F).astype(np.int32)  # ×4/π, truncated
    octant = (octant + 1) & ~np.int32(1)
    q = octant.astype(_F)
    sign_sin = sign_sin ^ ((octant & 4).astype(np.uint32) << np.uint32(29))
    sign_cos = ((~(octant - 2)) & 4).astype(np.uint32) << np.uint32(29)
    use_sine_poly = (octant & 2) == 0
    for part in (-0.78515625, -2.4187564849853515625e-4, -3.77489497744594108e-8):
        x = _fma(q, _F(part), x)
    z = (x * x).astype(_F)
    cos_p = _fma(np.full_like(z, _F(2.443315711809948e-5)), z, _F(-1.388731625493765e-3))
    cos_p = _fma(cos_p, z, _F(4.166664568298827e-2))
    cos_p = (cos_p * z).astype(_F)
    cos_p = _fma(cos_p, z, -(z * _F(0.5)).astype(_F))
    cos_p = (cos_p + _F(1)).astype(_F)
    sin_p = _fma(np.full_like(z, _F(-1.9515295891e-4)), z, _F(8.3321608736e-3))
    sin_p = _fma(sin_p, z, _F(-1.6666654611e-1))
    sin_p = (sin_p * z).astype(_F)
    sin_p = _fma(sin_p, x, x)
    s = np.where(use_sine_poly, sin_p, cos_p)
    c = np.where(use_sine_poly, cos_p, sin_p)
    return (s.view(np.uint32) ^ sign_sin).view(_F), (c.view(np.uint32) ^ sign_cos).view(_F)


def _fill_vectorized(blocks: np.ndarray) -> np.ndarray:
    """Box–Muller of (k, 16) uniforms, torch's AVX2 kernel."""
    u1 = (_F(1) - blocks[:, :8]).astype(_F)
    radius = np.sqrt((_F(-2) * _log_cephes(u1)).astype(_F)).astype(_F)
    s, c = _sincos_cephes((_F(2.0 * math.pi) * blocks[:, 8:]).astype(_F))
    return np.concatenate([(radius * c).astype(_F), (radius * s).astype(_F)], axis=1)


@functools.lru_cache(maxsize=1)
def _libm():
    lib = ctypes.CDLL(ctypes.util.find_library("m") or ("libm.so.6" if platform.system() == "Linux" else None))
    for name in ("logf", "cosf", "sinf"):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]
    return lib


def _fill_default(blocks: np.ndarray) -> np.ndarray:
    """Box–Muller of (k, 16) uniforms, torch's generic kernel: float32 libm calls, θ computed in
    double and rounded to float."""
    lib = _libm()
    out = np.empty_like(blocks)
    for b, row in enumerate(blocks):
        for j in range(8):
            lg = _F(lib.logf(float(_F(1) - row[j])))
            radius = _F(math.sqrt(float(_F(-2) * lg)))  # sqrtf: the double root rounds the same
            theta = float(_F(2.0 * math.pi * float(row[j + 8])))
            out[b, j] = _F(radius * _F(lib.cosf(theta)))
            out[b, j + 8] = _F(radius * _F(lib.sinf(theta)))
    return out


def _small(seed: int, n: int) -> np.ndarray:
    """Fewer than 16 elements: double Box–Muller on 53-bit uniforms (two draws each), the sine
    half cached for the next element; the C library's log1p/sin/cos (Python's math module)."""
    words = _mt19937(seed, 4 * max(n, 1)).astype(np.uint64)
    out = np.empty(n, _F)
    k, cached = 0, None
    for i in range(n):
        if cached is not None:
            out[i], cached = _F(cached), None
            continue
        u = []
        for _ in range(2):
            v = (int(words[k]) << 32) | int(words[k + 1])
            k += 2
            u.append((v & ((1 << 53) - 1)) * 2.0**-53)
        radius = math.sqrt(-2.0 * math.log1p(-u[1]))
        theta = 2.0 * math.pi * u[0]
        cached = radius * math.sin(theta)
        out[i] = _F(radius * math.cos(theta))
    return out
