"""The bundle manifest: the only contract between export and runtime (stdlib + numpy).

A bundle is a folder with ``manifest.json`` plus the files it lists. Every listed file has a
recorded size and sha256; :func:`open_bundle` refuses a bundle whose files do not match, whose
paths escape the folder, or whose schema is newer than this runtime understands.

A file is hashed at the first verified open only: its size, mtime, inode and device are then
recorded in ``$ICD_EDGE_CACHE/verified`` (the "verified stamps"), and later opens hash only the
files whose stat or recorded sha256 changed. ``ICD_EDGE_VERIFY=full`` hashes every file at every open.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from icd_edge.bundle.schema import FORMAT, READABLE_VERSIONS, SCHEMA_VERSION, Artifact, FileEntry, Graph, Manifest
from icd_edge.errors import BundleError, OutputError

logger = logging.getLogger(__name__)
MANIFEST = "manifest.json"
# "full": every verified open hashes every file, the verified stamps are not read (still written)
VERIFY_ENV = "ICD_EDGE_VERIFY"
STAMP_SCHEMA = 1
# the errnos for which Path.is_file() says False rather than raising: the file is missing
_MISSING = (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP)


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
        manifest: its typed :class:`~icd_edge.bundle.schema.Manifest`.
    """

    root: Path
    manifest: Manifest

    @property
    def dims(self) -> dict[str, int]:
        return dict(self.manifest.dims)

    @property
    def graphs(self) -> dict[str, Graph]:
        return self.manifest.graphs

    def graph(self, name: str) -> Graph:
        entry = self.graphs.get(name)
        if entry is None:
            raise BundleError(f"bundle {self.root} has no graph {name!r}; re-export it with this icd_edge version")
        return entry

    def path(self, rel: str) -> Path:
        return safe_relpath(self.root, rel)

    def artifact(self, graph: str, fmt: str) -> Artifact | None:
        """A graph's artifact in ``fmt``, or None if the bundle has no such artifact."""
        return self.graph(graph).artifacts.get(fmt)

    def precision(self, graph: str, fmt: str = "onnx") -> str | None:
        art = self.graphs[graph].artifacts.get(fmt) if graph in self.graphs else None
        return None if art is None else art.precision

    def formats(self) -> set[str]:
        return {fmt for g in self.graphs.values() for fmt in g.artifacts}

    def guidance_embedding(self, w: float) -> np.ndarray:
        """The recorded torch-computed embedding for a trained w, else the numpy formula."""
        from icd_edge.schedule import guidance_embedding

        row = self.manifest.guidance.embeddings.get(_w_key(w))
        if row is not None:
            return np.asarray(row, dtype=np.float32)
        return guidance_embedding(w, self.manifest.guidance.dim)

    @property
    def bundle_id(self) -> str:
        """A short id of the bundle content (sha256 over the file table)."""
        table = {k: {"bytes": f.bytes, "sha256": f.sha256} for k, f in self.manifest.files.items()}
        return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()[:16]


def _w_key(w: float) -> str:
    return f"{float(w):g}"


def read_manifest_json(root: str | Path) -> dict:
    """The raw ``manifest.json`` of a bundle folder, its format and version checked."""
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
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{mpath} has no integer schema_version")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"bundle schema version {version} is newer than this icd_edge understands ({SCHEMA_VERSION}); "
            "upgrade icd_edge or re-export the bundle with this version"
        )
    if version not in READABLE_VERSIONS:
        raise BundleError(f"bundle schema version {version} is too old; re-export it with this icd_edge version")
    return manifest


def read_manifest(root: str | Path, allow_incomplete: bool = False) -> Manifest:
    """The typed manifest of a bundle folder (validated; an unfinished export is refused)."""
    root = Path(root)
    raw = read_manifest_json(root)
    manifest = Manifest.from_json(raw, str(root / MANIFEST))
    if not manifest.complete and not allow_incomplete:
        raise BundleError(f"{root} is an unfinished export (its parity checks never completed); re-export the bundle")
    return manifest


def validate_manifest(m: dict, where: str | Path = MANIFEST) -> Manifest:
    """Parse a raw manifest; raises one :class:`BundleError` naming the first offending key."""
    return Manifest.from_json(m, str(where))


def stamp_file(root: str | Path) -> Path:
    """Where the verified stamps of a bundle folder live:
    ``$ICD_EDGE_CACHE/verified/<first 16 hex of sha256(resolved root)>.json``."""
    return _stamp_file(Path(root).resolve())


def _stamp_file(resolved: Path) -> Path:
    from icd_edge.cache import cache_dir

    return cache_dir("verified") / (hashlib.sha256(os.fsencode(resolved)).hexdigest()[:16] + ".json")


