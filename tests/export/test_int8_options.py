"""--int8-ops and --int8-per-channel: validated before any download, and carried from the command
line to ONNX Runtime's quantiser call (through the child process's argv), no export needed."""

from __future__ import annotations

import subprocess
import types

import numpy as np
import onnx
import pytest
from conftest import run_cli
from onnx import TensorProto, helper

from icd_edge.errors import ExportError
from icd_edge.export.config import ExportConfig, validate


def _cfg(tmp_path, **kw):
    return ExportConfig(out=tmp_path / "b", model="tiny", **kw)


@pytest.mark.parametrize(
    "ops, match",
    [
        (("Conv", "Relu"), "got Conv,Relu"),
        ((), "got nothing"),
        (("Conv", "Conv"), "distinct"),
        ("Conv,MatMul", "got 'Conv,MatMul'"),
    ],
)
def test_validate_rejects_bad_int8_ops(tmp_path, ops, match):
    with pytest.raises(ExportError, match=f"--int8-ops takes a comma list .*{match}"):
        validate(_cfg(tmp_path, precision="int8", int8_ops=ops))


def test_validate_int8_per_channel_and_scope(tmp_path):
    with pytest.raises(ExportError, match="--int8-per-channel must be on or off"):
        validate(_cfg(tmp_path, precision="int8", int8_per_channel="off"))
    # a setting that would change nothing is refused
    for kw in (
        {"int8_ops": ("Conv",)},
        {"int8_per_channel": False},
        {"precision": "int8-dynamic", "int8_ops": ("Conv",)},
    ):
        with pytest.raises(ExportError, match="apply to static int8 graphs only"):
            validate(_cfg(tmp_path, **kw))
    validate(_cfg(tmp_path))
    validate(_cfg(tmp_path, precision="int8", int8_ops=("Gemm", "Conv"), int8_per_channel=False))
    validate(_cfg(tmp_path, graph_precision=(("unet_forward", "int8"),), int8_ops=("MatMul",)))


