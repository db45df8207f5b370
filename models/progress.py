"""Progress for long steps: a tqdm bar on a terminal, counted log lines otherwise.

Batch logs (cron, the scheduler, CI) get lines like ``candidates: 40000/150000
(27%)`` every few seconds instead of carriage-return noise.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
log = logging.getLogger("progress")

# A run records its own progress (see jobs.runs); steps report into this hook.
_listeners: list = []


def add_listener(callback) -> None:
    """``callback(step: str, done: int, total: int)`` is called as steps advance."""
    _listeners.append(callback)


def remove_listener(callback) -> None:
    if callback in _listeners:
        _listeners.remove(callback)


def report(step: str, done: int, total: int) -> None:
    for callback in list(_listeners):
        try:
            callback(step, done, total)
        except Exception:  # progress reporting must never break the work itself
            log.exception("progress listener failed")


def progress(items: Iterable[T], step: str, total: int | None = None, show: bool = True, every: float = 5.0) -> Iterator[T]:
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else 0)
    if show and sys.stderr.isatty():
        iterator: Iterable[T] = tqdm(items, desc=step, total=total or None, mininterval=0.5)
    else:
        iterator = items
    last = time.monotonic()
    for done, item in enumerate(iterator, 1):
        yield item
        now = time.monotonic()
        if now - last >= every or done == total:
            last = now
            report(step, done, total)
            if show and not sys.stderr.isatty():
                percent = f" ({100 * done / total:.0f}%)" if total else ""
                log.info("%s: %d/%s%s", step, done, total or "?", percent)
