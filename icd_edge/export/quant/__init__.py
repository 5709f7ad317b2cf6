"""fp16 and int8 ONNX graphs (issue: precision), from the fp32 export.

* ``fp16``: onnxconverter-common's float16 conversion with fp32 inputs/outputs kept
  (``keep_io_types``), so host math and feeds stay float32.
* ``int8``: ONNX Runtime static Q/DQ (u8 activations, s8 per-channel weights) on Conv and the
  weight MatMuls (attention's activation MatMuls stay float, :func:`activation_matmuls`),
  calibrated on activations recorded along the real iCD trajectories (forward t = 19/259/519/779
  with w = 0, reverse 999/779/519/259 for both rows of the edit batch) of the calibration photos;
  ranges come from :func:`calibrate_ranges`. Only the op list avoids the dynamo exporter's
  shared-constant failure of the dynamo exporter (Gemm/Gather constants shared between nodes). Embedding tables become int8 rows
  (:func:`quantize_embeddings`).
* ``int8-dynamic``: weights int8, activations quantised at run time (MatMul/Gemm only), no
  calibration.
By default int8 applies to the two reverse UNets. The forward UNet stays fp32: its error in
x_999 is amplified by the reverse jumps (Π c1 ≈ 14.6 over the 4 reverse steps), which on the tiny
model cost 5 dB end to end (22 → 27 dB); ``--graph-precision unet_forward=int8`` overrides.
The VAE and text encoder stay fp32 unless overridden.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import onnx

import icd_edge
from icd_edge.atomic import scratch_dir
from icd_edge.errors import ExportError
from icd_edge.memory import trim_heap

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8", "int8-dynamic")
UNETS = ("unet_forward", "unet_reverse", "unet_reverse_edit")
INT8_DEFAULT = ("unet_reverse", "unet_reverse_edit")
# Conv and MatMul carry almost all UNet FLOPs; the time-embedding Gemms are tiny and sensitive.
INT8_OPS = tuple(os.environ.get("ICD_INT8_OPS", "Conv,MatMul").split(","))
INT8_PER_CHANNEL = os.environ.get("ICD_INT8_PER_CHANNEL", "1") == "1"
DEFAULT_E2E_GATE_DB = {"fp32": 45.0, "fp16": 35.0, "int8": 25.0, "int8-dynamic": 25.0}
# Largest |weight| of the quantised Conv/MatMul weights. Without VNNI, x86 int8 kernels (ONNX Runtime's
# and OpenVINO's) add two u8·s8 products in a signed 16-bit lane (vpmaddubsw): 2·255·127 saturates it,
# 2·255·64 = 32640 does not. "8bit" is exact only on CPUs with VNNI/AMX (and non-x86).
INT8_WEIGHT_RANGES = {"7bit": 64, "8bit": 127}
DEFAULT_INT8_WEIGHTS = "7bit"

CALIBRATION = (  # scikit-image's public-domain photos: (name, source prompt, target prompt, blend words)
    ("chelsea", "a photo of a cat", "a photo of a dog", ("cat", "dog")),
    ("astronaut", "a photo of an astronaut", "a photo of a robot", ("astronaut", "robot")),
    ("coffee", "a cup of coffee", "a cup of tea", ("coffee", "tea")),
)


def int8_scheme(weights: str) -> dict:
    """What the manifest records about how the int8 graphs' integer products are formed."""
    wmax = INT8_WEIGHT_RANGES[weights]
    return {"activations": "uint8, per tensor", "weights": "int8, symmetric, per output channel",
            "weight_range": weights, "weight_max": wmax, "exact_without_vnni": 2 * 255 * wmax <= 32767}


