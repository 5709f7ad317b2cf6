"""``icd-edge`` / ``python -m icd_edge``: edit, invert, reconstruct, generate, inspect, doctor.

Every bad input ends in one line ``error: ...`` on stderr and exit code 2, with no partial
output file (outputs are written to a temporary file and renamed).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from icd_edge.errors import IcdEdgeError, InputError

EXIT_BAD_INPUT = 2


def _amplify(values: list[str] | None) -> dict[str, float]:
    out = {}
    for item in values or []:
        word, sep, factor = item.rpartition("=")
        if not sep or not word:
            raise InputError(f"--amplify takes WORD=FACTOR (e.g. dog=3), got {item!r}")
        try:
            out[word] = float(factor)
        except ValueError:
            raise InputError(f"--amplify {item!r}: {factor!r} is not a number") from None
    return out


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, type=Path, help="bundle folder written by python -m icd_edge.export")
    p.add_argument("--backend", default="auto", help="auto, openvino, onnxruntime, torch, tensorrt or coreml")
    p.add_argument("--no-verify", action="store_true", help="check file sizes only, not sha256 (faster open)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--decoder", default="full", choices=("full", "taesd"),
                   help="final decoder: the full SD VAE, or TAESD (bundles exported with --taesd)")
    p.add_argument("--memory", default="resident", choices=("resident", "sequential", "shared-base"),
                   help="resident: keep graphs loaded; sequential: one graph at a time; shared-base: teacher weights "
                        "mapped once for all UNets (bundles exported with --unet-weights shared-base)")
    p.add_argument("--ov-precision", choices=("auto", "f32", "bf16", "f16"),
                   help="openvino: precision of the graphs' float parts (auto: float32, bfloat16 in int8 graphs where native)")
    p.add_argument("--ov-cache", metavar="DIR",
                   help="openvino: compiled-graph cache folder, or 'none' (default: ~/.cache/icd_edge/openvino)")


def _fit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fit", default="stretch", choices=("stretch", "crop", "pad"),
                   help="how a non-square photo becomes square: stretch (official), centre crop, or pad")
    p.add_argument("--keep-size", action="store_true", help="write the result at the input photo's size/aspect")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icd-edge", description="iCD text-guided image editing from an exported bundle.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("edit", help="invert a photo and decode it under a target prompt")
    _common(p)
    p.add_argument("--image", required=True, type=Path, help="input photo")
    p.add_argument("--source", required=True, help="prompt describing the photo")
    p.add_argument("--target", required=True, help="prompt describing the edited photo")
    p.add_argument("--out", required=True, type=Path, help="output image (.png, .jpg, .webp)")
    p.add_argument("--cross-replace", type=float, default=0.2, help="fraction of steps with cross-attention replacement")
    p.add_argument("--self-replace", type=float, default=0.2, help="fraction of steps with self-attention injection")
    p.add_argument("--amplify", action="append", metavar="WORD=F", help="re-weight a target word's attention (repeatable)")
    p.add_argument("--blend", nargs=2, metavar=("SRC_WORD", "TGT_WORD"), help="local blend: change only these words' region")
    p.add_argument("--guidance", type=float, default=19.0, help="guidance w of the target row (0..19, code units)")
    p.add_argument("--tau", type=float, default=0.8, help="dynamic guidance: guided iff t <= 1000*tau")
    p.add_argument("--mode", default="auto", choices=("auto", "refine", "replace"), help="token mapping")
    p.add_argument("--seed", type=int, default=0, help="seed of the inversion noise")
    p.add_argument("--preview", type=Path, metavar="DIR", help="write a preview PNG after every reverse step into DIR")
    _fit(p)

    p = sub.add_parser("invert", help="invert a photo to noise and save it (.npz) for later edits")
    _common(p)
    p.add_argument("--image", required=True, type=Path)
    p.add_argument("--source", required=True)
    p.add_argument("--out", required=True, type=Path, help="output .npz")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("reconstruct", help="invert and decode under the source prompt (round trip)")
    _common(p)
    p.add_argument("--image", required=True, type=Path)
    p.add_argument("--source", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--guidance", type=float, default=0.0)
    p.add_argument("--tau", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    _fit(p)

    p = sub.add_parser("generate", help="text to image with the reverse model")
    _common(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("inspect", help="print a bundle's manifest and parity figures")
    p.add_argument("bundle", type=Path)
    p.add_argument("--json", action="store_true", help="the whole manifest as JSON")
    p.add_argument("--no-verify", action="store_true", help="skip sha256 checks")

    p = sub.add_parser("doctor", help="list every backend as available or why not, and the CPU's int8 behaviour")
    p.add_argument("--json", action="store_true", help="the same as one JSON object")
    return parser


def _open(args):
    from icd_edge.editor import Editor

    options = {}
    if args.ov_precision is not None:
        options["precision"] = args.ov_precision
    if args.ov_cache is not None:
        options["cache_dir"] = "" if args.ov_cache == "none" else args.ov_cache
    if options and args.backend not in ("auto", "openvino"):
        raise InputError(f"--ov-precision and --ov-cache apply to the openvino backend, not {args.backend!r}")
    return Editor.open(args.bundle, backend=args.backend, verify=not args.no_verify, progress=not args.no_progress,
                       memory=args.memory, decoder=args.decoder, **options)


def _inversion_to_npz(inv, path: Path) -> None:
    import numpy as np

    from icd_edge.atomic import atomic_file

    if path.suffix != ".npz":
        raise InputError(f"--out {path} must end in .npz")
    if not path.parent.is_dir():
        raise InputError(f"output folder {path.parent} does not exist")
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, latent=inv.latent, source_prompt=np.array(inv.source_prompt), seed=np.array(inv.seed),
                     image_size=np.array(inv.image_size), bundle_id=np.array(inv.bundle_id))


def cmd_edit(args) -> int:
    from icd_edge.image import check_output_path, save_image

    check_output_path(args.out)
    amplify = _amplify(args.amplify)
    preview = None
    if args.preview is not None:
        if not args.preview.is_dir():
            raise InputError(f"--preview {args.preview} is not a folder; create it first")

        def preview(step, total, image):
            save_image(image, args.preview / f"step_{step}_of_{total}.png")
    with _open(args) as ed:
        # every edit parameter is checked before the (slow) inversion
        ed.check_edit(args.source, args.target, cross_replace=args.cross_replace, self_replace=args.self_replace,
                      amplify=amplify, blend=tuple(args.blend) if args.blend else None, guidance=args.guidance,
                      tau=args.tau, mode=args.mode)
        inv = ed.invert(args.image, args.source, seed=args.seed, fit=args.fit)
        img = ed.edit(inv, args.target, cross_replace=args.cross_replace, self_replace=args.self_replace, amplify=amplify,
                      blend=tuple(args.blend) if args.blend else None, guidance=args.guidance, tau=args.tau, mode=args.mode,
                      keep_size=args.keep_size, preview=preview)
    save_image(img, args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_invert(args) -> int:
    with _open(args) as ed:
        inv = ed.invert(args.image, args.source, seed=args.seed)
    _inversion_to_npz(inv, args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_reconstruct(args) -> int:
    from icd_edge.image import check_output_path, save_image

    check_output_path(args.out)
    with _open(args) as ed:
        ed.check_reconstruct(guidance=args.guidance, tau=args.tau)  # before the (slow) inversion
        inv = ed.invert(args.image, args.source, seed=args.seed, fit=args.fit)
        img = ed.reconstruct(inv, guidance=args.guidance, tau=args.tau, keep_size=args.keep_size)
    save_image(img, args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_generate(args) -> int:
    from icd_edge.image import check_output_path, save_image

    check_output_path(args.out)
    with _open(args) as ed:
        img = ed.generate(args.prompt, seed=args.seed, guidance=args.guidance, tau=args.tau)
    save_image(img, args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_inspect(args) -> int:
    from icd_edge.manifest import open_bundle

    b = open_bundle(args.bundle, verify=not args.no_verify)
    m = b.manifest
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    size = sum(f["bytes"] for f in m["files"].values())
    print(f"bundle   {b.root}  (schema {m['schema_version']}, id {b.bundle_id}, {size / 1e6:.1f} MB, files verified: {not args.no_verify})")
    print(f"model    {m['model']['name']}  image {m['dims']['H']} px, latent {m['dims']['h']}, steps {m['schedule']['config']}")
    print(f"forward  {m['schedule']['forward']}")
    print(f"reverse  {m['schedule']['reverse']}")
    print("graphs")
    for name, g in m["graphs"].items():
        arts = ", ".join(f"{fmt}:{a.get('precision', '')}" for fmt, a in g["artifacts"].items())
        par = m.get("parity", {}).get("graphs", {}).get(name)
        ptxt = f"  parity {par['psnr_db']} dB vs torch" if par else ""
        print(f"  {name:<18} {arts}{ptxt}")
    e2e = m.get("parity", {}).get("end_to_end")
    if e2e:
        for case in ("edit", "generate"):
            print(f"end-to-end {case}: {e2e[case]['psnr_db']} dB PSNR, max abs err {e2e[case]['max_abs_err']:.2e} "
                  f"({e2e[case]['backend']} {e2e[case]['precision']} vs torch)")
        ov = e2e.get("openvino")
        if ov:
            hints = "+".join(sorted(set(ov["inference_precision"].values())))
            print(f"end-to-end on openvino {ov['version']} ({hints}): edit {ov['edit']['psnr_db']} dB, generate "
                  f"{ov['generate']['psnr_db']} dB vs torch{'' if ov['meets_gate'] else ' (below the gate: use --ov-precision f32)'}")
    return 0


def cmd_doctor(args) -> int:
    from icd_edge import cpu
    from icd_edge.runtimes import int8_kernels, probe_all

    backends = {name: {"available": a.ok, "reason": a.reason} for name, a in probe_all().items()}
    info = cpu.info()
    # measured, not inferred from flags: which int8 weight ranges each CPU backend sums exactly here
    int8 = {b: {str(w): not int8_kernels.saturates(b, w) for w in int8_kernels.WEIGHT_MAXES}
            for b in int8_kernels.installed_backends() if backends.get(b, {}).get("available")}
    if args.json:
        print(json.dumps({"backends": backends, "cpu": info, "int8_exact": int8}))
        return 0
    for name, b in backends.items():
        print(f"{name}: {'available' if b['available'] else 'not available'} ({b['reason']})")
    print(f"cpu: {info['model']}, {info['cores']} cores, {info['machine']}, class {info['isa']} "
          f"({' '.join(info['features']) or 'none of the listed features'})")
    for b, by_w in int8.items():
        exact = [f"[-{w}, {w}] {'exact' if ok else 'SATURATES'}" for w, ok in by_w.items()]
        print(f"int8 on {b}: weights " + ", ".join(exact))
    return 0


COMMANDS = {"edit": cmd_edit, "invert": cmd_invert, "reconstruct": cmd_reconstruct, "generate": cmd_generate,
            "inspect": cmd_inspect, "doctor": cmd_doctor}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except IcdEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
