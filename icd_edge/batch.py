"""Batch editing of a photo collection (``icd-edge batch``).

A JOBS file (JSON Lines or CSV) has one row per photo: its source prompt, one or more target
prompts and optional per-row controls. Each photo is inverted once and all its targets are edited
from that inversion (through the source cache where the bundle has one). Outputs are named
``{row_id}_{target_slug}.png``, carry their parameters in the file's metadata and are written
atomically; a rerun skips outputs whose recorded parameters match. A failing row is recorded in
``errors.jsonl`` and the others go on. The whole file is checked before any work.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import time
from pathlib import Path

from icd_edge.edit.p2p import MODES
from icd_edge.errors import IcdEdgeError, InputError, Terminated
from icd_edge.image import FITS
from icd_edge.outputs import metadata, slug

ERRORS_FILE = "errors.jsonl"
EXIT_SOME_FAILED = 3
# per-row fields: the edit flags' names (dashes or underscores), plus the row's photo and prompts
FLOATS = ("cross_replace", "self_replace", "guidance", "tau")
COLUMNS = ("id", "image", "source", "target", "seed", "fit", "mode", "amplify", "blend", *FLOATS)
REQUIRED = ("image", "source", "target")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_PROBLEMS = 20  # listed in one error; the rest are counted


@dataclasses.dataclass(frozen=True)
class Row:
    """One photo of a JOBS file: ``line`` is its line in the file (1-based; CSV counts the header)."""

    line: int
    id: str
    image: Path
    source: str
    targets: tuple[str, ...]
    options: dict  # the row's own values (seed, fit, mode, amplify, blend, cross_replace, ...)


# ----------------------------------------------------------------------------- reading JOBS
def read_jobs(path: str | Path) -> list[Row]:
    """Every row of a JOBS file, checked (fields, types, photos on disk, unique ids and output
    names); one :class:`InputError` lists every problem with its line number."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"JOBS file {path} does not exist; give a .jsonl or .csv file with one row per photo")
    kind = path.suffix.lower()
    if kind not in (".jsonl", ".csv"):
        raise InputError(
            f"JOBS file {path.name}: expected a .jsonl (JSON Lines) or .csv file, got {kind or 'no suffix'}"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"JOBS file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    problems: list[str] = []
    records = _jsonl_records(text, problems) if kind == ".jsonl" else _csv_records(text, problems)
    rows: list[Row] = []
    seen: dict[str, int] = {}
    for n, (line, record) in enumerate(records, 1):
        row = _row(path.parent, n, line, record, kind == ".csv", problems)
        if row is None:
            continue
        if row.id in seen:
            problems.append(f"line {line}: id {row.id!r} is used by line {seen[row.id]} too; ids name the outputs")
            continue
        seen[row.id] = line
        rows.append(row)
    if not records and not problems:
        problems.append("no rows (one photo per line, with image, source and target)")
    if problems:
        shown = problems[:MAX_PROBLEMS]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise InputError(
            f"JOBS file {path} has {len(problems)} problem{'s' * (len(problems) > 1)}; nothing was run:\n  "
            + "\n  ".join(shown)
            + more
        )
    return rows


def _jsonl_records(text: str, problems: list[str]) -> list[tuple[int, dict]]:
    out = []
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            problems.append(f"line {line}: not JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(record, dict):
            problems.append(f"line {line}: expected a JSON object, got {type(record).__name__}")
            continue
        out.append((line, record))
    return out


def _csv_records(text: str, problems: list[str]) -> list[tuple[int, dict]]:
    reader = csv.reader(text.splitlines())
    try:
        header = next(reader)
    except StopIteration:
        return []
    names = [h.strip() for h in header]
    out = []
    for line, values in enumerate(reader, 2):
        if not any(v.strip() for v in values):
            continue
        if len(values) > len(names):
            problems.append(f"line {line}: {len(values)} fields, the header has {len(names)}")
            continue
        out.append((line, {k: v for k, v in zip(names, values) if v.strip() != ""}))
    return out


def _row(folder: Path, n: int, line: int, record: dict, from_csv: bool, problems: list[str]) -> Row | None:
    fields = {k.replace("-", "_"): v for k, v in record.items()}
    if "targets" in fields and "target" not in fields:
        fields["target"] = fields.pop("targets")
    before = len(problems)
    unknown = sorted(set(fields) - set(COLUMNS))
    if unknown:
        problems.append(
            f"line {line}: unknown field{'s' * (len(unknown) > 1)} {', '.join(unknown)}; known: {', '.join(COLUMNS)}"
        )
    missing = [k for k in REQUIRED if fields.get(k) in (None, "", [])]
    if missing:
        problems.append(f"line {line}: missing {', '.join(missing)}")
    if len(problems) > before:
        return None

    def bad(msg: str) -> None:
        problems.append(f"line {line}: {msg}")

    row_id = str(fields.get("id", f"{n:04d}")).strip()
    if not _ID.match(row_id):
        bad(f"id {row_id!r} must be 1-64 letters, digits, '.', '_' or '-' (it names the output files)")
    image = fields["image"]
    if not isinstance(image, str):
        bad(f"image must be a file path, got {image!r}")
        return None
    image_path = (folder / Path(image).expanduser()).resolve()
    if not image_path.is_file():
        bad(f"image {image} not found (relative paths are read from the JOBS file's folder, {folder})")
    source = fields["source"]
    if not isinstance(source, str) or not source.strip():
        bad("source must be a prompt (text)")
    targets = _targets(fields["target"], from_csv)
    if targets is None:
        bad("target must be a prompt, or several (a JSON list; in CSV separated by '|')")
        targets = ()
    slugs: dict[str, str] = {}
    for t in targets:
        if slug(t) in slugs:
            bad(f"targets {slugs[slug(t)]!r} and {t!r} would both write {row_id}_{slug(t)}.png; make them differ")
        slugs[slug(t)] = t
    options = {}
    for key in FLOATS:
        if key in fields:
            value = _number(fields[key], float)
            if value is None:
                bad(f"{key} must be a number, got {fields[key]!r}")
            options[key] = value
    if "seed" in fields:
        seed = _number(fields["seed"], int)
        if seed is None or seed < 0:
            bad(f"seed must be a whole number >= 0, got {fields['seed']!r}")
        options["seed"] = seed
    for key, choices in (("fit", FITS), ("mode", MODES)):
        if key in fields:
            if fields[key] not in choices:
                bad(f"{key} must be one of {', '.join(choices)}, got {fields[key]!r}")
            options[key] = fields[key]
    if "amplify" in fields:
        amplify = _amplify(fields["amplify"])
        if amplify is None:
            bad(f"amplify takes WORD=F pairs ({{'dog': 2}} in JSON, 'dog=2;hat=1.5' in CSV), got {fields['amplify']!r}")
        options["amplify"] = amplify
    if "blend" in fields:
        blend = fields["blend"].split() if isinstance(fields["blend"], str) else fields["blend"]
        if not (isinstance(blend, list) and len(blend) == 2 and all(isinstance(w, str) and w for w in blend)):
            bad(f"blend takes two words, a source and a target word ('cat dog'), got {fields['blend']!r}")
        options["blend"] = tuple(blend) if isinstance(blend, list) else blend
    if len(problems) > before:
        return None
    return Row(line, row_id, image_path, source, tuple(targets), options)


def _targets(value, from_csv: bool) -> tuple[str, ...] | None:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split("|")] if from_csv else [value]
    elif isinstance(value, list):
        parts = value
    else:
        return None
    if not parts or not all(isinstance(p, str) and p.strip() for p in parts):
        return None
    return tuple(parts)


def _number(value, kind):
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and (kind is float or float(value).is_integer()):
        return kind(value)
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            return None
    return None


def _amplify(value) -> dict[str, float] | None:
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, str):
        items = []
        for part in re.split(r"[;\s]+", value.strip()):
            word, eq, f = part.partition("=")
            if not eq:
                return None
            items.append((word, f))
    else:
        return None
    out = {}
    for word, f in items:
        number = _number(f, float)
        if not isinstance(word, str) or not word or number is None:
            return None
        out[word] = number
    return out