def graph_precisions(precision: str, overrides: dict[str, str], graphs) -> dict[str, str]:
    """Precision per graph: the global one (int8 only for UNets), then ``overrides``."""
    for p in [precision, *overrides.values()]:
        if p not in PRECISIONS:
            raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {p!r}")
    unknown = set(overrides) - set(graphs)
    if unknown:
        raise ExportError(f"--graph-precision names unknown graphs {sorted(unknown)}; graphs are {', '.join(graphs)}")
    out = {g: (precision if precision in ("fp32", "fp16") or g in INT8_DEFAULT else "fp32") for g in graphs}
    out.update(overrides)
    return out


def calibration_cases(directory: Path | None, side: int, limit: int) -> list[tuple]:
    """(image array, source, target, blend) cases: a user folder, else scikit-image's photos."""
    from icd_edge.image import load_image

    cases = []
    if directory is not None:
        prompts = {}
        if (directory / "prompts.json").is_file():
            prompts = json.loads((directory / "prompts.json").read_text())
        files = sorted(p for p in directory.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        if not files:
            raise ExportError(f"--calibration {directory} holds no images (.png, .jpg, .webp, .bmp)")
        for p in files[:limit]:
            src, tgt = prompts.get(p.name, ["a photo", "a painting"])
            cases.append((np.asarray(load_image(p)), src, tgt, None))
        return cases
    try:
        import skimage.data
    except ImportError as exc:
        raise ExportError("int8 calibration needs photos: install scikit-image (its public-domain photos are the "
                          "default set) or pass --calibration DIR") from exc
    for name, src, tgt, blend in CALIBRATION[:limit]:
        cases.append((getattr(skimage.data, name)(), src, tgt, blend))
    return cases


class _Recorder:
    """Wraps a backend and keeps every feed each graph receives."""

    def __init__(self, backend):
        self.backend, self.name, self.fmt = backend, backend.name, backend.fmt
        self.feeds: dict[str, list[dict]] = {}

    def probe(self):
        return self.backend.probe()

    def open_session(self, bundle, graph):
        inner = self.backend.open_session(bundle, graph)
        rec = self.feeds.setdefault(graph, [])

        class Session:
            def run(self_, feeds):
                rec.append({k: np.array(v) for k, v in feeds.items()})
                return inner.run(feeds)

            def close(self_):
                inner.close()

        return Session()


def record_trajectories(bundle, graphs, cases) -> dict[str, list[dict]]:
    """Run invert + edit (and a reconstruction) on the torch reference, recording each graph's feeds."""
    from icd_edge.edit.editor import Editor
    from icd_edge.runtimes.torch_ref import TorchBackend

    rec = _Recorder(TorchBackend(graphs))
    ed = Editor(bundle, rec)
    for image, src, tgt, blend in cases:
        inv = ed.invert(image, src, seed=0)
        ed.edit(inv, tgt, cross_replace=0.4, self_replace=0.6, blend=blend, output_type="np")
        ed.reconstruct(inv, output_type="np")
    feeds = rec.feeds
    if "taesd_decoder" in graphs and not feeds.get("taesd_decoder"):
        # the editor decoded with the full VAE: TAESD sees the same final latents, unscaled
        feeds["taesd_decoder"] = [{"latent": f["latent"] * np.float32(ed.vae_scale)} for f in feeds.get("vae_decoder", [])]
    return feeds


def convert(src: Path, dst: Path, precision: str, store, calibration: list[dict] | None = None,
            int8_embeddings: bool = False, int8_weights: str = DEFAULT_INT8_WEIGHTS) -> dict:
    """Write ``dst`` (weights into ``store``) as ``precision`` from the fp32 graph ``src``;
    ``int8_embeddings`` also stores an fp16 graph's embedding tables as int8 rows (int8 graphs always);
    ``int8_weights`` is the range of the quantised Conv/MatMul weights (:data:`INT8_WEIGHT_RANGES`).

    Returns what is worth recording: the quantiser's peak RSS (``peak_rss_gb``) for int8."""
    info = {}
    if precision == "fp32":
        model = onnx.load(str(src), load_external_data=True)
    elif precision == "fp16":
        from onnxconverter_common import float16

        # the path API infers shapes from the file: a > 2 GB UNet cannot be serialised in memory
        model = float16.convert_float_to_float16_model_path(str(src), keep_io_types=True)
        if int8_embeddings:
            info["int8_embeddings"] = quantize_embeddings(model)
    else:
        model, info["peak_rss_gb"] = _quantize(src, precision, calibration, int8_weights)
        info["int8_embeddings"] = quantize_embeddings(model)
        if precision == "int8":  # the dynamic quantiser already covers Gemm
            info["int8_gemm_weights"] = quantize_gemm_weights(model)
    store.externalize(model)
    onnx.save_model(model, str(dst))
    onnx.checker.check_model(str(dst))
    return info


def quantize_embeddings(model: onnx.ModelProto, min_rows: int = 256) -> list[str]:
    """Embedding tables (a Gather over a float or float16 initializer of at least ``min_rows``
    rows: the CLIP token embedding, 49408 x 768, 152 MB in fp32, 76 MB in fp16) stored as int8 rows
    with one scale per row (in the table's float type): ``Gather(table) -> Gather(q) * Gather(scale)``.
    The quantiser leaves Gather alone (its QDQ form would quantise the table per tensor as an
    activation). Returns the tables rewritten."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    done = []
    for node in list(graph.node):
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if (table is None or axis != 0 or table.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16)
                or len(table.dims) != 2 or table.dims[0] < min_rows or uses[table.name] != 1):
            continue
        values = numpy_helper.to_array(table)
        q, scale = _symmetric_int8(values.astype(np.float32), axis=0)
        scale = scale[:, None].astype(values.dtype)  # one per row, broadcast over the gathered rows
        name, ids, out, dtype = table.name, node.input[1], node.output[0], table.data_type
        graph.initializer.remove(table)
        graph.initializer.extend([numpy_helper.from_array(q, f"{name}_int8"),
                                  numpy_helper.from_array(scale, f"{name}_row_scale")])
        pos = list(graph.node).index(node)
        graph.node.remove(node)
        for j, new in enumerate([
                helper.make_node("Gather", [f"{name}_int8", ids], [f"{out}_q"], name=f"{node.name}_int8", axis=0),
                helper.make_node("Cast", [f"{out}_q"], [f"{out}_f"], name=f"{node.name}_cast", to=dtype),
                helper.make_node("Gather", [f"{name}_row_scale", ids], [f"{out}_s"], name=f"{node.name}_scale", axis=0),
                helper.make_node("Mul", [f"{out}_f", f"{out}_s"], [out], name=f"{node.name}_dequant")]):
            graph.node.insert(pos + j, new)
        done.append(name)
    return done


def _symmetric_int8(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """A 2-D ``w`` as int8 in [-127, 127] with one float32 scale per index of ``axis``."""
    scale = (np.abs(w).max(axis=1 - axis) / np.float32(127)).astype(np.float32)
    scale[scale == 0] = 1
    q = np.clip(np.rint(w / np.expand_dims(scale, 1 - axis)), -127, 127).astype(np.int8)
    return q, scale


def quantize_gemm_weights(model: onnx.ModelProto, min_elements: int = 4096) -> list[str]:
    """Weight-only int8 for the float weights of Gemm nodes (at least ``min_elements``): the static
    quantiser's operator list (Conv, MatMul) leaves them float, and in the UNet they are the time
    embedding's linear layers (1280x1280 per ResNet, 114 MB in fp32; one row of activations, so
    their speed does not matter). Per output channel, symmetric: ``DequantizeLinear(int8, scale)``
    feeds the Gemm. Returns the weights rewritten."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    done = []
    for name, t in list(inits.items()):
        nodes = users.get(name, [])
        if (t.data_type != TensorProto.FLOAT or len(t.dims) != 2 or int(np.prod(t.dims)) < min_elements or not nodes
                or any(n.op_type != "Gemm" or list(n.input).index(name) != 1 for n in nodes)):
            continue
        trans = {next((a.i for a in n.attribute if a.name == "transB"), 0) for n in nodes}
        if len(trans) != 1:
            continue
        axis = 0 if trans.pop() else 1  # the output-channel axis of B
        q, scale = _symmetric_int8(numpy_helper.to_array(t), axis)
        graph.initializer.remove(t)
        graph.initializer.extend([numpy_helper.from_array(q, f"{name}_int8"),
                                  numpy_helper.from_array(scale, f"{name}_scale")])
        first = min(list(graph.node).index(n) for n in nodes)
        graph.node.insert(first, helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale"], [name],
                                                  name=f"{name}_weight_dq", axis=axis))
        done.append(name)
    return done


