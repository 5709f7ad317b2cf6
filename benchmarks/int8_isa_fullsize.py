"""Full-size int8 quality on an emulated AVX2-only CPU, against the same bundle run natively.

After ``bench_cpu.py`` has run a configuration (its worker left the edited image beside the
bundle and the torch fp32 reference image in the work folder), this runs the same worker under
``qemu-x86_64 -cpu Haswell-v4`` (AVX2 + FMA, no AVX-512, no VNNI: the int8 kernels the runtimes
pick there are the AVX2 ones) and compares: emulated vs native, and each vs torch fp32.

    python benchmarks/int8_isa_fullsize.py --work benchmarks/work --config int8-resident \
        --out benchmarks/results/cpu_int8_emulated_avx2.json

Slow: user-mode emulation runs the full-size edit about ten times slower than the host.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EMULATOR = ["qemu-x86_64", "-cpu", "Haswell-v4"]


def _scheme(bundle) -> dict:
    """The bundle's int8 scheme as JSON ({} for bundles that predate it)."""
    scheme = bundle.manifest.int8_scheme
    return scheme.to_json() if scheme is not None else {}


def main() -> int:
    from benchmarks.bench_cpu import CONFIGS, image_file
    from benchmarks.bench_cpu_edit import machine
    from icd_edge.bundle.store import open_bundle
    from icd_edge.export.parity import psnr_db

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work")
    ap.add_argument("--config", default="int8-resident", help="a bench_cpu.py configuration label")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    config = next(c for c in CONFIGS if c[0] == args.config)
    bundle = args.work / f"sd15-{config[1]}.bundle"
    native_img = image_file(bundle, config)
    ref_img = args.work / "edit_torch.npy"
    for p in (native_img, ref_img):
        if not p.is_file():
            print(f"error: {p} is missing; run benchmarks/bench_cpu.py --only {args.config} first", file=sys.stderr)
            return 2
    if shutil.which(EMULATOR[0]) is None:
        print(f"error: {EMULATOR[0]} not found (Debian: apt-get install qemu-user)", file=sys.stderr)
        return 2
    native = np.load(native_img)
    keep = native_img.with_suffix(".native.npy")
    shutil.copyfile(native_img, keep)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            *EMULATOR,
            os.path.realpath(sys.executable),
            str(ROOT / "benchmarks" / "bench_cpu.py"),
            "--runs",
            "1",
            "--ov-cache",
            str(args.work / "openvino-cache-emulated"),
            "--worker",
            args.config,
            str(bundle),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    seconds = time.perf_counter() - t0
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    emulated = np.load(native_img)
    shutil.move(keep, native_img)  # the native image stays where bench_cpu.py left it
    ref = np.load(ref_img)
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    scheme = _scheme(open_bundle(bundle, verify=False))
    result = {
        "machine": machine(),
        "config": args.config,
        "bundle": bundle.name,
        "int8_scheme": scheme,
        "emulated_cpu": " ".join(EMULATOR) + " (user-mode TCG: AVX2 + FMA, no AVX-512, no VNNI)",
        "summary": {
            "int8_psnr_db_vs_torch_fp32_native": round(psnr_db(ref, native, peak=1.0), 2),
            "int8_psnr_db_vs_torch_fp32_emulated_avx2": round(psnr_db(ref, emulated, peak=1.0), 2),
            "emulated_vs_native_psnr_db": round(psnr_db(native, emulated, peak=1.0), 2),
        },
        "emulated_run": run,
        "emulated_wall_s": round(seconds, 1),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
