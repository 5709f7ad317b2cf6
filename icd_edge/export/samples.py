"""Fixed inputs of an export: a synthetic photo, per-graph sample feeds (tracing and graph
parity) and the torch-computed guidance embeddings shipped as constants."""

from __future__ import annotations

import numpy as np
import torch

from icd_edge.bundle.store import guidance_key
from icd_edge.schedule import TRAINED_GUIDANCE_SD15


def sample_photo(side: int) -> np.ndarray:
    """A deterministic synthetic photo (H, W, 3) uint8: gradients and a disc, no download."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    disc = ((x - 0.55) ** 2 + (y - 0.45) ** 2 < 0.08).astype(np.float32)
    img = np.stack([0.2 + 0.6 * x, 0.3 + 0.5 * y * (1 - disc), 0.8 * disc + 0.2 * (1 - x)], axis=-1)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def sample_inputs(graphs, tokenizer, dims, guidance_table) -> dict[str, dict[str, np.ndarray]]:
    """Realistic fixed inputs per graph (used for tracing and for graph parity)."""
    from icd_edge.image import image_to_tensor, load_image

    rng = np.random.default_rng(1234)
    src_prompt, tgt_prompt = "a photo of a cat", "a photo of a dog"
    ids = tokenizer(src_prompt).ids[None]
    with torch.no_grad():
        text = graphs["text_encoder"](torch.from_numpy(ids)).numpy()
    image = image_to_tensor(load_image(sample_photo(dims["H"])), dims["H"])
    h = dims["h"]
    w0 = np.asarray(guidance_table[guidance_key(0.0)], np.float32)[None]
    wg = np.asarray(guidance_table[guidance_key(19.0)], np.float32)[None]
    unet1 = {
        "sample": rng.standard_normal((1, 4, h, h), dtype=np.float32),
        "timestep": np.array([519.0], np.float32),
        "encoder_hidden_states": text,
        "timestep_cond": wg,
    }
    from icd_edge.edit import p2p

    src, tgt = tokenizer(src_prompt), tokenizer(tgt_prompt)
    token_map, refine_alpha = p2p.refine_map(src, tgt)
    equalizer = np.ones(77, np.float32)
    equalizer[tgt.length - 2] = 2.0
    edit = {
        "sample": rng.standard_normal((2, 4, h, h), dtype=np.float32),
        "timestep": np.array([779.0], np.float32),
        "encoder_hidden_states": np.concatenate([text, text[:, ::-1].copy()]),
        "timestep_cond": np.concatenate([w0, wg]),
        "token_map": token_map,
        "refine_alpha": refine_alpha,
        "equalizer": equalizer,
        "cross_alpha": np.ones(77, np.float32),
        "self_flag": np.ones(1, np.float32),
    }
    out = {
        "taesd_decoder": {"latent": rng.standard_normal((1, 4, h, h), dtype=np.float32)},
        "text_encoder": {"input_ids": ids},
        "vae_encoder": {"image": image},
        "vae_decoder": {"latent": rng.standard_normal((1, 4, h, h), dtype=np.float32) * 0.8},
        "unet_forward": {**unet1, "timestep": np.array([19.0], np.float32), "timestep_cond": w0},
        "unet_reverse": unet1,
        "unet_reverse_edit": edit,
    }
    if "unet_reverse_source" in graphs:
        # the target graph reads what the source graph wrote for the same photo: trace and check
        # it with a real source row (the cat prompt at w = 0, the edit sample's step)
        source = {**unet1, "sample": edit["sample"][:1], "timestep": edit["timestep"], "timestep_cond": w0}
        with torch.no_grad():
            _, _, cache = graphs["unet_reverse_source"](*(torch.from_numpy(v) for v in source.values()))
        out["unet_reverse_source"] = source
        out["unet_reverse_target"] = {
            **{k: edit[k] for k in ("timestep", "token_map", "refine_alpha", "equalizer", "cross_alpha", "self_flag")},
            "sample": edit["sample"][1:],
            "encoder_hidden_states": edit["encoder_hidden_states"][1:],
            "timestep_cond": wg,
            "source_text": text,
            "source_cache": cache.numpy(),
        }
    return out


def sample_inputs_xl(graphs, tokenizers, dims, guidance_table, time_ids) -> dict[str, dict[str, np.ndarray]]:
    """:func:`sample_inputs` for an SDXL bundle's graphs (``tokenizers``: the two of the bundle)."""
    from icd_edge.image import image_to_tensor, load_image

    rng = np.random.default_rng(1234)
    ids = [tok("a photo of a cat").ids[None] for tok in tokenizers]
    with torch.no_grad():
        hidden_1 = graphs["text_encoder"](torch.from_numpy(ids[0])).numpy()
        hidden_2, pooled = (t.numpy() for t in graphs["text_encoder_2"](torch.from_numpy(ids[1])))
    h = dims["h"]
    unet = {
        "sample": rng.standard_normal((1, 4, h, h), dtype=np.float32),
        "timestep": np.array([499.0], np.float32),
        "encoder_hidden_states": np.concatenate([hidden_1, hidden_2], axis=-1),
        "timestep_cond": np.asarray(guidance_table[guidance_key(19.0)], np.float32)[None],
        "text_embeds": pooled,
        "time_ids": np.asarray(time_ids, np.float32)[None],
    }
    w0 = np.asarray(guidance_table[guidance_key(0.0)], np.float32)[None]
    return {
        "text_encoder": {"input_ids": ids[0]},
        "text_encoder_2": {"input_ids": ids[1]},
        "vae_encoder": {"image": image_to_tensor(load_image(sample_photo(dims["H"])), dims["H"])},
        "vae_decoder": {"latent": rng.standard_normal((1, 4, h, h), dtype=np.float32) * 0.8},
        "unet_forward": {**unet, "timestep": np.array([19.0], np.float32), "timestep_cond": w0},
        "unet_reverse": unet,
    }


def guidance_table(unet, trained=TRAINED_GUIDANCE_SD15) -> dict[str, list[float]]:
    """Embeddings of the trained w values, computed with the torch formula (shipped as constants)."""
    from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import (
        LatentConsistencyModelPipeline,
    )

    dim = unet.config.time_cond_proj_dim
    table = {}
    for w in trained:
        emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor([w]), dim, torch.float32)
        table[guidance_key(w)] = [float(v) for v in emb[0]]
    return table
