"""Keep the daemon's resident memory flat over long series (glibc malloc).

A long in-situ series allocates and frees the same large arrays again and again: virtual
images per scan, snapshots, the networks' tensors for bands of varying height. glibc keeps
freed heap pages instead of returning them, and gives every thread its own arena, so
resident memory creeps up scan after scan. The daemon caps the arenas at start
(:func:`tune_malloc`) and hands free heap pages back after each finished scan
(:func:`release_free_memory`, from the results writer, off the ingest thread). Forcing
large blocks to be mapped instead (a low fixed mmap threshold) also keeps memory flat, but
costs a page fault per page of every received message: ingest ran at half speed.

For the same reason :func:`tune_malloc` keeps glibc from returning memory on its own, inside
``free``: a batched frames message (8 MB for 64 frames of 256x256 uint16) is allocated by
ZeroMQ's IO thread and freed by the ingest thread, and with glibc's defaults the first ones
are ``munmap``-ed and later ones trimmed from the thread's heap by ``madvise`` whenever the
free space at its top passes the trim threshold. Each of those calls zaps thousands of pages
(milliseconds on the ingest thread), and the IO thread faults them all in again for the next
message. With messages served from the arenas and no automatic trimming, the pages stay
mapped and are reused; :func:`release_free_memory` still hands free pages back after
finished scans, at most every few seconds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger("livestereo.memory")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

MMAP_THRESHOLD = 32 << 20
"""Blocks from this size (bytes) are mapped, smaller ones come from the arenas: glibc's
largest allowed value on 64-bit, above a batched frames message."""
TRIM_THRESHOLD = 1 << 30
"""Free space (bytes) at the top of a heap beyond which ``free`` itself trims it: in effect
never; :func:`release_free_memory` does it."""
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
    """Cap glibc's malloc arenas at ``arena_max``, serve blocks below :data:`MMAP_THRESHOLD`
    from them and stop ``free`` from trimming (glibc on Linux only); True when applied."""
    lib = _glibc()
    if lib is None:
        return False
    return all([lib.mallopt(_M_ARENA_MAX, int(arena_max)), lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                lib.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)])


def release_free_memory() -> bool:
    """Return free heap pages to the system (``malloc_trim(0)``); True when some were."""
    lib = _glibc()
    return bool(lib is not None and lib.malloc_trim(0))