# ----------------------------------------------------------------------------- planning
@dataclasses.dataclass
class Task:
    """One row's work: what to edit, where each output goes, and the metadata it records."""

    row: Row
    controls: dict
    outputs: list[tuple[str, Path]]  # (target, path)
    params: dict  # what an output records and what a rerun compares (besides the target)
    todo: list[int]  # indices of the outputs still to write


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def plan(rows: list[Row], ed, defaults: dict, out_dir: Path, force: bool) -> tuple[list[Task], list[str]]:
    """The tasks of every row (controls = the global defaults overridden by the row's own), each
    control checked by the editor now; outputs whose recorded parameters match are left out
    unless ``force``. Returns the tasks and the problems (``line N: ...``)."""
    sdxl = ed.bundle.manifest.family == "sdxl"
    p2p = ("cross_replace", "self_replace", "amplify", "blend", "mode")
    tasks, problems = [], []
    for row in rows:
        opts = {**defaults, **row.options}
        given = [k for k in p2p if k in row.options]
        if sdxl and given:
            problems.append(
                f"line {row.line}: {', '.join(given)}: this SDXL bundle edits by switching prompts (no P2P)"
            )
            continue
        if opts.get("tau") is None:  # the family's default dynamic guidance
            opts["tau"] = 0.7 if sdxl else 0.8
        if sdxl:
            controls = {"guidance": opts["guidance"], "tau": opts["tau"]}
        else:
            controls = {
                k: opts[k] for k in ("cross_replace", "self_replace", "amplify", "blend", "guidance", "tau", "mode")
            }
        try:
            for target in row.targets:
                ed.check_edit(row.source, target, **controls)
        except IcdEdgeError as exc:
            problems.append(f"line {row.line}: {exc}")
            continue
        try:
            digest = file_sha256(row.image)
        except OSError as exc:
            from icd_edge.atomic import describe_os_error

            problems.append(f"line {row.line}: cannot read {row.image}: {describe_os_error(exc)}")
            continue
        params = {
            "row": row.id,
            "image": str(row.image),
            "image_sha256": digest,
            "source": row.source,
            "seed": opts["seed"],
            "rng": opts["rng"],
            "fit": opts["fit"],
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in controls.items()},
            "decoder": opts["decoder"],
        }
        outputs = [(t, out_dir / f"{row.id}_{slug(t)}.png") for t in row.targets]
        todo = [i for i, (t, p) in enumerate(outputs) if force or not _matches(_existing(p), ed, params, t)]
        tasks.append(Task(row, controls, outputs, params, todo))
    return tasks, problems


