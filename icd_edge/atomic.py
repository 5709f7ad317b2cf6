"""Atomic writes: a reader sees the old file/folder or the new one, never half of one.

Also the pre-flight checks of output locations, the one wording of OS faults the CLI prints, and
scratch folders that a killed process does not leak (the next export sweeps them).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path

SCRATCH_PREFIX = "icd_scratch"


def describe_os_error(exc: OSError) -> str:
    """What went wrong and what to do, in one line, for an OS fault."""
    where = f" ({exc.filename})" if exc.filename else ""
    hint = {
        errno.ENOSPC: "the disk is full: free space or choose a folder on another disk",
        errno.EDQUOT: "the disk quota is exhausted: free space or choose another folder",
        errno.EROFS: "the file system is read-only: choose a writable folder",
        errno.EACCES: "permission denied: choose a folder you can write to, or fix its permissions",
        errno.EPERM: "the operation is not permitted (an immutable file or folder?): choose another path",
        errno.ENAMETOOLONG: "the file name is too long: choose a shorter one",
        errno.EIO: "an input/output error: the disk or network share may be failing",
        errno.ENOMEM: "out of memory: close other programs or use --memory sequential",
    }.get(exc.errno)
    return f"{exc.strerror or exc}{where}" + (f"; {hint}" if hint else "")


def _temp_name_parts(path: Path, suffix: str | None) -> tuple[str, str]:
    # the temporary name must fit the file-name limit whatever the target's length
    return f".{path.name[:48]}.", (suffix or path.suffix or ".tmp")[:16]


def check_output_file(path: str | Path, what: str = "output", need_bytes: int = 0) -> Path:
    """Before any work: the folder exists and takes a new file, the name fits the limit, and the
    disk has ``need_bytes`` free (an upper bound of what will be written)."""
    from icd_edge.errors import OutputError

    path = Path(path)
    try:
        _check_output_file(path, what, need_bytes)
    except OSError as exc:  # a stat of an unreadable folder, an I/O error
        raise OutputError(f"cannot write {what} {path}: {describe_os_error(exc)}") from None
    return path


def _check_output_file(path: Path, what: str, need_bytes: int) -> None:
    from icd_edge.errors import OutputError

    try:
        limit = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    if len(os.fsencode(path.name)) > limit:
        raise OutputError(
            f"{what} name {path.name[:40]}... is {len(os.fsencode(path.name))} bytes; "
            f"this file system allows {limit}: choose a shorter name"
        )
    if not path.parent.is_dir():
        raise OutputError(f"{what} folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file name inside it")
    prefix, suffix = _temp_name_parts(path, None)
    try:  # the only reliable test: create (and remove) a file where the output will be renamed from
        fd, probe = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write {what} {path}: {describe_os_error(exc)}") from None
    if need_bytes:
        st = os.statvfs(path.parent)
        free = st.f_bavail * st.f_frsize
        if free < need_bytes:
            raise OutputError(
                f"the disk is full: {path.parent} has {free} bytes free and {what} {path.name} needs up to "
                f"{need_bytes}; free space or choose a folder on another disk"
            )


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str | None = None):
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    On any exception (a full disk, SIGINT/SIGTERM) the temporary file is removed and ``path`` is
    untouched; OS faults become :class:`~icd_edge.errors.OutputError`.
    """
    from icd_edge.errors import OutputError

    path = Path(path)
    prefix, suffix = _temp_name_parts(path, suffix)
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {describe_os_error(exc)}") from None
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"writing {path} failed: {describe_os_error(exc)}; nothing was written") from None
        raise


@contextlib.contextmanager
def scratch_dir(kind: str):
    """A temporary folder named after this process, removed on exit (also on SIGTERM, which the
    CLIs turn into an exception); after a SIGKILL :func:`sweep_scratch` removes it later."""
    path = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}-{kind}-{os.getpid()}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sweep_scratch(root: str | Path | None = None) -> list[Path]:
    """Remove the scratch folders of processes that no longer run; returns what was removed."""
    removed = []
    for p in Path(root or tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}-*"):
        try:
            pid = int(p.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _alive(pid) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path``.

    The swap is one ``renameat2(RENAME_EXCHANGE)`` on Linux, so ``path`` always holds either the
    previous folder or the complete new one, even if the process is killed at any moment.
    Elsewhere (or on file systems without the call) the previous folder is moved aside and the
    new one renamed in: a kill between the two renames leaves the previous folder at
    ``.<name>.old-<pid>-*``. Temporary folders of dead exports (``.<name>.tmp-<pid>-*``) are
    removed at the next export to the same path; nothing ever reads them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists() and _exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous folder
            return
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{os.getpid()}-", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove_stale(path: Path) -> None:
    """Delete ``.<name>.tmp-<pid>-*`` folders whose exporting process no longer runs."""
    for p in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            pid = int(p.name[len(f".{path.name}.tmp-") :].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