def _quantize(src: Path, precision: str, calibration: list[dict] | None,
              int8_weights: str = DEFAULT_INT8_WEIGHTS) -> tuple[onnx.ModelProto, float | None]:
    """Quantise in a child process, so that what the exporter holds does not add to the
    quantiser's peak (at 512 px: 6.3 GB for a batch-1 UNet, 9.3 GB for the batch-2 P2P edit UNet)
    and the child's memory is returned whole when it exits. Returns the model and the child's
    peak RSS in GB."""
    import subprocess

    with scratch_dir("quant") as d:
        out, feeds = Path(d) / "q.onnx", Path(d) / "feeds"
        feeds.mkdir()
        for i, feed in enumerate(calibration or []):
            np.savez(feeds / f"{i:05d}.npz", **feed)
        pkg_root = str(Path(icd_edge.__file__).resolve().parents[1])  # importable however the parent found icd_edge
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [pkg_root, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, "-m", "icd_edge.export.quant", str(src), str(out), precision, str(feeds),
                               int8_weights],
                              capture_output=True, text=True, env=env)
        if proc.returncode:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            died = f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0 else (lines[-1] if lines else "")
            raise ExportError(f"{precision} quantisation of {src.stem} failed: {died}")
        peak = None
        for line in proc.stdout.splitlines()[::-1]:
            if line.startswith("{"):
                peak = json.loads(line).get("peak_rss_gb")
                break
        return onnx.load(str(out), load_external_data=True), peak


