"""Trending titles: those whose recent viewing rate rises against their longer-term rate.

One rule, used by the nightly job (on the events it trained on) and by the
hourly ``python -m jobs.trending`` (the event files plus the live stream,
without retraining); both publish the same record to Redis
(``Keys.trending``), which ``/page`` reads::

    {"computed_at", "reference", "items": [[item_id, score, recent_views], ...]}  best first

For each title: ``recent`` = viewings in the last ``RECENT_DAYS`` before the
reference time (the newest event, or now if that is earlier), ``long`` =
viewings in the ``LONG_DAYS`` before that. The score is the ratio of the
daily rates, each smoothed by ``PRIOR_PER_DAY`` so a title with two views is
not "trending" against zero: ``(recent/R + p) / (long/L + p)``. Titles with
fewer than ``MIN_RECENT`` recent viewings are left out.
"""

from __future__ import annotations

import time

import numpy as np
import orjson

RECENT_DAYS = 7
LONG_DAYS = 56
PRIOR_PER_DAY = 0.5
MIN_RECENT = 5
KEEP = 500
DAY = 86_400


def window_edges(timestamp_max: float, now: float | None = None) -> tuple[float, float, float]:
    """(reference, start of the recent window, start of the long window) for events up to ``timestamp_max``."""
    reference = min(float(timestamp_max), time.time() if now is None else now)
    recent_from = reference - RECENT_DAYS * DAY
    return reference, recent_from, recent_from - LONG_DAYS * DAY


def trending(item: np.ndarray, timestamp: np.ndarray, n_items: int, now: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(item indices, scores, recent viewings) of the trending titles, best first (at most ``KEEP``)."""
    if len(timestamp) == 0:
        return np.empty(0, np.int64), np.empty(0), np.empty(0, np.int64)
    reference, recent_from, long_from = window_edges(timestamp.max(), now)
    in_recent = (timestamp > recent_from) & (timestamp <= reference)
    in_long = (timestamp > long_from) & (timestamp <= recent_from)
    return trending_from_counts(np.bincount(item[in_recent], minlength=n_items), np.bincount(item[in_long], minlength=n_items))


def trending_from_counts(recent: np.ndarray, long: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rule on each title's viewings in the recent and the long window (any engine counts them)."""
    score = (recent / RECENT_DAYS + PRIOR_PER_DAY) / (long / LONG_DAYS + PRIOR_PER_DAY)
    candidates = np.flatnonzero((recent >= MIN_RECENT) & (score > 1.0))
    order = candidates[np.lexsort((-recent[candidates], -score[candidates]))][:KEEP]
    return order, score[order], recent[order]


def trending_record(item_ids, item: np.ndarray, timestamp: np.ndarray, now: float | None = None) -> bytes:
    rows, scores, counts = trending(item, timestamp, len(item_ids), now)
    reference = window_edges(timestamp.max(), now)[0] if len(timestamp) else None
    return record(item_ids, rows, scores, counts, reference)


def record(item_ids, rows: np.ndarray, scores: np.ndarray, counts: np.ndarray, reference: float | None) -> bytes:
    return orjson.dumps(
        {
            "computed_at": time.time(),
            "reference": reference,
            "items": [[item_ids[r], round(float(s), 4), int(c)] for r, s, c in zip(rows.tolist(), scores, counts)],
        }
    )
