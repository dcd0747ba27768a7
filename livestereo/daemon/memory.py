"""Keep the daemon's resident memory flat over long series (glibc malloc).

A long in-situ series allocates and frees the same large arrays again and again: virtual
images per scan, snapshots, the networks' tensors for bands of varying height. glibc keeps
freed heap pages instead of returning them, and gives every thread its own arena, so
resident memory creeps up scan after scan. The daemon caps the arenas at start
(:func:`tune_malloc`) and hands free heap pages back after each finished scan
(:func:`release_free_memory`, from the results writer, off the ingest thread). Forcing
large blocks to be mapped instead (a fixed mmap threshold) also keeps memory flat, but costs
a page fault per page of every received message: ingest ran at half speed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger("livestereo.memory")

_M_ARENA_MAX = -8
_libc = None


def _glibc():
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                lib.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
                lib.malloc_trim.argtypes = (ctypes.c_size_t,)
                _libc = lib
            except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
                pass
    return _libc or None


def tune_malloc(arena_max: int = 4) -> bool:
    """Cap glibc's malloc arenas (glibc on Linux only); True when applied."""
    lib = _glibc()
    return bool(lib is not None and lib.mallopt(_M_ARENA_MAX, int(arena_max)))


def release_free_memory() -> bool:
    """Return free heap pages to the system (``malloc_trim(0)``); True when some were."""
    lib = _glibc()
    return bool(lib is not None and lib.malloc_trim(0))