def _no_arena_sessions() -> None:
    """In the quantiser's process only: ONNX Runtime sessions without the CPU memory arena and
    memory patterns. The calibrator runs the graph once per input and the arena keeps what each
    run grew: a 512 px VAE encoder took 3.3 GB for one input and 6.1 GB for two; without the
    arena it stays at 3.2 GB. quantize_static takes no session options, hence the wrapper."""
    import onnxruntime as ort

    init = ort.InferenceSession.__init__

    def lean_init(self, path_or_bytes, sess_options=None, *args, **kwargs):
        sess_options = sess_options or ort.SessionOptions()
        sess_options.enable_cpu_mem_arena = False
        sess_options.enable_mem_pattern = False
        init(self, path_or_bytes, sess_options, *args, **kwargs)

    ort.InferenceSession.__init__ = lean_init


def _child_main(argv: list[str]) -> int:
    """``python -m icd_edge.export.quant SRC OUT PRECISION FEEDS_DIR WEIGHTS`` (used by :func:`_quantize`)."""
    src, out, precision, feeds, weights = Path(argv[0]), Path(argv[1]), argv[2], Path(argv[3]), argv[4]
    calibration = []
    for f in sorted(feeds.glob("*.npz")):
        with np.load(f) as z:
            calibration.append({k: z[k] for k in z.files})
    _no_arena_sessions()
    try:
        _run_quantizer(src, out, precision, calibration, weights)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # onnxruntime.quantization raises many types
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"peak_rss_gb": _own_peak_rss_gb()}))
    return 0


