"""``icd-edge`` / ``python -m icd_edge``: edit, invert, reconstruct, generate, inspect, doctor.

Every bad input and every operating-system fault ends in one line ``error: ...`` on stderr and
exit code 2, checked before any model runs where it can be, with no partial output file (outputs
are written to a temporary file and renamed). SIGINT exits 130, SIGTERM 143, leaving nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from icd_edge import __version__
from icd_edge.cli_args import EXIT_BAD_INPUT, Once, Parser
from icd_edge.errors import IcdEdgeError, InputError, Terminated

# API parameter names in error messages → the flags a CLI user typed
FLAGS = {
    "cross_replace": "--cross-replace",
    "self_replace": "--self-replace",
    "guidance": "--guidance",
    "tau": "--tau",
    "seed": "--seed",
    "mode": "--mode",
    "blend": "--blend",
    "amplify": "--amplify",
    "fit": "--fit",
    "quality": "--quality",
    "source prompt": "--source",
    "target prompt": "--target",
    "prompt": "--prompt",
}


# the SD1.5 edit's Prompt-to-Prompt defaults (the flags default to None: SDXL bundles refuse them when given)
EDIT_P2P_DEFAULTS = {"cross_replace": 0.2, "self_replace": 0.2}


def _precision_name(value: str) -> str:
    from icd_edge.precision import ALIASES

    return ALIASES.get(value.lower(), value.lower())  # f32/f16, the spellings of earlier versions


def _amplify(values: list[str] | None) -> dict[str, float]:
    out = {}
    for item in values or []:
        word, sep, factor = item.rpartition("=")
        if not sep or not word:
            raise InputError(f"--amplify takes WORD=FACTOR (e.g. dog=3), got {item!r}")
        if word in out:
            raise InputError(f"--amplify names {word!r} twice; give each word once")
        try:
            out[word] = float(factor)
        except ValueError:
            raise InputError(f"--amplify {item!r}: {factor!r} is not a number") from None
    return out


def _verbosity(p: argparse.ArgumentParser, top: bool = False) -> None:
    # on the subcommands too (`icd-edge edit ... -v`); SUPPRESS keeps the top-level value otherwise
    default = False if top else argparse.SUPPRESS
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="log more (library warnings too)")
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bar, errors only")


def _common(p: argparse.ArgumentParser) -> None:
    once = {"action": Once}
    p.add_argument(
        "--bundle", required=True, type=Path, help="bundle folder written by python -m icd_edge.export", **once
    )
    p.add_argument("--backend", default="auto", help="auto, openvino, onnxruntime, torch, tensorrt or coreml", **once)
    p.add_argument("--no-verify", action="store_true", help="check file sizes only, not sha256 (faster open)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--decoder",
        default="full",
        choices=("full", "taesd"),
        help="final decoder: the full SD VAE, or TAESD (bundles exported with --taesd)",
        **once,
    )
    p.add_argument(
        "--memory",
        default="resident",
        choices=("resident", "sequential", "shared-base"),
        help="resident: keep graphs loaded; sequential: one graph at a time; shared-base: teacher weights "
        "mapped once for all UNets (bundles exported with --unet-weights shared-base)",
        **once,
    )
    p.add_argument(
        "--ov-precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        type=_precision_name,
        help="openvino: precision of the graphs' float parts (auto: float32, bfloat16 in int8 graphs where native)",
        **once,
    )
    p.add_argument(
        "--ov-cache",
        metavar="DIR",
        help="openvino: compiled-graph cache folder, or 'none' (default: ~/.cache/icd_edge/openvino)",
        **once,
    )
    p.add_argument(
        "--json", action="store_true", help="print what was written, timings, backend and parameters as JSON"
    )
    p.add_argument(
        "--rng",
        default="torch",
        choices=("torch", "numpy"),
        action=Once,
        help="noise generator: torch (the official code's torch.randn on the CPU, bit for bit) or numpy",
    )
    _verbosity(p)


def _image_out(p: argparse.ArgumentParser, what: str, several: bool = False) -> None:
    if several:  # edit: one output per --target, named by a pattern or put in a folder
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument(
            "--out",
            type=Path,
            action=Once,
            help=f"{what} (.png, .jpg, .webp, .bmp, .tif); with several --target the name must hold {{i}} "
            "(1, 2, ...) and/or {target} (the prompt as a file name), e.g. out_{i}.png",
        )
        g.add_argument(
            "--out-dir",
            type=Path,
            metavar="DIR",
            action=Once,
            help="write one PNG per --target into DIR (an existing folder), named {i:02d}_{target}.png",
        )
    else:
        p.add_argument("--out", required=True, type=Path, action=Once, help=f"{what} (.png, .jpg, .webp, .bmp, .tif)")
    p.add_argument("--quality", type=int, action=Once, help="JPEG/WebP quality 1-100 (default 95)")
    p.add_argument("--force", action="store_true", help="allow --out to be the input photo (it is overwritten)")


def _fit(p: argparse.ArgumentParser, keep_size: bool = True) -> None:
    p.add_argument(
        "--fit",
        default="stretch",
        choices=("stretch", "crop", "pad"),
        action=Once,
        help="how a non-square photo becomes square: stretch (official), centre crop, or pad",
    )
    if keep_size:
        p.add_argument("--keep-size", action="store_true", help="write the result at the input photo's size/aspect")


def _edit_controls(p: argparse.ArgumentParser) -> None:
    """The edit controls of `edit` and (as the rows' defaults) `batch`; the P2P ones default to
    None so that an SDXL bundle can refuse them when given."""
    once = {"action": Once}
    sd15 = " (SD1.5 bundles; SDXL edits switch prompts)"
    p.add_argument(
        "--cross-replace",
        type=float,
        help=f"fraction of steps with cross-attention replacement [default {EDIT_P2P_DEFAULTS['cross_replace']}]{sd15}",
        **once,
    )
    p.add_argument(
        "--self-replace",
        type=float,
        help=f"fraction of steps with self-attention injection [default {EDIT_P2P_DEFAULTS['self_replace']}]{sd15}",
        **once,
    )
    p.add_argument(
        "--amplify",
        action="append",
        metavar="WORD=F",
        help=f"re-weight a target word's attention (repeatable, one per word){sd15}",
    )
    p.add_argument(
        "--blend",
        nargs=2,
        metavar=("SRC_WORD", "TGT_WORD"),
        help=f"local blend: change only these words' region{sd15}",
        **once,
    )
    p.add_argument(
        "--guidance", type=float, default=19.0, help="guidance w of the target row (0..19, code units)", **once
    )
    p.add_argument(
        "--tau",
        type=float,
        help="dynamic guidance: guided iff t <= 1000*tau [default 0.8; SDXL bundles 0.7, where the steps above "
        "it also run under the source prompt]",
        **once,
    )
    p.add_argument("--mode", choices=("auto", "refine", "replace"), help=f"token mapping [default auto]{sd15}", **once)
    p.add_argument("--seed", type=int, default=0, help="seed of the inversion noise", **once)


def _p2p_given(args) -> list[str]:
    """The SD1.5 Prompt-to-Prompt flags the command line set."""
    flags = {
        "--cross-replace": args.cross_replace,
        "--self-replace": args.self_replace,
        "--amplify": args.amplify,
        "--blend": args.blend,
        "--mode": args.mode,
    }
    return [flag for flag, value in flags.items() if value is not None]


def _photo_or_inversion(p: argparse.ArgumentParser) -> None:
    """--image (inverted now, with --source) or --inversion (a file of `icd-edge invert`)."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--image", type=Path, action=Once, help="input photo (inverted now; needs --source)")
    g.add_argument(
        "--inversion",
        type=Path,
        metavar="INV.npz",
        action=Once,
        help="an inversion file written by `icd-edge invert`, instead of --image: no inversion runs, and the "
        "source prompt, seed, --rng and --fit are the file's",
    )
    p.add_argument(
        "--source", action=Once, help="prompt describing the photo (needed with --image; the file's with --inversion)"
    )


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = Parser(
        prog="icd-edge", description="iCD text-guided image editing from an exported bundle.", formatter_class=fmt
    )
    parser.add_argument("--version", action="version", version=f"icd-edge {__version__}")
    _verbosity(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    once = {"action": Once}

    p = sub.add_parser(
        "edit",
        help="invert a photo (or read an inversion file) and decode it under target prompts",
        formatter_class=fmt,
    )
    _common(p)
    _photo_or_inversion(p)
    p.add_argument(
        "--target",
        required=True,
        action="append",
        help="prompt describing the edited photo; repeat it for several edits of one inversion (one image each)",
    )
    _image_out(p, "output image", several=True)
    _edit_controls(p)
    p.add_argument(
        "--preview", type=Path, metavar="DIR", help="write a preview PNG after every reverse step into DIR", **once
    )
    p.add_argument(
        "--save-source",
        type=Path,
        metavar="PATH",
        action=Once,
        help="also write the source row (the reconstruction the edit is made against; one file for all targets)",
    )
    _fit(p)

    p = sub.add_parser("invert", help="invert a photo to noise and save it (.npz) for later edits", formatter_class=fmt)
    _common(p)
    p.add_argument("--image", required=True, type=Path, help="input photo", **once)
    p.add_argument("--source", required=True, help="prompt describing the photo", **once)
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output .npz inversion file (x_999, prompt, seed, fit, bundle id): edit it with `edit --inversion`",
        **once,
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the inversion noise", **once)
    _fit(p, keep_size=False)
    p.add_argument(
        "--save-source",
        action="store_true",
        help="also store the source cache in the file (faster re-edits; hundreds of MB at 512 px) when the "
        "backend computes one during the inversion",
    )

    p = sub.add_parser(
        "reconstruct", help="invert and decode under the source prompt (round trip)", formatter_class=fmt
    )
    _common(p)
    _photo_or_inversion(p)
    _image_out(p, "output image")
    p.add_argument("--guidance", type=float, default=0.0, help="guidance w of the decode (0..19, code units)", **once)
    p.add_argument("--tau", type=float, default=0.8, help="dynamic guidance: guided iff t <= 1000*tau", **once)
    p.add_argument("--seed", type=int, default=0, help="seed of the inversion noise", **once)
    _fit(p)

    p = sub.add_parser("generate", help="text to image with the reverse model", formatter_class=fmt)
    _common(p)
    p.add_argument("--prompt", required=True, help="what to draw", **once)
    _image_out(p, "output image")
    p.add_argument("--guidance", type=float, default=7.0, help="guidance w (0..19, code units)", **once)
    p.add_argument("--tau", type=float, default=1.0, help="dynamic guidance: guided iff t <= 1000*tau", **once)
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noise", **once)

    p = sub.add_parser(
        "inspect",
        help="print a bundle's manifest and parity figures, or an output image's parameters",
        formatter_class=fmt,
    )
    p.add_argument("bundle", type=Path, metavar="PATH", help="a bundle folder, or an image written by icd-edge")
    p.add_argument("--json", action="store_true", help="the whole manifest (or the image's parameters) as JSON")
    p.add_argument("--no-verify", action="store_true", help="skip sha256 checks")
    _verbosity(p)

    p = sub.add_parser(
        "prepare",
        help="make what a GPU backend builds at first use now (onnxruntime's fused CUDA graphs; with --fast "
        "the compiled torch path's kernels), so the first edit does not wait",
        formatter_class=fmt,
    )
    p.add_argument("bundle", type=Path, metavar="PATH", help="a bundle folder")
    p.add_argument(
        "--fusions",
        default="all",
        choices=("all", "attention"),
        help="all: ONNX Runtime's Stable Diffusion fusions and fused attention; attention: fused attention only",
    )
    p.add_argument("--jobs", type=int, default=1, help="graphs fused at once (each holds one graph in memory)")
    p.add_argument(
        "--fast",
        action="store_true",
        help="compile the torch fast path (bundles with --targets onnx,torch; CUDA GPU) and keep its kernels "
        "in $ICD_EDGE_CACHE/torch-compile",
    )
    p.add_argument(
        "--aot",
        action="store_true",
        help="with --fast: AOTInductor packages (later processes load them without tracing; open the editor "
        "with FastOptions(aot=True)) instead of torch.compile's cache artifacts",
    )
    p.add_argument("--no-verify", action="store_true", help="check file sizes only, not sha256 (faster open)")
    p.add_argument("--json", action="store_true", help="print the cache entries as JSON")
    _verbosity(p)

    p = sub.add_parser(
        "batch",
        help="edit a photo collection from a JOBS file (JSONL or CSV): resumable, failing rows recorded",
        formatter_class=fmt,
        description="One row per photo: image, source, target (several: a JSON list, or '|' in CSV) and optional "
        "per-row controls named like the edit flags (seed, fit, mode, amplify, blend, cross_replace, self_replace, "
        "guidance, tau); the flags below are the defaults. Outputs: OUT_DIR/{id}_{target}.png. Exit code 0 when "
        "every row succeeded, 3 when some failed (listed in OUT_DIR/errors.jsonl), 2 for a bad JOBS file or flag.",
    )
    p.add_argument("jobs", type=Path, metavar="JOBS", help="a .jsonl or .csv file, one row per photo")
    _common(p)
    p.add_argument("--out-dir", type=Path, required=True, help="folder of the outputs (created if missing)", **once)
    p.add_argument(
        "--workers", type=int, default=1, help="worker processes (local) or Ray actors, one editor each", **once
    )
    p.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: processes on this machine; ray: Ray Data actors on the cluster of $RAY_ADDRESS (or a local "
        "Ray), photos and --out-dir on a file system every node sees (pip install 'icd_edge[ray]')",
        **once,
    )
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        help="ray: GPUs per actor [default 1 on a GPU backend (TensorRT, onnxruntime CUDA), else 0]",
        **once,
    )
    p.add_argument("--force", action="store_true", help="redo outputs that already exist with the same parameters")
    _edit_controls(p)
    _fit(p, keep_size=False)

    p = sub.add_parser(
        "doctor", help="list every backend as available or why not, and the CPU's int8 behaviour", formatter_class=fmt
    )
    p.add_argument("--json", action="store_true", help="the same as one JSON object")
    p.add_argument(
        "--bundle", type=Path, metavar="DIR", help="also say which backend --backend auto opens this bundle with"
    )
    _verbosity(p)
    return parser


