"""The export, in order: validate → load and fuse → graphs → targets (ONNX first) → parity →
manifest, written atomically. Orchestration and the manifest only; each stage lives in its module."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from icd_edge.atomic import atomic_dir, scratch_dir, sweep_scratch
from icd_edge.bundle import spec
from icd_edge.bundle.schema import P2P, Graph, Guidance, Manifest, Parity, Schedule, Step
from icd_edge.bundle.store import file_table, write_manifest
from icd_edge.errors import ExportError
from icd_edge.export import parity as parity_mod
from icd_edge.export import samples as samples_mod
from icd_edge.export.config import MODEL_FAMILIES, TARGETS, ExportConfig, step_counts, validate
from icd_edge.export.models import SDXL_TIME_IDS
from icd_edge.schedule import (
    ENCODER_START_T,
    MAX_GUIDANCE,
    TRAINED_GUIDANCE_SD15,
    TRAINED_GUIDANCE_SDXL,
    alpha_sigma,
    step_coefficients,
)

logger = logging.getLogger(__name__)


@dataclass
class ExportContext:
    """What a target exporter gets: the config, the temporary bundle folder, the fused source
    models, the traceable graph modules with fixed sample inputs, and the manifest to extend."""

    cfg: ExportConfig
    out_dir: Path
    src: object
    graphs: dict
    samples: dict
    dims: dict
    manifest: Manifest  # its graph artifacts and info are filled in by the targets
    timings: dict
    progress: object = None

    def step(self, label: str) -> None:
        if self.progress is not None:
            self.progress.set_postfix_str(label)


def _tool_versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in (
        "icd_edge",
        "torch",
        "diffusers",
        "transformers",
        "onnx",
        "onnxruntime",
        "tokenizers",
        "safetensors",
        "coremltools",
        "scikit-learn",
    ):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def run_export(cfg: ExportConfig) -> Path:
    """Export a bundle to ``cfg.out``; returns the path. Raises IcdEdgeError on failure."""
    validate(cfg)
    from tqdm.auto import tqdm

    from icd_edge.graphs.wrappers import build_graphs
    from icd_edge.tokenizer import ClipTokenizer

    t_start = time.perf_counter()
    timings = {}
    family = MODEL_FAMILIES[cfg.model]
    table = spec.graph_table(family)
    optional = len(table) - len(spec.OPTIONAL_GRAPHS & set(table))
    bar = tqdm(
        total=3
        + optional
        + (cfg.taesd is not None)
        + (len(spec.REEDIT_GRAPHS) if cfg.reedit and family == "sd15" else 0)
        + len(cfg.targets)
        - 1
        + (0 if cfg.parity == "none" else 2),
        desc="export",
        disable=not cfg.progress,
    )
    sweep_scratch()  # what killed exports left behind
    with scratch_dir("src") as work, atomic_dir(cfg.out) as tmp:
        work = Path(work)
        t0 = time.perf_counter()
        bar.set_postfix_str("loading models")
        src = _load_models(cfg, work)
        if cfg.vae is not None:  # SDXL: an fp16-safe VAE instead of the base's (a deviation, recorded)
            from icd_edge.export.models import load_vae

            src.vae = load_vae(cfg.vae, cfg.revision)
            src.sources["deviations"] = [f"vae: {cfg.vae} instead of the base model's VAE (fp16-safe)"]
        timings["load_s"] = time.perf_counter() - t0
        bar.update(1)

        if src.unet_forward.config.get("time_cond_proj_dim") != spec.GUIDANCE_DIM:
            raise ExportError("the UNet has no 512-d guidance input (time_cond_proj_dim); it is not the iCD teacher")
        (tmp / "tokenizer").mkdir()
        shutil.copyfile(src.tokenizer_json, tmp / "tokenizer" / "tokenizer.json")
        tokenizer = ClipTokenizer(tmp / "tokenizer" / "tokenizer.json")
        if family == "sdxl":
            from icd_edge.graphs.wrappers import build_xl_graphs

            dims = spec.dims_for_xl(
                src.image_hw,
                int(src.text_encoder.config.hidden_size),
                int(src.text_encoder_2.config.hidden_size),
                int(src.text_encoder_2.config.projection_dim),
            )
            graphs = build_xl_graphs(src.text_encoder, src.text_encoder_2, src.vae, src.unet_forward, src.unet_reverse)
            (tmp / "tokenizer_2").mkdir()
            shutil.copyfile(src.tokenizer_2_json, tmp / "tokenizer_2" / "tokenizer.json")
            tokenizer_2 = ClipTokenizer(tmp / "tokenizer_2" / "tokenizer.json", pad_token=src.tokenizer_2_pad)
            guidance = samples_mod.guidance_table(src.unet_forward, TRAINED_GUIDANCE_SDXL)
            samples = samples_mod.sample_inputs_xl(graphs, (tokenizer, tokenizer_2), dims, guidance, SDXL_TIME_IDS)
        else:
            dims = spec.dims_for(src.image_hw, int(src.text_encoder.config.hidden_size))
            taesd = None
            if cfg.taesd is not None:
                from icd_edge.export.taesd import load_taesd

                taesd = load_taesd(cfg.taesd, cfg.revision, cfg.seed)
                src.sources["taesd"] = cfg.taesd
            graphs = build_graphs(
                src.text_encoder,
                src.vae,
                src.unet_forward,
                src.unet_reverse,
                dims,
                taesd,
                p2p_attention=cfg.p2p_attention,
                reedit=cfg.reedit,
            )
            guidance = samples_mod.guidance_table(src.unet_forward)
            samples = samples_mod.sample_inputs(graphs, tokenizer, dims, guidance)
            if "unet_reverse_source" in samples:  # the packed source tensors' length, from the UNet itself
                dims["S"] = int(samples["unet_reverse_target"]["source_cache"].shape[1])
        bar.update(1)

        manifest = _base_manifest(cfg, src, dims, guidance, graphs)
        ctx = ExportContext(cfg, tmp, src, graphs, samples, dims, manifest, timings, bar)
        for target in ("onnx",) + tuple(t for t in cfg.targets if t != "onnx"):
            module_name, func = TARGETS[target].split(":")
            t0 = time.perf_counter()
            getattr(importlib.import_module(module_name), func)(ctx)
            timings[f"{target}_s"] = time.perf_counter() - t0
            if target == "onnx" and "unet_reverse_edit" in graphs:
                # the other targets and the parity checks run the reference math: the fused ONNX
                # edit graph is then compared with the explicit form it must equal
                graphs["unet_reverse_edit"].use_attention("explicit")

        manifest = ctx.manifest  # a target may have replaced it (e.g. with the int8 scheme)
        write_manifest(tmp, manifest.with_(files=file_table(tmp)))
        entries, info = [], {}
        if cfg.parity != "none":
            bar.set_postfix_str("parity: graphs")
            t0 = time.perf_counter()
            entries += parity_mod.graph_parity(tmp, graphs, samples, cfg.graph_min_psnr_db)
            bar.update(1)
            if cfg.parity == "e2e":
                bar.set_postfix_str("parity: end to end")
                from icd_edge.export.quant.policy import DEFAULT_E2E_GATE_DB

                precisions = {manifest.graphs[g].artifacts["onnx"].precision for g in graphs}
                lowest = (
                    "int8"
                    if any(q.startswith("int8") for q in precisions)
                    else "fp16"
                    if "fp16" in precisions
                    else "fp32"
                )
                gate = cfg.min_psnr_db if cfg.min_psnr_db is not None else DEFAULT_E2E_GATE_DB[lowest]
                e2e, info = parity_mod.e2e_parity(tmp, graphs, gate, dims, cfg if lowest != "fp32" else None)
                entries += e2e
            bar.update(1)
            timings["parity_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - t_start
        manifest.info["export"]["timings"] = {k: round(v, 2) for k, v in timings.items()}
        parity = Parity(manifest.parity.reference, tuple(entries), info)
        write_manifest(tmp, manifest.with_(files=file_table(tmp), complete=True, parity=parity))
        bar.update(1)
    bar.close()
    return Path(cfg.out)


def _load_models(cfg: ExportConfig, work: Path):
    """The fused source models of ``cfg.model`` (the real releases, or a built-in random model)."""
    from icd_edge.export import models

    common = dict(image_hw=cfg.resolution, unet_weights=cfg.unet_weights, lora_rounding=cfg.lora_rounding)
    if cfg.model in ("icd-sd15", "icd-sdxl"):
        load = models.load_icd_sd15 if cfg.model == "icd-sd15" else models.load_icd_sdxl
        return load(
            cfg.base,
            cfg.teacher,
            cfg.forward_lora,
            cfg.reverse_lora,
            cfg.revision,
            step_counts(cfg),
            work,
            **common,
        )
    build = models.build_random_xl if MODEL_FAMILIES[cfg.model] == "sdxl" else models.build_random
    return build(cfg.model, cfg.seed, work, steps=step_counts(cfg), **common)


def _torch_alphas_cumprod() -> np.ndarray:
    """ᾱ_t exactly as the official code gets them (diffusers' DDIMScheduler, torch fp32)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
    )
    return sched.alphas_cumprod.numpy().astype(np.float32)


