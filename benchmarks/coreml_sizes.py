"""Core ML package size per graph and per weight compression, from a bundle exported with
``--targets onnx,coreml`` (uncompressed). Each compression is applied to the bundle's own
packages with the export's function, so sizes equal what ``--coreml-compression`` writes.
Writes ``benchmarks/results/coreml_sizes_<model>.json``.

    python benchmarks/coreml_sizes.py --bundle tiny.bundle
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--out", type=Path, help="JSON to write [default benchmarks/results/coreml_sizes_<model>.json]")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    import coremltools as ct

    from icd_edge.export import to_coreml

    manifest = json.loads((args.bundle / "manifest.json").read_text())
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        for graph, entry in manifest["graphs"].items():
            art = entry["artifacts"]["coreml"]
            if art["compression"] != "none":
                raise SystemExit(
                    f"{graph} is already compressed ({art['compression']}); export without --coreml-compression"
                )
            package = args.bundle / art["file"]
            rows[graph] = {"none": {"bytes": to_coreml.package_bytes(package), "seconds": 0.0}}
            for compression in to_coreml.COMPRESSIONS[1:]:
                t0 = time.perf_counter()
                model = to_coreml.compress(ct.models.MLModel(str(package), skip_model_load=True), compression)
                seconds = time.perf_counter() - t0
                out = Path(work) / f"{graph}_{compression}.mlpackage"
                model.save(str(out))
                rows[graph][compression] = {"bytes": to_coreml.package_bytes(out), "seconds": round(seconds, 2)}
                print(graph, compression, rows[graph][compression], flush=True)
    totals = {c: sum(r[c]["bytes"] for r in rows.values()) for c in to_coreml.COMPRESSIONS}
    result = {
        "model": manifest["model"]["name"],
        "dims": manifest["dims"],
        "coremltools": ct.__version__,
        "machine": {"os": platform.platform(), "python": platform.python_version()},
        "note": "compression seconds on a shared 2-core machine; k-means time depends on tensor count",
        "graphs": rows,
        "total_bytes": totals,
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"coreml_sizes_{manifest['model']['name']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(totals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
