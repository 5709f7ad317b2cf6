"""What the CPU can do, for ``icd-edge doctor`` and the benchmarks' records.

int8 speed and even int8 results depend on it: x86 CPUs with VNNI (AVX-512 VNNI, AVX-VNNI) or
AMX multiply u8 by s8 and accumulate in 32 bits, while AVX2-only CPUs add pairs of products in
16 bits, which saturates with full-range 8-bit weights (see :mod:`icd_edge.runtimes.int8_kernels`).
"""

from __future__ import annotations

import os
import platform
import subprocess

# the flags that decide which int8/bf16/fp16 kernels the runtimes pick (Linux /proc/cpuinfo names)
X86_FEATURES = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
ARM_FEATURES = ("asimd", "asimddp", "i8mm", "bf16", "sve", "sve2")  # asimddp: the dot-product extension


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model") and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def info() -> dict:
    """``{"model", "machine", "cores", "features", "isa"}`` of this CPU (features: the ones in
    :data:`X86_FEATURES` / :data:`ARM_FEATURES` it has)."""
    machine = platform.machine().lower()
    model, flags = _cpuinfo()
    if platform.system() == "Darwin":
        model = model or _sysctl("machdep.cpu.brand_string")
        if machine in ("arm64", "aarch64"):
            # every Apple-silicon core has NEON and the dot-product instructions
            flags = {"asimd", "asimddp"} | ({"i8mm", "bf16"} if _sysctl("hw.optional.arm.FEAT_I8MM") == "1" else set())
    known = ARM_FEATURES if machine in ("arm64", "aarch64") else X86_FEATURES
    features = [f for f in known if f in flags]
    return {
        "model": model or platform.processor() or "unknown",
        "machine": machine,
        "cores": os.cpu_count() or 1,
        "features": features,
        "isa": isa_class(features, machine),
    }


def isa_class(features, machine: str = "x86_64") -> str:
    """The class that decides int8 behaviour: ``amx``, ``avx512-vnni``, ``avx-vnni``, ``avx512``
    (no VNNI), ``avx2``, ``x86`` (older), ``arm-dotprod``, ``arm``."""
    f = set(features)
    if machine in ("arm64", "aarch64"):
        return "arm-dotprod" if "asimddp" in f else "arm"
    for cls, needs in (
        ("amx", "amx_int8"),
        ("avx512-vnni", "avx512_vnni"),
        ("avx-vnni", "avx_vnni"),
        ("avx512", "avx512f"),
        ("avx2", "avx2"),
    ):
        if needs in f:
            return cls
    return "x86"


def int8_pairs_saturate(features, machine: str = "x86_64") -> bool:
    """True where the x86 int8 kernels sum u8·s8 products in 16 bits (no VNNI, no AMX)."""
    return machine in ("x86_64", "amd64", "i686", "x86") and isa_class(features, machine) in ("avx512", "avx2", "x86")
