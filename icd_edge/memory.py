"""Process memory: giving freed heap back to the OS between large graphs (export and runtime)."""

from __future__ import annotations


def trim_heap() -> None:
    """Give freed heap memory back to the OS: glibc keeps freed chunks below its mmap threshold in
    the process, and the next graph would sit on top of what a closed session left. No-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
