"""The cost of Prompt-to-Prompt in the edit UNet on the CPU: one reverse-edit step (batch 2, P2P
controls on) against a plain batch-2 UNet step, on onnxruntime and OpenVINO, for the edit graph
as the export writes it (``fused``: the edit as plain attentions) and as it was (``explicit``).

Full-size SD1.5 UNet with random weights (``random-sd15``), 512 px, fp32; the three graphs are
traced in this process with the export's own tracer. Writes
``benchmarks/results/cpu_edit_overhead_<isa>.json`` whose ``summary`` has
``edit_unet_overhead_ort`` and ``edit_unet_overhead_openvino`` (fused edit step / plain step).

    python benchmarks/bench_edit_overhead.py [--runs 5] [--work benchmarks/work/overhead]

The three graphs of a backend are loaded together and timed in turns (see time_interleaved).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_cpu_edit import machine  # noqa: E402


def trace_all(work: Path) -> dict[str, Path]:
    """plain (UNetGraph, batch 2), edit_fused and edit_explicit ONNX files of one reverse UNet."""
    import torch

    from icd_edge.bundle import spec
    from icd_edge.export import models
    from icd_edge.export.to_onnx import WeightStore, trace_graph, write_program
    from icd_edge.graphs.wrappers import UNetEditGraph, UNetGraph

    paths = {k: work / f"{k}.onnx" for k in ("plain", "edit_fused", "edit_explicit")}
    if all(p.is_file() for p in paths.values()):
        return paths
    (work / "src").mkdir(parents=True, exist_ok=True)
    src = models.build_random("random-sd15", 0, work / "src")
    unet = src.unet_reverse
    del src  # the forward UNet, text encoder and VAE are not needed here
    gc.collect()
    dims = spec.dims_for(512, 768)
    h, q = dims["h"], dims["Q"]
    rng = np.random.default_rng(0)
    unet_in = (
        torch.from_numpy(rng.standard_normal((2, 4, h, h), dtype=np.float32)),
        torch.tensor([519.0]),
        torch.from_numpy(rng.standard_normal((2, 77, 768), dtype=np.float32)),
        torch.from_numpy(rng.standard_normal((2, 512), dtype=np.float32)),
    )
    controls = tuple(torch.from_numpy(v) for v in _controls().values())
    unet_io = [s.name for s in spec.GRAPHS["unet_reverse"][0]]
    edit_io = [s.name for s in spec.GRAPHS["unet_reverse_edit"][0]]
    edit = UNetEditGraph(unet, self_max_keys=(h // 2) ** 2, blend_queries=q)
    for name, module, args, ins, outs in (
        ("plain", UNetGraph(unet), unet_in, unet_io, ["eps"]),
        ("edit_fused", edit, unet_in + controls, edit_io, ["eps", "blend_maps"]),
        ("edit_explicit", edit, unet_in + controls, edit_io, ["eps", "blend_maps"]),
    ):
        if paths[name].is_file():
            continue
        if name.startswith("edit"):
            edit.use_attention(name.split("_")[1])
        t0 = time.perf_counter()
        program = trace_graph(module.eval(), args, ins, outs, name, 18)
        store = WeightStore(work / f"{name}.weights")
        write_program(program, paths[name], store)
        store.close()
        del program
        gc.collect()
        print(f"traced {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return paths


def _controls() -> dict[str, np.ndarray]:
    """An edit step with both edits on (step 0 of the official settings): a permuted token map,
    refinement, amplification, cross replacement and self-injection."""
    rng = np.random.default_rng(1)
    tm = np.zeros((77, 77), np.float32)
    tm[rng.permutation(77), np.arange(77)] = 1.0
    return {
        "token_map": tm,
        "refine_alpha": (rng.random(77) > 0.3).astype(np.float32),
        "equalizer": np.ones(77, np.float32),
        "cross_alpha": np.ones(77, np.float32),
        "self_flag": np.ones(1, np.float32),
    }


def _feeds(edit: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    f = {
        "sample": rng.standard_normal((2, 4, 64, 64), dtype=np.float32),
        "timestep": np.array([519.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32),
        "timestep_cond": rng.standard_normal((2, 512), dtype=np.float32),
    }
    return {**f, **_controls()} if edit else f


def ort_runner(path: Path):
    import onnxruntime as ort

    from icd_edge.runtimes.ort.attention import fused_source

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    source, fused = fused_source(path, so)  # what the runtime does when it opens a CPU session
    sess = ort.InferenceSession(source, sess_options=so, providers=["CPUExecutionProvider"])
    return (lambda feeds: sess.run(None, feeds)), {"fused": fused}


def openvino_runner(path: Path):
    import openvino

    core = openvino.Core()
    compiled = core.compile_model(str(path), "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    return (lambda feeds: request.infer(feeds)), {}


def time_interleaved(make, paths: dict[str, Path], runs: int) -> dict:
    """All graphs loaded at once, then timed in turns (plain, fused, explicit, plain, ...): a
    2-core VM's speed drifts by 10-20 % over minutes, which separate blocks of runs turned into
    ratios as far apart as 1.10 and 1.22 for the same graphs."""
    runners, feeds, out = {}, {}, {}
    for name, path in paths.items():
        runners[name], out[name] = make(path)
        feeds[name] = _feeds(name != "plain")
        runners[name](feeds[name])  # first call: allocations
    times: dict[str, list] = {name: [] for name in paths}
    for _ in range(runs):
        for name in paths:
            t0 = time.perf_counter()
            runners[name](feeds[name])
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        out[name] |= {"median_s": round(statistics.median(ts), 3), "runs_s": [round(t, 3) for t in ts]}
    runners.clear()
    gc.collect()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "overhead")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--into",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "cpu.json",
        help="the report whose summary gets the two edit_unet_overhead keys (and the ISA they ran on)",
    )
    ap.add_argument("--merge", type=Path, help="only copy the summary of this earlier result into --into")
    args = ap.parse_args()
    if args.merge:
        return into_summary(json.loads(args.merge.read_text()), args.merge, args.into)
    args.work.mkdir(parents=True, exist_ok=True)
    paths = trace_all(args.work)
    gc.collect()
    report = {"machine": machine(), "shape": "512 px, batch 2, fp32, random-sd15 reverse UNet", "runs": {}}
    for backend, make in (("onnxruntime", ort_runner), ("openvino", openvino_runner)):
        for name, res in time_interleaved(make, paths, args.runs).items():
            report["runs"][f"{backend}/{name}"] = res
            print(backend, name, res, flush=True)
        gc.collect()
    r = report["runs"]

    def ratio(backend: str, edit: str) -> float:
        return round(r[f"{backend}/{edit}"]["median_s"] / r[f"{backend}/plain"]["median_s"], 3)

    report["summary"] = {
        "isa": report["machine"].get("isa"),
        "edit_unet_overhead_ort": ratio("onnxruntime", "edit_fused"),
        "edit_unet_overhead_openvino": ratio("openvino", "edit_fused"),
        "edit_unet_overhead_ort_explicit": ratio("onnxruntime", "edit_explicit"),
        "edit_unet_overhead_openvino_explicit": ratio("openvino", "edit_explicit"),
    }
    isa = str(report["summary"]["isa"] or "cpu").replace("-", "")
    out = args.out or ROOT / "benchmarks" / "results" / f"cpu_edit_overhead_{isa}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["summary"]), "->", out)
    return into_summary(report, out, args.into)


def into_summary(report: dict, source: Path, into: Path) -> int:
    """The issue's keys in the CPU report's summary, with the ISA class and file they came from."""
    data = json.loads(into.read_text())
    s = report["summary"]
    data["summary"] |= {
        "edit_unet_overhead_ort": s["edit_unet_overhead_ort"],
        "edit_unet_overhead_openvino": s["edit_unet_overhead_openvino"],
        "edit_unet_overhead_isa": s["isa"],
        "edit_unet_overhead_source": str(source.resolve().relative_to(ROOT))
        if source.resolve().is_relative_to(ROOT)
        else str(source),
    }
    into.write_text(json.dumps(data, indent=1) + "\n")
    print("summary keys ->", into)
    return 0


if __name__ == "__main__":
    sys.exit(main())
