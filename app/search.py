"""``GET /search?q=…&k=10[&user=ID]``: titles by meaning.

The query is embedded inside the service with the job's encoder
(all-MiniLM-L6-v2, :mod:`models.text`, weights verified), once per worker,
and looked up in the version's Annoy index over the titles' synopsis vectors
(``text.ann``). Exact title or id matches come first. With ``user``, results
are re-ranked towards the user's taste::

    score = (1 - SEARCH_TASTE_WEIGHT) x cosine(query, synopsis) + SEARCH_TASTE_WEIGHT x taste

where ``taste`` is the user's model score for the title rescaled to 0..1
within the matches (0.3 by default), and titles the user has watched go after
the unseen ones. The filters of ``/recommend`` apply. Query vectors are kept
in a per-worker LRU (``SEARCH_CACHE`` queries): searches repeat a lot.

``SEARCH_ENCODER``: ``preload`` (gunicorn.conf.py's default: each worker loads
the encoder in the background at start), ``lazy`` (at the first search; the
default elsewhere), ``off``. While it loads, ``/search`` answers 503 with
Retry-After.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict

import numpy as np
from flask import Blueprint, Flask, current_app

from app import heap
from app.api import MAX_EXCLUDE_QUERY, Query, live_model, serving_for
from app.errors import ApiError, json_response
from app.online import stamp

log = logging.getLogger(__name__)
search_api = Blueprint("search", __name__)

MAX_QUERY_CHARS = 200
TASTE_WEIGHT = float(os.environ.get("SEARCH_TASTE_WEIGHT", "0.3"))
CACHE_SIZE = int(os.environ.get("SEARCH_CACHE", "4096"))
POOL = 40  # titles asked of the text index before filters and re-ranking (nodes searched grow with it)


class QueryEncoder:
    """The worker's encoder, loaded once (in a thread), and an LRU of query vectors."""

    def __init__(self):
        self.encoder = None
        self.error: str | None = None
        self._started = False
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._load, name="search-encoder", daemon=True).start()

    def _load(self) -> None:
        try:
            self.encoder = shared_encoder()
            heap.settle("loading the search encoder")
        except Exception as exc:  # a missing package or weights that do not verify: search stays off, loudly
            self.error = f"the search encoder cannot run: {exc}"
            log.error(self.error)

    def wait(self, seconds: float) -> bool:
        """Start loading if needed and wait up to ``seconds`` for it; True when the encoder is ready."""
        self.start()
        deadline = time.monotonic() + seconds
        while self.encoder is None and self.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.encoder is not None

    def vector(self, text: str) -> np.ndarray:
        key = " ".join(text.lower().split())
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        vector = self.encoder.encode([key])[0]
        with self._lock:
            self._cache[key] = vector
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return vector


_SHARED = None
_SHARED_LOCK = threading.Lock()


def shared_encoder():
    """One encoder per process (a gunicorn worker; several apps in one test process share it)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            from models.text import TextEncoder

            _SHARED = TextEncoder(threads=1)  # one core per request: workers and threads share the machine
            log.info("search encoder loaded (weights sha256 %s)", _SHARED.digest)
        return _SHARED


def init_search(app: Flask) -> None:
    mode = app.config.get("SEARCH_ENCODER", os.environ.get("SEARCH_ENCODER", "lazy"))
    encoder = QueryEncoder()
    if mode == "off":
        encoder.error = "search is switched off (SEARCH_ENCODER=off)"
    elif mode == "preload":
        encoder.start()
    app.extensions["search_encoder"] = encoder
    app.register_blueprint(search_api)


@search_api.get("/search")
def search():
    query = Query.from_args()
    text = (query.one("q") or "").strip()
    if not text:
        raise ApiError(400, "missing required parameter 'q' (what to search for)")
    if len(text) > MAX_QUERY_CHARS:
        raise ApiError(400, f"parameter 'q' is longer than {MAX_QUERY_CHARS} characters")
    k = query.k()
    user = query.id("user") if "user" in query.values else None  # given empty: 400, like everywhere
    model, arm, experiment = serving_for(user) if user else (_live(), None, None)
    if model.text_index is None:
        raise ApiError(503, f"model version {model.version} has no text index (its catalogue has no descriptions)")
    encoder = current_app.extensions["search_encoder"]
    if encoder.error:
        raise ApiError(503, encoder.error)
    if encoder.encoder is None:
        encoder.start()
        raise ApiError(503, "the search encoder is loading; retry in a few seconds", headers={"Retry-After": "5"})
    filters, exclude = query.filters(model, MAX_EXCLUDE_QUERY)
    eligible = model.rules.eligible(filters)
    vector = encoder.vector(text)
    found = model.search_text(vector, max(POOL, 3 * k), eligible, exclude)
    lowered = text.lower()
    exact = [row for row in (model.item_index.get(text), *model.title_rows.get(lowered, ())) if row is not None]
    exact = [row for row in dict.fromkeys(exact) if eligible[row] and row not in exclude]
    items = rank(model, user, found, exact, k)
    body = {"query": text, "user": user, "items": items}
    return json_response(stamp(body, model.version, arm, experiment))


def _live():
    model = live_model().current
    if model is None:
        raise ApiError(503, "no model is published yet; run the nightly job (python -m jobs.nightly)")
    return model


def rank(model, user: str | None, found: list[tuple[int, float]], exact: list[int], k: int) -> list[dict]:
    """Exact matches first, then by meaning (blended with the user's taste), unseen before seen."""
    scores = {row: cos for row, cos in found}
    seen: set[int] = set()
    if user and found:
        fresh_items, fresh_weights = live_model().fresh_history(model, user)  # first: reads the record too
        items, weights = model.history(user)
        if fresh_items is not None and len(fresh_items):
            from models.recommender import merge_history

            items, weights = merge_history(fresh_items, fresh_weights, items, weights)
        if len(items):
            seen = set(int(i) for i in items)
            rows = np.array([row for row, _ in found])
            taste = model.vectors[rows].astype(np.float64) @ model.user_vector(items, weights).astype(np.float64)
            spread = taste.max() - taste.min()
            taste = (taste - taste.min()) / spread if spread > 0 else np.zeros(len(rows))
            scores = {row: (1 - TASTE_WEIGHT) * cos + TASTE_WEIGHT * float(t) for (row, cos), t in zip(found, taste)}
    ordered = sorted(scores, key=lambda row: (row in seen, -scores[row]))
    ids, titles = model.item_ids, model.titles
    out = [{"item_id": ids[row], "title": titles[row], "score": 1.0, "match": "exact"} for row in exact]
    for row in ordered:
        if len(out) >= k:
            break
        if row not in exact:
            out.append({"item_id": ids[row], "title": titles[row], "score": round(scores[row], 6), "match": "meaning"})
    return out[:k]
