"""The bundle manifest: the only contract between export and runtime (stdlib + numpy).

A bundle is a folder with ``manifest.json`` plus the files it lists. Every listed file has a
recorded size and sha256; :func:`open_bundle` refuses a bundle whose files do not match, whose
paths escape the folder, or whose schema is newer than this runtime understands.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from icd_edge.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
FORMAT = "icd_edge.bundle"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def safe_relpath(root: Path, rel: str) -> Path:
    """``root/rel`` for a manifest path; absolute paths and ``..`` escapes are refused."""
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts or "\\" in rel:
        raise BundleError(f"manifest names the file {rel!r}, which is outside the bundle folder; the bundle is invalid")
    return root.joinpath(*p.parts)


@dataclass(frozen=True)
class Bundle:
    """A validated bundle on disk.

    Attributes:
        root: the bundle folder.
        manifest: the parsed ``manifest.json``.
    """

    root: Path
    manifest: dict

    @property
    def dims(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.manifest["dims"].items()}

    @property
    def graphs(self) -> dict:
        return self.manifest["graphs"]

    def path(self, rel: str) -> Path:
        return safe_relpath(self.root, rel)

    def artifact(self, graph: str, fmt: str) -> dict | None:
        """The ``artifacts[fmt]`` entry of a graph, or None if the bundle has no such artifact."""
        entry = self.graphs.get(graph)
        if entry is None:
            raise BundleError(f"bundle {self.root} has no graph {graph!r}; re-export it with this icd_edge version")
        return entry.get("artifacts", {}).get(fmt)

    def formats(self) -> set[str]:
        return {fmt for g in self.graphs.values() for fmt in g.get("artifacts", {})}

    def guidance_embedding(self, w: float) -> np.ndarray:
        """The recorded torch-computed embedding for a trained w, else the numpy formula."""
        from icd_edge.schedule import guidance_embedding

        table = self.manifest["guidance"]["embeddings"]
        key = _w_key(w)
        if key in table:
            return np.asarray(table[key], dtype=np.float32)
        return guidance_embedding(w, int(self.manifest["guidance"]["dim"]))

    @property
    def bundle_id(self) -> str:
        """A short id of the bundle content (sha256 over the file table)."""
        files = json.dumps(self.manifest["files"], sort_keys=True).encode()
        return hashlib.sha256(files).hexdigest()[:16]


def _w_key(w: float) -> str:
    return f"{float(w):g}"


def read_manifest(root: str | Path, allow_incomplete: bool = False) -> dict:
    root = Path(root)
    if not root.exists():
        raise BundleError(f"bundle {root} does not exist; create one with `python -m icd_edge.export --out {root}`")
    if not root.is_dir():
        raise BundleError(f"bundle {root} is not a folder; pass the folder that holds manifest.json")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{root} has no {MANIFEST}: it is not a bundle, or its export did not finish. Re-export it.")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{mpath} is not valid JSON ({exc}); re-export the bundle") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{mpath} is not an icd_edge bundle manifest (format {FORMAT!r} expected)")
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise BundleError(f"{mpath} has no integer schema_version")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"bundle schema version {version} is newer than this icd_edge understands ({SCHEMA_VERSION}); "
            "upgrade icd_edge or re-export the bundle with this version"
        )
    if version < SCHEMA_VERSION:
        raise BundleError(f"bundle schema version {version} is too old; re-export it with this icd_edge version")
    for key in ("dims", "graphs", "files", "schedule", "guidance", "tokenizer", "vae"):
        if key not in manifest:
            raise BundleError(f"{mpath} lacks the {key!r} section; re-export the bundle")
    if manifest.get("complete") is not True and not allow_incomplete:
        raise BundleError(f"{root} is an unfinished export (its parity checks never completed); re-export the bundle")
    validate_manifest(manifest, mpath)
    return manifest


# ----------------------------------------------------------------------------- schema

_SHA256 = re.compile(r"[0-9a-f]{64}")


class _Bad(Exception):
    def __init__(self, key: str, expected: str):
        super().__init__(key, expected)
        self.key, self.expected = key, expected


def _get(d, key: str, path: str):
    if not isinstance(d, dict):
        raise _Bad(path, "an object")
    if key not in d:
        raise _Bad(f"{path}.{key}" if path else key, "present")
    return d[key]


def _num(v, path: str, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
        raise _Bad(path, "a positive number" if positive else "a finite number")
    return float(v)


def _int(v, path: str, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise _Bad(path, f"an integer ≥ {minimum}")
    return v


def _list(v, path: str, length: int | None = None, nonempty: bool = False) -> list:
    if not isinstance(v, list) or (length is not None and len(v) != length) or (nonempty and not v):
        raise _Bad(path, f"a list of {length} items" if length is not None else "a non-empty list" if nonempty else "a list")
    return v


def _str(v, path: str) -> str:
    if not isinstance(v, str) or not v:
        raise _Bad(path, "a non-empty string")
    return v


def _tensor_specs(v, path: str) -> None:
    for i, spec in enumerate(_list(v, path, nonempty=True)):
        _str(_get(spec, "name", f"{path}[{i}]"), f"{path}[{i}].name")
        _str(_get(spec, "dtype", f"{path}[{i}]"), f"{path}[{i}].dtype")
        for j, d in enumerate(_list(_get(spec, "shape", f"{path}[{i}]"), f"{path}[{i}].shape")):
            _int(d, f"{path}[{i}].shape[{j}]", 1)


def validate_manifest(m: dict, where: str | Path = MANIFEST) -> None:
    """Types, required keys and ranges of everything the runtime reads, and every file a graph or
    the tokenizer names present in the file table (so it is size- and hash-checked). Raises one
    :class:`BundleError` naming the first offending key."""
    try:
        _validate(m)
    except _Bad as bad:
        raise BundleError(f"{where}: {bad.key} must be {bad.expected}; the manifest is malformed, re-export the bundle") from None


def _validate(m: dict) -> None:
    files = _get(m, "files", "")
    if not isinstance(files, dict):
        raise _Bad("files", "an object")
    for rel, meta in files.items():
        _int(_get(meta, "bytes", f"files[{rel!r}]"), f"files[{rel!r}].bytes")
        if not isinstance(_get(meta, "sha256", f"files[{rel!r}]"), str) or not _SHA256.fullmatch(meta["sha256"]):
            raise _Bad(f"files[{rel!r}].sha256", "64 lowercase hex digits")

    def listed(rel, path, folder_ok=False):
        _str(rel, path)
        if rel not in files and not (folder_ok and any(k.startswith(rel.rstrip("/") + "/") for k in files)):
            raise _Bad(path, f"a file of the file table (it names {rel!r}, which is not size- and hash-checked)")

    dims = _get(m, "dims", "")
    for key in ("H", "h"):
        _int(_get(dims, key, "dims"), f"dims.{key}", 1)
    for key, value in dims.items():
        _int(value, f"dims.{key}", 1)
    _str(_get(_get(m, "model", ""), "name", "model"), "model.name")
    sched = _get(m, "schedule", "")
    _str(_get(sched, "config", "schedule"), "schedule.config")
    coeff = _get(sched, "coefficients", "schedule")
    table = _get(sched, "alpha_sigma", "schedule")
    if not isinstance(table, dict):
        raise _Bad("schedule.alpha_sigma", "an object")
    for direction in ("forward", "reverse"):
        steps = _list(_get(sched, direction, "schedule"), f"schedule.{direction}", nonempty=True)
        cs = _list(_get(coeff, direction, "schedule.coefficients"), f"schedule.coefficients.{direction}", len(steps))
        for i, (step, c) in enumerate(zip(steps, cs)):
            for j, t in enumerate(_list(step, f"schedule.{direction}[{i}]", 2)):
                _int(t, f"schedule.{direction}[{i}][{j}]")
            for j, v in enumerate(_list(c, f"schedule.coefficients.{direction}[{i}]", 2)):
                _num(v, f"schedule.coefficients.{direction}[{i}][{j}]")
            if direction == "reverse" and str(step[0]) not in table:
                raise _Bad(f"schedule.alpha_sigma[{str(step[0])!r}]", "present (a reverse timestep)")
    for t, pair in table.items():
        for j, v in enumerate(_list(pair, f"schedule.alpha_sigma[{t!r}]", 2)):
            _num(v, f"schedule.alpha_sigma[{t!r}][{j}]")
    for j, v in enumerate(_list(_get(_get(sched, "encoder_start", "schedule"), "alpha_sigma", "schedule.encoder_start"),
                                "schedule.encoder_start.alpha_sigma", 2)):
        _num(v, f"schedule.encoder_start.alpha_sigma[{j}]")
    guidance = _get(m, "guidance", "")
    dim = _int(_get(guidance, "dim", "guidance"), "guidance.dim", 1)
    _num(_get(guidance, "max", "guidance"), "guidance.max")
    emb = _get(guidance, "embeddings", "guidance")
    if not isinstance(emb, dict):
        raise _Bad("guidance.embeddings", "an object")
    for w, row in emb.items():
        for j, v in enumerate(_list(row, f"guidance.embeddings[{w!r}]", dim)):
            _num(v, f"guidance.embeddings[{w!r}][{j}]")
    _num(_get(_get(m, "vae", ""), "scaling_factor", "vae"), "vae.scaling_factor", positive=True)
    _num(_get(_get(m, "p2p", ""), "blend_threshold", "p2p"), "p2p.blend_threshold")
    listed(_get(_get(m, "tokenizer", ""), "file", "tokenizer"), "tokenizer.file")
    graphs = _get(m, "graphs", "")
    if not isinstance(graphs, dict) or not graphs:
        raise _Bad("graphs", "a non-empty object")
    for name, g in graphs.items():
        path = f"graphs.{name}"
        _tensor_specs(_get(g, "inputs", path), f"{path}.inputs")
        _tensor_specs(_get(g, "outputs", path), f"{path}.outputs")
        arts = _get(g, "artifacts", path)
        if not isinstance(arts, dict) or not arts:
            raise _Bad(f"{path}.artifacts", "a non-empty object")
        for fmt, art in arts.items():
            apath = f"{path}.artifacts.{fmt}"
            if not isinstance(art, dict):
                raise _Bad(apath, "an object")
            for key in ("file", "weights"):
                if art.get(key) is not None:  # a Core ML package is a folder of listed files
                    listed(art[key], f"{apath}.{key}", folder_ok=key == "file")
            if art.get("dir") is not None:
                prefix = _str(art["dir"], f"{apath}.dir").rstrip("/") + "/"
                if not any(rel.startswith(prefix) for rel in files):
                    raise _Bad(f"{apath}.dir", "a folder holding files of the file table")
    scheme = m.get("int8_scheme")
    if scheme is not None:
        _int(_get(scheme, "weight_max", "int8_scheme"), "int8_scheme.weight_max", 1)


def verify_files(root: Path, files: dict, check_hash: bool = True) -> None:
    """Check that every listed file exists with its recorded size (and sha256)."""
    for rel, meta in files.items():
        p = safe_relpath(root, rel)
        if not isinstance(meta, dict) or not isinstance(meta.get("bytes"), int) or not isinstance(meta.get("sha256"), str):
            raise BundleError(f"manifest entry for {rel} is malformed; re-export the bundle")
        if not p.is_file():
            raise BundleError(f"bundle file {rel} is missing from {root}; re-export the bundle")
        size = p.stat().st_size
        if size != meta["bytes"]:
            raise BundleError(
                f"bundle file {rel} has {size} bytes, the manifest records {meta['bytes']}: "
                "it is truncated or was changed; re-export the bundle"
            )
        if check_hash and sha256_file(p) != meta["sha256"]:
            raise BundleError(f"bundle file {rel} does not match its recorded sha256: it was modified; re-export the bundle")


def open_bundle(root: str | Path, verify: bool = True, allow_incomplete: bool = False) -> Bundle:
    """Read and validate a bundle.

    Args:
        root: the bundle folder.
        verify: also hash every file (sizes are always checked).
        allow_incomplete: accept a manifest the export has not marked complete (the export's
            own parity checks only).
    """
    from icd_edge.atomic import describe_os_error

    root = Path(root)
    try:
        manifest = read_manifest(root, allow_incomplete)
        verify_files(root, manifest["files"], check_hash=verify)
    except OSError as exc:  # an unreadable folder or file, an I/O error
        raise BundleError(f"cannot read bundle {root}: {describe_os_error(exc)}") from None
    return Bundle(root, manifest)


def file_table(root: Path) -> dict:
    """Size and sha256 of every file under ``root`` except the manifest (posix relative paths)."""
    table = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(root).as_posix()
            table[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return table


def write_manifest(root: Path, manifest: dict) -> None:
    from icd_edge.atomic import write_bytes_atomic

    manifest = dict(manifest)
    manifest["schema_version"] = SCHEMA_VERSION
    manifest["format"] = FORMAT
    write_bytes_atomic(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=False).encode("utf-8"))


def guidance_key(w: float) -> str:
    return _w_key(w)
