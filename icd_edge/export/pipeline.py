"""load → fuse → wrap → ONNX (+ torch weights) → parity → manifest, written atomically."""

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
import torch

from icd_edge.bundle import spec
from icd_edge.atomic import atomic_dir, scratch_dir, sweep_scratch
from icd_edge.errors import ExportError, ParityError
from icd_edge.export import parity as parity_mod
from icd_edge.bundle.store import file_table, guidance_key, write_manifest
from icd_edge.schedule import (ENCODER_START_T, MAX_GUIDANCE, TRAINED_GUIDANCE_SD15, alpha_sigma, step_coefficients)

logger = logging.getLogger(__name__)

from icd_edge.export.config import TARGETS, ExportConfig, step_counts, validate


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
    manifest: dict
    timings: dict
    progress: object = None

    def step(self, label: str) -> None:
        if self.progress is not None:
            self.progress.set_postfix_str(label)


def _tool_versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("icd_edge", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "tokenizers", "safetensors",
                "coremltools", "scikit-learn"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def sample_photo(side: int) -> np.ndarray:
    """A deterministic synthetic photo (H, W, 3) uint8: gradients and a disc, no download."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    disc = ((x - 0.55) ** 2 + (y - 0.45) ** 2 < 0.08).astype(np.float32)
    img = np.stack([0.2 + 0.6 * x, 0.3 + 0.5 * y * (1 - disc), 0.8 * disc + 0.2 * (1 - x)], axis=-1)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _sample_inputs(graphs, tokenizer, dims, guidance_table) -> dict[str, dict[str, np.ndarray]]:
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
    unet1 = {"sample": rng.standard_normal((1, 4, h, h), dtype=np.float32), "timestep": np.array([519.0], np.float32),
             "encoder_hidden_states": text, "timestep_cond": wg}
    from icd_edge.edit import p2p

    src, tgt = tokenizer(src_prompt), tokenizer(tgt_prompt)
    token_map, refine_alpha = p2p.refine_map(src, tgt)
    equalizer = np.ones(77, np.float32)
    equalizer[tgt.length - 2] = 2.0
    edit = {"sample": rng.standard_normal((2, 4, h, h), dtype=np.float32), "timestep": np.array([779.0], np.float32),
            "encoder_hidden_states": np.concatenate([text, text[:, ::-1].copy()]), "timestep_cond": np.concatenate([w0, wg]),
            "token_map": token_map, "refine_alpha": refine_alpha, "equalizer": equalizer,
            "cross_alpha": np.ones(77, np.float32), "self_flag": np.ones(1, np.float32)}
    return {
        "taesd_decoder": {"latent": rng.standard_normal((1, 4, h, h), dtype=np.float32)},
        "text_encoder": {"input_ids": ids},
        "vae_encoder": {"image": image},
        "vae_decoder": {"latent": rng.standard_normal((1, 4, h, h), dtype=np.float32) * 0.8},
        "unet_forward": {**unet1, "timestep": np.array([19.0], np.float32), "timestep_cond": w0},
        "unet_reverse": unet1,
        "unet_reverse_edit": edit,
    }


def _guidance_table(unet) -> dict[str, list[float]]:
    """Embeddings of the trained w values, computed with the torch formula (shipped as constants)."""
    from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import (
        LatentConsistencyModelPipeline,
    )

    dim = unet.config.time_cond_proj_dim
    table = {}
    for w in TRAINED_GUIDANCE_SD15:
        emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor([w]), dim, torch.float32)
        table[guidance_key(w)] = [float(v) for v in emb[0]]
    return table


def run_export(cfg: ExportConfig) -> Path:
    """Export a bundle to ``cfg.out``; returns the path. Raises IcdEdgeError on failure."""
    validate(cfg)
    from tqdm.auto import tqdm

    from icd_edge.export import models
    from icd_edge.graphs.wrappers import build_graphs
    from icd_edge.tokenizer import ClipTokenizer

    t_start = time.perf_counter()
    timings = {}
    bar = tqdm(total=3 + len(spec.GRAPHS) - 1 + (cfg.taesd is not None) + len(cfg.targets) - 1 + (0 if cfg.parity == "none" else 2),
               desc="export", disable=not cfg.progress)
    sweep_scratch()  # what killed exports left behind
    with scratch_dir("src") as work, atomic_dir(cfg.out) as tmp:
        work = Path(work)
        t0 = time.perf_counter()
        bar.set_postfix_str("loading models")
        if cfg.model == "icd-sd15":
            src = models.load_icd_sd15(cfg.base, cfg.teacher, cfg.forward_lora, cfg.reverse_lora, cfg.revision,
                                       step_counts(cfg), work, cfg.resolution, unet_weights=cfg.unet_weights,
                                       lora_rounding=cfg.lora_rounding)
        else:
            src = models.build_random(cfg.model, cfg.seed, work, cfg.resolution, unet_weights=cfg.unet_weights,
                                      lora_rounding=cfg.lora_rounding, steps=step_counts(cfg))
        timings["load_s"] = time.perf_counter() - t0
        bar.update(1)

        dims = spec.dims_for(src.image_hw, int(src.text_encoder.config.hidden_size))
        if src.unet_forward.config.get("time_cond_proj_dim") != spec.GUIDANCE_DIM:
            raise ExportError("the UNet has no 512-d guidance input (time_cond_proj_dim); it is not the iCD teacher")
        taesd = None
        if cfg.taesd is not None:
            from icd_edge.export.taesd import load_taesd

            taesd = load_taesd(cfg.taesd, cfg.revision, cfg.seed)
            src.sources["taesd"] = cfg.taesd
        graphs = build_graphs(src.text_encoder, src.vae, src.unet_forward, src.unet_reverse, dims, taesd)
        (tmp / "tokenizer").mkdir()
        shutil.copyfile(src.tokenizer_json, tmp / "tokenizer" / "tokenizer.json")
        tokenizer = ClipTokenizer(tmp / "tokenizer" / "tokenizer.json")
        guidance = _guidance_table(src.unet_forward)
        samples = _sample_inputs(graphs, tokenizer, dims, guidance)
        bar.update(1)

        manifest = _base_manifest(cfg, src, dims, guidance, graphs)
        ctx = ExportContext(cfg, tmp, src, graphs, samples, dims, manifest, timings, bar)
        for target in ("onnx",) + tuple(t for t in cfg.targets if t != "onnx"):
            module_name, func = TARGETS[target].split(":")
            t0 = time.perf_counter()
            getattr(importlib.import_module(module_name), func)(ctx)
            timings[f"{target}_s"] = time.perf_counter() - t0

        write_manifest(tmp, {**manifest, "files": file_table(tmp)})
        if cfg.parity != "none":
            bar.set_postfix_str("parity: graphs")
            t0 = time.perf_counter()
            manifest["parity"]["graphs"] = _graph_parity(tmp, graphs, samples, cfg.graph_min_psnr_db)
            bar.update(1)
            if cfg.parity == "e2e":
                bar.set_postfix_str("parity: end to end")
                from icd_edge.export.quant.policy import DEFAULT_E2E_GATE_DB

                precisions = {manifest["graphs"][g]["artifacts"]["onnx"]["precision"] for g in graphs}
                lowest = "int8" if any(q.startswith("int8") for q in precisions) else "fp16" if "fp16" in precisions else "fp32"
                gate = cfg.min_psnr_db if cfg.min_psnr_db is not None else DEFAULT_E2E_GATE_DB[lowest]
                manifest["parity"]["end_to_end"] = _e2e_parity(tmp, graphs, gate, dims, cfg if lowest != "fp32" else None)
            bar.update(1)
            timings["parity_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - t_start
        manifest["export"]["timings"] = {k: round(v, 2) for k, v in timings.items()}
        write_manifest(tmp, {**manifest, "files": file_table(tmp), "complete": True})
        bar.update(1)
    bar.close()
    return Path(cfg.out)


def _torch_alphas_cumprod() -> np.ndarray:
    """ᾱ_t exactly as the official code gets them (diffusers' DDIMScheduler, torch fp32)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          clip_sample=False, set_alpha_to_one=False)
    return sched.alphas_cumprod.numpy().astype(np.float32)


def _base_manifest(cfg, src, dims, guidance, graph_names=None) -> dict:
    acp = _torch_alphas_cumprod()
    acp_ts = sorted({t for seg in src.steps.forward + src.steps.reverse for t in seg} | {ENCODER_START_T})
    graphs = {}
    for name, (inputs, outputs) in spec.GRAPHS.items():
        if name in spec.OPTIONAL_GRAPHS and name not in (graph_names or ()):
            continue
        graphs[name] = {"inputs": [s.to_json(dims) for s in inputs], "outputs": [s.to_json(dims) for s in outputs],
                        "artifacts": {}}
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"name": src.name, "family": "sd15"},
        "sources": src.sources,
        "dims": dims,
        "resolution": {"image": dims["H"], "latent": dims["h"]},
        "schedule": {
            "config": src.steps.name,
            "forward": [list(s) for s in src.steps.forward],
            "reverse": [list(s) for s in src.steps.reverse],
            "alphas_cumprod_source": "diffusers DDIMScheduler scaled_linear 0.00085..0.012 (torch fp32)",
            "alpha_sigma": {str(t): list(alpha_sigma(t, acp)) for t in acp_ts},
            "coefficients": {"forward": [list(step_coefficients(t, s, acp)) for t, s in src.steps.forward],
                             "reverse": [list(step_coefficients(t, s, acp)) for t, s in src.steps.reverse]},
            "encoder_start": {"t": ENCODER_START_T, "alpha_sigma": list(alpha_sigma(ENCODER_START_T, acp))},
            "prediction": "epsilon",
        },
        "guidance": {"dim": spec.GUIDANCE_DIM, "max": MAX_GUIDANCE, "trained": list(TRAINED_GUIDANCE_SD15),
                     "embeddings": guidance, "defaults": {"edit": 19.0, "tau_edit": 0.8, "generate": 7.0}},
        "vae": {"scaling_factor": float(src.vae.config.scaling_factor)},
        "unet_weights": cfg.unet_weights,
        "p2p": {"blend_threshold": 0.3, "blend_hw": dims["h"] // 4, "self_inject_max_keys": (dims["h"] // 2) ** 2},
        "tokenizer": {"file": "tokenizer/tokenizer.json", "max_length": spec.TOKENS},
        "graphs": graphs,
        "tools": _tool_versions(),
        "export": {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items() if k != "extra"}},
        "parity": {"reference": "torch eager fp32 (the export's own modules)"},
    }


