"""The bundle manifest: the only contract between export and runtime (stdlib + numpy).

A bundle is a folder with ``manifest.json`` plus the files it lists. Every listed file has a
recorded size and sha256; :func:`open_bundle` refuses a bundle whose files do not match, whose
paths escape the folder, or whose schema is newer than this runtime understands.
"""

from __future__ import annotations

import hashlib
import json
import os
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
    if not isinstance(manifest["files"], dict) or not isinstance(manifest["graphs"], dict):
        raise BundleError(f"{mpath} is malformed (files/graphs must be objects); re-export the bundle")
    return manifest


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
    root = Path(root)
    manifest = read_manifest(root, allow_incomplete)
    verify_files(root, manifest["files"], check_hash=verify)
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
