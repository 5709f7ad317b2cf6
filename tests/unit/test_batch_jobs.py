"""JOBS files of ``icd-edge batch``: parsing and planning without a model (a stand-in editor)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from icd_edge import batch
from icd_edge.errors import InputError

DEFAULTS = dict(
    cross_replace=0.2,
    self_replace=0.2,
    amplify={},
    blend=None,
    guidance=19.0,
    tau=0.8,
    mode="auto",
    seed=0,
    fit="stretch",
    rng="torch",
    decoder="full",
)


def editor(family: str = "sd15"):
    manifest = types.SimpleNamespace(family=family, model="tiny")
    bundle = types.SimpleNamespace(manifest=manifest, bundle_id="abc")
    return types.SimpleNamespace(
        bundle=bundle, check_edit=lambda *a, **k: None, backend=types.SimpleNamespace(name="x")
    )


def test_csv_fields_parse_to_the_api_types(tmp_path):
    (tmp_path / "p.png").write_bytes(b"x")
    jobs = tmp_path / "j.csv"
    jobs.write_text(
        "image,source,target,seed,amplify,blend,self-replace\np.png,a cat,a dog | a fox,7,dog=2 fox=1.5,cat dog,0.5\n"
    )
    (row,) = batch.read_jobs(jobs)
    assert row.id == "0001" and row.line == 2 and row.image == (tmp_path / "p.png").resolve()
    assert row.targets == ("a dog", "a fox")
    assert row.options == {"seed": 7, "amplify": {"dog": 2.0, "fox": 1.5}, "blend": ("cat", "dog"), "self_replace": 0.5}


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "no rows"),
        ('{"image": "p.png", "source": "a", "target": "b", "seed": true}\n', "seed must be a whole number"),
        ('{"image": "p.png", "source": "a", "target": "b", "fit": "zoom"}\n', "fit must be one of"),
        ('{"image": "p.png", "source": "a", "target": "b", "id": "../x"}\n', "id '../x' must be"),
        ('{"image": "p.png", "source": "a", "target": [], "mode": "auto"}\n', "missing target"),
        ("[1, 2]\n", "expected a JSON object"),
    ],
)
def test_jsonl_problems_name_their_line(tmp_path, text, message):
    (tmp_path / "p.png").write_bytes(b"x")
    jobs = tmp_path / "j.jsonl"
    jobs.write_text(text)
    with pytest.raises(InputError, match=message):
        batch.read_jobs(jobs)


def test_plan_skips_nothing_new_and_reports_an_unreadable_photo(tmp_path):
    photo = tmp_path / "p.png"
    photo.write_bytes(b"x")
    ok = batch.Row(1, "a", photo, "a cat", ("a dog", "a fox"), {"seed": 3})
    unreadable = batch.Row(2, "b", tmp_path, "a cat", ("a dog",), {})  # a folder: open() fails
    tasks, problems = batch.plan([ok, unreadable], editor(), DEFAULTS, tmp_path / "out", force=False)
    assert len(problems) == 1 and problems[0].startswith(f"line 2: cannot read {tmp_path}: ")
    (task,) = tasks
    assert (
        task.todo == [0, 1]
        and task.params["seed"] == 3
        and [p.name for _, p in task.outputs] == ["a_a-dog.png", "a_a-fox.png"]
    )
    assert task.params["image_sha256"] == batch.file_sha256(photo) and task.params["blend"] is None


def test_plan_refuses_p2p_fields_on_sdxl(tmp_path):
    photo = tmp_path / "p.png"
    photo.write_bytes(b"x")
    row = batch.Row(4, "a", photo, "a cat", ("a dog",), {"blend": ("cat", "dog")})
    tasks, problems = batch.plan([row], editor("sdxl"), {**DEFAULTS, "tau": None}, tmp_path, force=False)
    assert not tasks and problems[0].startswith("line 4: blend: this SDXL bundle")


def test_slug_and_threads():
    assert batch.slug("A Photo, of a DOG!") == "a-photo-of-a-dog" and batch.slug("!!!") == "target"
    assert batch.threads_per_worker(1000) == 1
    assert Path(batch.ERRORS_FILE).suffix == ".jsonl"