def test_cli_rejects_bad_int8_flags(tmp_path):
    proc = run_cli(
        "--model",
        "tiny",
        "--out",
        str(tmp_path / "b"),
        "--precision",
        "int8",
        "--int8-ops",
        "Conv,Softmax",
        module="icd_edge.export",
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: --int8-ops takes a comma list")
    assert not (tmp_path / "b").exists()
    proc = run_cli(
        "--model", "tiny", "--out", str(tmp_path / "b"), "--int8-per-channel", "no", module="icd_edge.export"
    )
    assert proc.returncode == 2 and "--int8-per-channel: invalid choice" in proc.stderr


def test_cli_flags_reach_the_config(monkeypatch, tmp_path):
    import icd_edge.cli
    import icd_edge.export.pipeline
    from icd_edge.export.__main__ import main

    got = []
    monkeypatch.setattr(icd_edge.cli, "_install_signal_handlers", lambda: None)
    monkeypatch.setattr(icd_edge.export.pipeline, "run_export", lambda cfg: got.append(cfg) or cfg.out)
    assert (
        main(
            [
                "--model",
                "tiny",
                "--out",
                str(tmp_path / "b"),
                "--precision",
                "int8",
                "-v",
                "--int8-ops",
                "Conv, Gemm",
                "--int8-per-channel",
                "off",
            ]
        )
        == 0
    )
    assert got[0].int8_ops == ("Conv", "Gemm") and got[0].int8_per_channel is False
    assert main(["--model", "tiny", "--out", str(tmp_path / "b"), "-v"]) == 0
    assert got[1].int8_ops == ("Conv", "MatMul") and got[1].int8_per_channel is True


def test_config_reaches_convert(monkeypatch, tmp_path):
    """The ONNX target hands the config's fields to every graph's conversion."""
    from icd_edge.export import to_onnx
    from icd_edge.export.quant import calibration, stage

    calls = []
    monkeypatch.setattr(calibration, "calibration_cases", lambda *a: [(None, "a", "b", None)])
    monkeypatch.setattr(calibration, "record_trajectories", lambda *a: {"unet_reverse": [{}]})
    monkeypatch.setattr(to_onnx, "_page_out_modules", lambda *a: None)
    monkeypatch.setattr(stage, "convert", lambda *a, **kw: calls.append((a, kw)) or {})
    cfg = _cfg(tmp_path, precision="int8", int8_ops=("Conv",), int8_per_channel=False)
    (tmp_path / "onnx").mkdir()
    ctx = types.SimpleNamespace(
        cfg=cfg, out_dir=tmp_path, graphs={}, manifest=_Manifest(), timings={}, dims={"H": 128}, step=lambda s: None
    )
    stores = {}
    to_onnx._convert_all(ctx, tmp_path, {"unet_reverse": "int8"}, {}, stores)
    for s in stores.values():
        s.close()
    ((args, kw),) = calls
    assert args[2] == "int8" and kw["int8_ops"] == ("Conv",) and kw["int8_per_channel"] is False
    assert ctx.manifest.int8_scheme.info["weights"] == "int8, symmetric, per tensor"


class _Manifest:
    """The part of a Manifest the ONNX target's conversion step reads and replaces."""

    def __init__(self, int8_scheme=None, info=None):
        self.int8_scheme, self.info = int8_scheme, {} if info is None else info

    def with_(self, **changes):
        return _Manifest(changes.get("int8_scheme", self.int8_scheme), self.info)


def test_fields_reach_the_quantiser_call(monkeypatch, tmp_path):
    """convert -> the child's argv -> ONNX Runtime's quantize_static, run here in-process."""
    import onnxruntime.quantization

    from icd_edge.export.quant import int8, stage

    src = tmp_path / "g.onnx"
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(src))
    seen = {}

    def fake_quantize_static(model_in, model_out, reader, **kw):
        seen.update(kw)
        onnx.save_model(onnx.load(model_in), model_out)

    def child(cmd, **kw):  # the child process, in this one: the same argv reaches _child_main
        assert cmd[1:3] == ["-m", "icd_edge.export.quant"]
        seen["argv"] = cmd[3:]
        return subprocess.CompletedProcess(cmd, int8._child_main(cmd[3:]), "", "")

    monkeypatch.setattr(subprocess, "run", child)
    monkeypatch.setattr(int8, "_no_arena_sessions", lambda: None)  # it would patch ORT for the whole test run
    monkeypatch.setattr(int8, "activation_matmuls", lambda path: [])
    monkeypatch.setattr(int8, "calibrate_ranges", lambda path, feeds, ops, exclude: seen.update(ranges_ops=ops) or {})
    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", fake_quantize_static)

    class Store:
        def externalize(self, model):
            pass

    stage.convert(
        src,
        tmp_path / "out.onnx",
        "int8",
        Store(),
        [{"x": np.zeros(1, np.float32)}],
        int8_ops=("Conv", "Gemm"),
        int8_per_channel=False,
    )
    assert seen["argv"][-2:] == ["Conv,Gemm", "off"]
    assert seen["ranges_ops"] == ("Conv", "Gemm")
    assert seen["op_types_to_quantize"] == ["Conv", "Gemm"] and seen["per_channel"] is False
    stage.convert(src, tmp_path / "out.onnx", "int8", Store(), [{"x": np.zeros(1, np.float32)}])
    assert seen["argv"][-2:] == ["Conv,MatMul", "on"]
    assert seen["op_types_to_quantize"] == ["Conv", "MatMul"] and seen["per_channel"] is True


def test_tensorrt_flags_need_the_target_and_are_recorded(tmp_path):
    """The tensorrt target's knobs are typed config fields (recorded with the rest of the config)."""
    from icd_edge.export.config import ExportConfig, validate

    with pytest.raises(ExportError, match="--trt-precision applies to TensorRT engines only"):
        validate(ExportConfig(out=tmp_path / "b", model="tiny", trt_precision="fp16"))
    with pytest.raises(ExportError, match="--trt-workspace-mb applies"):
        validate(ExportConfig(out=tmp_path / "b", model="tiny", trt_workspace_mb=512))
    assert {"trt_precision", "trt_workspace_mb"} <= set(ExportConfig(out=tmp_path).__dict__)


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"a.png": ["a photo of a cat"]}', r"'a\.png' must map to \[source prompt, target prompt\]"),
        ('{"a.png": ["a cat", ""]}', "two non-empty strings"),
        ('["a cat", "a dog"]', "must be an object"),
        ("{not json", "is not readable JSON"),
    ],
)
def test_calibration_prompts_are_checked_before_the_export(tmp_path, text, match):
    """A malformed prompts.json of --calibration is a typed error from the config check (exit 2 on
    the command line, no bundle), not a traceback during quantisation."""
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "prompts.json").write_text(text)
    with pytest.raises(ExportError, match=match):
        validate(_cfg(tmp_path, precision="int8", calibration=calib))
    proc = run_cli(
        "--model", "tiny", "--out", str(tmp_path / "b"), "--precision", "int8", "--calibration", str(calib),
        module="icd_edge.export",
    )  # fmt: skip
    assert proc.returncode == 2 and "prompts.json" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "b").exists()
