"""int8 quantisation by ONNX Runtime, in a child process.

* ``int8``: static Q/DQ (u8 activations, s8 weights, per channel by default) on the export's
  ``int8_ops`` (default Conv and the weight MatMuls; attention's activation MatMuls stay float,
  :func:`~icd_edge.export.quant.surgery.activation_matmuls`), with ranges from
  :func:`~icd_edge.export.quant.calibration.calibrate_ranges`. The default list leaves Gemm and
  Gather out: the quantiser failed on the constants the dynamo exporter shares between those nodes.
* ``int8-dynamic``: weights int8, activations quantised at run time (MatMul/Gemm only), no
  calibration.

The child is ``python -m icd_edge.export.quant`` (the package's ``__main__``), which calls
:func:`_child_main`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx

import icd_edge
from icd_edge.atomic import scratch_dir
from icd_edge.errors import ExportError
from icd_edge.export.quant.calibration import calibrate_ranges
from icd_edge.export.quant.policy import DEFAULT_INT8_OPS, DEFAULT_INT8_WEIGHTS, INT8_WEIGHT_RANGES
from icd_edge.export.quant.surgery import activation_matmuls
from icd_edge.memory import trim_heap


def quantize(
    src: Path,
    precision: str,
    calibration: list[dict] | None,
    int8_weights: str = DEFAULT_INT8_WEIGHTS,
    int8_ops: tuple[str, ...] = DEFAULT_INT8_OPS,
    int8_per_channel: bool = True,
) -> tuple[onnx.ModelProto, float | None]:
    """Quantise in a child process, so that what the exporter holds does not add to the
    quantiser's peak (at 512 px: 6.3 GB for a batch-1 UNet, 9.3 GB for the batch-2 P2P edit UNet)
    and the child's memory is returned whole when it exits. ``int8_ops`` and ``int8_per_channel``
    shape the static quantisation only. Returns the model and the child's peak RSS in GB."""
    import subprocess

    with scratch_dir("quant") as d:
        out, feeds = Path(d) / "q.onnx", Path(d) / "feeds"
        feeds.mkdir()
        for i, feed in enumerate(calibration or []):
            np.savez(feeds / f"{i:05d}.npz", **feed)
        pkg_root = str(Path(icd_edge.__file__).resolve().parents[1])  # importable however the parent found icd_edge
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [pkg_root, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "icd_edge.export.quant",
                str(src),
                str(out),
                precision,
                str(feeds),
                int8_weights,
                ",".join(int8_ops),
                "on" if int8_per_channel else "off",
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            died = (
                f"killed by signal {-proc.returncode} (out of memory?)"
                if proc.returncode < 0
                else (lines[-1] if lines else "")
            )
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
    """``python -m icd_edge.export.quant SRC OUT PRECISION FEEDS_DIR WEIGHTS OPS on|off`` (used by
    :func:`quantize`; OPS is a comma list, on|off the per-channel weight scales)."""
    src, out, precision, feeds, weights = Path(argv[0]), Path(argv[1]), argv[2], Path(argv[3]), argv[4]
    ops, per_channel = tuple(argv[5].split(",")), argv[6] == "on"
    calibration = []
    for f in sorted(feeds.glob("*.npz")):
        with np.load(f) as z:
            calibration.append({k: z[k] for k in z.files})
    _no_arena_sessions()
    try:
        _run_quantizer(src, out, precision, calibration, weights, ops, per_channel)
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


def _run_quantizer(
    src: Path,
    out: Path,
    precision: str,
    calibration: list[dict] | None,
    int8_weights: str = DEFAULT_INT8_WEIGHTS,
    int8_ops: tuple[str, ...] = DEFAULT_INT8_OPS,
    int8_per_channel: bool = True,
) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

    # ONNX Runtime's reduce_range narrows the weights alone to [-64, 64]; activations keep 0..255
    reduce_range = INT8_WEIGHT_RANGES[int8_weights] < 127
    if precision == "int8-dynamic":
        quantize_dynamic(
            str(src),
            str(out),
            op_types_to_quantize=["MatMul", "Gemm"],
            weight_type=QuantType.QInt8,
            use_external_data_format=True,
            reduce_range=reduce_range,
        )
    else:
        if not calibration:
            raise ExportError(f"int8 calibration recorded no inputs for {src.stem}")

        exclude = activation_matmuls(src)
        ranges = calibrate_ranges(src, calibration, int8_ops, exclude)
        trim_heap()
        with scratch_dir("ranges") as d:
            # ranges go in through ORT's calibration cache, so its own calibrator never runs
            cache = Path(d) / "ranges.json"
            save_tensors_data(
                TensorsData(
                    CalibrationMethod.MinMax,
                    {t: (np.array(a, np.float32), np.array(b, np.float32)) for t, (a, b) in ranges.items()},
                ),
                cache,
            )
            quantize_static(
                str(src),
                str(out),
                None,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(int8_ops),
                nodes_to_exclude=exclude,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=int8_per_channel,
                use_external_data_format=True,
                reduce_range=reduce_range,
                calibrate_method=CalibrationMethod.MinMax,
                calibration_cache_path=str(cache),
            )