def torch_target(ctx: ExportContext) -> None:
    """Fused weights (safetensors + configs) for the torch reference backend."""
    ctx.step("torch weights")
    src, manifest = ctx.src, ctx.manifest
    root = ctx.out_dir / "torch"
    src.text_encoder.save_pretrained(root / "text_encoder", safe_serialization=True)
    src.vae.save_pretrained(root / "vae", safe_serialization=True)
    if ctx.cfg.unet_weights == "shared-base":  # the reference backend loads plain (fused) UNets
        from icd_edge.export.lora import merge_branches

        merge_branches(src.unet_forward).save_pretrained(root / "unet_forward", safe_serialization=True)
        merge_branches(src.unet_reverse).save_pretrained(root / "unet_reverse", safe_serialization=True)
    else:
        src.unet_forward.save_pretrained(root / "unet_forward", safe_serialization=True)
        src.unet_reverse.save_pretrained(root / "unet_reverse", safe_serialization=True)
    dirs = {"text_encoder": "text_encoder", "vae_encoder": "vae", "vae_decoder": "vae", "unet_forward": "unet_forward",
            "unet_reverse": "unet_reverse", "unet_reverse_edit": "unet_reverse"}
    for graph, d in dirs.items():
        manifest["graphs"][graph]["artifacts"]["torch"] = {"dir": f"torch/{d}", "precision": "fp32"}
    if ctx.progress is not None:
        ctx.progress.update(1)


