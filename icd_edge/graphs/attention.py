"""Prompt-to-Prompt attention control as a diffusers attention processor (explicit softmax).

The controls arrive as tensors through ``cross_attention_kwargs={"p2p": P2PControls(...)}``,
so the same module runs eagerly (the torch reference) and traces into the reverse-edit graph
with the controls as graph inputs. Row 0 of the batch is the source, row 1 the target; only
row 1 is edited (Prompt-to-Prompt, as the official code applies it).
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


class P2PControls:
    """Per-call P2P tensors plus the collected 16×16 cross-attention maps.

    Args:
        token_map: (77, 77) M.  refine_alpha: (77,) r.  equalizer: (77,) e.
        cross_alpha: (77,) a_k.  self_flag: (1,) f.
        self_max_keys: self-attention layers with more keys are left untouched.
        blend_queries: cross-attention layers with this many queries feed ``blend_maps``.
    """

    def __init__(
        self, token_map, refine_alpha, equalizer, cross_alpha, self_flag, self_max_keys: int, blend_queries: int
    ):
        self.token_map = token_map
        self.refine_alpha = refine_alpha
        self.equalizer = equalizer
        self.cross_alpha = cross_alpha
        self.self_flag = self_flag
        self.self_max_keys = self_max_keys
        self.blend_queries = blend_queries
        self.maps: list[torch.Tensor] = []
        # Optional host-known step flags (the P2P schedules are 0/1 per step). When set, the
        # fused processor specialises: no cross edit → plain attention; injection on → the
        # target reuses the source's probabilities at no extra cost. The explicit processor
        # ignores them (it reads the tensors), so both stay equal when flags match tensors.
        self.cross_on: bool | None = None
        self.self_on: bool | None = None

    def edit(self, probs: torch.Tensor, is_cross: bool, heads: int) -> torch.Tensor:
        """Edit softmax probabilities (2·heads, q, k); returns the same shape."""
        bh, q, k = probs.shape
        if bh != 2 * heads:
            raise ValueError(f"the explicit P2P processor edits one [source, target] pair; got batch {bh // heads}")
        p = probs.reshape(bh // heads, heads, q, k)
        src, tgt = p[0], p[1]
        if is_cross:
            replaced = (
                torch.matmul(src, self.token_map) * self.refine_alpha + tgt * (1 - self.refine_alpha)
            ) * self.equalizer
            new_tgt = self.cross_alpha * replaced + (1 - self.cross_alpha) * tgt
            if q == self.blend_queries:
                self.maps.append(torch.stack([src.mean(0), new_tgt.mean(0)])[:, None])
        elif k <= self.self_max_keys:
            new_tgt = self.self_flag * src + (1 - self.self_flag) * tgt
        else:
            return probs
        return torch.stack([src, new_tgt]).reshape(bh, q, k)

    def blend_maps(self) -> torch.Tensor:
        """(2, N, Q, 77): mean over every blend layer and head of the post-edit probabilities
        (row 0 source, row 1 target, N edit pairs)."""
        if not self.maps:
            raise RuntimeError(f"no cross-attention layer has {self.blend_queries} queries; cannot build blend maps")
        return torch.stack(self.maps).mean(0)


class P2PAttnProcessor:
    """diffusers ``AttnProcessor`` math with an explicit softmax that ``p2p`` may edit.

    Without ``p2p`` it defers to the fused ``AttnProcessor2_0`` (plain graphs stay fast).
    """

    def __init__(self):
        self.fused = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        p2p: P2PControls | None = None,
    ):
        if isinstance(p2p, (SourceTape, TargetTape)):  # the re-edit graphs
            return _reedit_call(attn, hidden_states, encoder_hidden_states, p2p, fused=False)
        if p2p is None or (encoder_hidden_states is None and _tokens(hidden_states) > p2p.self_max_keys):
            # Plain graphs, and self-attention layers P2P leaves untouched (the 64×64 ones at 512 px),
            # keep the fused kernel: no probabilities are materialised there.
            return self.fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        is_cross = encoder_hidden_states is not None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)
        probs = p2p.edit(probs, is_cross, attn.heads)
        hidden_states = torch.bmm(probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _tokens(hidden_states) -> int:
    """Sequence length of (B, L, C) or (B, C, H, W) hidden states."""
    return hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]


def install_p2p(unet, processor=None) -> None:
    """Give every attention layer of ``unet`` a P2P processor (explicit softmax by default)."""
    unet.set_attn_processor(processor if processor is not None else P2PAttnProcessor())


class FusedP2PAttnProcessor:
    """Prompt-to-Prompt on fused attention: the same result as :class:`P2PAttnProcessor`
    without materialising probabilities, for a batch of N edit pairs.

    Batch layout: rows ``[src_0 … src_{N-1}, tgt_0 … tgt_{N-1}]``; controls are (77, 77)/(77,)
    for one pair or carry a leading N. The edits are linear in the probabilities, so with
    ``w1 = a·r·e`` and ``w2 = a·(1-r)·e + (1-a)`` (per token)::

        P'_tgt·V_tgt = attn(Q_src, K_src, M·diag(w1)·V_tgt) + attn(Q_tgt, K_tgt, diag(w2)·V_tgt)

    and self-attention injection is ``f·attn(Q_src, K_src, V_tgt) + (1-f)·attn(Q_tgt, K_tgt, V_tgt)``.
    Each is one fused SDPA call over a 3N batch. Only the small cross-attention layers that feed
    local blend compute explicit probabilities (for ``blend_maps``).
    """

    def __init__(self):
        self.fused = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        p2p: P2PControls | None = None,
    ):
        if isinstance(p2p, (SourceTape, TargetTape)):
            return _reedit_call(attn, hidden_states, encoder_hidden_states, p2p, fused=True)
        is_cross = encoder_hidden_states is not None
        if p2p is None or (not is_cross and _tokens(hidden_states) > p2p.self_max_keys):
            return self.fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if (
            attention_mask is not None
            or attn.spatial_norm is not None
            or hidden_states.ndim != 3
            or attn.group_norm is not None
        ):
            # Layouts the SD1.5 UNet never uses here: take the explicit path (one pair only).
            return P2PAttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask, temb, p2p)
        residual = hidden_states
        context = encoder_hidden_states if is_cross else hidden_states
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q3, k3, v3 = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        b2, lq, _ = q3.shape
        n, heads = b2 // 2, attn.heads
        # the edit is built on (batch, tokens, channels) tensors and every attention takes its
        # inputs through the usual head split: the exported graph then holds plain attentions
        # that the runtimes fuse (onnxruntime's MultiHeadAttention, OpenVINO's SDPA)
        qs, qt, ks, kt, vs, vt = q3[:n], q3[n:], k3[:n], k3[n:], v3[:n], v3[n:]

        head_dim = q3.shape[-1] // heads

        def attend(q, k, v):
            b = q.shape[0]
            # (batch, -1, heads, head_dim) as diffusers writes it: the form the fusions match
            split = lambda x: x.view(b, -1, heads, head_dim).transpose(1, 2)  # noqa: E731
            out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), scale=attn.scale)
            return out.transpose(1, 2).reshape(b, lq, heads * head_dim)

        if is_cross and p2p.cross_on is False:
            out = attend(q3, k3, v3)
            o_src, o_tgt = out[:n], out[n:]
            if lq == p2p.blend_queries:
                ps, pt = _probs(qs, ks, heads, attn.scale), _probs(qt, kt, heads, attn.scale)
                p2p.maps.append(torch.stack([ps.mean(1), pt.mean(1)]))
        elif not is_cross and p2p.self_on is not None:
            if p2p.self_on:  # P'_tgt = P_src: the target attends with the source's queries and keys
                o_src, o_tgt = attend(torch.cat([qs, qs]), torch.cat([ks, ks]), torch.cat([vs, vt])).split(n)
            else:
                out = attend(q3, k3, v3)
                o_src, o_tgt = out[:n], out[n:]
        elif is_cross:
            a = _per_pair(p2p.cross_alpha, n)
            r = _per_pair(p2p.refine_alpha, n)
            e = _per_pair(p2p.equalizer, n)
            m = p2p.token_map if p2p.token_map.ndim == 3 else p2p.token_map.expand(n, -1, -1)
            w1 = (a * r * e).to(vt.dtype)
            w2 = (a * (1 - r) * e + (1 - a)).to(vt.dtype)
            v1 = torch.matmul(m.to(vt.dtype), w1[:, :, None] * vt)  # M·diag(w1)·V over the key tokens
            v2 = w2[:, :, None] * vt
            o_src, o_a, o_b = attend(torch.cat([qs, qs, qt]), torch.cat([ks, ks, kt]), torch.cat([vs, v1, v2])).split(n)
            o_tgt = o_a + o_b
            if lq == p2p.blend_queries:
                ps, pt = _probs(qs, ks, heads, attn.scale), _probs(qt, kt, heads, attn.scale)
                af, rf, ef = (x.float()[:, None, None, :] for x in (a, r, e))
                replaced = (torch.matmul(ps, m.float()[:, None]) * rf + pt * (1 - rf)) * ef
                pt_new = af * replaced + (1 - af) * pt
                p2p.maps.append(torch.stack([ps.mean(1), pt_new.mean(1)]))  # (2, N, Q, 77)
        else:
            f = _per_pair(p2p.self_flag, n).reshape(n, 1, 1).to(vt.dtype)
            o_src, o_a, o_b = attend(torch.cat([qs, qs, qt]), torch.cat([ks, ks, kt]), torch.cat([vs, vt, vt])).split(n)
            o_tgt = f * o_a + (1 - f) * o_b
        # the output projection per row, concatenated after: a Concat feeding a quantised MatMul
        # gets per-row dequantisation that OpenVINO's int8 transformations cannot broadcast
        hidden = torch.cat([attn.to_out[0](o_src.to(q3.dtype)), attn.to_out[0](o_tgt.to(q3.dtype))])
        hidden = attn.to_out[1](hidden)
        if attn.residual_connection:
            hidden = hidden + residual
        return hidden / attn.rescale_output_factor


def _probs(q3: torch.Tensor, k3: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """Softmax probabilities (N, heads, Lq, Lk) in float32, for the blend maps."""
    n, lq, lk = q3.shape[0], q3.shape[1], k3.shape[1]
    q = q3.float().view(n, lq, heads, -1).transpose(1, 2)
    k = k3.float().view(n, lk, heads, -1).transpose(1, 2)
    return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)


def _per_pair(x: torch.Tensor, n: int) -> torch.Tensor:
    """(K,) or (N, K) control → (N, K)."""
    return x.expand(n, -1) if x.ndim == 1 else x


class SourceTape:
    """Re-edits (see :mod:`icd_edge.edit.inversion`): the source row's tensors that the target row
    borrows, in attention-call order.

    Recorded by the source graph (batch 1, plain attention): per cross-attention layer its queries,
    per self-attention layer P2P may inject (at most ``self_max_keys`` keys) its queries and keys,
    and the mean-over-heads probabilities of the ``blend_queries`` cross layers. :meth:`packed`
    flattens the tensors into one (1, S) row; the target graph reads it back in the same order
    (each slice has the shape of the target's own tensor of that layer, so no layout is stored).
    """

    def __init__(self, self_max_keys: int, blend_queries: int):
        self.self_max_keys = self_max_keys
        self.blend_queries = blend_queries
        self.recorded: list[torch.Tensor] = []
        self.maps: list[torch.Tensor] = []

    def packed(self) -> torch.Tensor:
        return torch.cat([t.reshape(1, -1) for t in self.recorded], dim=1)

    def blend_maps(self) -> torch.Tensor:
        """(1, Q, 77): the mean over the blend layers of the source's mean-over-heads probabilities."""
        if not self.maps:
            raise RuntimeError(f"no cross-attention layer has {self.blend_queries} queries; cannot build blend maps")
        return torch.stack(self.maps).mean(0)


class TargetTape(P2PControls):
    """The target row's P2P controls plus the source tensors (a :meth:`SourceTape.packed` row) and
    the source prompt's embedding (its cross-attention keys are computed here: 77 tokens)."""

    def __init__(self, controls: tuple, packed: torch.Tensor, source_text: torch.Tensor, self_max_keys, blend_queries):
        super().__init__(*controls, self_max_keys, blend_queries)
        self.packed = packed
        self.source_text = source_text
        self.offset = 0

    def take(self, like: torch.Tensor) -> torch.Tensor:
        """The next source tensor, of ``like``'s shape (batch 1; broadcast over the target rows)."""
        n = like[:1].numel()
        t = self.packed[0, self.offset : self.offset + n].reshape((1, *like.shape[1:]))
        self.offset += n
        return t.to(like.dtype)

    def check_consumed(self) -> None:
        if self.offset != self.packed.shape[1]:
            raise RuntimeError(
                f"the source cache holds {self.packed.shape[1]} values but the target graph read {self.offset}: "
                "it was made by another model"
            )


def _plain_tail(attn: Attention, out3: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    hidden = attn.to_out[1](attn.to_out[0](out3))
    if attn.residual_connection:
        hidden = hidden + residual
    return hidden / attn.rescale_output_factor


def _attend(q, k, v, heads: int, scale: float) -> torch.Tensor:
    """Plain attention on (B, L, C) tensors through the usual head split (what the runtimes fuse)."""
    b, lq, c = q.shape
    head_dim = c // heads

    def split(x):
        return x.view(x.shape[0], -1, heads, head_dim).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), scale=scale)
    return out.transpose(1, 2).reshape(b, lq, c)