def _existing(path: Path) -> dict | None:
    """The parameters an earlier run recorded in ``path`` (None: no such file, or unreadable)."""
    from icd_edge.image import read_metadata

    if not path.is_file():
        return None
    try:
        return read_metadata(path)
    except IcdEdgeError:  # unreadable: redo it
        return None


def _matches(meta: dict | None, ed, params: dict, target: str) -> bool:
    if meta is None or meta.get("bundle_id") != ed.bundle.bundle_id:
        return False
    want = json.loads(json.dumps({**params, "target": target}))
    return all(meta.get(k) == v for k, v in want.items())


# ----------------------------------------------------------------------------- running
def run_task(ed, task: Task) -> list[str]:
    """Invert the row's photo once, edit its remaining targets from that inversion, write each
    output atomically; returns the paths written."""
    from icd_edge.atomic import atomic_file
    from icd_edge.image import load_image, save_image

    photo = load_image(task.row.image)
    p = task.params
    inv = ed.invert(photo, task.row.source, seed=p["seed"], fit=p["fit"], rng=p["rng"])
    targets = [task.outputs[i][0] for i in task.todo]
    if len(targets) > 1:
        images = ed.edit_many(inv, targets, **task.controls)
    else:
        images = [ed.edit(inv, targets[0], **task.controls)]
    written = []
    for i, img in zip(task.todo, images):
        target, path = task.outputs[i]
        with atomic_file(path) as tmp:
            save_image(img, tmp, metadata=metadata(ed, "batch", **task.params, target=target))
        written.append(str(path))
    return written


