"""Trace-friendly modules, one per graph of :data:`icd_edge.bundle.spec.GRAPHS` (positional tensors in,
exactly the spec's outputs out). They are also the torch reference backend's sessions."""

from __future__ import annotations

import torch
from torch import nn

from icd_edge.graphs.attention import (
    FusedP2PAttnProcessor,
    P2PAttnProcessor,
    P2PControls,
    SourceTape,
    TargetTape,
    install_p2p,
)

P2P_ATTENTIONS = ("explicit", "fused")


class TextEncoderGraph(nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        """input_ids (1, 77) int64 → last_hidden_state (1, 77, D), final layer norm applied."""
        return self.text_encoder(input_ids=input_ids, return_dict=True).last_hidden_state


class VaeEncoderGraph(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def moments(self, image):
        """The posterior's mean and log-variance (each (1, 4, H/8, W/8)), unscaled."""
        h = self.vae.encoder(image)
        if self.vae.quant_conv is not None:
            h = self.vae.quant_conv(h)
        return torch.chunk(h, 2, dim=1)

    def forward(self, image):
        """image (1, 3, H, W) in [-1, 1] → posterior mean (1, 4, H/8, W/8), unscaled."""
        return self.moments(image)[0]


class VaeDecoderGraph(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        """latent (1, 4, h, w), already divided by the VAE scale → image (1, 3, 8h, 8w) ≈ [-1, 1]."""
        if self.vae.post_quant_conv is not None:
            latent = self.vae.post_quant_conv(latent)
        return self.vae.decoder(latent)


class UNetGraph(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond):
        """ε̂ for sample (B, 4, h, w), timestep (1,), text (B, 77, D), guidance embedding (B, 512)."""
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond, return_dict=False)[0]


class UNetEditGraph(nn.Module):
    """Batch [source, target] with Prompt-to-Prompt control of the target row.

    Args:
        unet: the reverse UNet; its attention processors are replaced by P2P ones (which
            defer to fused attention when no controls are given, so a :class:`UNetGraph`
            sharing the module is unaffected).
        self_max_keys: self-attention layers with at most this many keys take injection.
        blend_queries: query count of the cross-attention layers whose maps are returned.
    """

    def __init__(self, unet, self_max_keys: int, blend_queries: int, processor=None, pairs: bool = False):
        super().__init__()
        install_p2p(unet, processor)
        self.attention = "fused" if isinstance(processor, FusedP2PAttnProcessor) else "explicit"
        self.unet = unet
        self.self_max_keys = self_max_keys
        self.blend_queries = blend_queries
        self.pairs = pairs  # True: N pairs [sources; targets], maps (2, N, Q, 77); False: one pair, maps (2, Q, 77)

    def use_attention(self, kind: str) -> None:
        """``explicit`` (softmax probabilities edited, the reference math) or ``fused`` (the same
        edit as plain attentions: what the ONNX edit graph is traced with, see
        :class:`~icd_edge.graphs.attention.FusedP2PAttnProcessor`)."""
        if kind not in P2P_ATTENTIONS:
            raise ValueError(f"P2P attention must be one of {', '.join(P2P_ATTENTIONS)}, got {kind!r}")
        install_p2p(self.unet, FusedP2PAttnProcessor() if kind == "fused" else P2PAttnProcessor())
        self.attention = kind

    def forward(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        timestep_cond,
        token_map,
        refine_alpha,
        equalizer,
        cross_alpha,
        self_flag,
        cross_on=None,
        self_on=None,
    ):
        ctl = P2PControls(
            token_map, refine_alpha, equalizer, cross_alpha, self_flag, self.self_max_keys, self.blend_queries
        )
        ctl.cross_on, ctl.self_on = cross_on, self_on  # optional host-known step flags (fused processor)
        eps = self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            timestep_cond=timestep_cond,
            cross_attention_kwargs={"p2p": ctl},
            return_dict=False,
        )[0]
        maps = ctl.blend_maps()
        return eps, (maps if self.pairs else maps[:, 0])


class UNetSourceGraph(nn.Module):
    """The source row of an edit alone (batch 1, plain attention) with what re-edits borrow from it:
    ``eps``, its local-blend maps (1, Q, 77) and the packed source tensors (1, S) (see
    :class:`~icd_edge.graphs.attention.SourceTape`). Shares the reverse UNet with the edit graph."""

    def __init__(self, unet, self_max_keys: int, blend_queries: int):
        super().__init__()
        self.unet = unet
        self.self_max_keys = self_max_keys
        self.blend_queries = blend_queries

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond):
        tape = SourceTape(self.self_max_keys, self.blend_queries)
        eps = self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            timestep_cond=timestep_cond,
            cross_attention_kwargs={"p2p": tape},
            return_dict=False,
        )[0]
        return eps, tape.blend_maps(), tape.packed()


class UNetTargetGraph(nn.Module):
    """The target row of an edit alone: the reverse-edit UNet's target half, reading the source
    tensors from a :class:`UNetSourceGraph` output instead of computing the source row.

    ``pairs``: False, one target (maps (1, Q, 77)); True, N targets of one source (the torch fast
    path batches them; maps (N, Q, 77) as well). The attention math follows the edit graph's
    (``explicit``/``fused``, see :meth:`UNetEditGraph.use_attention`) through the installed processors.
    """

    def __init__(self, unet, self_max_keys: int, blend_queries: int):
        super().__init__()
        self.unet = unet
        self.self_max_keys = self_max_keys
        self.blend_queries = blend_queries

    def forward(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        timestep_cond,
        token_map,
        refine_alpha,
        equalizer,
        cross_alpha,
        self_flag,
        source_text,
        source_cache,
        cross_on=None,
        self_on=None,
    ):
        controls = (token_map, refine_alpha, equalizer, cross_alpha, self_flag)
        tape = TargetTape(controls, source_cache, source_text, self.self_max_keys, self.blend_queries)
        tape.cross_on, tape.self_on = cross_on, self_on
        eps = self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            timestep_cond=timestep_cond,
            cross_attention_kwargs={"p2p": tape},
            return_dict=False,
        )[0]
        tape.check_consumed()
        return eps, tape.blend_maps()[0]