def _open(args, source_cache: str = "auto", progress: bool = True):
    """The editor; ``source_cache="off"`` where no edit follows the inversion (invert without
    --save-source, reconstruct), so that the source branch is not computed only to be dropped."""
    from icd_edge.edit.editor import Editor

    fields = {}
    if args.ov_precision is not None:
        fields["precision"] = args.ov_precision
    if args.ov_cache is not None:
        fields["cache_dir"] = "" if args.ov_cache == "none" else args.ov_cache
    if fields and args.backend not in ("auto", "openvino"):
        raise InputError(f"--ov-precision and --ov-cache apply to the openvino backend, not {args.backend!r}")
    options = ()
    if fields:
        from icd_edge.runtimes.openvino import OvOptions

        options = (OvOptions(**fields),)
    return Editor.open(
        args.bundle,
        backend=args.backend,
        verify=not args.no_verify,
        progress=progress and not (args.no_progress or args.quiet),
        memory=args.memory,
        decoder=args.decoder,
        source_cache=source_cache,
        options=options,
    )


def _check_quality(quality: int | None, path: Path, fmt: str, flag: str = "--out") -> None:
    from icd_edge.image import LOSSY

    if quality is not None and (fmt not in LOSSY or not 1 <= quality <= 100):
        raise InputError(
            f"--quality takes 1-100 and applies to .jpg/.webp outputs (got {quality} for {flag} {path.name})"
        )


