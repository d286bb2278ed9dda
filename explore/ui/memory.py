"""Hand the memory a finished run freed back to the system: glibc otherwise keeps it per thread arena."""
from __future__ import annotations

import ctypes
import ctypes.util

M_ARENA_MAX = -8  # mallopt parameter number in glibc's malloc.h


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def limit_arenas(count: int = 2) -> bool:
    """At most `count` malloc arenas for threads created from now on (call before the server starts)."""
    mallopt = getattr(_LIBC, "mallopt", None)
    return bool(mallopt(M_ARENA_MAX, count)) if mallopt is not None else False


def release_memory() -> bool:
    """Return the heap pages a finished run freed to the system; a no-op without glibc."""
    trim = getattr(_LIBC, "malloc_trim", None)
    return bool(trim(0)) if trim is not None else False

