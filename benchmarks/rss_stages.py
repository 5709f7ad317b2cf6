"""Resident memory per stage of one edit: where the peak of a memory policy comes from.

    python benchmarks/rss_stages.py BUNDLE [--memory sequential] [--decoder taesd] [--out FILE.json]

Runs the CPU benchmark's edit (benchmarks/bench_cpu_edit.py) on onnxruntime and samples this
process's RSS every 20 ms from /proc (Linux), attributing each sample to the stage in progress
(``load:<graph>`` or a step); prints the highest RSS seen in each stage, in GB.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_gb() -> tuple[float, float]:
    """(total, anonymous) resident GB of this process. The rest is file-backed: mapped weight
    files, which the kernel can drop and read back."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssAnon:")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0]) * 1024 / 1e9
    return fields["VmRSS"], fields["RssAnon"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--memory", default="sequential")
    ap.add_argument("--decoder", default="taesd")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    import skimage.data

    from benchmarks.bench_cpu_edit import timed_edit
    from icd_edge.edit.editor import Editor

    ed = Editor.open(a.bundle, backend="onnxruntime", verify=False, memory=a.memory, decoder=a.decoder)
    samples: list[tuple[int, float]] = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            samples.append((len(ed.profile or []), rss_gb()))  # stages finished so far, RSS now
            time.sleep(0.02)

    ed.profile = []
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, rec = timed_edit(ed, skimage.data.chelsea())
    done.set()
    thread.join()
    stages = [s for s, _ in ed.profile]
    peaks: dict[str, float] = {}
    anon: dict[str, float] = {}
    for finished, (gb, anon_gb) in samples:  # a sample belongs to the stage that finishes next
        name = stages[finished] if finished < len(stages) else "after"
        peaks[name] = round(max(peaks.get(name, 0.0), gb), 2)
        anon[name] = round(max(anon.get(name, 0.0), anon_gb), 2)
    res = {
        "bundle": a.bundle,
        "memory": a.memory,
        "decoder": a.decoder,
        "edit_s": rec["edit_s"],
        "peak_rss_gb_by_stage": peaks,
        "peak_anon_rss_gb_by_stage": anon,
    }
    print(json.dumps(res, indent=1))
    if a.out:
        a.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