def _base_manifest(cfg, src, dims, guidance, graph_names=None) -> Manifest:
    acp = _torch_alphas_cumprod()
    acp_ts = sorted({t for seg in src.steps.forward + src.steps.reverse for t in seg} | {ENCODER_START_T})
    graphs = {}
    xl = src.family == "sdxl"
    for name, (inputs, outputs) in spec.graph_table(src.family).items():
        if name in spec.OPTIONAL_GRAPHS and name not in (graph_names or ()):
            continue
        graphs[name] = Graph(name, tuple(s.concrete(dims) for s in inputs), tuple(s.concrete(dims) for s in outputs))

    def steps(pairs):
        return tuple(Step(t, s, *step_coefficients(t, s, acp)) for t, s in pairs)

    schedule = Schedule(
        src.steps.name,
        steps(src.steps.forward),
        steps(src.steps.reverse),
        {t: tuple(alpha_sigma(t, acp)) for t in acp_ts},
        ENCODER_START_T,
        tuple(alpha_sigma(ENCODER_START_T, acp)),
        {
            "alphas_cumprod_source": "diffusers DDIMScheduler scaled_linear 0.00085..0.012 (torch fp32)",
            "prediction": "epsilon",
        },
    )
    return Manifest(
        model=src.name,
        family=src.family,
        dims=dict(dims),
        schedule=schedule,
        guidance=Guidance(
            spec.GUIDANCE_DIM,
            MAX_GUIDANCE,
            {k: tuple(v) for k, v in guidance.items()},
            tuple(TRAINED_GUIDANCE_SDXL if xl else TRAINED_GUIDANCE_SD15),
            {"edit": 19.0, "tau_edit": 0.7 if xl else 0.8, "generate": 7.0},
        ),
        vae_scaling_factor=float(src.vae.config.scaling_factor),
        # SDXL's VAE: a sample of the posterior, decoded pixels rounded (the official SDXL code)
        vae_encode="sample" if xl else "mean",
        vae_to_uint8="round" if xl else "truncate",
        p2p=None if xl else P2P(0.3, dims["h"] // 4, (dims["h"] // 2) ** 2),
        tokenizer_2_file="tokenizer_2/tokenizer.json" if xl else None,
        tokenizer_2_pad=src.tokenizer_2_pad if xl else None,
        time_ids=tuple(SDXL_TIME_IDS) if xl else None,
        tokenizer_file="tokenizer/tokenizer.json",
        tokenizer_max_length=spec.TOKENS,
        graphs=graphs,
        unet_weights=cfg.unet_weights,
        parity=Parity("torch eager fp32 (the export's own modules)"),
        info={
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "sources": src.sources,
            "resolution": {"image": dims["H"], "latent": dims["h"]},
            "tools": _tool_versions(),
            "export": {"config": {k: _jsonable(v) for k, v in cfg.__dict__.items()}},
        },
    )


def _jsonable(v):
    return str(v) if isinstance(v, Path) else list(map(_jsonable, v)) if isinstance(v, tuple) else v


def memory_bundle(model: str, seed: int, work: Path, steps: tuple[int, int] = (4, 4), reedit: bool = False):
    """(source models, Bundle) for a built-in random model without writing graphs: the manifest
    constants and tokenizers only (used by the fast torch path's tests and GPU benchmark);
    ``steps``: (forward, reverse) step counts; ``reedit``: the manifest declares the re-edit graphs
    (SD1.5)."""
    from icd_edge.bundle.store import Bundle
    from icd_edge.export import models

    cfg = ExportConfig(out=work / "bundle", model=model, seed=seed)
    names = None
    if MODEL_FAMILIES[model] == "sdxl":
        src = models.build_random_xl(model, seed, work, steps=steps)
        dims = spec.dims_for_xl(
            src.image_hw,
            int(src.text_encoder.config.hidden_size),
            int(src.text_encoder_2.config.hidden_size),
            int(src.text_encoder_2.config.projection_dim),
        )
        guidance = samples_mod.guidance_table(src.unet_forward, TRAINED_GUIDANCE_SDXL)
    else:
        src = models.build_random(model, seed, work, steps=steps)
        dims = spec.dims_for(src.image_hw, int(src.text_encoder.config.hidden_size))
        guidance = samples_mod.guidance_table(src.unet_forward)
        if reedit:
            dims["S"] = source_cache_length(src.unet_reverse, dims)
            names = spec.REEDIT_GRAPHS
    manifest = _base_manifest(cfg, src, dims, guidance, names)
    files = {"tokenizer_file": src.tokenizer_json.relative_to(work).as_posix()}
    if src.tokenizer_2_json is not None:
        files["tokenizer_2_file"] = src.tokenizer_2_json.relative_to(work).as_posix()
    return src, Bundle(work, manifest.with_(**files, complete=True))


def source_cache_length(unet, dims: dict) -> int:
    """``S``: the length of one step's packed source tensors for ``unet`` at ``dims`` (one
    batch-1 run of the source graph on zeros)."""
    import torch

    from icd_edge.graphs.attention import install_p2p
    from icd_edge.graphs.wrappers import UNetSourceGraph

    install_p2p(unet)
    h = dims["h"]
    graph = UNetSourceGraph(unet, (h // 2) ** 2, dims["Q"])
    with torch.no_grad():
        _, _, packed = graph(
            torch.zeros(1, 4, h, h), torch.tensor([999.0]), torch.zeros(1, spec.TOKENS, dims["D"]), torch.zeros(1, 512)
        )
    return int(packed.shape[1])