def _own_peak_rss_gb() -> float | None:
    """This process's peak RSS in GB since its exec (Linux ``VmHWM``; None elsewhere). Not
    ``ru_maxrss``: Linux carries that over from the forked parent, so a child of a 12 GB exporter
    reported 12 GB whatever it used itself."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) * 1024 / 1e9, 2)
    except OSError:
        pass
    return None


def activation_matmuls(path: Path) -> list[str]:
    """MatMul nodes with no weight input: attention's Q·Kᵀ and P·V. They stay float. Quantised,
    ONNX Runtime runs them as QLinearMatMul and fuses the Softmax between them into QLinearSoftmax;
    in the 512 px int8 forward UNet those two took 39 % + ~25 % of the time and made it slower than
    fp32 (benchmarks/profile_ort.py). Calibrating them also kept every attention map of a run as a
    calibrator output (gigabytes at 512 px)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    weights |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in graph.node if n.op_type == "MatMul" and not any(i in weights for i in n.input)]


def calibrate_ranges(src: Path, calibration: list[dict], op_types, exclude=()) -> dict[str, tuple[float, float]]:
    """Min/max of every float input and output of the ``op_types`` nodes (but ``exclude``) over the
    calibration feeds: what ONNX Runtime's MinMax calibrator computes, with one copy of the weights.

    Its calibrator holds the model proto, a deep copy, the augmented copy and an unoptimised session
    at once (17.5 GB for a batch-1 UNet at 512 px; the batch-2 edit UNet did not fit in 24 GB).
    Here the graph is augmented without its weights (ReduceMin/ReduceMax per tensor, so a run returns
    scalars), handed to ONNX Runtime as bytes that read the original weight files, and run one feed
    at a time in a session without the memory arena."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    weights = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    skip = set(exclude)
    tensors = sorted({t for n in graph.node if n.op_type in op_types and n.name not in skip
                      for t in [*n.input, *n.output] if t and t not in weights})
    if not tensors:
        return {}
    del graph.output[:]
    for k, t in enumerate(tensors):
        for red in ("Min", "Max"):
            out = f"icd_calib_{k}_{red.lower()}"
            graph.node.append(helper.make_node(f"Reduce{red}", [t], [out], name=out, keepdims=0))
            graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, []))
    lo = np.full(len(tensors), np.inf, np.float32)
    hi = np.full(len(tensors), -np.inf, np.float32)
    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    # the augmented graph is passed as bytes; its weights are read from the original files
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(src.parent.resolve()))
    blob = model.SerializeToString()
    del model, graph
    sess = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
    for feed in calibration:
        outs = sess.run(None, feed)
        lo = np.minimum(lo, np.asarray(outs[0::2], np.float32))
        hi = np.maximum(hi, np.asarray(outs[1::2], np.float32))
    del sess
    return {t: (float(a), float(b)) for t, a, b in zip(tensors, lo, hi)}


def _run_quantizer(src: Path, out: Path, precision: str, calibration: list[dict] | None,
                   int8_weights: str = DEFAULT_INT8_WEIGHTS) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

    # ONNX Runtime's reduce_range narrows the weights alone to [-64, 64]; activations keep 0..255
    reduce_range = INT8_WEIGHT_RANGES[int8_weights] < 127
    if precision == "int8-dynamic":
        quantize_dynamic(str(src), str(out), op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8,
                         use_external_data_format=True, reduce_range=reduce_range)
    else:
        if not calibration:
            raise ExportError(f"int8 calibration recorded no inputs for {src.stem}")

        exclude = activation_matmuls(src)
        ranges = calibrate_ranges(src, calibration, INT8_OPS, exclude)
        trim_heap()
        with scratch_dir("ranges") as d:
            # ranges go in through ORT's calibration cache, so its own calibrator never runs
            cache = Path(d) / "ranges.json"
            save_tensors_data(TensorsData(CalibrationMethod.MinMax, {
                t: (np.array(a, np.float32), np.array(b, np.float32)) for t, (a, b) in ranges.items()}), cache)
            quantize_static(str(src), str(out), None, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(INT8_OPS), nodes_to_exclude=exclude,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            per_channel=INT8_PER_CHANNEL, use_external_data_format=True, reduce_range=reduce_range,
                            calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=str(cache))

