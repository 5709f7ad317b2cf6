"""Noise schedule, consistency-step math and guidance embedding (pure numpy, float32).

Everything here follows the official iCD code's schedule and is stateless: callers pass what they need.

* Schedule (SD1.5/SDXL): 1000 steps, ``scaled_linear`` betas
  ``β_i = linspace(√0.00085, √0.012, 1000)_i²``, ``ᾱ_t = Π_{i≤t}(1-β_i)``,
  ``a_t = √ᾱ_t``, ``σ_t = √(1-ᾱ_t)``.
* One consistency step from ``t`` to boundary ``s`` (DDIM, η = 0)::

      x̂0  = (x_t - σ_t·ε̂) / a_t
      x_s = a_s·x̂0 + σ_s·ε̂            with a_0 := 1, σ_0 := 0

  i.e. ``x_s = c1·x_t + c2·ε̂`` with ``c1 = a_s/a_t`` and ``c2 = σ_s - a_s·σ_t/a_t``.
* Guidance embedding of scalar ``w`` (512-d, sin block first)::

      u = 1000·w;  f_k = exp(-k·ln(10000)/255), k = 0..255;  emb = [sin(u·f), cos(u·f)]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_TRAIN_STEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
GUIDANCE_EMBED_DIM = 512
MAX_GUIDANCE = 19.0  # the largest w the released SD1.5 students were trained with
TRAINED_GUIDANCE_SD15 = (0.0, 7.0, 11.0, 15.0, 19.0)
TRAINED_GUIDANCE_SDXL = (0.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0, 17.0, 19.0)
ENCODER_START_T = 19


@dataclass(frozen=True)
class StepConfig:
    """A released iCD timestep configuration.

    Attributes:
        name: "4A", "4B" or "3".
        forward: forward (fCD) segments ``(t, s)``, ascending, starting at t = 19.
        reverse: reverse (CD) segments ``(t, s)``, descending, ending at s = 0.
    """

    name: str
    forward: tuple[tuple[int, int], ...]
    reverse: tuple[tuple[int, int], ...]

    @property
    def timesteps(self) -> tuple[int, ...]:
        """Every timestep whose a_t, σ_t the loop needs (sorted)."""
        ts = {t for seg in self.forward + self.reverse for t in seg}
        return tuple(sorted(ts))


def _segments(points: list[int], last: int, descending: bool) -> tuple[tuple[int, int], ...]:
    pts = sorted(points, reverse=descending)
    return tuple((t, s) for t, s in zip(pts, pts[1:] + [last]))


STEP_CONFIGS = {
    # SD1.5 editing default (τ = 0.8): reverse-259-519-779-999 / forward-19-259-519-779
    "4A": StepConfig("4A", _segments([19, 259, 519, 779], 999, False), _segments([999, 779, 519, 259], 0, True)),
    # SDXL editing default (τ = 0.7): reverse-249-499-699-999 / forward-19-249-499-699
    "4B": StepConfig("4B", _segments([19, 249, 499, 699], 999, False), _segments([999, 699, 499, 249], 0, True)),
    # reverse-339-699-999 / forward-19-339-699
    "3": StepConfig("3", _segments([19, 339, 699], 999, False), _segments([999, 699, 339], 0, True)),
}


# the released forward and reverse timestep lists, by number of steps (SD1.5; any pairing is valid)
FORWARD_POINTS = {4: (19, 259, 519, 779), 3: (19, 339, 699)}
REVERSE_POINTS = {4: (259, 519, 779, 999), 3: (339, 699, 999)}
# SDXL's released lists (iCD-XL): the 4-step pair is "4B", the 3-step pair the same as SD1.5's
SDXL_FORWARD_POINTS = {4: (19, 249, 499, 699), 3: (19, 339, 699)}
SDXL_REVERSE_POINTS = {4: (249, 499, 699, 999), 3: (339, 699, 999)}


def step_config(forward_points, reverse_points) -> StepConfig:
    """The schedule of a forward LoRA trained on ``forward_points`` (ascending from t = 19) and a
    reverse LoRA trained on ``reverse_points`` (up to t = 999), paired freely: the forward model
    ends where the reverse model starts, at 999. Released pairs keep their names ("4A", "3");
    others are named "<forward>+<reverse>" ("3+4"). Raises ValueError if the two do not meet."""
    fwd, rev = sorted(int(t) for t in forward_points), sorted(int(t) for t in reverse_points)
    if not fwd or fwd[0] != ENCODER_START_T or len(set(fwd)) != len(fwd) or fwd[-1] >= 999:
        raise ValueError(f"forward timesteps must start at {ENCODER_START_T}, rise and stay below 999, got {fwd}")
    if not rev or rev[-1] != 999 or len(set(rev)) != len(rev) or rev[0] <= 0:
        raise ValueError(f"reverse timesteps must rise to 999 (where the forward model ends), got {rev}")
    cfg = StepConfig("", _segments(fwd, 999, False), _segments(rev, 0, True))
    for known in STEP_CONFIGS.values():
        if known.forward == cfg.forward and known.reverse == cfg.reverse:
            return known
    return StepConfig(f"{len(fwd)}+{len(rev)}", cfg.forward, cfg.reverse)


def step_config_from_lora_names(forward_name: str, reverse_name: str) -> StepConfig:
    """Derive the configuration from the released LoRA file names (the authority, §2.2).

    ``forward-19-259-519-779.safetensors`` and ``reverse-259-519-779-999.safetensors`` give "4A";
    any forward file pairs with any reverse file (``forward-19-339-699`` + the 4-step reverse:
    "3+4"). Names without a recognisable timestep list return None so the caller keeps its
    ``--forward-steps``/``--reverse-steps``; lists that do not meet at 999 raise ValueError.
    """
    import re

    def nums(name: str, keyword: str) -> list[int] | None:
        base = name.rsplit("/", 1)[-1].lower()
        if keyword not in base:
            return None
        tail = base.rsplit(keyword, 1)[1]
        found = re.findall(r"(?<![0-9])(\d{2,3})(?![0-9])", tail)
        return [int(x) for x in found] or None

    fwd, rev = nums(forward_name, "forward"), nums(reverse_name, "reverse")
    if fwd is None or rev is None:
        return None
    return step_config(fwd, rev)


def alphas_cumprod(n: int = NUM_TRAIN_STEPS, beta_start: float = BETA_START, beta_end: float = BETA_END) -> np.ndarray:
    """ᾱ_t for t = 0..n-1 of the ``scaled_linear`` schedule in float32.

    Within 3e-7 of diffusers' torch values (linspace/cumprod rounding differs); the export
    records torch's exact values in the manifest and the runtime uses those.
    """
    betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float32) ** 2
    return np.cumprod(1.0 - betas, dtype=np.float32)


def alpha_sigma(t: int, acp: np.ndarray | None = None) -> tuple[float, float]:
    """(a_t, σ_t) as float32 numbers; boundary t = 0 of the last reverse step is forced to (1, 0)."""
    if t == 0:
        return 1.0, 0.0
    acp = alphas_cumprod() if acp is None else acp
    a = np.float32(acp[t])
    return float(np.sqrt(a)), float(np.sqrt(np.float32(1.0) - a))


def step_coefficients(t: int, s: int, acp: np.ndarray | None = None) -> tuple[float, float]:
    """(c1, c2) of ``x_s = c1·x_t + c2·ε̂`` for a jump from t to s."""
    a_t, s_t = alpha_sigma(t, acp)
    a_s, s_s = alpha_sigma(s, acp)
    c1 = np.float32(a_s) / np.float32(a_t)
    c2 = np.float32(s_s) - np.float32(a_s) * np.float32(s_t) / np.float32(a_t)
    return float(c1), float(c2)


def consistency_step(x: np.ndarray, eps: np.ndarray, c1: float, c2: float) -> np.ndarray:
    """One consistency jump ``x_s = c1·x_t + c2·ε̂``, always in float32 (c1 reaches 4.2)."""
    return (np.float32(c1) * x.astype(np.float32) + np.float32(c2) * eps.astype(np.float32)).astype(np.float32)


def guidance_embedding(w: float, dim: int = GUIDANCE_EMBED_DIM) -> np.ndarray:
    """The (dim,) float32 ``timestep_cond`` vector for guidance w, computed as torch does in fp32."""
    half = dim // 2
    freq = np.exp(np.arange(half, dtype=np.float32) * -(np.log(np.float32(10000.0)) / np.float32(half - 1)))
    arg = np.float32(w * 1000.0) * freq.astype(np.float32)
    return np.concatenate([np.sin(arg), np.cos(arg)]).astype(np.float32)


def dynamic_guidance(w: float, t: int, tau: float) -> float:
    """Dynamic CFG with τ1 = τ2 = τ (§2.5): guided iff t ≤ 1000·τ, otherwise unguided (0)."""
    return float(w) if t <= 1000.0 * tau else 0.0
