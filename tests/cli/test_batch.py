"""``icd-edge batch``: a JOBS file of photos and prompts edited into named, resumable outputs;
failing rows recorded without stopping the others; the whole file checked before any work."""

from __future__ import annotations

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

from icd_edge.image import read_metadata


@pytest.fixture
def photos(tmp_path, photo) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(photo).save(folder / "cat.png")
    Image.fromarray(photo[:, ::-1].copy()).save(folder / "cat2.png")
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [
    {
        "image": "cat.png",
        "source": "a photo of a cat",
        "target": ["a photo of a dog", "a photo of a big dog"],
        "blend": ["cat", "dog"],
    },
    {"id": "flip", "image": "cat2.png", "source": "a photo of a cat", "target": "a painting of a cat", "seed": 3},
]


def batch(tiny_bundle, jobs: Path, out: Path, *extra: str, timeout: int = 600):
    return run_cli("batch", str(jobs), "--bundle", str(tiny_bundle), "--out-dir", str(out), *extra, timeout=timeout)


def summary(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_batch_names_outputs_records_parameters_and_resumes(tiny_bundle, photos, tmp_path):
    jobs = write_jsonl(photos / "jobs.jsonl", ROWS)
    out = tmp_path / "out"
    first = batch(tiny_bundle, jobs, out, "--json", "--guidance", "18")
    assert first.returncode == 0, first.stderr
    s = summary(first)
    assert (s["rows"], s["done"], s["skipped"], s["failed"], s["written"]) == (2, 2, 0, 0, 3) and s["errors"] is None
    names = sorted(p.name for p in out.iterdir())
    assert names == ["0001_a-photo-of-a-big-dog.png", "0001_a-photo-of-a-dog.png", "flip_a-painting-of-a-cat.png"]
    meta = read_metadata(out / "flip_a-painting-of-a-cat.png")
    assert meta["command"] == "batch" and meta["row"] == "flip" and meta["seed"] == 3
    assert meta["target"] == "a painting of a cat" and meta["guidance"] == 18.0  # the global flag
    assert meta["blend"] is None and read_metadata(out / "0001_a-photo-of-a-dog.png")["blend"] == ["cat", "dog"]
    assert meta["image"] == str(photos / "cat2.png") and len(meta["image_sha256"]) == 64
    # the two targets of row 1 come from one inversion: an edit of that photo gives the same image
    with_edit = tmp_path / "single.png"
    proc = run_cli(
        "edit",
        "--bundle",
        str(tiny_bundle),
        "--image",
        str(photos / "cat.png"),
        "--source",
        "a photo of a cat",
        "--target",
        "a photo of a dog",
        "--blend",
        "cat",
        "dog",
        "--guidance",
        "18",
        "--out",
        str(with_edit),
    )
    assert proc.returncode == 0, proc.stderr
    a = np.asarray(Image.open(with_edit), dtype=np.int16)
    b = np.asarray(Image.open(out / "0001_a-photo-of-a-dog.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # a rerun does nothing; a changed row is redone alone; --force redoes everything
    again = summary(batch(tiny_bundle, jobs, out, "--json", "--guidance", "18"))
    assert (again["done"], again["skipped"], again["written"]) == (0, 2, 0)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    changed = [ROWS[0], {**ROWS[1], "seed": 4}]
    proc = batch(tiny_bundle, write_jsonl(jobs, changed), out, "--json", "--guidance", "18")
    assert (summary(proc)["done"], summary(proc)["skipped"]) == (1, 1)
    assert read_metadata(out / "flip_a-painting-of-a-cat.png")["seed"] == 4
    assert (out / "0001_a-photo-of-a-dog.png").stat().st_mtime_ns == stamps["0001_a-photo-of-a-dog.png"]
    forced = summary(batch(tiny_bundle, jobs, out, "--json", "--guidance", "18", "--force"))
    assert (forced["done"], forced["written"]) == (2, 3)


def test_a_failing_row_is_recorded_and_the_others_go_on(tiny_bundle, photos, tmp_path):
    rows = [ROWS[0], {"id": "bad", "image": "broken.png", "source": "a photo", "target": "a drawing"}, ROWS[1]]
    jobs = write_jsonl(photos / "jobs.jsonl", rows)
    out = tmp_path / "out"
    proc = batch(tiny_bundle, jobs, out, "--json")
    assert proc.returncode == 3, proc.stderr
    s = summary(proc)
    assert (s["done"], s["failed"], s["written"]) == (2, 1, 3)
    (err,) = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert err["row"] == "bad" and err["line"] == 2 and err["error"] == "ImageError" and "broken.png" in err["message"]
    assert not list(out.glob("bad_*"))
    # fixed photo: the rerun edits that row only, and a run without failures leaves no errors.jsonl
    Image.open(photos / "cat.png").save(photos / "broken.png")
    proc = batch(tiny_bundle, jobs, out, "--json")
    assert proc.returncode == 0 and summary(proc)["done"] == 1 and not (out / "errors.jsonl").exists()


def test_the_whole_jobs_file_is_checked_before_any_work(tiny_bundle, photos, tmp_path):
    lines = [
        json.dumps(ROWS[0]),
        json.dumps({"image": "cat.png", "source": "a cat", "target": "a dog", "strength": 2}),
        "{not json",
        json.dumps({"image": "nowhere.png", "source": "a cat", "target": "a dog"}),
        json.dumps({"image": "cat.png", "source": "a cat", "target": "a dog", "seed": "x"}),
        json.dumps({"id": "0001", "image": "cat.png", "source": "a cat", "target": "a dog"}),
        json.dumps({"image": "cat.png", "source": "a cat"}),
        json.dumps({"image": "cat.png", "source": "a cat", "target": ["a dog", "a  dog!"]}),
    ]
    jobs = photos / "jobs.jsonl"
    jobs.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    proc = batch(tiny_bundle, jobs, out)
    assert proc.returncode == 2
    err = proc.stderr
    assert "7 problems; nothing was run" in err and "Traceback" not in err
    for expected in (
        "line 2: unknown field strength",
        "line 3: not JSON",
        "line 4: image nowhere.png not found",
        "line 5: seed must be a whole number",
        "line 6: id '0001' is used by line 1 too",
        "line 7: missing target",
        "line 8: targets 'a dog' and 'a  dog!' would both write",
    ):
        assert expected in err, (expected, err)
    assert not out.exists()
    # values the editor checks (ranges, blend words) are caught before any work too, with the line
    jobs.write_text(json.dumps({**ROWS[0], "guidance": 99}) + "\n" + json.dumps({**ROWS[1], "blend": "cow dog"}) + "\n")
    proc = batch(tiny_bundle, jobs, out)
    assert proc.returncode == 2 and "line 1: guidance" in proc.stderr and "line 2: blend" in proc.stderr
    assert not out.exists()


def test_csv_jobs_with_several_targets_and_controls(tiny_bundle, photos, tmp_path):
    jobs = photos / "jobs.csv"
    jobs.write_text(
        "id,image,source,target,amplify,blend,cross-replace\n"
        "c1,cat.png,a photo of a cat,a photo of a dog | a photo of a big dog,dog=2;photo=1.5,cat dog,0.3\n"
        "c2,cat2.png,a photo of a cat,a painting of a cat,,,\n"
    )
    out = tmp_path / "out"
    proc = batch(tiny_bundle, jobs, out, "--json")
    assert proc.returncode == 0, proc.stderr
    assert summary(proc)["written"] == 3
    meta = read_metadata(out / "c1_a-photo-of-a-big-dog.png")
    assert meta["amplify"] == {"dog": 2.0, "photo": 1.5} and meta["blend"] == ["cat", "dog"]
    assert meta["cross_replace"] == 0.3 and read_metadata(out / "c2_a-painting-of-a-cat.png")["cross_replace"] == 0.2


def test_two_workers_write_what_one_writes(tiny_bundle, photos, tmp_path):
    jobs = write_jsonl(photos / "jobs.jsonl", ROWS)
    one, two = tmp_path / "one", tmp_path / "two"
    assert batch(tiny_bundle, jobs, one).returncode == 0
    proc = batch(tiny_bundle, jobs, two, "--workers", "2", "--json")
    assert proc.returncode == 0, proc.stderr and summary(proc)["written"] == 3
    for path in one.iterdir():
        a = np.asarray(Image.open(path), dtype=np.int16)
        b = np.asarray(Image.open(two / path.name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, path.name


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stopped_batch_leaves_whole_files_and_a_rerun_finishes_it(tiny_bundle, photos, tmp_path, sig):
    n = 8
    rows = [
        {"id": f"r{i}", "image": "cat.png", "source": "a photo of a cat", "target": "a dog", "seed": i}
        for i in range(n)
    ]
    jobs = write_jsonl(photos / "jobs.jsonl", rows)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "icd_edge", "batch", str(jobs), "--bundle", str(tiny_bundle), "--out-dir", str(out)]
    # the command as a terminal starts it: a shell's background job (how a CI script may run the
    # suite) passes SIGINT on ignored, and Python then keeps ignoring it
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while not list(out.glob("r*.png")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), err
    assert "run the same command again to continue" in err and "Traceback" not in err
    left = sorted(p.name for p in out.iterdir())
    assert left and all(n.startswith("r") and n.endswith(".png") for n in left), left  # no temporary files
    for name in left:
        assert read_metadata(out / name)["command"] == "batch"  # each one whole
    proc = batch(tiny_bundle, jobs, out, "--json")
    assert proc.returncode == 0 and summary(proc)["skipped"] == len(left) and len(list(out.iterdir())) == n


def test_ray_executor_same_rows_resume_and_errors(tiny_bundle, photos, tmp_path):
    """--executor ray on a local Ray instance the command starts (two actors, one editor each):
    the outputs of the local executor, the same errors file, and a rerun skips what is done."""
    pytest.importorskip("ray.data", reason="the ray extra is not installed (pip install 'icd_edge[ray]')")
    rows = [ROWS[0], {"id": "bad", "image": "broken.png", "source": "a photo", "target": "a drawing"}, ROWS[1]]
    jobs = write_jsonl(photos / "jobs.jsonl", rows)
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    assert batch(tiny_bundle, jobs, local).returncode == 3
    env = {"RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"}
    cmd = ["batch", str(jobs), "--bundle", str(tiny_bundle), "--out-dir", str(ray_out), "--json"]
    proc = run_cli(*cmd, "--executor", "ray", "--workers", "2", env=env)
    assert proc.returncode == 3, proc.stderr
    s = summary(proc)
    assert (s["done"], s["failed"], s["written"]) == (2, 1, 3)
    (err,) = [json.loads(line) for line in (ray_out / "errors.jsonl").read_text().splitlines()]
    assert err["row"] == "bad" and err["error"] == "ImageError"
    for path in local.glob("*.png"):
        a = np.asarray(Image.open(path), dtype=np.int16)
        b = np.asarray(Image.open(ray_out / path.name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, path.name
        assert read_metadata(ray_out / path.name)["command"] == "batch"
    again = summary(run_cli(*cmd, "--executor", "ray", env=env))
    assert (again["skipped"], again["written"], again["failed"]) == (2, 0, 1)


def test_p2p_flags_are_refused_on_an_sdxl_bundle(tiny_xl_bundle, photos, tmp_path):
    """SDXL edits switch prompts: a global P2P flag is an error, as it is for `edit`, not ignored."""
    jobs = write_jsonl(photos / "jobs.jsonl", [ROWS[1]])
    proc = batch(tiny_xl_bundle, jobs, tmp_path / "out", "--blend", "cat", "dog")
    assert proc.returncode == 2 and "--blend: this SDXL bundle edits by switching prompts" in proc.stderr
    assert not (tmp_path / "out").exists()
