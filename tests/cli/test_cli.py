"""CLI end to end and every bad-input path: exit code 2, one line, no traceback, no output file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image


def test_edit_writes_png(tiny_bundle, photo_png, tmp_path):
    out = tmp_path / "dog.png"
    proc = run_cli(
        "edit",
        "--bundle",
        str(tiny_bundle),
        "--image",
        str(photo_png),
        "--source",
        "a photo of a cat",
        "--target",
        "a photo of a dog",
        "--out",
        str(out),
        "--blend",
        "cat",
        "dog",
        "--amplify",
        "dog=2",
        "--cross-replace",
        "0.4",
        "--self-replace",
        "0.6",
        "--guidance",
        "19",
        "--tau",
        "0.8",
        "--seed",
        "7",
    )
    assert proc.returncode == 0, proc.stderr
    img = Image.open(out)
    assert img.size == (128, 128) and img.mode == "RGB"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp leftovers


def test_cli_edit_equals_api(tiny_bundle, photo_png, tmp_path):
    from icd_edge.edit.editor import Editor

    out = tmp_path / "a.png"
    run_cli(
        "edit",
        "--bundle",
        str(tiny_bundle),
        "--image",
        str(photo_png),
        "--source",
        "a photo of a cat",
        "--target",
        "a photo of a dog",
        "--out",
        str(out),
        check=True,
    )
    with Editor.open(tiny_bundle) as ed:
        api = ed.edit(ed.invert(photo_png, "a photo of a cat"), "a photo of a dog")
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(api))


def test_invert_reconstruct_generate(tiny_bundle, photo_png, tmp_path):
    run_cli(
        "invert",
        "--bundle",
        str(tiny_bundle),
        "--image",
        str(photo_png),
        "--source",
        "a cat",
        "--out",
        str(tmp_path / "inv.npz"),
        check=True,
    )
    from icd_edge.edit.inversion import Inversion

    inv = Inversion.load(tmp_path / "inv.npz")
    assert inv.latent.shape == (1, 4, 16, 16) and inv.source_prompt == "a cat"
    run_cli(
        "reconstruct",
        "--bundle",
        str(tiny_bundle),
        "--image",
        str(photo_png),
        "--source",
        "a cat",
        "--out",
        str(tmp_path / "rec.jpg"),
        check=True,
    )
    run_cli(
        "generate", "--bundle", str(tiny_bundle), "--prompt", "a dog", "--out", str(tmp_path / "gen.webp"), check=True
    )
    assert Image.open(tmp_path / "rec.jpg").size == Image.open(tmp_path / "gen.webp").size == (128, 128)


def test_inspect_json_shows_parity(tiny_bundle):
    proc = run_cli("inspect", str(tiny_bundle), "--json", check=True)
    m = json.loads(proc.stdout)
    edit = next(
        e
        for e in m["parity"]["entries"]
        if (e["check"], e["target"], e["backend"]) == ("edit", "synthetic", "onnxruntime")
    )
    assert edit["psnr_db"] >= 45 and edit["gate_db"] == 45
    text = run_cli("inspect", str(tiny_bundle), check=True).stdout
    assert "end-to-end edit" in text and "unet_reverse_edit" in text


def test_doctor_lists_every_backend():
    out = run_cli("doctor", check=True).stdout
    assert "onnxruntime: available" in out
    assert "tensorrt: not available (not installed)" in out
    assert "coreml: not available (Core ML runs only on macOS)" in out
    assert "torch: " in out


def _bad(tmp_path, *args):
    out = tmp_path / "out.png"
    proc = run_cli(*args)
    assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    return lines[0]


def _edit_args(bundle, image, tmp_path, **over):
    args = {
        "--bundle": str(bundle),
        "--image": str(image),
        "--source": "a photo of a cat",
        "--target": "a photo of a dog",
        "--out": str(tmp_path / "out.png"),
    }
    args.update(over)
    flat = ["edit"]
    for k, v in args.items():
        if v is not None:
            flat += [k, v]
    return flat


def test_bad_images(tiny_bundle, tmp_path):
    cases = {
        "missing.png": None,
        "zero.png": b"",
        "corrupt.png": b"\x89PNG\r\n\x1a\nnope",
        "text.jpg": b"hello, not a jpeg",
    }
    for name, data in cases.items():
        p = tmp_path / name
        if data is not None:
            p.write_bytes(data)
        msg = _bad(tmp_path, *_edit_args(tiny_bundle, p, tmp_path))
        assert "image" in msg or name in msg
    trunc = tmp_path / "trunc.png"
    buf = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf)
    trunc.write_bytes(buf.read_bytes()[:300])
    assert "corrupt or truncated" in _bad(tmp_path, *_edit_args(tiny_bundle, trunc, tmp_path))


def test_bad_bundles_and_backends(tiny_bundle, photo_png, tmp_path):
    assert "does not exist" in _bad(tmp_path, *_edit_args(tmp_path / "nope", photo_png, tmp_path))
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, tampered)
    with open(tampered / "onnx" / "vae_decoder.weights", "r+b") as f:
        f.seek(100)
        f.write(b"\x01\x02\x03")
    assert "sha256" in _bad(tmp_path, *_edit_args(tampered, photo_png, tmp_path))
    assert "not available" in _bad(tmp_path, *_edit_args(tiny_bundle, photo_png, tmp_path), "--backend", "tensorrt")
    assert "unknown backend" in _bad(tmp_path, *_edit_args(tiny_bundle, photo_png, tmp_path), "--backend", "magic")


@pytest.mark.parametrize(
    "over, extra, expect",
    [
        ({"--source": ""}, [], "--source is empty"),
        ({"--target": "   "}, [], "--target is empty"),
        ({}, ["--guidance", "40"], "--guidance must be in"),
        ({}, ["--tau", "2"], "--tau must be in"),
        ({}, ["--cross-replace", "-1"], "--cross-replace must be in"),
        ({}, ["--self-replace", "x"], "invalid float value"),
        ({}, ["--seed", "1", "--seed", "2"], "--seed: given twice"),
        ({}, ["--target", "a dog"], "2 --target prompts"),  # repeatable now, but one --out names one file
        ({}, ["--amplify", "dog=3", "--amplify", "dog=5"], "names 'dog' twice"),
        ({"--source": "caf\udcff"}, [], "--source is not valid text"),
        ({}, ["--amplify", "dog"], "WORD=FACTOR"),
        ({}, ["--amplify", "dog=abc"], "not a number"),
        ({}, ["--blend", "cow", "dog"], "not a word"),
        ({}, ["--seed", "-5"], "--seed must be"),
    ],
)
def test_bad_parameters(tiny_bundle, photo_png, tmp_path, over, extra, expect):
    assert expect in _bad(tmp_path, *_edit_args(tiny_bundle, photo_png, tmp_path, **over), *extra)


def test_bad_output_paths(tiny_bundle, photo_png, tmp_path):
    assert "must end in" in _bad(
        tmp_path, *_edit_args(tiny_bundle, photo_png, tmp_path, **{"--out": str(tmp_path / "x.txt")})
    )
    assert "does not exist" in _bad(
        tmp_path, *_edit_args(tiny_bundle, photo_png, tmp_path, **{"--out": str(tmp_path / "no" / "x.png")})
    )


def test_export_bad_options(tmp_path):
    for args, expect in (
        (["--model", "tiny", "--out", str(tmp_path / "b"), "--resolution", "100"], "multiple of 64"),
        (["--model", "tiny", "--out", str(tmp_path / "b"), "--targets", "tensorrt"], "--targets"),
        (["--model", "tiny", "--out", str(tmp_path / "b"), "--opset", "17"], "--opset"),
        (["--model", "tiny", "--out", str(tmp_path / "b"), "--teacher", "x"], "icd-sd15 or icd-sdxl only"),
        (["--model", "tiny", "--out", str(tmp_path / "b"), "--vae", "x"], "--vae applies to SDXL"),
    ):
        proc = run_cli(*args, module="icd_edge.export")
        assert proc.returncode == 2 and expect in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "b").exists()


def test_export_offline_names_the_local_flags(tmp_path):
    proc = run_cli(
        "--model",
        "icd-sd15",
        "--out",
        str(tmp_path / "b"),
        module="icd_edge.export",
        env={"HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "--forward-lora" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "extra",
    [
        ["--target", "  "],
        ["--guidance", "40"],
        ["--tau", "2"],
        ["--amplify", "dog=99"],
        ["--mode", "replace", "--blend", "cat", "cow"],
    ],
)
def test_edit_parameters_fail_before_any_model_runs(tiny_bundle, photo_png, tmp_path, monkeypatch, capsys, extra):
    """Independent of the host's speed: the error comes before a single graph is run."""
    from icd_edge import cli
    from icd_edge.runtimes.ort import OrtBackend

    def no_model(*a, **k):
        raise AssertionError("a graph session was opened before the parameters were checked")

    monkeypatch.setattr(OrtBackend, "open_session", no_model)
    args = _edit_args(tiny_bundle, photo_png, tmp_path, **{"--target": None}) + ["--backend", "onnxruntime"]
    args += extra if extra[0] == "--target" else ["--target", "a photo of a dog", *extra]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("extra", [["--guidance", "-1"], ["--tau", "1.5"]])
