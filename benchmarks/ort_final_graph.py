"""The graph onnxruntime actually runs on the CUDA provider: each prepared fused graph of a
bundle loaded as the backend loads it (all of ORT's own optimisations), written back out with
``optimized_model_filepath``, and its operator counts. A diagnostic for the kernel profile
(issue 17): which Transposes, Casts and bias-adds survive ORT's own passes.

    python benchmarks/ort_final_graph.py BUNDLE [--graphs unet_reverse_edit ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--graphs", nargs="+", default=["unet_reverse_edit"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import onnx
    import onnxruntime as ort

    from icd_edge.bundle.store import open_bundle
    from icd_edge.runtimes.ort import cuda

    cuda.preload()
    bundle = open_bundle(args.bundle, verify=False)
    res = {}
    for graph in args.graphs:
        model, stats = cuda.FusedGraphCache().get(bundle, graph, ort.__version__)
        with tempfile.TemporaryDirectory() as tmp:
            so = ort.SessionOptions()
            so.optimized_model_filepath = str(Path(tmp) / "final.onnx")
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "final.data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            opts = cuda.provider_options(0, "HEURISTIC", False)
            ort.InferenceSession(str(model), so, providers=[("CUDAExecutionProvider", opts)])
            final = onnx.load(str(Path(tmp) / "final.onnx"), load_external_data=False)
        ops = collections.Counter(n.op_type for n in final.graph.node)
        res[graph] = {"fused": stats, "final_ops": dict(ops.most_common())}
        print(graph, json.dumps(res[graph]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