def attempt(ed, task: Task) -> tuple[list[str], dict | None]:
    """:func:`run_task`, with a failure turned into its ``errors.jsonl`` record: a row's failure
    is recorded and the other rows go on (Ctrl-C and SIGTERM still stop the batch)."""
    try:
        return run_task(ed, task), None
    except Exception as exc:
        return [], error_record(task, exc)


def error_record(task: Task, exc: BaseException) -> dict:
    return {
        "row": task.row.id,
        "line": task.row.line,
        "image": str(task.row.image),
        "error": type(exc).__name__,
        "message": str(exc),
    }


class ErrorLog:
    """``errors.jsonl`` of this run: created at the first failure (a run without failures leaves
    none; the previous run's file is removed when this one starts), one line each, flushed."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / ERRORS_FILE
        self.path.unlink(missing_ok=True)
        self.count = 0

    def add(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += 1


_WORKER_EDITOR = None


def _worker_init(open_kwargs: dict) -> None:
    """Each worker process: SIGTERM unwinds (temporary files removed), Ctrl-C is the parent's to
    handle, and one editor for the worker's life."""
    import signal

    from icd_edge.edit.editor import Editor
    from icd_edge.errors import Terminated

    def on_term(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _WORKER_EDITOR
    _WORKER_EDITOR = Editor.open(**open_kwargs)


def _worker_run(task: Task) -> tuple[list[str], dict | None]:
    return attempt(_WORKER_EDITOR, task)


@dataclasses.dataclass
class Summary:
    rows: int
    done: int = 0
    skipped: int = 0
    failed: int = 0
    written: int = 0
    seconds: float = 0.0
    interrupted: str | None = None  # "SIGINT" or "SIGTERM": the run stopped early

    def as_dict(self, out_dir: Path, errors: ErrorLog) -> dict:
        edits = self.written
        return {
            **dataclasses.asdict(self),
            "out_dir": str(out_dir),
            "errors": str(errors.path) if errors.count else None,
            "edits_per_minute": round(60 * edits / self.seconds, 2) if self.seconds and edits else None,
        }


def run(
    tasks: list[Task],
    ed,
    out_dir: Path,
    workers: int,
    open_kwargs: dict,
    bar,
    executor: str = "local",
    num_gpus: float = 0,
) -> tuple[Summary, ErrorLog]:
    """Every task: in this process (``workers`` 1, with ``ed``), in ``workers`` processes each
    with its own editor, or (``executor="ray"``) on Ray actors. Ctrl-C stops after the outputs
    written so far (all complete files)."""
    summary = Summary(rows=len(tasks))
    errors = ErrorLog(out_dir)
    pending = [t for t in tasks if t.todo]
    summary.skipped = len(tasks) - len(pending)
    bar.update(summary.skipped)
    t0 = time.perf_counter()

    def record(task, written, err):
        if err is None:
            summary.done += 1
            summary.written += len(written)
        else:
            summary.failed += 1
            errors.add(err)
        bar.set_postfix(done=summary.done + summary.skipped, failed=summary.failed, refresh=False)
        bar.update(1)

    try:
        if executor == "ray":
            run_ray(pending, open_kwargs, workers, num_gpus, record)
        elif workers <= 1:
            for task in pending:
                record(task, *attempt(ed, task))
        else:
            _run_pool(pending, workers, open_kwargs, record)
    except KeyboardInterrupt:
        summary.interrupted = "SIGINT"
    except Terminated:
        summary.interrupted = "SIGTERM"
    summary.seconds = round(time.perf_counter() - t0, 2)
    return summary, errors


def _run_pool(tasks: list[Task], workers: int, open_kwargs: dict, record) -> None:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("spawn")  # no forked copy of this process's sessions
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init, initargs=(open_kwargs,))
    try:
        futures = {pool.submit(_worker_run, t): t for t in tasks}
        left = set(futures)
        while left:
            done, left = wait(left, return_when=FIRST_COMPLETED)
            for fut in done:
                try:
                    written, err = fut.result()
                except BrokenProcessPool:
                    raise IcdEdgeError(
                        "a batch worker process died (out of memory, or killed from outside); the rows finished "
                        "so far are written: run the command again to continue, with fewer --workers if memory "
                        "is short"
                    ) from None
                record(futures[fut], written, err)
    except BaseException:
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()  # SIGTERM: each worker unwinds and removes its temporary file
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def on_gpu(ed) -> bool:
    """Whether the editor's backend runs on a GPU (TensorRT, onnxruntime's CUDA provider): Ray
    then gives each actor a GPU."""
    name = ed.backend.name
    if name == "tensorrt":
        return True
    if name == "onnxruntime":
        import onnxruntime as ort

        from icd_edge.runtimes.ort import choose_providers, cuda

        return choose_providers(ort.get_available_providers())[0] == cuda.PROVIDER
    return False


