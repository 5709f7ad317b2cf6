"""Prompt-to-Prompt attention control as a diffusers attention processor (explicit softmax).

The controls arrive as tensors through ``cross_attention_kwargs={"p2p": P2PControls(...)}``,
so the same module runs eagerly (the torch reference) and traces into the reverse-edit graph
with the controls as graph inputs. Row 0 of the batch is the source, row 1 the target; only
row 1 is edited (``icd_spec.md`` §3.1 and §7.1).
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

    def __init__(self, token_map, refine_alpha, equalizer, cross_alpha, self_flag, self_max_keys: int, blend_queries: int):
        self.token_map = token_map
        self.refine_alpha = refine_alpha
        self.equalizer = equalizer
        self.cross_alpha = cross_alpha
        self.self_flag = self_flag
        self.self_max_keys = self_max_keys
        self.blend_queries = blend_queries
        self.maps: list[torch.Tensor] = []

    def edit(self, probs: torch.Tensor, is_cross: bool, heads: int) -> torch.Tensor:
        """Edit softmax probabilities (2·heads, q, k); returns the same shape."""
        bh, q, k = probs.shape
        p = probs.reshape(bh // heads, heads, q, k)
        src, tgt = p[0], p[1]
        if is_cross:
            replaced = (torch.matmul(src, self.token_map) * self.refine_alpha + tgt * (1 - self.refine_alpha)) * self.equalizer
            new_tgt = self.cross_alpha * replaced + (1 - self.cross_alpha) * tgt
            if q == self.blend_queries:
                self.maps.append(torch.stack([src.mean(0), new_tgt.mean(0)]))
        elif k <= self.self_max_keys:
            new_tgt = self.self_flag * src + (1 - self.self_flag) * tgt
        else:
            return probs
        return torch.stack([src, new_tgt]).reshape(bh, q, k)

    def blend_maps(self) -> torch.Tensor:
        """(2, Q, 77): mean over every blend layer and head of the post-edit probabilities."""
        if not self.maps:
            raise RuntimeError(f"no cross-attention layer has {self.blend_queries} queries; cannot build blend maps")
        return torch.stack(self.maps).mean(0)


class P2PAttnProcessor:
    """diffusers ``AttnProcessor`` math with an explicit softmax that ``p2p`` may edit.

    Without ``p2p`` it defers to the fused ``AttnProcessor2_0`` (plain graphs stay fast).
    """

    def __init__(self):
        self.fused = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, p2p: P2PControls | None = None):
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


def install_p2p(unet) -> None:
    """Give every attention layer of ``unet`` a :class:`P2PAttnProcessor`."""
    unet.set_attn_processor(P2PAttnProcessor())
