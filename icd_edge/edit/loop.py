"""The iCD loops, written once: invert (forward consistency steps), reverse (reconstruct and
generate) and edit (the two-row source/target Prompt-to-Prompt decode with local blend).

They call the models only through ``run(graph, stage, **feeds) -> outputs`` and do their array
arithmetic only through an :class:`Ops` (numpy on the host here; the compiled GPU path passes
torch ops so the same loop runs on the device without a host sync). Everything that is not a
model call or step arithmetic (prompts, P2P controls, decoding, validation) stays with the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from icd_edge.bundle.schema import Manifest, Step
from icd_edge.schedule import consistency_step, dynamic_guidance

Run = Callable[..., dict]


@dataclass(frozen=True)
class Constants:
    """What the loops need from a manifest."""

    image_hw: int
    latent_hw: int
    vae_scale: float
    forward: tuple[Step, ...]
    reverse: tuple[Step, ...]
    start: tuple[float, float]  # (a, σ) of the t = 19 start point x = a·z0 + σ·ε
    alpha_sigma: dict[int, tuple[float, float]]
    max_guidance: float
    blend_threshold: float

    @classmethod
    def from_manifest(cls, m: Manifest) -> "Constants":
        return cls(
            m.image_hw,
            m.latent_hw,
            m.vae_scaling_factor,
            m.schedule.forward,
            m.schedule.reverse,
            m.schedule.encoder_start,
            m.schedule.alpha_sigma,
            m.guidance.max,
            m.p2p.blend_threshold if m.p2p is not None else 0.0,
        )

    def guided_w(self, guidance: float, tau: float) -> list[float]:
        """The guidance w of each reverse step under dynamic guidance (0 where t > 1000·τ)."""
        return [dynamic_guidance(guidance, st.t, tau) for st in self.reverse]


class Ops(Protocol):
    """Array arithmetic of the loops, so that one loop serves numpy and torch."""

    def timestep(self, t: int): ...

    def start(self, z0, noise, a: float, sigma: float): ...

    def step(self, x, eps, st: Step): ...

    def pair(self, latent): ...

    def accumulate(self, acc, maps): ...

    def blend(self, x, mask, n: int): ...

    def blend_with(self, x, x_src, mask): ...

    def cat(self, a, b): ...

    def stack_into(self, rows: list): ...


class NumpyOps:
    """float32 arithmetic as the reference computes it (scalars as float32)."""

    @staticmethod
    def timestep(t: int) -> np.ndarray:
        return np.array([t], np.float32)

    @staticmethod
    def start(z0, noise, a: float, sigma: float) -> np.ndarray:
        return (np.float32(a) * z0 + np.float32(sigma) * noise).astype(np.float32)

    @staticmethod
    def step(x, eps, st: Step) -> np.ndarray:
        return consistency_step(x, eps, st.c1, st.c2)

    @staticmethod
    def pair(latent) -> np.ndarray:
        return np.concatenate([latent, latent]).astype(np.float32)

    @staticmethod
    def accumulate(acc, maps):
        return maps if acc is None else acc + maps

    @staticmethod
    def blend(x, mask, n: int) -> np.ndarray:
        """Rows n.. (targets) keep their change only inside ``mask``; elsewhere the source rows."""
        x[n:] = x[:n] + np.asarray(mask, np.float32) * (x[n:] - x[:n])
        return x

    @staticmethod
    def blend_with(x, x_src, mask) -> np.ndarray:
        """The target rows ``x`` keep their change only inside ``mask``; elsewhere ``x_src``."""
        return (x_src + np.asarray(mask, np.float32) * (x - x_src)).astype(np.float32)

    @staticmethod
    def cat(a, b) -> np.ndarray:
        return np.concatenate([a, b])

    @staticmethod
    def stack_into(rows: list) -> np.ndarray:
        return np.stack(rows)


NUMPY = NumpyOps()


def invert(
    run: Run,
    c: Constants,
    z0,
    noise,
    emb,
    w0,
    ops: Ops = NUMPY,
    on_step: Callable | None = None,
    extra: dict | None = None,
):
    """x_19 = a·z0 + σ·ε, then the forward model's steps up to x_999 under the source prompt;
    ``extra``: further feeds of every step (SDXL's added condition)."""
    x = ops.start(z0, noise, *c.start)
    for i, st in enumerate(c.forward):
        eps = run(
            "unet_forward",
            f"forward_{i}",
            sample=x,
            timestep=ops.timestep(st.t),
            encoder_hidden_states=emb,
            timestep_cond=w0,
            **(extra or {}),
        )["eps"]
        x = ops.step(x, eps, st)
        if on_step is not None:
            on_step(i)
    return x


def reverse(
    run: Run,
    c: Constants,
    x,
    emb,
    conds: Sequence,
    ops: Ops = NUMPY,
    on_step: Callable | None = None,
    extra: dict | None = None,
):
    """The reverse model's steps from x_999 under one prompt; ``conds[k]``: step k's guidance row;
    ``extra``: further feeds of every step (SDXL's added condition)."""
    for k, st in enumerate(c.reverse):
        eps = run(
            "unet_reverse",
            f"reverse_{k}",
            sample=x,
            timestep=ops.timestep(st.t),
            encoder_hidden_states=emb,
            timestep_cond=conds[k],
            **(extra or {}),
        )["eps"]
        x = ops.step(x, eps, st)
        if on_step is not None:
            on_step(k, None, None, st)
    return x


def edit(
    run: Run,
    c: Constants,
    latent,
    text,
    conds: Sequence,
    step_feeds: Callable[[int], dict],
    blend: Callable | None = None,
    ops: Ops = NUMPY,
    on_step: Callable | None = None,
):
    """The edit decode: rows [sources; targets] from the same x_999, Prompt-to-Prompt controls of
    step k from ``step_feeds(k)``; with ``blend(acc) -> mask`` (acc: the summed blend maps so far)
    the targets change only inside the mask. ``on_step(k, x_before, eps, step)`` after each step."""
    n = latent.shape[0]
    x = ops.pair(latent)
    acc = None
    for k, st in enumerate(c.reverse):
        out = run(
            "unet_reverse_edit",
            f"reverse_edit_{k}",
            sample=x,
            timestep=ops.timestep(st.t),
            encoder_hidden_states=text,
            timestep_cond=conds[k],
            **step_feeds(k),
        )
        x_before = x
        x = ops.step(x, out["eps"], st)
        if blend is not None:
            acc = ops.accumulate(acc, out["blend_maps"])
            x = ops.blend(x, blend(acc), n)
        if on_step is not None:
            on_step(k, x_before, out["eps"], st)
    return x


def source_pass(run: Run, c: Constants, latent, emb, w0, ops: Ops = NUMPY, on_step: Callable | None = None):
    """The edit's source row alone (source prompt, w = 0 from x_999): per reverse step its latent
    after the step, its blend maps and its packed tensors, as the arrays of a
    :class:`~icd_edge.edit.inversion.SourceCache`."""
    x = latent
    latents, maps, tensors = [], [], []
    for k, st in enumerate(c.reverse):
        out = run(
            "unet_reverse_source",
            f"source_{k}",
            sample=x,
            timestep=ops.timestep(st.t),
            encoder_hidden_states=emb,
            timestep_cond=w0,
        )
        x = ops.step(x, out["eps"], st)
        latents.append(x)
        maps.append(out["blend_maps"])
        tensors.append(out["source_cache"])
        if on_step is not None:
            on_step(k)
    return ops.stack_into(latents), ops.stack_into(maps), ops.stack_into(tensors)


def edit_cached(
    run: Run,
    c: Constants,
    latent,
    source,
    text,
    source_text,
    conds: Sequence,
    step_feeds: Callable[[int], dict],
    blend: Callable | None = None,
    ops: Ops = NUMPY,
    on_step: Callable | None = None,
):
    """:func:`edit`'s target rows alone, from a :class:`~icd_edge.edit.inversion.SourceCache` of
    the same x_999: the same decode at the cost of the target rows (``text``/``conds``: theirs)."""
    x = latent
    acc = None
    for k, st in enumerate(c.reverse):
        x_src, maps_src, tensors_src = source.step(k)
        out = run(
            "unet_reverse_target",
            f"target_{k}",
            sample=x,
            timestep=ops.timestep(st.t),
            encoder_hidden_states=text,
            timestep_cond=conds[k],
            source_text=source_text,
            source_cache=tensors_src,
            **step_feeds(k),
        )
        x_before = x
        x = ops.step(x, out["eps"], st)
        if blend is not None:
            acc = ops.accumulate(acc, ops.cat(maps_src, out["blend_maps"]))
            x = ops.blend_with(x, x_src, blend(acc))
        if on_step is not None:
            on_step(k, x_before, out["eps"], st)
    return x


def edit_switch(
    run: Run,
    c: Constants,
    latent,
    source_text,
    target_text,
    pooled,
    time_ids,
    w0,
    wg,
    tau: float,
    ops: Ops = NUMPY,
    on_step: Callable | None = None,
):
    """SDXL's edit: one row decoded with a prompt switch. Steps with t > 1000·τ run under the
    source prompt's token embeddings at w = 0, the others under the target's at the guidance
    embedding ``wg``; the pooled condition ``pooled`` is the target's on every step, as the
    official code does. ``on_step(k, x_before, eps, step)`` after each step."""
    x = latent
    for k, st in enumerate(c.reverse):
        guided = st.t <= 1000.0 * tau
        eps = run(
            "unet_reverse",
            f"reverse_{k}",
            sample=x,
            timestep=ops.timestep(st.t),
            encoder_hidden_states=target_text if guided else source_text,
            timestep_cond=wg if guided else w0,
            text_embeds=pooled,
            time_ids=time_ids,
        )["eps"]
        x_before = x
        x = ops.step(x, eps, st)
        if on_step is not None:
            on_step(k, x_before, eps, st)
    return x