def _metadata(ed, command: str, **params) -> dict:
    from icd_edge.outputs import metadata

    return metadata(ed, command, **params)


def _check_room(paths: list[Path], ed, size: tuple[int, int] | None = None) -> None:
    """Once the bundle says how large an image is: room on the disk for every output (an
    uncompressed upper bound each, summed per folder), before the model work."""
    from collections import Counter

    from icd_edge.atomic import check_output_file

    side = ed.constants.image_hw
    w, h = size or (side, side)
    per_folder = Counter(p.parent.resolve() for p in paths)
    for folder, n in per_folder.items():
        first = next(p for p in paths if p.parent.resolve() == folder)
        check_output_file(first, need_bytes=n * (w * h * 3 + (1 << 16)))


def _report(args, command: str, wrote, ed, timings: dict, params: dict, extra: dict | None = None) -> None:
    """``wrote``: the path written, or the list of them (edit with several targets)."""
    if args.json:
        print(
            json.dumps(
                {
                    "command": command,
                    "wrote": [str(p) for p in wrote] if isinstance(wrote, list) else str(wrote),
                    **(extra or {}),
                    "backend": ed.backend.name,
                    "bundle_id": ed.bundle.bundle_id,
                    "seconds": {k: round(v, 3) for k, v in timings.items()},
                    "parameters": params,
                }
            )
        )
    elif not args.quiet:
        for p in wrote if isinstance(wrote, list) else [wrote]:
            print(f"wrote {p}")
        if extra and extra.get("source_image"):
            print(f"wrote {extra['source_image']} (the source row)")