def _graph_parity(bundle_dir: Path, graphs: dict, samples: dict, min_psnr: float) -> dict:
    from icd_edge.bundle.store import open_bundle
    from icd_edge.runtimes.ort import OrtBackend
    from icd_edge.runtimes.torch_ref import TorchBackend

    bundle = open_bundle(bundle_dir, verify=False, allow_incomplete=True)
    ort_b, torch_b = OrtBackend(), TorchBackend(graphs)
    result = {}
    for name in graphs:
        ref = torch_b.open_session(bundle, name).run(samples[name])
        sess = ort_b.open_session(bundle, name)
        got = sess.run(samples[name])
        sess.close()
        precision = bundle.graphs[name]["artifacts"]["onnx"]["precision"]
        result[name] = {"backend": "onnxruntime", "precision": precision, **parity_mod.compare(ref, got)}
        if precision == "fp32" and result[name]["psnr_db"] < min_psnr:
            raise ParityError(f"{name}: ONNX Runtime differs from torch by {result[name]['psnr_db']} dB PSNR "
                              f"(gate {min_psnr} dB): {result[name]['outputs']}")
    return result


def _e2e_parity(bundle_dir: Path, graphs: dict, min_psnr: float, dims: dict, calibration_cfg=None) -> dict:
    """Invert + P2P edit with local blend, and generate: ONNX Runtime vs torch fp32, decoded images.

    For reduced precisions the edit is also compared on the calibration photos; the gate applies
    to the mean over all edit cases. Where OpenVINO is installed the same cases also run on the
    openvino backend (its default precision rule) and are recorded under ``openvino``; the gate
    is ONNX Runtime's, OpenVINO's figures say whether they meet it.
    """
    from icd_edge.edit.editor import Editor
    from icd_edge.bundle.store import open_bundle
    from icd_edge.runtimes.ort import OrtBackend
    from icd_edge.runtimes.torch_ref import TorchBackend

    bundle = open_bundle(bundle_dir, verify=False, allow_incomplete=True)
    cases = [("synthetic", sample_photo(dims["H"]), "a photo of a cat", "a photo of a dog", ("cat", "dog"))]
    if calibration_cfg is not None:
        from icd_edge.export.quant.calibration import calibration_cases

        for i, (img, src, tgt, blend) in enumerate(calibration_cases(calibration_cfg.calibration, dims["H"],
                                                                     calibration_cfg.calibration_count)):
            cases.append((f"calibration_{i}", img, src, tgt, blend))
    editors = {label: Editor(bundle, b) for label, b in (("torch", TorchBackend(graphs)), ("onnxruntime", OrtBackend()))}
    precision = sorted({g["artifacts"]["onnx"]["precision"] for g in bundle.graphs.values()})
    out, references = {}, {}
    edit_args = dict(cross_replace=0.4, self_replace=0.6, seed=0)
    for name, photo, src, tgt, blend in cases:
        images = {label: _parity_edit(ed, photo, src, tgt, blend, **edit_args) for label, ed in editors.items()}
        key = "edit" if name == "synthetic" else f"edit_{name}"
        references[key] = (images["torch"], (photo, src, tgt, blend))
        out[key] = {"backend": "onnxruntime", "precision": "+".join(precision), "source": src, "target": tgt,
                    "psnr_db": round(parity_mod.psnr_db(images["torch"], images["onnxruntime"], peak=1.0), 2),
                    "max_abs_err": parity_mod.max_abs_err(images["torch"], images["onnxruntime"])}
    images = {label: ed.generate("a photo of a dog", seed=1, output_type="np") for label, ed in editors.items()}
    references["generate"] = (images["torch"], None)
    out["generate"] = {"backend": "onnxruntime", "precision": "+".join(precision),
                       "psnr_db": round(parity_mod.psnr_db(images["torch"], images["onnxruntime"], peak=1.0), 2),
                       "max_abs_err": parity_mod.max_abs_err(images["torch"], images["onnxruntime"])}
    for ed in editors.values():  # closed first: at full size a third set of resident graphs would not fit
        ed.close()
    edits = [v["psnr_db"] for k, v in out.items() if k.startswith("edit")]
    out["edit_mean_psnr_db"] = round(float(np.mean(edits)), 2)
    out["gate_db"] = min_psnr
    if out["edit_mean_psnr_db"] < min_psnr or out["generate"]["psnr_db"] < min_psnr:
        raise ParityError(f"end to end, ONNX Runtime ({'+'.join(precision)}) vs torch fp32: edit {out['edit_mean_psnr_db']} dB, "
                          f"generate {out['generate']['psnr_db']} dB; the gate is {min_psnr} dB (lower it with --min-psnr)")
    ov = _openvino_backend()  # recorded after the gate: a failing export does not wait for it
    if ov is not None:
        out["openvino"] = _openvino_parity(Editor(bundle, ov), references, edit_args, min_psnr)
    out["case"] = {"photo": "synthetic (icd_edge.export.pipeline.sample_photo)" + (" + calibration photos" if calibration_cfg else ""),
                   "cross_replace": 0.4, "self_replace": 0.6, "amplify": 2.0, "seed": 0}
    return out


