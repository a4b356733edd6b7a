"""A small thread-safe TTL cache: page callbacks run in parallel and often need the same read."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


class TTLCache:
    """A small thread-safe cache whose entries expire after ``ttl_s`` (errors are never cached)."""

    def __init__(self, ttl_s: float, max_entries: int = 128) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._key_locks: dict[Hashable, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(
        self, key: Hashable, compute: Callable[[], T], ttl_s: float | Callable[[T], float] | None = None
    ) -> T:
        """The cached value of ``key``; computed when missing or expired, once even if asked concurrently.

        ``ttl_s`` overrides the default lifetime; a callable decides it from the computed value.
        """
        hit = self._fresh(key)
        if hit is not None:
            return hit[1]
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            hit = self._fresh(key)
            if hit is not None:
                return hit[1]
            value = compute()
            ttl = self.ttl_s if ttl_s is None else ttl_s
            if callable(ttl):
                ttl = ttl(value)
            self._store(key, ttl, value)
        return value

    def _store(self, key: Hashable, ttl: float, value: Any) -> None:
        with self._lock:
            self._entries[key] = (time.monotonic() + ttl, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:  # least recently used first
                evicted, _ = self._entries.popitem(last=False)
                self._key_locks.pop(evicted, None)

    def _fresh(self, key: Hashable) -> tuple[float, Any] | None:
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[0] > time.monotonic():
                self._entries.move_to_end(key)
                return hit
        return None

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