class _Clock:
    def __init__(self):
        self.seconds, self._t = {}, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self._t
        self._t = now


# the inversion's own settings: an inversion file fixed them, so with --inversion they are errors
_FIXED_AT_INVERSION = {"seed": "--seed", "rng": "--rng", "fit": "--fit"}


def _check_input_flags(args) -> None:
    """--image needs --source; --inversion takes no --seed/--rng/--fit (checked before any work)."""
    if args.inversion is None:
        if args.source is None:
            raise InputError("--image needs --source, the prompt describing the photo")
        return
    given = getattr(args, "_given", set())  # Once records every flag typed
    fixed = [flag for dest, flag in _FIXED_AT_INVERSION.items() if dest in given]
    if fixed:
        raise InputError(
            f"{' and '.join(fixed)} cannot be used with --inversion: `icd-edge invert` fixed "
            f"{'it' if len(fixed) == 1 else 'them'} in {args.inversion.name}; leave "
            f"{'it' if len(fixed) == 1 else 'them'} out, or invert the photo again with the new value"
        )


def _load_inversion(args, ed):
    """The --inversion file, checked against this bundle and --source (when given)."""
    from icd_edge.edit.inversion import Inversion

    inv = Inversion.load(args.inversion, bundle_id=ed.bundle.bundle_id)
    if args.source is not None and args.source != inv.source_prompt:
        raise InputError(
            f"--source {args.source!r} is not the prompt {args.inversion.name} was inverted with "
            f"({inv.source_prompt!r}); leave --source out to use the file's, or invert the photo again"
        )
    return inv


def _input_params(args, inv) -> dict:
    """The inversion's parameters for metadata and --json: the flags, or the file's."""
    if args.inversion is None:
        return {"source": args.source, "seed": args.seed, "rng": args.rng, "fit": args.fit}
    return {
        "source": inv.source_prompt,
        "seed": inv.seed,
        "rng": inv.rng,
        "fit": inv.fit[0],
        "inversion": str(args.inversion),
    }


def _slug(prompt: str) -> str:
    from icd_edge.outputs import slug

    return slug(prompt)


def _output_names(args, targets: list[str]) -> list[Path]:
    """One output path per target (see docs/running.md "Several targets"); names only, unchecked."""
    import string

    if args.out_dir is not None:
        if not args.out_dir.is_dir():
            raise InputError(f"--out-dir {args.out_dir} is not a folder; create it first")
        return [args.out_dir / f"{i:02d}_{_slug(t)}.png" for i, t in enumerate(targets, 1)]
    name = args.out.name
    hint = "use {i} (1, 2, ...) and {target} (the prompt as a file name); write a literal brace as {{ or }}"
    try:
        fields = [(f, conv) for _, f, _, conv in string.Formatter().parse(name) if f is not None]
    except ValueError as exc:
        raise InputError(f"--out {name}: {exc}; {hint}") from None
    for field, conv in fields:
        if field not in ("i", "target") or conv:
            raise InputError(f"--out {name}: unknown placeholder {{{field}{'!' + conv if conv else ''}}}; {hint}")
    if len(targets) > 1 and not fields:
        raise InputError(
            f"--out {name} names one file but {len(targets)} --target prompts were given; put {{i}} or "
            "{target} in the name (e.g. out_{i}.png), or use --out-dir DIR"
        )
    try:
        return [args.out.with_name(name.format(i=i, target=_slug(t))) for i, t in enumerate(targets, 1)]
    except (ValueError, TypeError) as exc:  # a format spec that does not fit, e.g. {target:d}
        raise InputError(f"--out {name}: {exc}; {hint}") from None


def _check_edit_outputs(args, targets: list[str]) -> tuple[list[Path], Path | None]:
    """Every output name of an edit checked before any work: distinct, a known suffix, a writable
    folder, not the input photo (without --force), --quality fits each."""
    from icd_edge.image import check_output_path

    outs = _output_names(args, targets)
    flag = "--out-dir" if args.out_dir is not None else "--out"
    seen: dict[Path, int] = {}
    for i, path in enumerate(outs):
        _, fmt = check_output_path(path, input_path=args.image, force=args.force)
        _check_quality(args.quality, path, fmt, flag)
        key = path.resolve()
        if key in seen:
            j = seen[key]
            raise InputError(
                f"--target {j + 1} ({targets[j]!r}) and --target {i + 1} ({targets[i]!r}) would both write "
                f"{path}; give distinct prompts, or put {{i}} in --out"
            )
        seen[key] = i
    src = args.save_source
    if src is not None:
        _, src_fmt = check_output_path(src, input_path=args.image, force=args.force)
        if src.resolve() in seen:
            raise InputError(f"--save-source {src} and an edit's output are the same file; give two names")
        _check_quality(args.quality, src, src_fmt, "--save-source")
    return outs, src


def _save_all(items: list[tuple], quality: int | None) -> None:
    """Write every (image, path, metadata) or none: each goes to a temporary file, renamed only
    once all are written, so a fault or Ctrl-C midway leaves no output of this run behind."""
    from contextlib import ExitStack

    from icd_edge.atomic import atomic_file
    from icd_edge.image import save_image

    with ExitStack() as stack:
        for img, path, meta in items:
            save_image(img, stack.enter_context(atomic_file(path)), metadata=meta, quality=quality)


def _or(value, default):
    return default if value is None else value


def cmd_edit(args) -> int:
    from icd_edge.image import load_image, save_image

    _check_input_flags(args)
    targets = list(args.target)
    if args.preview is not None and len(targets) > 1:
        raise InputError(
            f"--preview shows one edit's steps; give one --target with it (got {len(targets)}), or leave --preview out"
        )
    outs, src_path = _check_edit_outputs(args, targets)
    amplify = _amplify(args.amplify)
    preview = None
    if args.preview is not None:
        if not args.preview.is_dir():
            raise InputError(f"--preview {args.preview} is not a folder; create it first")
        from icd_edge.atomic import check_output_file

        check_output_file(args.preview / "step_1_of_4.png", "--preview")

        def preview(step, total, image):
            save_image(image, args.preview / f"step_{step}_of_{total}.png")

    blend = tuple(args.blend) if args.blend else None
    clock = _Clock()
    photo = load_image(args.image) if args.image is not None else None  # decoded once, before the bundle opens
    with _open(args) as ed:
        if ed.bundle.manifest.family == "sdxl":
            given = _p2p_given(args)
            if given:
                raise InputError(
                    f"{', '.join(given)}: this SDXL bundle edits by switching prompts, without Prompt-to-Prompt "
                    "controls; leave these flags out (--guidance and --tau apply)"
                )
            controls = {"guidance": args.guidance, "tau": 0.7 if args.tau is None else args.tau}
        else:
            controls = {
                "cross_replace": _or(args.cross_replace, EDIT_P2P_DEFAULTS["cross_replace"]),
                "self_replace": _or(args.self_replace, EDIT_P2P_DEFAULTS["self_replace"]),
                "amplify": amplify,
                "blend": blend,
                "guidance": args.guidance,
                "tau": _or(args.tau, 0.8),
                "mode": _or(args.mode, "auto"),
            }
        inv = _load_inversion(args, ed) if args.inversion is not None else None
        source = args.source if inv is None else inv.source_prompt
        # every edit parameter, for every target, is checked before the (slow) inversion
        for target in targets:
            ed.check_edit(source, target, **controls)
        size = None
        if args.keep_size:  # the photo's size, or (crop) an upper bound of it
            size = photo.size if photo is not None else inv.image_size
        _check_room(outs + ([src_path] if src_path is not None else []), ed, size)
        clock.lap("open")
        if inv is None:
            inv = ed.invert(photo, args.source, seed=args.seed, fit=args.fit, rng=args.rng)
            clock.lap("invert")
        source_img = None
        if len(targets) > 1 and preview is None and src_path is None:
            images = ed.edit_many(inv, targets, **controls, keep_size=args.keep_size)
        else:  # a per-target option: edit() one by one, the source row from the first (it is the same for all)
            images = []
            for k, target in enumerate(targets):
                want_source = src_path is not None and k == 0
                img = ed.edit(
                    inv, target, **controls, keep_size=args.keep_size, preview=preview, return_source=want_source
                )
                if want_source:
                    img, source_img = img
                images.append(img)
        clock.lap("edit")
        params = {
            **_input_params(args, inv),
            "target": targets[0] if len(targets) == 1 else targets,
            **controls,
            **({"amplify": amplify, "blend": list(blend) if blend else None} if "blend" in controls else {}),
            "keep_size": args.keep_size,
            "decoder": args.decoder,
        }
        items = [
            (img, out, _metadata(ed, "edit", **{**params, "target": t})) for img, out, t in zip(images, outs, targets)
        ]
        if source_img is not None:
            items.append((source_img, src_path, _metadata(ed, "edit-source", **params)))
        _save_all(items, args.quality)
        clock.lap("save")
        extra = {"outputs": [{"target": t, "path": str(o)} for t, o in zip(targets, outs)]}
        if src_path is not None:
            extra["source_image"] = str(src_path)
        _report(args, "edit", outs[0] if len(outs) == 1 else outs, ed, clock.seconds, params, extra)
    return 0


def cmd_invert(args) -> int:
    from icd_edge.atomic import check_output_file
    from icd_edge.image import load_image

    # the output first: a bad --out fails before the photo is decoded or the bundle opened
    if args.out.suffix != ".npz":
        raise InputError(f"--out {args.out} must end in .npz (an inversion file)")
    check_output_file(args.out, "--out")
    clock = _Clock()
    photo = load_image(args.image)
    with _open(args, "auto" if args.save_source else "off") as ed:
        # the latent; a source cache's size is known only after the inversion, and save checks it then
        check_output_file(args.out, "--out", need_bytes=4 * ed.constants.latent_hw**2 * 4 + (1 << 16))
        clock.lap("open")
        inv = ed.invert(photo, args.source, seed=args.seed, fit=args.fit, rng=args.rng)
        clock.lap("invert")
        with_source = args.save_source and inv.source is not None
        if args.save_source and not with_source and not args.quiet:
            print(
                "note: no source cache was computed (it needs a bundle with the re-edit graphs and --memory "
                f"other than sequential); {args.out.name} is saved without it, and edits of it compute it",
                file=sys.stderr,
            )
        inv.save(args.out, source=with_source)
        clock.lap("save")
        params = {"source": args.source, "seed": args.seed, "rng": args.rng, "fit": args.fit}
        extra = {"source_cache": with_source}
        if with_source:
            extra["source_cache_bytes"] = inv.source.nbytes
        _report(args, "invert", args.out, ed, clock.seconds, params, extra)
    return 0


def cmd_reconstruct(args) -> int:
    from icd_edge.image import check_output_path, load_image, save_image

    _check_input_flags(args)
    _, fmt = check_output_path(args.out, input_path=args.image, force=args.force)
    _check_quality(args.quality, args.out, fmt)
    clock = _Clock()
    photo = load_image(args.image) if args.image is not None else None
    with _open(args, "off") as ed:  # a reconstruction uses no source cache
        inv = _load_inversion(args, ed) if args.inversion is not None else None
        ed.check_reconstruct(guidance=args.guidance, tau=args.tau)  # before the (slow) inversion
        size = None
        if args.keep_size:
            size = photo.size if photo is not None else inv.image_size
        _check_room([args.out], ed, size)
        clock.lap("open")
        if inv is None:
            inv = ed.invert(photo, args.source, seed=args.seed, fit=args.fit, rng=args.rng)
            clock.lap("invert")
        img = ed.reconstruct(inv, guidance=args.guidance, tau=args.tau, keep_size=args.keep_size)
        clock.lap("reconstruct")
        params = {
            **_input_params(args, inv),
            "guidance": args.guidance,
            "tau": args.tau,
            "keep_size": args.keep_size,
            "decoder": args.decoder,
        }
        save_image(img, args.out, metadata=_metadata(ed, "reconstruct", **params), quality=args.quality)
        clock.lap("save")
        _report(args, "reconstruct", args.out, ed, clock.seconds, params)
    return 0