def _read_stamps(path: Path, root: Path) -> dict:
    """The ``files`` table of a stamp file; anything unreadable or unexpected is an empty one."""
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: not UTF-8 or not JSON
        logger.debug("ignoring the verified stamps %s: %s", path, exc)
        return {}
    if (
        not isinstance(raw, dict)
        or raw.get("schema") != STAMP_SCHEMA
        or raw.get("root") != str(root)
        or not isinstance(raw.get("files"), dict)
    ):
        logger.debug("ignoring the verified stamps %s: not schema %d stamps of %s", path, STAMP_SCHEMA, root)
        return {}
    return raw["files"]


def _write_stamps(path: Path, root: Path, files: dict) -> None:
    from icd_edge.atomic import write_bytes_atomic

    data = json.dumps({"schema": STAMP_SCHEMA, "root": str(root), "files": files}, indent=1, sort_keys=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data.encode("utf-8"))
    except (OSError, OutputError) as exc:  # a read-only or missing cache only costs the next open a re-hash
        logger.debug("cannot write the verified stamps %s: %s", path, exc)


def verify_files(root: Path, files: dict[str, FileEntry], check_hash: bool = True) -> None:
    """Check that every listed file exists with its recorded size (and sha256).

    With ``check_hash``, a file whose size, mtime, inode and device are those recorded in the
    bundle's verified stamps (:func:`stamp_file`) when it was last hashed with this manifest's
    sha256 is not hashed again; the stamps of newly hashed files are recorded once every file
    passed. ``ICD_EDGE_VERIFY=full`` in the environment hashes every file (stamps are not read).
    The stamps are a cache: an unreadable one is ignored and a failed write only logged (DEBUG).
    """
    stamps: dict = {}
    where = resolved = None
    if check_hash:
        try:
            resolved = Path(root).resolve()
            where = _stamp_file(resolved)
        except (OSError, RuntimeError) as exc:  # a symlink loop, no home folder to hold the cache
            logger.debug("no verified stamps for %s: %s", root, exc)
        if where is not None and os.environ.get(VERIFY_ENV, "").strip().lower() != "full":
            stamps = _read_stamps(where, resolved)
    verified, hashed = {}, False
    for rel, meta in files.items():
        p = safe_relpath(root, rel)
        try:  # the one stat of the file: existence, size and the stamp
            st = p.stat()
        except OSError as exc:
            if exc.errno not in _MISSING:
                raise
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            raise BundleError(f"bundle file {rel} is missing from {root}; re-export the bundle")
        if st.st_size != meta.bytes:
            raise BundleError(
                f"bundle file {rel} has {st.st_size} bytes, the manifest records {meta.bytes}: "
                "it is truncated or was changed; re-export the bundle"
            )
        if not check_hash:
            continue
        # the stat taken before hashing: a file changed while being hashed fails the next comparison
        stamp = {
            "bytes": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "ino": st.st_ino,
            "dev": st.st_dev,
            "sha256": meta.sha256,
        }
        if stamps.get(rel) != stamp:
            if sha256_file(p) != meta.sha256:
                raise BundleError(
                    f"bundle file {rel} does not match its recorded sha256: it was modified; re-export the bundle"
                )
            hashed = True
        verified[rel] = stamp
    if hashed and where is not None:
        _write_stamps(where, resolved, verified)


def open_bundle(root: str | Path, verify: bool = True, allow_incomplete: bool = False) -> Bundle:
    """Read and validate a bundle.

    Args:
        root: the bundle folder.
        verify: also check every file's sha256 (sizes are always checked); a file unchanged since
            an earlier open hashed it is not hashed again (see :func:`verify_files`;
            ``ICD_EDGE_VERIFY=full`` hashes every file).
        allow_incomplete: accept a manifest the export has not marked complete (the export's
            own parity checks only).
    """
    from icd_edge.atomic import describe_os_error

    root = Path(root)
    try:
        manifest = read_manifest(root, allow_incomplete)
        verify_files(root, manifest.files, check_hash=verify)
    except OSError as exc:  # an unreadable folder or file, an I/O error
        raise BundleError(f"cannot read bundle {root}: {describe_os_error(exc)}") from None
    return Bundle(root, manifest)


def file_table(root: Path) -> dict[str, FileEntry]:
    """Size and sha256 of every file under ``root`` except the manifest (posix relative paths)."""
    table = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            table[p.relative_to(root).as_posix()] = FileEntry(p.stat().st_size, sha256_file(p))
    return table


def write_manifest(root: Path, manifest: Manifest) -> None:
    """``root/manifest.json`` in the current schema, written atomically."""
    from icd_edge.atomic import write_bytes_atomic

    write_bytes_atomic(root / MANIFEST, json.dumps(manifest.to_json(), indent=1, sort_keys=False).encode("utf-8"))


def guidance_key(w: float) -> str:
    return _w_key(w)
