"""int8 quality per CPU class: the same int8 bundles run natively and on an emulated AVX2-only CPU.

The export gates an int8 bundle on the CPU it runs on; a bundle gated on a VNNI/AMX machine used to
lose quality on AVX2-only ones (their int8 kernels saturate with 8-bit weights). This script runs
the export's end-to-end cases (synthetic photo, cat → dog edit with P2P and blend, and a generate)
on the torch reference, then on each int8 bundle with onnxruntime and openvino, natively and under
``qemu-x86_64 -cpu Haswell-v4`` (user-mode emulation of an AVX2 + FMA CPU without AVX-512 or
VNNI: the int8 kernels the runtimes pick there are the AVX2 ones), and records PSNR against torch.

    python benchmarks/int8_isa_parity.py --reference tiny.bundle --int8 7bit=a.bundle 8bit=b.bundle \
        --out benchmarks/results/int8_isa_tiny.json

``--reference`` is an fp32 bundle of the same model exported with ``--targets onnx,torch``.
Emulation is slow (the tiny model's cases take about a minute per backend); meant for tiny bundles.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EMULATOR = ["qemu-x86_64", "-cpu", "Haswell-v4"]


def _scheme(bundle) -> dict:
    """The bundle's int8 scheme as JSON ({} for bundles that predate it)."""
    scheme = bundle.manifest.int8_scheme
    return scheme.to_json() if scheme is not None else {}


def cases(bundle: str, backend: str, photo: str) -> dict[str, np.ndarray]:
    """The export's end-to-end cases on one bundle and backend (decoded images, float32 0..1)."""
    from icd_edge.edit.editor import Editor

    options = {"precision": "fp32"} if backend == "openvino" else {}
    with Editor.open(bundle, backend=backend, **options) as ed:
        inv = ed.invert(photo, "a photo of a cat", seed=0)
        edit = ed.edit(
            inv,
            "a photo of a dog",
            cross_replace=0.4,
            self_replace=0.6,
            amplify={"dog": 2.0},
            blend=("cat", "dog"),
            output_type="np",
        )
        gen = ed.generate("a photo of a dog", seed=1, output_type="np")
    return {"edit": edit, "generate": gen}


def _child(argv: list[str]) -> int:
    bundle, backend, photo, out = argv
    np.savez(out, **cases(bundle, backend, photo))
    return 0


def run_cases(bundle: Path, backend: str, photo: Path, emulate: bool, work: Path) -> tuple[dict, float]:
    out = work / f"{bundle.name}_{backend}_{int(emulate)}.npz"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [
        *(EMULATOR if emulate else []),
        os.path.realpath(sys.executable),
        str(Path(__file__).resolve()),
        "--child",
        str(bundle),
        backend,
        str(photo),
        str(out),
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    with np.load(out) as z:
        return {k: z[k] for k in z.files}, time.perf_counter() - t0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return _child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--reference", type=Path, required=True, help="fp32 bundle with torch weights (--targets onnx,torch)"
    )
    ap.add_argument("--int8", nargs="+", required=True, metavar="LABEL=BUNDLE", help="int8 bundles to compare")
    ap.add_argument("--backends", nargs="+", default=["onnxruntime", "openvino"])
    ap.add_argument("--no-emulation", action="store_true", help="native runs only")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from icd_edge.bundle.store import open_bundle
    from icd_edge.cpu import info
    from icd_edge.export.parity import psnr_db
    from icd_edge.export.samples import sample_photo

    emulate = [False] + ([] if args.no_emulation else [True])
    if True in emulate and shutil.which(EMULATOR[0]) is None:
        print(
            f"error: {EMULATOR[0]} not found (Debian: apt-get install qemu-user); or pass --no-emulation",
            file=sys.stderr,
        )
        return 2
    bundles = dict(item.split("=", 1) for item in args.int8)
    rows = []
    with tempfile.TemporaryDirectory(prefix="icd_isa_") as d:
        work = Path(d)
        side = open_bundle(args.reference, verify=False).manifest.image_hw
        photo = work / "photo.png"
        Image.fromarray(sample_photo(side)).save(photo)
        ref, ref_s = run_cases(args.reference, "torch", photo, False, work)
        for label, path in bundles.items():
            scheme = _scheme(open_bundle(path, verify=False))
            for backend in args.backends:
                for emu in emulate:
                    got, secs = run_cases(Path(path), backend, photo, emu, work)
                    rows.append(
                        {
                            "bundle": label,
                            "weight_max": scheme.get("weight_max"),
                            "backend": backend,
                            "cpu": "emulated AVX2 (qemu-x86_64 -cpu Haswell-v4)" if emu else "native",
                            **{f"{k}_psnr_db_vs_torch_fp32": round(psnr_db(ref[k], got[k], peak=1.0), 2) for k in ref},
                            "seconds": round(secs, 1),
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
    host = info()
    summary = {
        f"{r['bundle']}_{r['backend']}_{'avx2' if 'emulated' in r['cpu'] else host['isa']}_edit_psnr_db": r[
            "edit_psnr_db_vs_torch_fp32"
        ]
        for r in rows
    }
    result = {
        "machine": host,
        "reference": {"bundle": str(args.reference), "backend": "torch", "seconds": round(ref_s, 1)},
        "summary": summary,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