def cmd_generate(args) -> int:
    from icd_edge.image import check_output_path, save_image

    _, fmt = check_output_path(args.out)
    _check_quality(args.quality, args.out, fmt)
    params = {
        "prompt": args.prompt,
        "seed": args.seed,
        "rng": args.rng,
        "guidance": args.guidance,
        "tau": args.tau,
        "decoder": args.decoder,
    }
    clock = _Clock()
    with _open(args) as ed:
        _check_room([args.out], ed)
        clock.lap("open")
        img = ed.generate(args.prompt, seed=args.seed, guidance=args.guidance, tau=args.tau, rng=args.rng)
        clock.lap("generate")
        save_image(img, args.out, metadata=_metadata(ed, "generate", **params), quality=args.quality)
        clock.lap("save")
        _report(args, "generate", args.out, ed, clock.seconds, params)
    return 0


def cmd_inspect(args) -> int:
    from icd_edge.bundle.store import open_bundle

    if args.bundle.is_file():
        return _inspect_image(args)
    b = open_bundle(args.bundle, verify=not args.no_verify)
    m = b.manifest
    if args.json:
        print(json.dumps(m.to_json(), indent=1))
        return 0
    size = sum(f.bytes for f in m.files.values())
    print(
        f"bundle   {b.root}  (schema {m.schema_version}, id {b.bundle_id}, {size / 1e6:.1f} MB, "
        f"files verified: {not args.no_verify})"
    )
    print(f"model    {m.model} ({m.family})  image {m.image_hw} px, latent {m.latent_hw}, steps {m.schedule.config}")
    print(f"forward  {[[st.t, st.s] for st in m.schedule.forward]}")
    print(f"reverse  {[[st.t, st.s] for st in m.schedule.reverse]}")
    if m.int8_scheme is not None:
        s = m.int8_scheme
        print(
            f"int8     weights [-{s.weight_max}, {s.weight_max}] ({s.weight_range}), "
            f"{'exact on every x86 CPU' if s.exact_without_vnni else 'exact only with VNNI/AMX'}"
        )
    print("graphs")
    for name, g in m.graphs.items():
        arts = ", ".join(f"{fmt}:{a.precision}" for fmt, a in g.artifacts.items())
        par = m.parity.get("graph", name)
        ptxt = f"  parity {par.psnr_db} dB vs torch" if par is not None and par.psnr_db is not None else ""
        print(f"  {name:<18} {arts}{ptxt}")
    _print_e2e(m.parity)
    return 0


def _print_e2e(parity) -> None:
    for backend in parity.backends():
        for check in ("edit", "reedit", "generate"):
            e = parity.get(check, "synthetic", backend)
            if e is None:
                continue
            if e.error is not None:
                print(f"end-to-end {check} on {backend}: failed ({e.error})")
                continue
            gate = "" if e.meets_gate in (None, True) else " (below the gate)"
            err = f", max abs err {e.max_abs_err:.2e}" if e.max_abs_err is not None else ""
            print(f"end-to-end {check} on {backend}: {e.psnr_db} dB PSNR{err} ({e.precision} vs torch){gate}")


def _inspect_image(args) -> int:
    from icd_edge.image import read_metadata

    meta = read_metadata(args.bundle)
    if meta is None:
        raise InputError(
            f"{args.bundle} carries no icd-edge parameters (not written by icd-edge, or a format "
            "without metadata such as .bmp); inspect takes a bundle folder or an icd-edge output image"
        )
    if args.json:
        print(json.dumps(meta))
    else:
        for key, value in meta.items():
            print(f"{key:<14} {json.dumps(value) if not isinstance(value, str) else value}")
    return 0