def _parity_edit(ed, photo, src, tgt, blend, cross_replace, self_replace, seed):
    inv = ed.invert(photo, src, seed=seed)
    return ed.edit(inv, tgt, cross_replace=cross_replace, self_replace=self_replace, amplify={tgt.split()[-1]: 2.0},
                   blend=blend, output_type="np")


def _openvino_parity(editor, references: dict, edit_args: dict, min_psnr: float) -> dict:
    """The end-to-end cases on the openvino backend (its ``auto`` precision) against the torch
    images in ``references`` ({case: (image, (photo, src, tgt, blend) or None for generate)}).
    Recorded only: the gate is onnxruntime's; a NaN result is recorded, not raised."""
    import openvino

    from icd_edge.errors import NumericsError

    cases = {}
    try:
        for key, (ref, case) in references.items():
            got = (_parity_edit(editor, *case, **edit_args) if case is not None
                   else editor.generate("a photo of a dog", seed=1, output_type="np"))
            cases[key] = {"psnr_db": round(parity_mod.psnr_db(ref, got, peak=1.0), 2),
                          "max_abs_err": parity_mod.max_abs_err(ref, got)}
    except NumericsError as exc:
        logger.warning("OpenVINO (precision auto) failed the end-to-end parity: %s", exc)
        return {"version": openvino.__version__.split("-")[0], "precision": "auto", "error": str(exc), "meets_gate": False}
    finally:
        hints = {g: s.precision for g, s in editor._sessions.items()}
        editor.close()
    mean = round(float(np.mean([v["psnr_db"] for k, v in cases.items() if k.startswith("edit")])), 2)
    meets = bool(mean >= min_psnr and cases["generate"]["psnr_db"] >= min_psnr)
    if not meets:
        logger.warning("OpenVINO (precision auto) vs torch: edit %.2f dB, generate %.2f dB, below the %.1f dB gate; "
                       "run this bundle with --ov-precision f32 or on onnxruntime", mean, cases["generate"]["psnr_db"], min_psnr)
    return {"version": openvino.__version__.split("-")[0], "precision": "auto", "inference_precision": dict(sorted(hints.items())),
            **cases, "edit_mean_psnr_db": mean, "meets_gate": meets}