class TextEncoderXLGraph(nn.Module):
    """One of SDXL's text encoders: its penultimate hidden states (no final layer norm), and for the
    second encoder (``pooled=True``, a CLIPTextModelWithProjection) its projected pooled output."""

    def __init__(self, text_encoder, pooled: bool = False):
        super().__init__()
        self.text_encoder = text_encoder
        self.pooled = pooled

    def forward(self, input_ids):
        out = self.text_encoder(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        return (out.hidden_states[-2], out.text_embeds) if self.pooled else out.hidden_states[-2]


class VaeEncoderXLGraph(VaeEncoderGraph):
    def forward(self, image):
        """image (1, 3, H, W) in [-1, 1] → posterior mean and log-variance (each (1, 4, H/8, W/8)), unscaled."""
        mean, logvar = self.moments(image)
        return mean, torch.clamp(logvar, -30.0, 20.0)  # the clamp diffusers' posterior applies


class UNetXLGraph(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond, text_embeds, time_ids):
        """ε̂ of an SDXL UNet: text (1, 77, D1 + D2), guidance embedding (1, 512) and the added
        condition (pooled text (1, P), time_ids (1, 6))."""
        cond = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            timestep_cond=timestep_cond,
            added_cond_kwargs=cond,
            return_dict=False,
        )[0]


def build_xl_graphs(text_encoder, text_encoder_2, vae, unet_forward, unet_reverse) -> dict[str, nn.Module]:
    """Every graph module of an SDXL bundle (:data:`icd_edge.bundle.spec.XL_GRAPHS`), in eval mode."""
    graphs = {
        "text_encoder": TextEncoderXLGraph(text_encoder),
        "text_encoder_2": TextEncoderXLGraph(text_encoder_2, pooled=True),
        "vae_encoder": VaeEncoderXLGraph(vae),
        "vae_decoder": VaeDecoderGraph(vae),
        "unet_forward": UNetXLGraph(unet_forward),
        "unet_reverse": UNetXLGraph(unet_reverse),
    }
    for g in graphs.values():
        g.eval().requires_grad_(False)
    return graphs


def build_graphs(
    text_encoder,
    vae,
    unet_forward,
    unet_reverse,
    dims: dict[str, int],
    taesd=None,
    p2p_attention: str = "explicit",
    reedit: bool = True,
) -> dict[str, nn.Module]:
    """Every graph module, in eval mode, for a bundle's dims (``taesd_decoder`` when given);
    ``p2p_attention``: how the edit graphs compute Prompt-to-Prompt (see :meth:`UNetEditGraph.use_attention`);
    ``reedit``: the source/target graphs of cached re-edits (:class:`UNetSourceGraph`, :class:`UNetTargetGraph`)."""
    latent = dims["h"]
    if unet_forward is not unet_reverse:
        # the edit graph gives the reverse UNet P2P processors (fused attention without controls);
        # the forward UNet gets them too: its graph is unchanged, and the two UNets then have the
        # same structure, so the exporter traces once and gives the reverse its own weights
        install_p2p(unet_forward)
    graphs = {
        "text_encoder": TextEncoderGraph(text_encoder),
        "vae_encoder": VaeEncoderGraph(vae),
        "vae_decoder": VaeDecoderGraph(vae),
        "unet_forward": UNetGraph(unet_forward),
        "unet_reverse": UNetGraph(unet_reverse),
        "unet_reverse_edit": UNetEditGraph(unet_reverse, self_max_keys=(latent // 2) ** 2, blend_queries=dims["Q"]),
    }
    if reedit:
        graphs["unet_reverse_source"] = UNetSourceGraph(unet_reverse, (latent // 2) ** 2, dims["Q"])
        graphs["unet_reverse_target"] = UNetTargetGraph(unet_reverse, (latent // 2) ** 2, dims["Q"])
    graphs["unet_reverse_edit"].use_attention(p2p_attention)
    if taesd is not None:
        from icd_edge.graphs.taesd import TaesdDecoderGraph

        graphs["taesd_decoder"] = TaesdDecoderGraph(taesd)
    for g in graphs.values():
        g.eval().requires_grad_(False)
    return graphs


class HalfGraph(nn.Module):
    """``graph`` run in float16 behind float32 inputs and outputs, for tracing fp16 graphs directly
    (their I/O stays float32, like onnxconverter-common's ``keep_io_types``). Inputs at the
    positions in ``keep`` (the timestep) stay float32: diffusers embeds it in float32 anyway."""

    def __init__(self, graph: nn.Module, keep: tuple[int, ...] = ()):
        super().__init__()
        self.inner = graph.half()
        self.keep = tuple(keep)

    def forward(self, *args):
        args = [a.half() if a.is_floating_point() and i not in self.keep else a for i, a in enumerate(args)]
        out = self.inner(*args)
        return tuple(o.float() for o in out) if isinstance(out, (tuple, list)) else out.float()
