"""Host time of one onnxruntime edit: everything the runtime does around the graph runs.

Every session is replaced by a stub that checks its feeds like the real one and returns fresh
arrays of the graph's output shapes at once (what the CUDA path hands back after its device →
host copy), so the wall time of an invert + edit is the Python/numpy work alone: prompt
encoding bookkeeping, P2P controls, step math, local blend, image conversion. Only the bundle's
manifest is read (no graph is loaded), so a full-size bundle's shapes can be timed on any CPU.

    python benchmarks/host_overhead.py BUNDLE [--iters 30] [--profile 25] [--out FILE.json]

``summary``: ``ort_host_ms`` (median wall of invert + edit with stubs), ``ort_host_invert_ms``,
``ort_host_edit_ms``; ``--profile N`` adds the N largest cumulative entries of cProfile.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_ort import EDIT, EDIT_XL, SRC, TGT  # noqa: E402  (the edit bench_gpu --phase ort times)


class StubSession:
    """A session that costs nothing on the device: feeds are checked, outputs are new arrays."""

    def __init__(self, graph: str, inputs, outputs):
        from icd_edge.bundle.spec import check_feeds

        self.graph, self._inputs, self._check = graph, inputs, check_feeds
        rng = np.random.default_rng(0)
        # uniform in [0.1, 1): finite and positive (attention maps are normalised by their max)
        self._outs = {o.name: (0.1 + 0.9 * rng.random(o.shape)).astype(o.dtype) for o in outputs}
        self.providers = ["stub"]
        self.cuda_graph = False

    def run(self, feeds):
        self._check(self.graph, dict(feeds), self._inputs)
        return {k: v.copy() for k, v in self._outs.items()}

    def close(self):
        pass


def machine() -> str:
    from icd_edge.cpu import info

    cpu = info()
    return f"{cpu['model']} ({cpu['isa']}, {cpu['cores']} cores)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--profile", type=int, default=0, metavar="N")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from icd_edge import Editor
    from icd_edge.export.samples import sample_photo
    from icd_edge.runtimes.ort import OrtBackend

    OrtBackend.open_session = lambda self, bundle, graph: StubSession(  # type: ignore[method-assign]
        graph, bundle.graphs[graph].inputs, bundle.graphs[graph].outputs
    )
    ed = Editor.open(args.bundle, backend="onnxruntime", source_cache="off", verify=False)
    img = sample_photo(ed.constants.image_hw)
    edit_kw = EDIT_XL if ed.bundle.manifest.family == "sdxl" else EDIT
    inv_ms, edit_ms, walls = [], [], []

    def once():
        t0 = time.perf_counter()
        inv = ed.invert(img, SRC)
        t1 = time.perf_counter()
        ed.edit(inv, TGT, output_type="np", **edit_kw)
        t2 = time.perf_counter()
        return (t1 - t0) * 1000, (t2 - t1) * 1000

    for _ in range(3):
        once()
    for _ in range(args.iters):
        a, b = once()
        inv_ms.append(a)
        edit_ms.append(b)
        walls.append(a + b)
    res = {
        "machine": machine(),
        "bundle": str(args.bundle),
        "iters": args.iters,
        "summary": {
            "ort_host_ms": round(statistics.median(walls), 3),
            "ort_host_invert_ms": round(statistics.median(inv_ms), 3),
            "ort_host_edit_ms": round(statistics.median(edit_ms), 3),
        },
    }
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5):
            once()
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(args.profile)
        res["profile_cumulative_5_edits"] = text.getvalue().splitlines()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.profile)
        res["profile_tottime_5_edits"] = text.getvalue().splitlines()
    ed.close()
    text = json.dumps(res, indent=1)
    if args.out:
        from icd_edge.atomic import write_bytes_atomic

        write_bytes_atomic(args.out, (text + "\n").encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
