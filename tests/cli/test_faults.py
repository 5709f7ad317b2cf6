"""Operating-system faults and odd inputs: typed errors, one line, exit 2, nothing left behind.

Real faults where this machine allows them: read-only and full tmpfs mounts (root only), an
unreadable folder for a non-root user, SIGTERM of a real process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_cli
from PIL import Image

from icd_edge.atomic import check_output_file, scratch_dir, sweep_scratch
from icd_edge.errors import ImageError, OutputError
from icd_edge.image import load_image, read_metadata, save_image


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {proc.stderr.strip()[-200:]}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(folder: Path) -> None:
    with contextlib.suppress(OSError), open(folder / "filler", "wb") as f:
        while True:
            f.write(b"\0" * 65536)
            f.flush()


# ----------------------------------------------------------------------------- output locations


def test_read_only_folder_is_refused_before_work(tmp_path):
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        with pytest.raises(OutputError, match="read-only"):
            check_output_file(ro / "out.png")


def test_full_disk_removes_the_temporary_file(tmp_path):
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8))
    with _tmpfs(tmp_path / "full", "size=256k") as full:
        _fill(full)
        (full / "filler").write_bytes(
            b"\0" * ((full / "filler").stat().st_size - 80_000)
        )  # room for the probe, not the PNG
        with pytest.raises(OutputError, match="disk is full"):
            save_image(big, full / "out.png")
        assert sorted(p.name for p in full.iterdir()) == ["filler"]


def test_cli_full_disk_and_read_only(tiny_bundle, photo_png, tmp_path):
    base = ["edit", "--bundle", str(tiny_bundle), "--image", str(photo_png), "--source", "a cat", "--target", "a dog"]
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        assert "read-only" in _one_error_line(run_cli(*base, "--out", str(ro / "o.png")))
    with _tmpfs(tmp_path / "full", "size=128k") as full:
        _fill(full)
        msg = _one_error_line(run_cli(*base, "--out", str(full / "o.png")))
        assert "disk is full" in msg
        assert sorted(p.name for p in full.iterdir()) == ["filler"]


def test_long_output_name(tmp_path):
    img = Image.new("RGB", (8, 8))
    name = "x" * 250 + ".png"  # valid (254 bytes); the old temporary name built from it was not
    save_image(img, tmp_path / name)
    assert (tmp_path / name).is_file() and [p.name for p in tmp_path.iterdir()] == [name]
    with pytest.raises(OutputError, match="shorter"):
        check_output_file(tmp_path / ("y" * 300 + ".png"))


def _without_permission_override() -> list[str]:
    """A command prefix under which permission bits apply: nothing for a normal user; for root,
    setpriv dropping the capabilities that bypass them (root otherwise reads any folder)."""
    import shutil

    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without util-linux's setpriv: cannot make a folder unreadable to this user")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]


def test_unreadable_bundle_image_and_output_folder(tiny_bundle, photo_png, tmp_path):
    prefix = _without_permission_override()
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "manifest.json").write_text("{}")
    img = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(img)
    os.chmod(img, 0o000)
    os.chmod(locked, 0o000)

    def run(*args):
        return subprocess.run(
            [*prefix, sys.executable, "-m", "icd_edge", *args], capture_output=True, text=True, cwd=ROOT
        )

    try:
        assert "permission denied" in _one_error_line(run("inspect", str(locked))).lower()
        assert "bundle" in _one_error_line(
            run(
                "edit",
                "--bundle",
                str(locked / "b"),
                "--image",
                str(photo_png),
                "--source",
                "a cat",
                "--target",
                "a dog",
                "--out",
                str(tmp_path / "o.png"),
            )
        )
        msg = _one_error_line(
            run(
                "edit",
                "--bundle",
                str(tiny_bundle),
                "--image",
                str(img),
                "--source",
                "a cat",
                "--target",
                "a dog",
                "--out",
                str(tmp_path / "o.png"),
            )
        )
        assert "not readable" in msg
        msg = _one_error_line(
            run("generate", "--bundle", str(tiny_bundle), "--prompt", "a dog", "--out", str(locked / "o.png"))
        )
        assert "permission denied" in msg.lower()
    finally:
        os.chmod(locked, 0o755)
        os.chmod(img, 0o644)
    assert not (tmp_path / "o.png").exists() and sorted(p.name for p in locked.iterdir()) == ["manifest.json"]


def test_writing_over_the_input_needs_force(tiny_bundle, photo_png):
    before = photo_png.read_bytes()
    args = [
        "edit",
        "--bundle",
        str(tiny_bundle),
        "--image",
        str(photo_png),
        "--source",
        "a cat",
        "--target",
        "a dog",
        "--out",
        str(photo_png),
    ]
    assert "--force" in _one_error_line(run_cli(*args))
    assert photo_png.read_bytes() == before
    run_cli(*args, "--force", check=True)
    assert photo_png.read_bytes() != before


# ----------------------------------------------------------------------------- signals, scratch


def test_sigterm_inside_atomic_write_removes_the_temporary_file(tmp_path):
    code = f"""
