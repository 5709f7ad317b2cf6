"""Resident memory per stage of one edit: where the peak of a memory policy comes from.

    python benchmarks/rss_stages.py BUNDLE [--memory sequential] [--decoder taesd] [--out FILE.json]

Runs the CPU benchmark's edit (benchmarks/bench_cpu_edit.py) on onnxruntime and samples this
process's RSS every 20 ms from /proc (Linux), attributing each sample to the stage in progress
(``load:<graph>`` or a step); prints the highest RSS seen in each stage, in GB.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--memory", default="sequential")
    ap.add_argument("--decoder", default="taesd")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    import skimage.data

    from benchmarks.bench_cpu_edit import timed_edit
    from icd_edge.editor import Editor

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
    for finished, gb in samples:  # a sample belongs to the stage that finishes next
        name = stages[finished] if finished < len(stages) else "after"
        peaks[name] = round(max(peaks.get(name, 0.0), gb), 2)
    res = {"bundle": a.bundle, "memory": a.memory, "decoder": a.decoder, "edit_s": rec["edit_s"], "peak_rss_gb_by_stage": peaks}
    print(json.dumps(res, indent=1))
    if a.out:
        a.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