def test_reconstruct_parameters_fail_before_any_model_runs(
    tiny_bundle, photo_png, tmp_path, monkeypatch, capsys, extra
):
    from icd_edge import cli
    from icd_edge.runtimes.ort import OrtBackend

    monkeypatch.setattr(OrtBackend, "open_session", lambda *a, **k: pytest.fail("a graph ran before the check"))
    assert (
        cli.main(
            [
                "reconstruct",
                "--bundle",
                str(tiny_bundle),
                "--image",
                str(photo_png),
                "--source",
                "a cat",
                "--out",
                str(tmp_path / "rec.png"),
                "--backend",
                "onnxruntime",
                *extra,
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "rec.png").exists()


def test_doctor_reports_cpu_and_int8_kernels():
    out = run_cli("doctor", check=True).stdout
    assert "cpu: " in out and "class " in out
    assert "int8 on onnxruntime: weights [-64, 64] exact" in out
    rep = json.loads(run_cli("doctor", "--json", check=True).stdout)
    assert rep["backends"]["onnxruntime"]["available"] is True
    assert rep["cpu"]["isa"] and rep["cpu"]["cores"] >= 1
    assert rep["int8_exact"]["onnxruntime"]["64"] is True
    from icd_edge import runtimes

    isa = rep["cpu"]["isa"]
    assert rep["auto"]["isa"] == isa and rep["auto"]["int8_fastest"] == runtimes.INT8_CPU_BACKEND.get(isa, "openvino")
    assert f"auto on this CPU (class {isa}): int8 bundles on {rep['auto']['int8_backend']}" in out


def test_doctor_says_what_auto_opens_a_bundle_with(tiny_bundle, tmp_path):
    rep = json.loads(run_cli("doctor", "--json", "--bundle", str(tiny_bundle), check=True).stdout)
    # the tiny bundle is fp32: onnxruntime in both policies, whatever the CPU
    assert rep["auto"]["bundle"] == {"resident": "onnxruntime", "sequential": "onnxruntime"}
    out = run_cli("doctor", "--bundle", str(tiny_bundle), check=True).stdout
    assert f"auto for {tiny_bundle} (resident): onnxruntime" in out
    proc = run_cli("doctor", "--bundle", str(tmp_path / "missing"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: bundle ") and "Traceback" not in proc.stderr


def test_invalid_utf8_from_argv(tiny_bundle, photo_png, tmp_path):
    """Bytes that are not UTF-8 reach Python as lone surrogates; they are an input error."""
    import os
    import subprocess
    import sys

    args = [os.fsencode(a) for a in _edit_args(tiny_bundle, photo_png, tmp_path)]
    args[args.index(b"--target") + 1] = b"\xff\xfe"
    proc = subprocess.run([os.fsencode(sys.executable), b"-m", b"icd_edge", *args], capture_output=True)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2 and err.startswith("error: --target is not valid text") and "Traceback" not in err, err


def test_help_version_verbosity_json(tiny_bundle, photo_png, tmp_path):
    from icd_edge import __version__

    assert run_cli("--version", check=True).stdout.strip() == f"icd-edge {__version__}"
    for command in ("edit", "invert", "reconstruct", "generate", "inspect", "doctor"):
        text = run_cli(command, "--help", check=True).stdout
        assert "-q, --quiet" in text and "-v, --verbose" in text, command
        if command in ("edit", "generate"):
            assert "(default: 19.0)" in text or "(default: 7.0)" in text
            assert "--json" in text and "--quality" in text
    out = tmp_path / "o.png"
    proc = run_cli(
        "generate",
        "--bundle",
        str(tiny_bundle),
        "--prompt",
        "a dog",
        "--out",
        str(out),
        "--json",
        "-q",
        "--seed",
        "3",
        check=True,
    )
    rep = json.loads(proc.stdout)
    assert rep["wrote"] == str(out) and rep["backend"] in ("onnxruntime", "openvino") and rep["parameters"]["seed"] == 3
    assert set(rep["seconds"]) == {"open", "generate", "save"} and proc.stderr == ""
    proc = run_cli("edit", *_edit_args(tiny_bundle, photo_png, tmp_path)[1:], "--json", "-v", check=True)
    assert json.loads(proc.stdout)["parameters"]["target"] == "a photo of a dog"
    assert run_cli("edit", "-q", *_edit_args(tiny_bundle, photo_png, tmp_path)[1:], check=True).stdout == ""


def test_doctor_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, io, contextlib\nfrom icd_edge.cli import main\nbuf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n    main(['doctor'])\n"
        "print('torch' in sys.modules, 'diffusers' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "False False"


def test_export_argument_errors_before_torch(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys\nfrom icd_edge.export.__main__ import main\nrc = main(sys.argv[1:])\n"
        "print(rc, 'torch' in sys.modules)"
    )
    for args in (
        ["--model", "tiny", "--out", str(tmp_path / "b"), "--resolution", "100"],
        ["--model", "tiny", "--out", str(tmp_path / "b"), "--opset", "17"],
    ):
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
        assert proc.stdout.strip() == "2 False", (proc.stdout, proc.stderr)
        assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("--model", "tiny", "--out", str(tmp_path / "b"), "--bogus", module="icd_edge.export")
    assert proc.returncode == 2 and proc.stderr.startswith("error: unrecognized arguments: --bogus")