def _unsupported_layout(attn: Attention, hidden_states, attention_mask) -> bool:
    return (
        attention_mask is not None
        or attn.spatial_norm is not None
        or hidden_states.ndim != 3
        or attn.group_norm is not None
    )


def source_call(attn: Attention, hidden_states, encoder_hidden_states, tape: SourceTape) -> torch.Tensor:
    """One attention layer of the source graph: plain attention, recording what re-edits need."""
    is_cross = encoder_hidden_states is not None
    if not is_cross and _tokens(hidden_states) > tape.self_max_keys:
        return AttnProcessor2_0()(attn, hidden_states)
    if _unsupported_layout(attn, hidden_states, None):
        raise NotImplementedError("re-edit graphs support the SD UNet's 3-D attention layout only")
    context = encoder_hidden_states if is_cross else hidden_states
    if is_cross and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    tape.recorded.append(q)
    if not is_cross:
        tape.recorded.append(k)
    elif q.shape[1] == tape.blend_queries:
        tape.maps.append(_probs(q, k, attn.heads, attn.scale).mean(1))  # (1, Q, 77)
    return _plain_tail(attn, _attend(q, k, v, attn.heads, attn.scale), hidden_states)


def target_call(attn: Attention, hidden_states, encoder_hidden_states, tape: TargetTape, fused: bool) -> torch.Tensor:
    """One attention layer of the target graph: the target rows' Prompt-to-Prompt edit against the
    cached source tensors; ``fused``: as plain attentions (see :class:`FusedP2PAttnProcessor`),
    else with explicit probabilities (the reference math of :meth:`P2PControls.edit`)."""
    is_cross = encoder_hidden_states is not None
    if not is_cross and _tokens(hidden_states) > tape.self_max_keys:
        return AttnProcessor2_0()(attn, hidden_states)
    if _unsupported_layout(attn, hidden_states, None):
        raise NotImplementedError("re-edit graphs support the SD UNet's 3-D attention layout only")
    context = encoder_hidden_states if is_cross else hidden_states
    src_context = tape.source_text if is_cross else None
    if is_cross and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
        src_context = attn.norm_encoder_hidden_states(src_context)
    qt, kt, vt = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    qs = tape.take(qt)
    # two projections, not one of [source; targets]: a Concat feeding a quantised MatMul breaks
    # OpenVINO's int8 compile; the price is a second, untransposed copy of to_k's weights in the file
    ks = attn.to_k(src_context.to(qt.dtype)) if is_cross else tape.take(kt)
    n, heads, scale = qt.shape[0], attn.heads, attn.scale
    blend_layer = is_cross and qt.shape[1] == tape.blend_queries
    if fused:
        out = _target_fused(qs, ks, qt, kt, vt, tape, is_cross, heads, scale, n)
        if blend_layer:
            ps, pt = _probs(qs, ks, heads, scale), _probs(qt, kt, heads, scale)
            if tape.cross_on is False:
                tape.maps.append(pt.mean(1)[None])
            else:
                tape.maps.append(_edited_cross(ps.expand(n, -1, -1, -1), pt, tape, n).mean(1)[None])
    else:
        ps = _probs(qs, ks, heads, scale).to(qt.dtype).expand(n, -1, -1, -1)
        pt = _probs(qt, kt, heads, scale).to(qt.dtype)
        if is_cross:
            p = _edited_cross(ps, pt, tape, n)
            if blend_layer:
                tape.maps.append(p.mean(1)[None])
        else:
            f = _per_pair(tape.self_flag, n).reshape(n, 1, 1, 1).to(pt.dtype)
            p = f * ps + (1 - f) * pt
        b, lq, c = qt.shape
        v = vt.view(b, -1, heads, c // heads).transpose(1, 2)
        out = torch.matmul(p.to(v.dtype), v).transpose(1, 2).reshape(b, lq, c)
    return _plain_tail(attn, out.to(qt.dtype), hidden_states)


def _edited_cross(ps, pt, ctl: P2PControls, n: int) -> torch.Tensor:
    """P' = a ⊙ [((P_src·M) ⊙ r + P_tgt ⊙ (1 - r)) ⊙ e] + (1 - a) ⊙ P_tgt on (N, heads, Q, 77)."""
    a, r, e = (
        _per_pair(x, n).to(pt.dtype)[:, None, None, :] for x in (ctl.cross_alpha, ctl.refine_alpha, ctl.equalizer)
    )
    m = ctl.token_map if ctl.token_map.ndim == 3 else ctl.token_map.expand(n, -1, -1)
    replaced = (torch.matmul(ps, m.to(pt.dtype)[:, None]) * r + pt * (1 - r)) * e
    return a * replaced + (1 - a) * pt


def _target_fused(qs, ks, qt, kt, vt, ctl: TargetTape, is_cross: bool, heads: int, scale: float, n: int):
    qs, ks = qs.expand(n, -1, -1), ks.expand(n, -1, -1)
    if is_cross and ctl.cross_on is False:
        return _attend(qt, kt, vt, heads, scale)
    if not is_cross and ctl.self_on is not None:
        return _attend(qs, ks, vt, heads, scale) if ctl.self_on else _attend(qt, kt, vt, heads, scale)
    if is_cross:
        a, r, e = (_per_pair(x, n) for x in (ctl.cross_alpha, ctl.refine_alpha, ctl.equalizer))
        m = ctl.token_map if ctl.token_map.ndim == 3 else ctl.token_map.expand(n, -1, -1)
        w1 = (a * r * e).to(vt.dtype)
        w2 = (a * (1 - r) * e + (1 - a)).to(vt.dtype)
        v1 = torch.matmul(m.to(vt.dtype), w1[:, :, None] * vt)
        v2 = w2[:, :, None] * vt
        o_a, o_b = _attend(torch.cat([qs, qt]), torch.cat([ks, kt]), torch.cat([v1, v2]), heads, scale).split(n)
        return o_a + o_b
    f = _per_pair(ctl.self_flag, n).reshape(n, 1, 1).to(vt.dtype)
    o_a, o_b = _attend(torch.cat([qs, qt]), torch.cat([ks, kt]), torch.cat([vt, vt]), heads, scale).split(n)
    return f * o_a + (1 - f) * o_b


def _reedit_call(attn, hidden_states, encoder_hidden_states, tape, fused: bool):
    if isinstance(tape, TargetTape):
        return target_call(attn, hidden_states, encoder_hidden_states, tape, fused)
    return source_call(attn, hidden_states, encoder_hidden_states, tape)


class CastAttnProcessor:
    """The VAE's single-head spatial attention (group norm, 4-D input, residual) with q, k and v in
    ``dtype`` (bfloat16: flash kernels on a GPU, float32's range), everything else in the module's
    own dtype. For SDXL's float32 VAE, whose fp32 attention is the slowest part after its
    convolutions at 1024² (the fast path's ``vae_attention="bf16"``)."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype

    def __call__(
        self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw
    ):
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 4:
            raise RuntimeError("CastAttnProcessor is for the VAE's self-attention on (B, C, H, W) maps")
        residual = hidden_states
        b, c, h, w = hidden_states.shape
        x = hidden_states.view(b, c, h * w)
        if attn.group_norm is not None:
            x = attn.group_norm(x)
        x = x.transpose(1, 2)
        q, k, v = (t.to(self.dtype) for t in (attn.to_q(x), attn.to_k(x), attn.to_v(x)))
        out = self.attend(q, k, v, attn.heads, attn.scale).to(hidden_states.dtype)
        out = attn.to_out[1](attn.to_out[0](out)).transpose(1, 2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @staticmethod
    def attend(q, k, v, heads: int, scale: float) -> torch.Tensor:
        """(B, L, C) q, k, v → (B, L, C): fused SDPA (a benchmark swaps in other forms)."""
        return _attend(q, k, v, heads, scale)


def cast_vae_attention(vae, dtype: torch.dtype = torch.bfloat16) -> int:
    """Install :class:`CastAttnProcessor` on every attention of a diffusers AutoencoderKL; returns
    how many (SD/SDXL VAEs: one in the encoder's and one in the decoder's mid block)."""
    n = 0
    for mod in vae.modules():
        if isinstance(mod, Attention):
            mod.set_processor(CastAttnProcessor(dtype))
            n += 1
    return n
