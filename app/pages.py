"""``GET /page?user=ID``: a whole home page of rows in one call, under the same filters as /recommend.

Rows come in the order of the page config (``PAGE_CONFIG``, a JSON or YAML
file; :data:`DEFAULT_PAGE` otherwise), each ``{"id", "kind", "title", "items"}``.
No title appears twice on a page (nor one in ``exclude``, nor one the user
has watched), and a row that cannot fill ``min_items`` is dropped. Kinds:

``top_picks``            the user's recommendations
``because_you_watched``  one row per recent distinct title of the user ("Because you watched X"): its nearest titles
``trending``             titles whose recent viewing rate rises (models.trending; refreshed hourly)
``new_for_you``          titles added in the last ``days`` (default 30), ranked for the user
``genre``                one row per top genre of the user (of the catalogue's most watched, for a new user)
``popular``              the most popular titles

Each row takes ``size`` (default 10) and ``diversity`` (0-1, default
:data:`DEFAULT_DIVERSITY`: the row's titles are picked by maximal marginal
relevance out of the best ``2 x size``, or ``3 x size`` above 0.3, see
:func:`pool_size`); ``because_you_watched`` and ``genre`` take ``count``
(how many such rows, default 2). Unknown and new users get a
page too: trending, new, genre and popular rows.

Promotions: operators pin titles into a row kind at a share of its slots
(the dashboard's Promotions page; stored in Redis, ``Keys.promotions``, and
picked up by every worker within ``PROMOTIONS_CACHE_SECONDS``). Promoted
titles lead their row, still under the page's filters and never twice on a
page, and carry ``"reason": "promoted"``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from functools import cached_property
from pathlib import Path

import numpy as np
import orjson
import redis
from flask import Blueprint, Flask, current_app

from app.api import MAX_EXCLUDE_QUERY, Query, live_model, serving_for
from app.errors import json_response
from app.online import stamp
from models.recommender import (
    ANNOY_CANDIDATES,
    EXACT_POOL,
    POPULAR_CANDIDATES,
    SEQUENCE_CANDIDATES,
    Recommendation,
    Recommender,
    merge_history,
)
from models.rules import Filters

log = logging.getLogger(__name__)
pages_api = Blueprint("pages", __name__)

ROW_KINDS = ("top_picks", "because_you_watched", "trending", "new_for_you", "genre", "popular")
DEFAULT_PAGE = {
    "min_items": 5,
    "rows": [
        {"kind": "top_picks", "size": 10},
        {"kind": "because_you_watched", "count": 2, "size": 10},
        {"kind": "trending", "size": 10},
        {"kind": "new_for_you", "size": 10, "days": 30},
        {"kind": "genre", "count": 2, "size": 10},
        {"kind": "popular", "size": 10},
    ],
}
TRENDING_CACHE_SECONDS = 60.0
PAGE_SLOTS = 200  # titles a page may place before its rows' shared nearest-title pool runs thin
# MMR weight of a row unless its config says otherwise (chosen on ml-latest-small, see README).
DEFAULT_DIVERSITY = 0.3


def pool_size(size: int, diversity: float) -> int:
    """How many titles a row asks its source for; MMR picks ``size`` of them (none without diversity).

    Measured on the serving benchmark's model (100k titles, 1,000 pages, 6,000 rows, pool 3 x size):
    at diversity 0.3, 99.5 % of MMR's picks lay within the best 2 x size; at 0.6, 10 % lay beyond
    it, at 1.0, 33 %. A smaller pool costs every row's source and MMR less (~10 % of a page).
    """
    if diversity <= 0:
        return size
    return size * (2 if diversity <= 0.3 else 3)


class PageConfigError(ValueError):
    pass


def load_page_config(path: str | None) -> dict:
    """The page config from ``path`` (JSON, or YAML by extension), checked; the default without one."""
    if not path:
        return DEFAULT_PAGE
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith((".yaml", ".yml")):
        import yaml

        config = yaml.safe_load(text)
    else:
        config = orjson.loads(text)
    return check_page_config(config, path)


def check_page_config(config, where: str = "page config") -> dict:
    if not isinstance(config, dict) or not isinstance(config.get("rows"), list) or not config["rows"]:
        raise PageConfigError(f"{where}: expected an object with a non-empty list 'rows'")
    min_items = config.get("min_items", 5)
    if not isinstance(min_items, int) or not 1 <= min_items <= 100:
        raise PageConfigError(f"{where}: 'min_items' must be an integer from 1 to 100")
    for n, row in enumerate(config["rows"]):
        if not isinstance(row, dict) or row.get("kind") not in ROW_KINDS:
            raise PageConfigError(f"{where}: row {n}: 'kind' must be one of {', '.join(ROW_KINDS)}")
        diversity = row.get("diversity")
        if diversity is not None and (isinstance(diversity, bool) or not isinstance(diversity, (int, float)) or not 0 <= diversity <= 1):
            raise PageConfigError(f"{where}: row {n} ({row['kind']}): 'diversity' must be a number from 0 to 1")
        for name, high in (("size", 100), ("count", 10), ("days", 3650)):
            value = row.get(name)
            if value is not None and (not isinstance(value, int) or not 1 <= value <= high):
                raise PageConfigError(f"{where}: row {n} ({row['kind']}): '{name}' must be an integer from 1 to {high}")
    return {"min_items": min_items, "rows": config["rows"]}


PROMOTIONS_CACHE_SECONDS = 2.0
MAX_PROMOTED = 50


def check_promotions(value) -> dict:
    """``{row kind: {"items": [title ids], "share": 0 < s <= 1}}``; raises ValueError saying what is wrong."""
    if not isinstance(value, dict):
        raise ValueError("promotions must be an object of row kinds")
    out = {}
    for kind, spec in value.items():
        if kind not in ROW_KINDS:
            raise ValueError(f"unknown row kind {kind!r}; use one of {', '.join(ROW_KINDS)}")
        items, share = (spec or {}).get("items"), (spec or {}).get("share")
        if not isinstance(items, list) or not all(isinstance(i, str) and 0 < len(i) <= 128 for i in items):
            raise ValueError(f"{kind}: 'items' must be a list of title ids")
        if len(items) > MAX_PROMOTED:
            raise ValueError(f"{kind}: at most {MAX_PROMOTED} promoted titles")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ValueError(f"{kind}: 'share' must be a number above 0 and at most 1")
        if items:
            out[kind] = {"items": list(dict.fromkeys(items)), "share": float(share)}
    return out


class RedisValue:
    """One Redis key, decoded, re-read at most every ``seconds``; the last good value stays if a read fails."""

    def __init__(self, client: redis.Redis, key: str, seconds: float, decode, empty):
        self.client, self.key, self.seconds = client, key, seconds
        self.decode, self.value = decode, empty
        self._read_at = -1e9
        self._lock = threading.Lock()

    def get(self):
        if time.monotonic() - self._read_at < self.seconds:
            return self.value
        with self._lock:
            now = time.monotonic()
            if now - self._read_at >= self.seconds:
                self._read_at = now
                try:
                    raw = self.client.get(self.key)
                    self.value = self.decode(orjson.loads(raw) if raw else None)
                except (redis.RedisError, ValueError, KeyError, TypeError, IndexError) as exc:
                    log.warning("%s unavailable, keeping the last value: %r", self.key, exc)
        return self.value

    def forget(self) -> None:
        """Read it again on the next ``get`` (this worker just changed it)."""
        self._read_at = -1e9


def _trending_ids(record) -> list[str]:
    return [row[0] for row in record["items"]] if record else []


def _promotions(value) -> dict:
    return check_promotions(value) if value else {}


def init_pages(app: Flask) -> None:
    app.config["PAGE"] = check_page_config(app.config["PAGE"]) if "PAGE" in app.config else load_page_config(
        os.environ.get("PAGE_CONFIG")
    )
    store = app.extensions["live_model"].store
    client = live_model_events_client(app)
    app.extensions["trending"] = RedisValue(client, store.keys.trending, TRENDING_CACHE_SECONDS, _trending_ids, [])
    app.extensions["promotions"] = RedisValue(client, store.keys.promotions, PROMOTIONS_CACHE_SECONDS, _promotions, {})
    app.register_blueprint(pages_api)


def live_model_events_client(app: Flask) -> redis.Redis:
    events = app.extensions["live_model"].events  # the short-timeout client of the request path
    return events.redis if events is not None else app.extensions["live_model"].store.redis


class PageBuilder:
    """Fills the rows of one page, keeping every title it placed out of the rows after it."""

    def __init__(self, model: Recommender, user: str, filters: Filters, exclude: set[int], fresh, promotions=None):
        self.model, self.user, self.filters = model, user, filters
        self.promotions = promotions or {}
        self.fresh_items, self.fresh_weights = fresh
        self.fresh = self.fresh_items is not None and len(self.fresh_items) > 0
        self.record = model.user(user)  # one read per page (a Redis record, or the mapped parts)
        items, weights = model.history(self.record)
        if self.fresh_items is not None and len(self.fresh_items):
            items, weights = merge_history(self.fresh_items, self.fresh_weights, items, weights)
        self.history, self.weights = items, weights
        self.seen = set(int(i) for i in items)
        self.used = set(exclude)
        self.eligible = model.rules.eligible(filters)

    @cached_property
    def terms(self) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray], list[int]]:
        """The user's vector, watched-next scores and nearest titles: computed once for every row of the page."""
        query = self.model.user_vector(self.history, self.weights)
        nearest = self.model.nearby_titles(self.record, self.history, query, ANNOY_CANDIDATES + len(self.history) + PAGE_SLOTS)
        return query, self.model.sequence_scores(np.asarray(self.history)), nearest

    @cached_property
    def scored_pool(self) -> tuple[np.ndarray, np.ndarray]:
        """The shared candidates of the page's ranked rows, scored once, best first (titles and scores)."""
        query, (seq_items, seq_values), nearest = self.terms
        strongest = seq_items[np.argsort(-seq_values)[:SEQUENCE_CANDIDATES]]
        pool = np.concatenate([np.asarray(nearest, dtype=np.int64), self.model.popular[:POPULAR_CANDIDATES], strongest])
        pool = pool[np.sort(np.unique(pool, return_index=True)[1])]  # first occurrences, in order
        allowed = self.eligible.copy()
        allowed[self.history] = False
        pool = pool[allowed[pool]]
        if len(pool) == 0:
            return pool, np.empty(0)
        scores = self.model.blended_scores(query, pool, seq_items, seq_values)
        order = np.argsort(-scores, kind="stable")
        return pool[order], scores[order]

    @property
    def known(self) -> bool:
        return len(self.history) > 0

    def taken(self) -> set[int]:
        return self.used | self.seen

    def row(
        self, row_id: str, kind: str, title: str, recs: list[Recommendation], min_items: int, size: int, diversity: float
    ) -> dict | None:
        recs = self.model.diversify([r for r in recs if r.item not in self.used], size, diversity)
        promoted = self.promoted(kind, size)
        if promoted:
            rest = [r for r in recs if r.item not in promoted]
            recs = [Recommendation(i, 0.0, []) for i in promoted] + rest[: size - len(promoted)]
        if len(recs) < min_items:
            return None
        self.used.update(r.item for r in recs)
        ids, titles = self.model.item_ids, self.model.titles
        items = []
        for r in recs:
            item = {"item_id": ids[r.item], "title": titles[r.item], "score": round(r.score, 6)}
            if r.item in promoted:
                item["reason"] = "promoted"
            if r.because:
                item["because"] = [{"item_id": ids[b], "title": titles[b]} for b in r.because]
            items.append(item)
        return {"id": row_id, "kind": kind, "title": title, "items": items}

    def promoted(self, kind: str, size: int) -> list[int]:
        """The promoted titles this row shows first: at most ``share`` of its slots, under the page's filters."""
        spec = self.promotions.get(kind)
        if not spec:
            return []
        slots = max(1, int(spec["share"] * size))
        index, taken, out = self.model.item_index, self.taken(), []
        for item_id in spec["items"]:
            row = index.get(item_id)
            if row is not None and self.eligible[row] and row not in taken and row not in out:
                out.append(row)
                if len(out) == slots:
                    break
        return out

    def top_picks(self, size: int) -> list[Recommendation]:
        if not self.known:
            return []
        strategy, recs = self.model.recommend(
            self.record, size, self.fresh_items, self.fresh_weights, filters=self.filters, exclude=self.used
        )
        return recs if strategy == "personalized" else []

    def seeds(self, count: int) -> list[int]:
        out = []
        for item in self.history.tolist():  # newest first
            if item not in out:
                out.append(int(item))
            if len(out) == count:
                break
        return out

    def more_like(self, seed: int, size: int) -> list[Recommendation]:
        found = self.model.similar(seed, size, self.eligible, self.taken())
        return [Recommendation(i, s, [seed]) for i, s in found]

    def trending(self, ids: list[str], size: int) -> list[Recommendation]:
        index, taken, out = self.model.item_index, self.taken(), []
        for rank, item_id in enumerate(ids):
            row = index.get(item_id)
            if row is not None and self.eligible[row] and row not in taken:
                out.append(Recommendation(row, 1.0 / (1 + rank), []))
                if len(out) == size:
                    break
        return out

    def within(self, mask: np.ndarray, size: int, key: tuple | None = None) -> list[Recommendation]:
        """The best titles inside ``mask`` for this user (popularity order for a user without history).

        ``key`` names a mask that stays the same across requests (the new arrivals of a minute): when
        small, its titles' vectors are kept gathered in the worker (``Recommender.small_set``).
        """
        eligible = self.eligible & mask
        if not eligible.any():
            return []
        if self.known and not self.fresh:  # the user's published top titles hold the row: exact, no scoring
            published = self.model.published_top(self.record, size, eligible, self.taken())
            if published is not None:
                return [Recommendation(i, s, []) for i, s in published[1]]
        if self.known and key is not None and np.count_nonzero(eligible) <= EXACT_POOL:  # new arrivals: score all
            query, sequence, _ = self.terms
            allowed = eligible.copy()
            taken = self.taken()
            allowed[np.fromiter(taken, dtype=np.int64, count=len(taken))] = False
            picked = self.model.top_of_small_set((self.filters, *key), eligible, allowed, query, sequence, size)
            return [Recommendation(i, s, []) for i, s in picked]
        if self.known:
            pool, scores = self.scored_pool  # one scoring for every row; a row it cannot fill searches on its own
            keep = eligible[pool] if len(pool) else np.zeros(0, dtype=bool)
            used = self.used
            picked = [(i, s) for i, s in zip(pool[keep].tolist(), scores[keep].tolist()) if i not in used][:size]
            if len(picked) < size:
                query, sequence, nearest = self.terms
                picked = self.model.ranked(self.history, self.weights, size, eligible, self.taken(), query, sequence, nearest)
            return [Recommendation(i, s, []) for i, s in picked]
        return self.model.popular_items(size, self.taken(), eligible)

    def top_genres(self, count: int) -> list[str]:
        genres = self.model.items.get("genres") or []
        weight: dict[str, float] = {}
        if self.known:
            for item, w in zip(self.history.tolist(), self.weights.tolist()):
                for g in genres[item]:
                    weight[g] = weight.get(g, 0.0) + float(w)
        else:  # a new user: the genres of the most popular titles
            for rank, item in enumerate(self.model.popular[:200].tolist()):
                for g in genres[item]:
                    weight[g] = weight.get(g, 0.0) + 1.0 / (1 + rank) ** 0.5
        allowed = set(self.filters.genres)
        ranked = sorted(weight, key=lambda g: (-weight[g], g))
        return [g for g in ranked if not allowed or g in allowed][:count]


