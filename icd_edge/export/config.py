"""What an export is asked to do (:class:`ExportConfig`) and its validation, without torch: the
export's argument errors come before the heavy imports."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from icd_edge.errors import ExportError
from icd_edge.export import parity as parity_mod

# the Core ML target's choices (to_coreml imports torch; these are checked before it loads)
COREML_COMPRESSIONS = ("none", "linear8", "palettize8", "palettize6")
COREML_ATTENTIONS = ("standard", "sliced-q")
MODELS = ("icd-sd15", "tiny", "random-sd15", "icd-sdxl", "tiny-xl", "random-sdxl")
MODEL_FAMILIES = {m: "sdxl" if m.endswith(("sdxl", "-xl")) else "sd15" for m in MODELS}
# target name -> "module:function(ctx: ExportContext)"; each writes its artifacts into ctx.out_dir
# and records them as Artifacts in ctx.manifest.graphs[graph].artifacts[<format>].
TARGETS = {
    "onnx": "icd_edge.export.to_onnx:export_target",
    "torch": "icd_edge.export.to_torch:torch_target",
    "coreml": "icd_edge.export.to_coreml:export_target",
    "tensorrt": "icd_edge.export.to_tensorrt:export_target",
}
# target name -> "module:function(cfg)" run by validate() before any download (e.g. a missing tool).
TARGET_CHECKS = {
    "tensorrt": "icd_edge.export.to_tensorrt:check_target",
}


def step_counts(cfg) -> tuple[int, int]:
    """(forward steps, reverse steps) asked for: each flag, else --steps."""
    return int(cfg.forward_steps or cfg.steps), int(cfg.reverse_steps or cfg.steps)


@dataclass(frozen=True)
class ExportConfig:
    """Everything an export needs; validated by :func:`validate` before any download."""

    out: Path
    model: str = "icd-sd15"
    base: str | None = None
    teacher: str | None = None
    forward_lora: str | None = None
    reverse_lora: str | None = None
    revision: str | None = None
    steps: str = "4"
    forward_steps: str | None = None  # None: --steps (any forward pairs with any reverse)
    reverse_steps: str | None = None
    resolution: int | None = None
    targets: tuple[str, ...] = ("onnx",)
    opset: int = 18
    seed: int = 0
    parity: str = "e2e"
    min_psnr_db: float | None = None  # end-to-end gate; None: 45 (fp32), 35 (fp16), 25 (int8) dB
    graph_min_psnr_db: float = parity_mod.GRAPH_MIN_PSNR_DB  # per-graph gate, fp32 graphs only
    precision: str = "fp32"
    graph_precision: tuple[tuple[str, str], ...] = ()
    calibration: Path | None = None
    calibration_count: int = 3
    taesd: str | None = None
    vae: str | None = None  # SDXL: another VAE (an fp16-safe one) instead of the base's: a recorded deviation
    unet_weights: str = "fused"  # or "shared-base": teacher weights once, LoRAs as low-rank branches
    embeddings: str = "float"  # or "int8": token embedding rows as int8 also in an fp16 text encoder
    lora_rounding: str = "fp16"  # A and B through float16 before fusing, as the official loader; or "none"
    reedit: bool = True  # the source/target graphs of cached re-edits (unet_reverse_source/_target)
    p2p_attention: str = "fused"  # the ONNX edit graph: P2P as plain (fusable) attentions, or "explicit"
    int8_weights: str = "7bit"  # or "8bit": exact only on CPUs with VNNI/AMX (quant.policy.INT8_WEIGHT_RANGES)
    int8_ops: tuple[str, ...] = ("Conv", "MatMul")  # ops static int8 quantises (quant.policy.INT8_OP_CHOICES)
    int8_per_channel: bool = True  # weight scales per output channel; False: one per tensor
    coreml_compression: str = "none"
    coreml_attention: str = "standard"
    progress: bool = True
    trt_precision: str = "auto"  # the tensorrt target's engines: auto, fp32, fp16 or int8
    trt_workspace_mb: int | None = None  # the tensorrt builder's workspace limit; None: TensorRT's default


def validate(cfg: ExportConfig) -> None:
    if cfg.model not in MODELS:
        raise ExportError(f"--model must be one of {', '.join(MODELS)}, got {cfg.model!r}")
    bad = [t for t in cfg.targets if t not in TARGETS]
    if bad or not cfg.targets or "onnx" not in cfg.targets:
        raise ExportError(
            f"--targets must include onnx and may add {', '.join(t for t in TARGETS if t != 'onnx')} "
            f"(got {','.join(cfg.targets) or 'nothing'})"
        )
    for target in cfg.targets:
        if target in TARGET_CHECKS:
            module_name, func = TARGET_CHECKS[target].split(":")
            getattr(importlib.import_module(module_name), func)(cfg)
    for flag, value in (
        ("--steps", cfg.steps),
        ("--forward-steps", cfg.forward_steps),
        ("--reverse-steps", cfg.reverse_steps),
    ):
        if value is not None and value not in ("4", "3"):
            raise ExportError(f"{flag} must be 4 or 3, got {value!r}")
    if cfg.resolution is not None and (cfg.resolution < 64 or cfg.resolution % 64):
        raise ExportError(f"--resolution must be a multiple of 64 (≥ 64), got {cfg.resolution}")
    if not 18 <= cfg.opset <= 25:
        raise ExportError(f"--opset must be within 18..25 (17 gives invalid graphs, 26 fails), got {cfg.opset}")
    from icd_edge.export.quant.policy import DEFAULT_INT8_OPS, INT8_OP_CHOICES, INT8_WEIGHT_RANGES, PRECISIONS

    if cfg.p2p_attention not in ("fused", "explicit"):
        raise ExportError(f"--p2p-attention must be fused or explicit, got {cfg.p2p_attention!r}")
    if cfg.lora_rounding not in ("fp16", "none"):
        raise ExportError(f"--lora-rounding must be fp16 or none, got {cfg.lora_rounding!r}")
    if cfg.int8_weights not in INT8_WEIGHT_RANGES:
        raise ExportError(f"--int8-weights must be one of {', '.join(INT8_WEIGHT_RANGES)}, got {cfg.int8_weights!r}")
    if cfg.precision not in PRECISIONS or any(v not in PRECISIONS for _, v in cfg.graph_precision):
        raise ExportError(f"--precision/--graph-precision take one of {', '.join(PRECISIONS)}")
    ops = cfg.int8_ops
    if (
        isinstance(ops, str)
        or not isinstance(ops, (tuple, list))
        or not ops
        or len(set(ops)) != len(ops)
        or any(op not in INT8_OP_CHOICES for op in ops)
    ):
        shown = ",".join(map(str, ops)) if isinstance(ops, (tuple, list)) else repr(ops)
        raise ExportError(
            f"--int8-ops takes a comma list of distinct ops from {', '.join(INT8_OP_CHOICES)}, got {shown or 'nothing'}"
        )
    if not isinstance(cfg.int8_per_channel, bool):
        raise ExportError(f"--int8-per-channel must be on or off, got {cfg.int8_per_channel!r}")
    # like the Core ML flags: a setting that would change nothing is refused, not silently ignored
    static_int8 = cfg.precision == "int8" or any(v == "int8" for _, v in cfg.graph_precision)
    if (tuple(ops) != DEFAULT_INT8_OPS or not cfg.int8_per_channel) and not static_int8:
        raise ExportError(
            "--int8-ops/--int8-per-channel apply to static int8 graphs only; add --precision int8 "
            "or --graph-precision GRAPH=int8"
        )
    if cfg.calibration is not None and not Path(cfg.calibration).is_dir():
        raise ExportError(f"--calibration {cfg.calibration} is not a folder of photos")
    if cfg.calibration is not None:
        from icd_edge.export.quant.calibration import read_prompts

        read_prompts(Path(cfg.calibration))  # a malformed prompts.json fails before any model loads
    if cfg.unet_weights not in ("fused", "shared-base"):
        raise ExportError(f"--unet-weights must be fused or shared-base, got {cfg.unet_weights!r}")
    if cfg.embeddings not in ("float", "int8"):
        raise ExportError(f"--embeddings must be float or int8, got {cfg.embeddings!r}")
    te_precision = dict(cfg.graph_precision).get("text_encoder", cfg.precision)
    if cfg.embeddings == "int8" and te_precision not in ("fp16", "int8", "int8-dynamic"):
        raise ExportError(
            f"--embeddings int8 needs a converted text encoder (fp16 or int8), not {te_precision}: "
            "add --precision fp16 or --graph-precision text_encoder=fp16"
        )
    if cfg.calibration_count < 1:
        raise ExportError("--calibration-count must be at least 1")
    if cfg.parity not in ("e2e", "graphs", "none"):
        raise ExportError(f"--parity must be e2e, graphs or none, got {cfg.parity!r}")
    if cfg.coreml_compression not in COREML_COMPRESSIONS:
        raise ExportError(
            f"--coreml-compression must be one of {', '.join(COREML_COMPRESSIONS)}, got {cfg.coreml_compression!r}"
        )
    if cfg.coreml_attention not in COREML_ATTENTIONS:
        raise ExportError(
            f"--coreml-attention must be one of {', '.join(COREML_ATTENTIONS)}, got {cfg.coreml_attention!r}"
        )
    for flag, value, default in (
        ("--coreml-compression", cfg.coreml_compression, "none"),
        ("--coreml-attention", cfg.coreml_attention, "standard"),
    ):
        if value != default and "coreml" not in cfg.targets:
            raise ExportError(
                f"{flag} applies to Core ML packages only; add coreml to --targets (e.g. --targets onnx,coreml)"
            )
    for flag, value, default in (
        ("--trt-precision", cfg.trt_precision, "auto"),
        ("--trt-workspace-mb", cfg.trt_workspace_mb, None),
    ):
        if value != default and "tensorrt" not in cfg.targets:
            raise ExportError(f"{flag} applies to TensorRT engines only; add tensorrt to --targets")
    if "coreml" in cfg.targets:
        from icd_edge.export import to_coreml

        to_coreml.check_available(cfg.coreml_compression)
    if cfg.model not in ("icd-sd15", "icd-sdxl") and any((cfg.base, cfg.teacher, cfg.forward_lora, cfg.reverse_lora)):
        raise ExportError("--base/--teacher/--forward-lora/--reverse-lora apply to --model icd-sd15 or icd-sdxl only")
    if MODEL_FAMILIES[cfg.model] == "sdxl":
        _validate_sdxl(cfg)
    elif cfg.vae is not None:
        raise ExportError("--vae applies to SDXL bundles (an fp16-safe VAE); SD1.5's VAE runs in fp16 as it is")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise ExportError(f"--out {out} is a non-empty folder that is not a bundle; choose a new path")


def _validate_sdxl(cfg: ExportConfig) -> None:
    """What an SDXL export cannot do (yet), refused with the reason rather than ignored."""
    if cfg.taesd is not None:
        raise ExportError("--taesd applies to SD1.5 bundles: SDXL's latents need another tiny decoder (TAESDXL)")
    if cfg.p2p_attention != "fused":
        raise ExportError(
            "--p2p-attention applies to SD1.5 bundles: SDXL edits switch prompts, without Prompt-to-Prompt"
        )
    if cfg.embeddings != "float":
        raise ExportError("--embeddings int8 applies to SD1.5 bundles only")
    for graph, p in cfg.graph_precision:
        if graph in ("vae_encoder", "vae_decoder") and p != "fp32" and cfg.vae is None:
            raise ExportError(
                f"--graph-precision {graph}={p}: SDXL's VAE runs in fp32 (it overflows in fp16, which is why "
                "the official code upcasts it); leave it at fp32, or give an fp16-safe VAE with --vae"
            )