import os, signal, sys, time
from icd_edge.atomic import atomic_file
from icd_edge.cli import _install_signal_handlers
_install_signal_handlers()
try:
    with atomic_file({str(tmp_path / "out.png")!r}) as tmp:
        open(tmp, 'wb').write(b'partial')
        print('writing', flush=True)
        time.sleep(30)
except BaseException as exc:
    print(type(exc).__name__, flush=True)
    raise
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert "Terminated" in out and proc.returncode != 0
    assert list(tmp_path.iterdir()) == []


def test_sigterm_of_a_real_edit_exits_143_and_leaves_nothing(tiny_bundle, photo_png, tmp_path):
    out, previews = tmp_path / "out", tmp_path / "previews"
    out.mkdir()
    previews.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "icd_edge",
            "edit",
            "--bundle",
            str(tiny_bundle),
            "--image",
            str(photo_png),
            "--source",
            "a cat",
            "--target",
            "a dog",
            "--out",
            str(out / "o.png"),
            "--preview",
            str(previews),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not any(previews.glob("step_1_*.png")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # the first preview: the process is inside the edit loop
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the edit finished between its first preview and the signal; nothing was left to interrupt")
    assert proc.returncode == 143 and "Traceback" not in err and "terminated" in err, err
    assert list(out.iterdir()) == []
    assert all(not p.name.startswith(".") for p in previews.iterdir())  # no temporary preview file either


def test_scratch_of_a_dead_process_is_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f"icd_scratch-src-{pid}-abc"
    stale.mkdir()
    (stale / "weights.bin").write_bytes(b"x" * 100)
    live = tmp_path / f"icd_scratch-src-{os.getpid()}-def"
    live.mkdir()
    assert sweep_scratch(tmp_path) == [stale]
    assert not stale.exists() and live.exists()
    with scratch_dir("t") as d:
        assert d.name.startswith(f"icd_scratch-t-{os.getpid()}-")
    assert not d.exists()


def test_killed_export_scratch_is_swept_by_the_next_and_a_failed_gate_publishes_nothing(tmp_path):
    env = {"TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "icd_edge.export",
            "--model",
            "tiny",
            "--out",
            str(tmp_path / "b"),
            "--no-progress",
            "--no-reedit",
            "--parity",
            "none",
        ],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(600):
        if any((tmp_path / "tmp").glob("icd_scratch-*")):
            break
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    assert any((tmp_path / "tmp").glob("icd_scratch-*")), "the export made no scratch folder before it was killed"
    # the next export sweeps it; this one also fails its parity gate (an impossible 200 dB), which
    # publishes nothing and says so in one line: the console shows our lines only (library
    # warnings go to -v)
    proc = run_cli(
        "--model",
        "tiny",
        "--out",
        str(tmp_path / "b"),
        "--no-progress",
        "--no-reedit",
        "--min-psnr",
        "200",
        module="icd_edge.export",
        env=env,
    )
    assert list((tmp_path / "tmp").glob("icd_scratch-*")) == []
    assert proc.returncode == 2 and "gate" in proc.stderr and not (tmp_path / "b").exists()
    assert proc.stdout.strip() == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]


# ----------------------------------------------------------------------------- images


def test_float_and_odd_arrays(tmp_path):
    ramp = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    a = np.asarray(load_image(np.stack([ramp] * 3, -1)))
    b = np.asarray(load_image(np.stack([ramp * 255] * 3, -1)))
    np.testing.assert_array_equal(a, b)
    assert a[0, 0].tolist() == [0, 0, 0] and a[-1, -1].tolist() == [255, 255, 255]
    assert load_image(np.zeros((5, 6, 1), np.uint8)).size == (6, 5)
    assert load_image(np.full((3, 3), 65535, np.uint16)).getpixel((0, 0)) == (255, 255, 255)
    for bad, match in (
        (np.zeros((3, 8, 8), np.uint8), "transpose"),
        (np.zeros((8, 8, 5), np.uint8), "C in 1, 3, 4"),
        (np.full((4, 4, 3), np.inf), "NaN or infinite"),
        (np.full((4, 4, 3), -2.0), r"\[0, 1\]"),
        (np.zeros((4, 4, 3), np.int32), "uint8"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
    ):
        with pytest.raises(ImageError, match=match):
            load_image(bad)
    f_img = Image.fromarray(np.full((4, 4), 0.5, np.float32), "F")
    assert load_image(f_img).getpixel((0, 0)) == (128, 128, 128)
    with pytest.raises(ImageError, match="NaN"):
        load_image(Image.fromarray(np.full((4, 4), np.nan, np.float32), "F"))


def test_bytes_and_file_objects(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (7, 5), (1, 2, 3)).save(buf, "PNG")
    assert load_image(buf.getvalue()).size == (7, 5)
    assert load_image(bytearray(buf.getvalue())).size == (7, 5)
    buf.seek(0)
    assert load_image(buf).size == (7, 5)
    p = tmp_path / "x.png"
    p.write_bytes(buf.getvalue())
    with open(p, "rb") as f:
        assert load_image(f).getpixel((0, 0)) == (1, 2, 3)
    with open(p, encoding="latin-1") as f, pytest.raises(ImageError, match="binary mode"):
        load_image(f)
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"not a picture")
    with pytest.raises(ImageError, match="got int"):
        load_image(3)