def build_page(
    model: Recommender, user: str, filters: Filters, exclude: set[int], fresh, config: dict, trending: list[str],
    promotions: dict | None = None,
) -> list[dict]:
    page = PageBuilder(model, user, filters, exclude, fresh, promotions)
    min_items, rows = config["min_items"], []
    titles = model.titles
    rules = model.rules

    for spec in config["rows"]:
        kind, size = spec["kind"], spec.get("size", 10)
        diversity = float(spec.get("diversity", DEFAULT_DIVERSITY))
        want = pool_size(size, diversity)

        def add(row_id: str, title: str, recs: list[Recommendation], kind=kind, size=size, diversity=diversity) -> None:
            row = page.row(row_id, kind, title, recs, min_items, size, diversity)
            if row is not None:
                rows.append(row)

        if kind == "top_picks":
            add("top_picks", "Top picks for you", page.top_picks(want))
        elif kind == "because_you_watched":
            for seed in page.seeds(spec.get("count", 2)):
                add(f"because_you_watched:{model.item_ids[seed]}", f"Because you watched {titles[seed]}", page.more_like(seed, want))
        elif kind == "trending":
            add("trending", "Trending now", page.trending(trending, want))
        elif kind == "new_for_you":
            days = spec.get("days", 30)
            new = rules.new_titles(days)
            key = ("new", days, int(time.time() // 60))  # new_titles changes by the minute at most
            add("new_for_you", "New for you" if page.known else "New arrivals", page.within(new, want, key))
        elif kind == "genre":
            for genre in page.top_genres(spec.get("count", 2)):
                mask = rules.genre_masks.get(genre)
                if mask is not None:
                    add(f"genre:{genre}", genre, page.within(mask, want))
        elif kind == "popular":
            add("popular", "Popular", model.popular_items(want, page.taken(), page.eligible))
    return rows


@pages_api.get("/page")
def home_page():
    query = Query.from_args()
    user = query.id("user")
    model, arm, experiment = serving_for(user)
    filters, exclude = query.filters(model, MAX_EXCLUDE_QUERY)
    fresh = live_model().fresh_history(model, user)
    extensions = current_app.extensions
    rows = build_page(
        model, user, filters, exclude, fresh, current_app.config["PAGE"], extensions["trending"].get(),
        extensions["promotions"].get(),
    )  # fmt: skip
    return json_response(stamp({"user": user, "rows": rows}, model.version, arm, experiment))
