"""A latest-wins slot: a writer never waits, a reader always gets the newest item.

Used for every edge downstream of accumulation (snapshots to inference, results to the
view), so a slow consumer skips stale items instead of slowing ingest (like streamz'
``latest``).
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class Latest(Generic[T]):
    """Holds at most one item; ``put`` replaces it, ``get`` waits for a newer one."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: T | None = None
        self._version = 0
        self._closed = False
        self._restored = False
        self.replaced = 0
        """Items overwritten before anyone took them (skipped as stale)."""

    def put(self, item: T) -> None:
        with self._cond:
            if self._item is not None and not self._restored:
                self.replaced += 1
            self._item = item
            self._restored = False
            self._version += 1
            self._cond.notify_all()

    def restore(self, item: T) -> bool:
        """Put back an item that was taken but could not be used yet, unless a newer one
        has arrived meanwhile (then that one wins and this returns False). A restored item
        replaced later is not counted in ``replaced`` again."""
        with self._cond:
            if self._item is not None or self._closed:
                return False
            self._item = item
            self._restored = True
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None = None) -> T | None:
        """The newest item not yet taken, waiting up to ``timeout`` s; None on timeout or close."""
        with self._cond:
            if self._item is None and not self._closed:
                self._cond.wait_for(lambda: self._item is not None or self._closed, timeout)
            item, self._item = self._item, None
            return item

    def peek(self) -> T | None:
        with self._cond:
            return self._item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed
