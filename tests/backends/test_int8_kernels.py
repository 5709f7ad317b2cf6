"""int8 that gives the same results on every x86 CPU: the bundle's weight range never saturates the
16-bit pair sums of CPUs without VNNI, checked on one-node graphs with worst-case values.

On this CPU the check runs natively; where qemu-user is installed it also runs on an emulated
AVX2-only CPU (``qemu-x86_64 -cpu Haswell-v4``: AVX2 + FMA, no AVX-512, no VNNI), so a VNNI/AMX
host catches a saturating scheme too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from icd_edge.export.quant.policy import DEFAULT_INT8_WEIGHTS, INT8_WEIGHT_RANGES, int8_scheme
from icd_edge.runtimes import int8_kernels

DEFAULT_WMAX = INT8_WEIGHT_RANGES[DEFAULT_INT8_WEIGHTS]


def test_default_scheme_fits_16_bit_pair_sums():
    scheme = int8_scheme(DEFAULT_INT8_WEIGHTS)
    assert scheme["weight_max"] == DEFAULT_WMAX and 2 * 255 * DEFAULT_WMAX <= 32767
    assert scheme["exact_without_vnni"] is True
    assert int8_scheme("8bit")["exact_without_vnni"] is False  # 2·255·127 = 64770
    assert set(int8_kernels.WEIGHT_MAXES) == set(INT8_WEIGHT_RANGES.values())


def test_probe_expectations_are_exact_integer_arithmetic():
    """The expected values are the integer sums themselves (what a correct kernel returns)."""
    for p in int8_kernels.probes(127):
        if p.name == "matmul_integer":
            w = onnx.numpy_helper.to_array(p.model.graph.initializer[0]).astype(np.int64)
            np.testing.assert_array_equal(p.expected, p.feed["a"].astype(np.int64) @ w)
            assert np.abs(p.expected).max() == 255 * 127 * 64  # the all-max row is there
    names = [p.name for p in int8_kernels.probes(64)]
    assert names == ["qdq_matmul", "matmul_integer", "qdq_conv1x1", "qdq_conv3x3"]


@pytest.mark.parametrize("backend", int8_kernels.BACKENDS)
def test_default_scheme_is_exact_on_this_cpu(backend):
    pytest.importorskip(backend)
    errs = int8_kernels.errors(backend, DEFAULT_WMAX)
    assert int8_kernels.exact(errs), errs


def test_full_range_result_matches_what_the_cpu_class_predicts():
    """On an x86 CPU without VNNI the 8-bit range must saturate (else the probe tests nothing);
    with VNNI/AMX it must be exact."""
    from icd_edge import cpu

    info = cpu.info()
    if info["machine"] not in ("x86_64", "amd64"):
        pytest.skip(f"int8 pair saturation is an x86 property; this is {info['machine']}")
    errs = int8_kernels.errors("onnxruntime", 127)
    assert int8_kernels.exact(errs) != cpu.int8_pairs_saturate(info["features"], info["machine"]), (info, errs)


def _emulated_report() -> dict:
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(
            f"the emulated AVX2 check runs this x86-64 Python under qemu-x86_64; this host is {platform.machine()}"
        )
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.skip(
            "qemu-user is not installed (apt-get install qemu-user): the emulated AVX2-only check did not run; "
            "the native check above covers this CPU only"
        )
    from conftest import ROOT

    root = str(ROOT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [
            qemu,
            "-cpu",
            "Haswell-v4",
            os.path.realpath(sys.executable),
            "-m",
            "icd_edge.runtimes.int8_kernels",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["results"]


def test_default_scheme_is_exact_on_emulated_avx2_cpu():
    results = _emulated_report()
    assert set(results) == set(int8_kernels.installed_backends())
    for backend, by_w in results.items():
        assert int8_kernels.exact(by_w[str(DEFAULT_WMAX)]), (backend, by_w)
        # the emulated CPU really lacks VNNI: full-range weights saturate there, on every backend
        assert not int8_kernels.exact(by_w["127"]), (backend, by_w)


def _quantised_weights(path):
    """The int8 initializers behind DequantizeLinear nodes that feed a Conv or MatMul."""
    g = onnx.load(str(path), load_external_data=True).graph
    inits = {i.name: i for i in g.initializer}
    users = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n.op_type)
    for n in g.node:
        if (
            n.op_type == "DequantizeLinear"
            and n.input[0] in inits
            and {"Conv", "MatMul"} & set(users.get(n.output[0], []))
        ):
            t = inits[n.input[0]]
            if t.data_type == onnx.TensorProto.INT8:
                yield n.input[0], onnx.numpy_helper.to_array(t)


def test_int8_bundle_records_and_uses_the_scheme(int8_bundle):
    from icd_edge.bundle.store import open_bundle

    b = open_bundle(int8_bundle, verify=False)
    assert b.manifest.int8_scheme.to_json() == int8_scheme(DEFAULT_INT8_WEIGHTS)
    for graph in ("unet_reverse", "unet_reverse_edit", "text_encoder"):
        weights = dict(_quantised_weights(b.path(b.artifact(graph, "onnx").file)))
        assert len(weights) > 5, graph
        peak = max(int(np.abs(w.astype(np.int32)).max()) for w in weights.values())
        assert peak == DEFAULT_WMAX, (graph, peak)  # the range is used, and never exceeded


def _bundle_with(int8_bundle, scheme):
    from icd_edge.bundle.schema import Int8Scheme
    from icd_edge.bundle.store import Bundle, open_bundle

    b = open_bundle(int8_bundle, verify=False)
    return Bundle(b.root, b.manifest.with_(int8_scheme=None if scheme is None else Int8Scheme.from_json(scheme)))


def test_saturating_bundle_warns_once(int8_bundle, monkeypatch, caplog):
    from icd_edge import runtimes as editor_mod

    calls = []
    monkeypatch.setattr(int8_kernels, "saturates", lambda b, w: calls.append((b, w)) or True)
    monkeypatch.setattr(editor_mod, "_WARNED", set())
    legacy = _bundle_with(int8_bundle, None)  # written before the scheme was recorded: 8-bit weights
    with caplog.at_level(logging.WARNING, logger="icd_edge.edit"):
        editor_mod.warn_if_int8_saturates(legacy, "openvino")
        editor_mod.warn_if_int8_saturates(legacy, "openvino")
    assert calls == [("openvino", 127)]
    assert len([r for r in caplog.records if "--int8-weights 7bit" in r.getMessage()]) == 1
    caplog.clear()
    # the default scheme is never probed; neither is a backend the check does not cover
    editor_mod.warn_if_int8_saturates(_bundle_with(int8_bundle, int8_scheme("7bit")), "onnxruntime")
    editor_mod.warn_if_int8_saturates(_bundle_with(int8_bundle, int8_scheme("8bit")), "torch")
    assert calls == [("openvino", 127)] and not caplog.records


def test_exact_kernels_do_not_warn(int8_bundle, monkeypatch, caplog):
    from icd_edge import runtimes as editor_mod

    monkeypatch.setattr(int8_kernels, "saturates", lambda b, w: False)
    monkeypatch.setattr(editor_mod, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="icd_edge.edit"):
        editor_mod.warn_if_int8_saturates(_bundle_with(int8_bundle, int8_scheme("8bit")), "onnxruntime")
    assert not caplog.records


def test_export_rejects_unknown_weight_range(tmp_path):
    from conftest import run_cli

    proc = run_cli(
        "--model",
        "tiny",
        "--out",
        str(tmp_path / "b"),
        "--precision",
        "int8",
        "--int8-weights",
        "6bit",
        module="icd_edge.export",
    )
    assert proc.returncode == 2 and "--int8-weights" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "b").exists()