def cmd_prepare(args) -> int:
    import importlib.util

    from icd_edge.bundle.store import open_bundle
    from icd_edge.errors import BackendUnavailable, InputError

    if args.jobs < 1:
        raise InputError(f"--jobs must be at least 1, not {args.jobs}", param="jobs")
    if args.aot and not args.fast:
        raise InputError("--aot applies to --fast (the torch fast path); add --fast", param="aot")
    if args.fast:
        return _prepare_fast(args)
    missing = [m for m in ("onnxruntime", "onnx") if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendUnavailable(
            f"prepare needs {' and '.join(missing)} (pip install 'icd_edge[onnxruntime]' onnxruntime-gpu)"
        )
    from icd_edge.runtimes.ort import cuda

    bundle = open_bundle(args.bundle, verify=not args.no_verify)
    if bundle.manifest.info.get("shared_initializers") is not None:
        raise InputError(
            f"bundle {bundle.root} stores shared-base UNets, which the CUDA provider runs unfused; prepare "
            "applies to bundles exported with --unet-weights fused",
            param="bundle",
        )
    graphs = cuda.graphs_to_prepare(bundle)
    bar = _progress_bar(len(graphs), "fusing graphs", disable=args.quiet or args.json)
    t0 = time.perf_counter()
    try:
        done = cuda.prepare(bundle, args.fusions, args.jobs, progress=lambda g: bar.update(1))
    finally:
        bar.close()
    seconds = round(time.perf_counter() - t0, 1)
    root = str(cuda.FusedGraphCache().root)
    if args.json:
        print(json.dumps({"cache": root, "seconds": seconds, "graphs": done}))
    elif not args.quiet:
        for g, meta in done.items():
            print(f"{g:<22} {meta.get('fused') or 'nothing fused'}")
        print(f"prepared {len(done)} graphs in {seconds} s (cache {root})")
    return 0


def _prepare_fast(args) -> int:
    import importlib.util

    from icd_edge.bundle.store import open_bundle
    from icd_edge.errors import BackendUnavailable

    missing = [m for m in ("torch", "diffusers") if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendUnavailable(f"prepare --fast needs {' and '.join(missing)} (pip install 'icd_edge[export]')")
    bundle = open_bundle(args.bundle, verify=not args.no_verify)  # a bad path fails before torch loads
    if bundle.artifact("unet_reverse", "torch") is None:
        raise BackendUnavailable(f"bundle {bundle.root} has no torch weights; re-export with --targets onnx,torch")
    from icd_edge.fast.editor import FastEditor  # refuses a machine without a CUDA GPU before loading weights

    done = FastEditor.prepare(bundle.root, progress=not (args.quiet or args.json), aot=args.aot)
    if args.json:
        print(json.dumps(done))
    elif not args.quiet:
        print(f"compiled the fast path in {done['seconds']} s (cache {done['entry']})")
    return 0


def _progress_bar(total: int, desc: str, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="graph", disable=disable, file=sys.stderr)


def ort_cuda_doctor() -> dict:
    """onnxruntime's CUDA provider and the GPUs (an empty report where onnxruntime is missing)."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        return {"provider": False, "reason": "onnxruntime is not installed", "gpus": []}
    from icd_edge.runtimes.ort import cuda

    return cuda.doctor()


def cmd_doctor(args) -> int:
    from icd_edge import cpu
    from icd_edge.runtimes import auto_cpu_plan, int8_kernels, probe_all

    bundle = None
    if args.bundle is not None:  # checked before the probes
        from icd_edge.bundle.store import open_bundle

        bundle = open_bundle(args.bundle, verify=False)
    backends = {name: {"available": a.ok, "reason": a.reason} for name, a in probe_all().items()}
    info = cpu.info()
    # measured, not inferred from flags: which int8 weight ranges each CPU backend sums exactly here
    int8 = {
        b: {str(w): not int8_kernels.saturates(b, w) for w in int8_kernels.WEIGHT_MAXES}
        for b in int8_kernels.installed_backends()
        if backends.get(b, {}).get("available")
    }
    gpu = ort_cuda_doctor()
    avail = {n: backends.get(n, {}).get("available", False) for n in ("onnxruntime", "openvino")}
    plan = auto_cpu_plan(info["isa"], avail)
    if bundle is not None:
        plan["bundle"] = {m: _auto_choice(bundle, m) for m in ("resident", "sequential")}
    if args.json:
        report = {"icd_edge": __version__, "backends": backends, "cpu": info, "int8_exact": int8, "gpu": gpu}
        print(json.dumps({**report, "auto": plan}))
        return 0
    for name, b in backends.items():
        print(f"{name}: {'available' if b['available'] else 'not available'} ({b['reason']})")
    if "onnxruntime" in gpu:
        state = "runs" if gpu["provider"] else "not usable"
        print(f"onnxruntime CUDA provider: {state} ({gpu['reason']})")
    for g in gpu["gpus"]:
        extra = f", compute capability {g['compute_capability']}" if g.get("compute_capability") else ""
        print(f"gpu: {g['name']}, {g.get('memory_gib', '?')} GiB, driver {g['driver']}{extra}")
    print(
        f"cpu: {info['model']}, {info['cores']} cores, {info['machine']}, class {info['isa']} "
        f"({' '.join(info['features']) or 'none of the listed features'})"
    )
    for b, by_w in int8.items():
        exact = [f"[-{w}, {w}] {'exact' if ok else 'SATURATES'}" for w, ok in by_w.items()]
        print(f"int8 on {b}: weights " + ", ".join(exact))
    print(_auto_line(plan, gpu=bool(gpu.get("provider"))))
    for memory, chosen in plan.get("bundle", {}).items():
        print(f"auto for {args.bundle} ({memory}): {chosen}")
    return 0


def _auto_choice(bundle, memory: str) -> str:
    """What ``--backend auto`` opens ``bundle`` with here, or why nothing can."""
    from icd_edge.errors import BackendUnavailable
    from icd_edge.runtimes import describe_backend, select_backend

    try:
        b = select_backend("auto", bundle, memory=memory)
    except BackendUnavailable as exc:
        return f"none ({exc})"
    return describe_backend(b)


def _auto_line(plan: dict, gpu: bool = False) -> str:
    """One line on what ``auto`` runs int8 bundles with on this CPU class."""
    line = "auto: onnxruntime's CUDA provider first (found here); without it, " if gpu else "auto on this CPU "
    line += f"(class {plan['isa']}): int8 bundles on {plan['int8_backend']}"
    if plan["int8_backend"] != plan["int8_fastest"]:
        line += f" ({plan['int8_fastest']}, faster on this class, is not available)"
    if plan["int8_graph_routes"]:
        moved = ", ".join(sorted(plan["int8_graph_routes"]))
        others = "/".join(sorted(set(plan["int8_graph_routes"].values())))
        line += f", their {moved} on {others} (resident policy)"
    return line + "; fp32/fp16 bundles and --memory sequential on onnxruntime"


def cmd_batch(args) -> int:
    from tqdm import tqdm

    from icd_edge import batch
    from icd_edge.atomic import check_output_file

    if args.workers < 1:
        raise InputError(f"--workers must be 1 or more, got {args.workers}")
    if args.gpus_per_worker is not None and (args.executor != "ray" or args.gpus_per_worker < 0):
        raise InputError("--gpus-per-worker takes a number >= 0 and applies to --executor ray")
    if args.executor == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            from icd_edge.errors import BackendUnavailable

            raise BackendUnavailable("--executor ray needs Ray Data: pip install 'icd_edge[ray]'")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise InputError(f"--out-dir {args.out_dir} is a file; give a folder")
    rows = batch.read_jobs(args.jobs)  # the whole file, before the bundle opens
    defaults = {
        "cross_replace": _or(args.cross_replace, EDIT_P2P_DEFAULTS["cross_replace"]),
        "self_replace": _or(args.self_replace, EDIT_P2P_DEFAULTS["self_replace"]),
        "amplify": _amplify(args.amplify),
        "blend": tuple(args.blend) if args.blend else None,
        "guidance": args.guidance,
        "tau": args.tau,  # None: the family's default (plan)
        "mode": _or(args.mode, "auto"),
        "seed": args.seed,
        "fit": args.fit,
        "rng": args.rng,
        "decoder": args.decoder,
    }
    with _open(args, progress=False) as ed:  # one bar for the batch, none per edit
        given = _p2p_given(args)
        if ed.bundle.manifest.family == "sdxl" and given:
            raise InputError(
                f"{', '.join(given)}: this SDXL bundle edits by switching prompts, without Prompt-to-Prompt "
                "controls; leave these flags out (--guidance and --tau apply)"
            )
        tasks, problems = batch.plan(rows, ed, defaults, args.out_dir, args.force)
        if problems:
            raise InputError(
                f"JOBS file {args.jobs} has {len(problems)} problem{'s' * (len(problems) > 1)}; nothing was "
                "run:\n  " + "\n  ".join(problems[: batch.MAX_PROBLEMS])
            )
        args.out_dir.mkdir(parents=True, exist_ok=True)  # every row checked: now the folder may appear
        check_output_file(args.out_dir / "probe.png", "--out-dir")
        _check_room([p for t in tasks for i, (_, p) in enumerate(t.outputs) if i in t.todo], ed)
        ray = args.executor == "ray"
        # this machine's cores are split between the workers, unless Ray places them on a cluster
        split = not (ray and os.environ.get("RAY_ADDRESS"))
        open_kwargs = _worker_open_kwargs(args, split) if args.workers > 1 or ray else {}
        gpus = args.gpus_per_worker
        if ray and gpus is None:
            gpus = 1.0 if batch.on_gpu(ed) else 0.0
        quiet = args.no_progress or args.quiet or args.json
        with tqdm(total=len(tasks), desc="batch", unit="row", disable=quiet, file=sys.stderr) as bar:
            summary, errors = batch.run(
                tasks, ed, args.out_dir, args.workers, open_kwargs, bar, args.executor, gpus or 0
            )
    result = summary.as_dict(args.out_dir, errors)
    if args.json:
        print(json.dumps(result))
    elif not args.quiet:
        print(
            f"{summary.done} rows edited ({summary.written} images), {summary.skipped} already done, "
            f"{summary.failed} failed{f' (see {errors.path})' if errors.count else ''}, in {summary.seconds} s"
        )
    if summary.interrupted:
        print(
            "interrupted; every image written so far is complete: run the same command again to continue",
            file=sys.stderr,
        )
        return 130 if summary.interrupted == "SIGINT" else 143
    return batch.EXIT_SOME_FAILED if summary.failed else 0


def _worker_open_kwargs(args, split_cores: bool = True) -> dict:
    """Editor.open arguments of a batch worker: the main process's flags, and (``split_cores``)
    each worker's share of this machine's cores for the CPU backends (0: the backend's default)."""
    from icd_edge import batch

    threads = batch.threads_per_worker(args.workers) if split_cores else 0
    options = []
    if args.backend in ("auto", "onnxruntime"):
        from icd_edge.runtimes.ort import OrtOptions

        options.append(OrtOptions(intra_op_threads=threads))
    if args.backend in ("auto", "openvino"):
        from icd_edge.runtimes.openvino import OvOptions

        fields = {"threads": threads}
        if args.ov_precision is not None:
            fields["precision"] = args.ov_precision
        if args.ov_cache is not None:
            fields["cache_dir"] = "" if args.ov_cache == "none" else args.ov_cache
        options.append(OvOptions(**fields))
    return {
        "bundle": str(args.bundle),
        "backend": args.backend,
        "verify": False,  # the main process verified the bundle
        "progress": False,
        "memory": args.memory,
        "decoder": args.decoder,
        "options": tuple(options),
    }


COMMANDS = {
    "batch": cmd_batch,
    "edit": cmd_edit,
    "invert": cmd_invert,
    "reconstruct": cmd_reconstruct,
    "generate": cmd_generate,
    "inspect": cmd_inspect,
    "doctor": cmd_doctor,
    "prepare": cmd_prepare,
}


def _on_sigterm(signum, frame):
    raise Terminated()


def _install_signal_handlers() -> None:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` and temporary-file cleanup runs."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def _flag_message(exc: IcdEdgeError) -> str:
    msg = str(exc)
    param = getattr(exc, "param", None)
    if param in FLAGS and msg.startswith(param):
        msg = FLAGS[param] + msg[len(param) :]
    return msg


def _quiet_libraries(verbose: bool) -> None:
    if verbose:
        return
    import warnings

    warnings.filterwarnings("ignore")  # library warnings are for -v; our own messages use logging
    for name in ("onnxruntime", "openvino", "torch", "PIL"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.ERROR if args.quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s")
    _quiet_libraries(args.verbose)
    _install_signal_handlers()
    try:
        return COMMANDS[args.command](args)
    except IcdEdgeError as exc:
        print(f"error: {_flag_message(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MemoryError:
        print(
            "error: out of memory; close other programs, or use --memory sequential / a smaller bundle", file=sys.stderr
        )
        return EXIT_BAD_INPUT
    except OSError as exc:  # an OS fault no check above anticipated: still one line, never a traceback
        from icd_edge.atomic import describe_os_error

        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted; no output was written", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated; no output was written", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
