"""The ``torch`` target: the fused weights (safetensors + configs) the torch reference backend loads."""

from __future__ import annotations

from icd_edge.bundle.schema import Artifact


def torch_target(ctx) -> None:
    """Fused weights (safetensors + configs) for the torch reference backend."""
    ctx.step("torch weights")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # its "Writing model shards" bars would cut through ours
    src, manifest = ctx.src, ctx.manifest
    root = ctx.out_dir / "torch"
    src.text_encoder.save_pretrained(root / "text_encoder", safe_serialization=True)
    src.vae.save_pretrained(root / "vae", safe_serialization=True)
    if src.text_encoder_2 is not None:  # SDXL
        src.text_encoder_2.save_pretrained(root / "text_encoder_2", safe_serialization=True)
    if ctx.cfg.unet_weights == "shared-base":  # the reference backend loads plain (fused) UNets
        from icd_edge.export.lora import merge_branches

        merge_branches(src.unet_forward).save_pretrained(root / "unet_forward", safe_serialization=True)
        merge_branches(src.unet_reverse).save_pretrained(root / "unet_reverse", safe_serialization=True)
    else:
        src.unet_forward.save_pretrained(root / "unet_forward", safe_serialization=True)
        src.unet_reverse.save_pretrained(root / "unet_reverse", safe_serialization=True)
    taesd = ctx.graphs.get("taesd_decoder")
    if taesd is not None:  # --taesd: its AutoencoderTiny, for the reference and fast torch paths
        taesd.taesd.save_pretrained(root / "taesd", safe_serialization=True)
    dirs = {
        "taesd_decoder": "taesd",
        "text_encoder": "text_encoder",
        "text_encoder_2": "text_encoder_2",
        "vae_encoder": "vae",
        "vae_decoder": "vae",
        "unet_forward": "unet_forward",
        "unet_reverse": "unet_reverse",
        "unet_reverse_edit": "unet_reverse",
        "unet_reverse_source": "unet_reverse",
        "unet_reverse_target": "unet_reverse",
    }
    for graph, d in dirs.items():
        if graph not in manifest.graphs:  # optional graphs left out of this export
            continue
        manifest.graphs[graph].artifacts["torch"] = Artifact("fp32", dir=f"torch/{d}")
    if ctx.progress is not None:
        ctx.progress.update(1)
