"""Keep a worker's long-lived objects out of the cyclic garbage collector's walks.

A worker holds a model version's catalogue (dicts and lists of tens of
thousands of titles) and the search encoder (torch modules, a tokenizer):
hundreds of thousands of objects that live until the next version. CPython's
collector walks every tracked object on each full collection, so every so
often a request would wait tens of milliseconds for it (measured: 50 ms with
150k objects, one in 5,000 pages). :func:`settle` collects once after such a
load and freezes what survives (``gc.freeze``): later collections walk only
the requests' own short-lived objects.

On by default under gunicorn (``gunicorn.conf.py`` sets ``GC_FREEZE=1``); off
elsewhere (tests and tools create many apps, each collection would cost them
a pause). Memory is not leaked: each call unfreezes first, so the collection
frees what the previous version left behind (its cycles included).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time

log = logging.getLogger(__name__)
_lock = threading.Lock()


def enabled() -> bool:
    return os.environ.get("GC_FREEZE", "0") == "1"


def settle(reason: str) -> None:
    """After ``reason`` (a version opened, the encoder loaded): collect once, then freeze the survivors."""
    if not enabled():
        return
    with _lock:
        started = time.perf_counter()
        gc.unfreeze()
        freed = gc.collect()
        gc.freeze()
        log.info(
            "heap settled after %s: %d unreachable objects freed, %d frozen, %.0f ms",
            reason, freed, gc.get_freeze_count(), (time.perf_counter() - started) * 1000,
        )  # fmt: skip