def _openvino_backend():
    """The openvino backend for parity when OpenVINO is installed and usable, else None (no cache:
    an export should not fill the user's cache with a bundle's first compile)."""
    import importlib.util

    if importlib.util.find_spec("openvino") is None:
        return None
    from icd_edge.runtimes.openvino import OpenVinoBackend

    backend = OpenVinoBackend(cache_dir="")
    return backend if backend.probe().ok else None


def memory_bundle(model: str, seed: int, work: Path, steps: tuple[int, int] = (4, 4)):
    """(source models, Bundle) for a built-in random model without writing graphs: the manifest
    constants and tokenizer only (used by the fast torch path's tests and GPU benchmark);
    ``steps``: (forward, reverse) step counts."""
    from icd_edge.export import models
    from icd_edge.bundle.store import FORMAT, SCHEMA_VERSION, Bundle

    src = models.build_random(model, seed, work, steps=steps)
    dims = spec.dims_for(src.image_hw, int(src.text_encoder.config.hidden_size))
    cfg = ExportConfig(out=work / "bundle", model=model, seed=seed)
    manifest = _base_manifest(cfg, src, dims, _guidance_table(src.unet_forward))
    manifest["tokenizer"]["file"] = src.tokenizer_json.relative_to(work).as_posix()
    return src, Bundle(work, {**manifest, "files": {}, "schema_version": SCHEMA_VERSION, "format": FORMAT, "complete": True})