def test_metadata_round_trip_and_inspect(tiny_bundle, photo_png, tmp_path):
    for ext in ("png", "jpg", "webp"):
        out = tmp_path / f"o.{ext}"
        run_cli(
            "edit",
            "--bundle",
            str(tiny_bundle),
            "--image",
            str(photo_png),
            "--source",
            "a cat",
            "--target",
            "a dog",
            "--seed",
            "4",
            "--amplify",
            "dog=2",
            "--out",
            str(out),
            *(["--quality", "80"] if ext != "png" else []),
            check=True,
        )
        meta = read_metadata(out)
        assert meta["source"] == "a cat" and meta["target"] == "a dog" and meta["seed"] == 4
        assert meta["amplify"] == {"dog": 2.0} and meta["guidance"] == 19.0 and meta["bundle_id"] and meta["icd_edge"]
        shown = json.loads(run_cli("inspect", str(out), "--json", check=True).stdout)
        assert shown == meta
    assert "--quality" in _one_error_line(
        run_cli(
            "generate",
            "--bundle",
            str(tiny_bundle),
            "--prompt",
            "a dog",
            "--out",
            str(tmp_path / "q.png"),
            "--quality",
            "50",
        )
    )


# ----------------------------------------------------------------------------- editor API


def test_api_prompts_closed_editor_and_nan(tiny_bundle, photo):
    from icd_edge.edit.editor import Editor
    from icd_edge.errors import EditorClosed, InputError, NumericsError
    from icd_edge.runtimes.ort import OrtBackend

    ed = Editor.open(tiny_bundle, backend="onnxruntime")
    with pytest.raises(InputError, match="not valid text"):
        ed.invert(photo, "a photo of a \udcff cat")
    inv = ed.invert(photo, "a cat")
    with pytest.raises(InputError, match="target prompt is not valid text"):
        ed.edit(inv, "a \ud800 dog")
    with pytest.raises(InputError, match="guidance must be a number"):
        ed.check_edit("a cat", "a dog", guidance=True)

    class Nan:  # a backend session that overflowed
        def __init__(self, inner):
            self.inner = inner

        def run(self, feeds):
            out = self.inner.run(feeds)
            return {k: np.full_like(v, np.nan) for k, v in out.items()}

        def close(self):
            self.inner.close()

    ed.close()
    backend = OrtBackend()
    real_open = backend.open_session
    edit_graphs = ("unet_reverse_edit", "unet_reverse_target")
    backend.open_session = lambda b, g: Nan(real_open(b, g)) if g in edit_graphs else real_open(b, g)
    for graph, mode in zip(edit_graphs, ("off", "invert")):  # the batch-2 edit, then a re-edit
        ed = Editor(ed.bundle, backend, source_cache=mode)
        with pytest.raises(NumericsError, match=f"{graph} returned NaN"):
            ed.edit(ed.invert(photo, "a cat"), "a dog")
        ed.close()
    with pytest.raises(EditorClosed, match="closed"):
        ed.edit(inv, "a dog")
    with pytest.raises(EditorClosed):
        ed.invert(photo, "a cat")


def test_immutable_folder(tmp_path):
    folder = tmp_path / "imm"
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("chattr +i is not possible here (needs root and a file system with attributes)")
    try:
        with pytest.raises(OutputError, match="not permitted"):
            check_output_file(folder / "o.png")
    finally:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)


def test_nan_inversion_and_unloadable_graph(tiny_bundle, photo, monkeypatch):
    import dataclasses

    from icd_edge.edit.editor import Editor
    from icd_edge.errors import BundleError, NumericsError
    from icd_edge.runtimes.ort import OrtBackend

    with Editor.open(tiny_bundle, backend="onnxruntime") as ed:
        inv = ed.invert(photo, "a cat")
        bad = dataclasses.replace(inv, latent=np.full_like(inv.latent, np.nan))
        with pytest.raises(NumericsError, match="latent holds NaN"):
            ed.edit(bad, "a dog")

        def fail(*a, **k):
            raise OSError(5, "Input/output error", "unet_reverse.weights")

        monkeypatch.setattr(OrtBackend, "open_session", fail)
        # the inversion holds its source cache: the edit loads the re-edit target graph
        with pytest.raises(BundleError, match="cannot load graph unet_reverse_target.*input/output error"):
            ed.edit(inv, "a dog")