def threads_per_worker(workers: int) -> int:
    """Cores per worker process (at least one): N editors on one machine share its cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


# ----------------------------------------------------------------------------- Ray
class _EditActor:
    """A Ray Data actor: one editor for the actor's life, one planned task per call."""

    def __init__(self, open_kwargs: dict):
        from icd_edge.edit.editor import Editor

        self.ed = Editor.open(**open_kwargs)

    def __call__(self, batch: dict) -> dict:
        import pickle

        rows, written, errors = [], [], []
        for blob in batch["task"]:
            task = pickle.loads(blob)
            done, err = attempt(self.ed, task)
            rows.append(task.row.id)
            written.append(json.dumps(done))
            errors.append(json.dumps(err) if err else "")
        return {"row": rows, "written": written, "error": errors}


def run_ray(tasks: list[Task], open_kwargs: dict, workers: int, num_gpus: float, record) -> None:
    """The tasks on a Ray cluster (``RAY_ADDRESS``, or a local instance): a Ray Data dataset of
    the planned tasks mapped by ``workers`` actors, each holding one editor (``num_gpus`` each
    on a GPU backend). Photos and the output folder must be at the same paths on every node
    (a shared file system). Results stream back as rows finish."""
    import pickle

    try:
        import ray
    except ImportError:
        from icd_edge.errors import BackendUnavailable

        raise BackendUnavailable("--executor ray needs Ray Data: pip install 'icd_edge[ray]'") from None
    import logging

    started = not ray.is_initialized()
    if started:
        ray.init(
            address=os.environ.get("RAY_ADDRESS") or None,
            log_to_driver=False,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    # the batch draws its own progress bar: Ray Data's bars and execution logs stay quiet
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    by_id = {t.row.id: t for t in tasks}
    try:
        ds = ray.data.from_items([{"task": pickle.dumps(t)} for t in tasks])
        out = ds.map_batches(
            _EditActor,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_gpus=num_gpus or None,
            fn_constructor_kwargs={"open_kwargs": open_kwargs},
            batch_format="numpy",
        )
        for item in out.iter_rows():
            err = item["error"]
            record(by_id[str(item["row"])], json.loads(item["written"]), json.loads(err) if err else None)
    finally:
        if started:
            ray.shutdown()
