"""``python -m icd_edge.export``: write an iCD bundle. See ``--help``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from icd_edge import __version__
from icd_edge.cli_args import Parser
from icd_edge.errors import ExportError, IcdEdgeError, Terminated
from icd_edge.export.config import MODELS


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m icd_edge.export",
        description=__doc__.split(":")[1].strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write (replaced atomically)")
    p.add_argument(
        "--model",
        default="icd-sd15",
        choices=MODELS,
        help="icd-sd15 / icd-sdxl: the released iCD SD1.5 / iCD-XL; tiny / tiny-xl: built-in toy models of "
        "the same classes; random-sd15 / random-sdxl: full size, random weights",
    )
    p.add_argument(
        "--base",
        help="base model (tokenizers, text encoders, VAE): hub id or local diffusers folder "
        "[default stable-diffusion-v1-5/stable-diffusion-v1-5; icd-sdxl: stabilityai/stable-diffusion-xl-base-1.0]",
    )
    p.add_argument(
        "--teacher",
        help="CFG-distilled teacher UNet: hub id, diffusers folder, or .safetensors/.pt state dict "
        "[default dbaranchuk/sd15-cfg-distill-unet; icd-sdxl: dbaranchuk/sdxl-cfg-distill-unet]",
    )
    p.add_argument(
        "--forward-lora",
        help="forward LoRA: local .safetensors or owner/repo/file "
        "[default from dbaranchuk/icd-lora-sd15; icd-sdxl: dbaranchuk/icd-lora-sdxl]",
    )
    p.add_argument(
        "--reverse-lora",
        help="reverse LoRA: local .safetensors or owner/repo/file "
        "[default from dbaranchuk/icd-lora-sd15; icd-sdxl: dbaranchuk/icd-lora-sdxl]",
    )
    p.add_argument("--revision", help="hub revision for --base/--teacher/LoRA downloads")
    p.add_argument("--steps", default="4", choices=("4", "3"), help="steps of both models (the released LoRA pairs)")
    p.add_argument(
        "--forward-steps",
        choices=("4", "3"),
        help="steps of the forward (inversion) model, e.g. 3 with --reverse-steps 4: the official "
        "'about 7 steps' edit [default: --steps]",
    )
    p.add_argument(
        "--reverse-steps", choices=("4", "3"), help="steps of the reverse (decoding) model [default: --steps]"
    )
    p.add_argument("--resolution", type=int, help="image side in pixels (multiple of 64) [default 512; tiny 128]")
    p.add_argument(
        "--targets",
        default="onnx",
        help="comma list: onnx (always), torch (reference weights), coreml (.mlpackage per graph), "
        "tensorrt (engines for this GPU; needs TensorRT)",
    )
    p.add_argument(
        "--coreml-compression",
        default="none",
        help="Core ML weights: none (fp16), linear8 (int8), palettize8 or palettize6 (k-means LUT)",
    )
    p.add_argument(
        "--coreml-attention",
        default="standard",
        help="Core ML attention: standard (macOS 14) or sliced-q (fused attention op with the query axis of "
        "full-resolution layers split in chunks; needs macOS 15)",
    )
    p.add_argument(
        "--trt-precision", default="auto", help="tensorrt target: auto, fp32, fp16 or int8 (needs Q/DQ graphs)"
    )
    p.add_argument("--trt-workspace-mb", type=int, help="tensorrt target: builder workspace limit in MiB")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (18..25)")
    p.add_argument("--seed", type=int, default=0, help="weights seed of the tiny/random-sd15 models")
    p.add_argument("--parity", default="e2e", choices=("e2e", "graphs", "none"), help="what to check against torch")
    p.add_argument("--min-psnr", type=float, help="end-to-end parity gate, dB [45 fp32, 35 fp16, 25 int8]")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "fp16", "int8", "int8-dynamic"),
        help="ONNX graphs: fp32, fp16 (fp32 I/O), int8 (static Q/DQ on the UNets, calibrated on iCD "
        "trajectories) or int8-dynamic (weights only, no calibration)",
    )
    p.add_argument(
        "--graph-precision",
        action="append",
        default=[],
        metavar="GRAPH=P",
        help="per-graph override, e.g. vae_decoder=fp32 (repeatable)",
    )
    p.add_argument(
        "--calibration",
        type=Path,
        help="folder of calibration photos (optional prompts.json: "
        "{file: [source, target]}) [default: scikit-image's photos]",
    )
    p.add_argument(
        "--taesd",
        help="add a TAESD decoder: taesd_decoder.pth, an AutoencoderTiny folder or hub id "
        "(madebyollin/taesd), or 'random' (built-in models)",
    )
    p.add_argument(
        "--vae",
        help="SDXL: another VAE instead of the base's, e.g. an fp16-safe one (madebyollin/sdxl-vae-fp16-fix; "
        "hub id or AutoencoderKL folder): its graphs then follow --precision; recorded as a deviation",
    )
    p.add_argument(
        "--unet-weights",
        default="fused",
        choices=("fused", "shared-base"),
        help="fused: LoRAs fused into two full UNets; shared-base: the teacher's weights stored once and "
        "shared in memory (--memory shared-base), the LoRAs as low-rank branches",
    )
    p.add_argument(
        "--embeddings",
        default="float",
        choices=("float", "int8"),
        help="int8: store the text encoder's token embedding as int8 rows with a per-row scale also when it "
        "is fp16 (int8 text encoders always do; fp16: 76 -> 38 MB)",
    )
    p.add_argument(
        "--no-reedit",
        action="store_true",
        help="leave out the re-edit graphs (unet_reverse_source/_target: every later edit of one photo runs "
        "the target row alone); they share the reverse UNet's weights, so the bundle grows by their graph files",
    )
    p.add_argument(
        "--p2p-attention",
        default="fused",
        choices=("fused", "explicit"),
        help="the ONNX edit graph's Prompt-to-Prompt: fused (the edit as plain attentions, which the "
        "runtimes fuse) or explicit (softmax probabilities edited in every layer)",
    )
    p.add_argument(
        "--lora-rounding",
        default="fp16",
        choices=("fp16", "none"),
        help="fp16: round the LoRA matrices to float16 before fusing, as the official loader does; "
        "none: fuse them at the file's precision",
    )
    p.add_argument(
        "--int8-weights",
        default="7bit",
        choices=("7bit", "8bit"),
        help="range of the int8 Conv/MatMul weights: 7bit ([-64, 64]) is exact on every x86 CPU; 8bit "
        "([-127, 127]) saturates on CPUs without VNNI (AVX2-only) [default 7bit]",
    )
    p.add_argument(
        "--int8-ops",
        default="Conv,MatMul",
        type=_comma_list,
        help="comma list of the ops static int8 quantises: Conv, MatMul, Gemm (attention's activation "
        "MatMuls stay float; Gemm weights left out are stored weight-only int8)",
    )
    p.add_argument(
        "--int8-per-channel",
        default="on",
        choices=("on", "off"),
        help="int8 Conv/MatMul weights with a scale per output channel (on) or one per tensor (off)",
    )
    p.add_argument("--calibration-count", type=int, default=3, help="calibration photos to use")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log more, library warnings included")
    p.add_argument("--version", action="version", version=f"icd_edge.export {__version__}")
    return p


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _quiet_libraries() -> None:
    """Without -v the console shows the progress bar and our own messages: the libraries' warnings
    (torch's exporter registry, onnxscript, transformers) go to -v."""
    import os
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    names = ("torch", "onnxscript", "onnx_ir", "transformers", "diffusers", "onnxruntime", "openvino", "coremltools")
    # torch sets its own loggers' levels when imported: every existing child logger too
    for name in [n for n in logging.root.manager.loggerDict if n.split(".")[0] in names] + list(names):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        _quiet_libraries()
    from icd_edge.cli import _install_signal_handlers

    _install_signal_handlers()
    try:
        from icd_edge.export.config import ExportConfig, validate

        overrides = []
        for item in args.graph_precision:
            graph, sep, value = item.partition("=")
            if not sep:
                raise ExportError(f"--graph-precision takes GRAPH=PRECISION, got {item!r}")
            overrides.append((graph, value))
        cfg = ExportConfig(
            precision=args.precision,
            graph_precision=tuple(overrides),
            calibration=args.calibration,
            calibration_count=args.calibration_count,
            taesd=args.taesd,
            vae=args.vae,
            unet_weights=args.unet_weights,
            embeddings=args.embeddings,
            int8_weights=args.int8_weights,
            int8_ops=args.int8_ops,
            int8_per_channel=args.int8_per_channel == "on",
            lora_rounding=args.lora_rounding,
            p2p_attention=args.p2p_attention,
            reedit=not args.no_reedit,
            out=args.out,
            model=args.model,
            base=args.base,
            teacher=args.teacher,
            forward_lora=args.forward_lora,
            reverse_lora=args.reverse_lora,
            revision=args.revision,
            steps=args.steps,
            forward_steps=args.forward_steps,
            reverse_steps=args.reverse_steps,
            resolution=args.resolution,
            targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
            opset=args.opset,
            seed=args.seed,
            parity=args.parity,
            min_psnr_db=args.min_psnr,
            coreml_compression=args.coreml_compression,
            coreml_attention=args.coreml_attention,
            progress=not args.no_progress,
            trt_precision=args.trt_precision,
            trt_workspace_mb=args.trt_workspace_mb,
        )
        validate(cfg)  # before torch is imported
        from icd_edge.export.pipeline import run_export

        if not args.verbose:
            _quiet_libraries()  # again: importing torch reset its loggers

        out = run_export(cfg)
    except IcdEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        print(
            f"error: the export needs the 'export' extra ({exc.name} is missing): pip install 'icd_edge[export]'",
            file=sys.stderr,
        )
        return 2
    except MemoryError:
        print("error: out of memory; close other programs or export a smaller --resolution", file=sys.stderr)
        return 2
    except OSError as exc:
        from icd_edge.atomic import describe_os_error

        print(f"error: {describe_os_error(exc)}; no bundle was written", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no bundle was written (a previous bundle at that path is intact)", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated; no bundle was written (a previous bundle at that path is intact)", file=sys.stderr)
        return 143
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
