"""The public API: /recommend, /similar, /history, /healthz, /readyz, /version."""

from __future__ import annotations

import re

from flask import Blueprint, current_app, g, request

from app.errors import ApiError, json_response
from app.online import stamp
from models.recommender import Recommender
from models.rules import FilterError, Filters

api = Blueprint("api", __name__)

MAX_ID_LENGTH = 128
MAX_K = 100
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def live_model():
    return current_app.extensions["live_model"]


def serving_model() -> Recommender:
    model = live_model().current
    if model is None:
        raise ApiError(503, "no model is published yet; run the nightly job (python -m jobs.nightly)")
    return model


def serving_for(user: str) -> tuple[Recommender, str | None, str | None]:
    """The version serving ``user`` (its experiment arm's, or the live one), the arm and the experiment id."""
    model, arm, experiment = live_model().serving(user)
    if model is None:
        raise ApiError(503, "no model is published yet; run the nightly job (python -m jobs.nightly)")
    return model, arm, experiment


MAX_EXCLUDE_QUERY = 500  # exclude= ids in a query string; POST /recommend takes more
MAX_EXCLUDE_BODY = 10_000
DIVERSITY_POOL = 3  # with diversity > 0, MMR picks k titles out of the best 3k
_BODY_TYPES = {
    "user": str, "k": int, "genre": list, "kind": str, "year_min": int, "year_max": int,
    "max_maturity": int, "region": str, "exclude": list, "diversity": float,
}  # fmt: skip


NO_FILTERS = Filters()
_NOT_FILTERS = {"user", "item", "k", "diversity"}


class Query:
    """A request's parameters, from the query string (GET) or a JSON object (POST /recommend)."""

    def __init__(self, values: dict[str, list]):
        self.values = values

    @classmethod
    def from_args(cls) -> Query:
        return cls({name: request.args.getlist(name) for name in request.args})

    @classmethod
    def from_json(cls) -> Query:
        from app.events import json_body

        body = json_body("the request")
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object, e.g. {\"user\": \"u1\", \"exclude\": [\"t1\"]}")
        values = {}
        for name, value in body.items():
            kind = _BODY_TYPES.get(name)
            if kind is None:
                continue  # extra fields are ignored, as in events
            if kind is float:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ApiError(400, f"'{name}' must be a number")
                values[name] = [repr(float(value))]
            elif kind is int:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ApiError(400, f"'{name}' must be an integer")
                values[name] = [str(value)]
            elif kind is list:
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ApiError(400, f"'{name}' must be a list of strings")
                values[name] = value
            else:
                if not isinstance(value, str):
                    raise ApiError(400, f"'{name}' must be a string")
                values[name] = [value]
        return cls(values)

    def one(self, name: str) -> str | None:
        values = self.values.get(name, [])
        if len(values) > 1:
            raise ApiError(400, f"parameter '{name}' given {len(values)} times; give it once")
        return values[0].strip() if values else None

    def many(self, name: str, limit: int) -> list[str]:
        parts = [part.strip() for value in self.values.get(name, []) for part in value.split(",")]
        if len(parts) > limit:
            raise ApiError(400, f"parameter '{name}' has {len(parts)} values; at most {limit} are accepted here")
        out = [part for part in parts if part]
        for value in out:
            if len(value) > MAX_ID_LENGTH or _CONTROL.search(value):
                raise ApiError(400, f"a value of '{name}' is longer than {MAX_ID_LENGTH} characters or has control characters")
        return out

    def integer(self, name: str, low: int, high: int) -> int | None:
        raw = self.one(name)
        if raw is None:
            return None
        if not re.fullmatch(r"[+-]?\d{1,6}", raw):
            raise ApiError(400, f"parameter '{name}' must be an integer, not {raw[:20]!r}")
        value = int(raw)
        if not low <= value <= high:
            raise ApiError(400, f"parameter '{name}' must be between {low} and {high}, not {value}")
        return value

    def fraction(self, name: str) -> float:
        """A number from 0 to 1 (absent: 0)."""
        raw = self.one(name)
        if raw is None:
            return 0.0
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not 0.0 <= value <= 1.0:  # NaN fails this too
            raise ApiError(400, f"parameter '{name}' must be a number from 0 to 1, not {raw[:20]!r}")
        return value

    def id(self, name: str) -> str:
        value = self.one(name) or ""
        if not value:
            raise ApiError(400, f"missing required parameter '{name}'")
        if len(value) > MAX_ID_LENGTH:
            raise ApiError(400, f"parameter '{name}' is longer than {MAX_ID_LENGTH} characters")
        if _CONTROL.search(value):
            raise ApiError(400, f"parameter '{name}' contains control characters")
        return value

    def k(self) -> int:
        if self.one("k") == "":
            raise ApiError(400, f"parameter 'k' must be an integer between 1 and {MAX_K}, not ''")
        value = self.integer("k", 1, MAX_K)
        return 10 if value is None else value

    def filters(self, model: Recommender, max_exclude: int) -> tuple[Filters, set[int]]:
        """The request's filters (checked against the catalogue: 400 naming valid values) and exclusions."""
        if not self.values.keys() - _NOT_FILTERS:  # the common request: no filter, nothing excluded
            return NO_FILTERS, set()
        kind = self.one("kind")
        region = self.one("region")
        for name, value in (("kind", kind), ("region", region)):
            if value == "":
                raise ApiError(400, f"parameter '{name}' is empty; leave it out for no filter")
        filters = Filters(
            genres=tuple(dict.fromkeys(self.many("genre", 50))),
            kind=kind or None,
            year_min=self.integer("year_min", 0, 9999),
            year_max=self.integer("year_max", 0, 9999),
            max_maturity=self.integer("max_maturity", 0, 99),
            region=region.upper() if region else None,
        )
        try:
            model.rules.check(filters)
        except FilterError as exc:
            raise ApiError(400, str(exc)) from None
        index = model.item_index
        exclude = {index[i] for i in self.many("exclude", max_exclude) if i in index}  # unknown ids: nothing to hide
        return filters, exclude


def scored_items(model: Recommender, recs) -> list[dict]:
    ids, titles = model.item_ids, model.titles
    return [
        {
            "item_id": ids[r.item],
            "title": titles[r.item],
            "score": round(r.score, 6),
            "because": [{"item_id": ids[b], "title": titles[b]} for b in r.because] if r.because else [],
        }
        for r in recs
    ]


def recommend_answer(query: Query, max_exclude: int):
    user = query.id("user")
    k = query.k()
    model, arm, experiment = serving_for(user)
    filters, exclude = query.filters(model, max_exclude)
    diversity = query.fraction("diversity")
    fresh_items, fresh_weights = live_model().fresh_history(model, user)
    pool = k if diversity == 0 else min(DIVERSITY_POOL * k, MAX_K * DIVERSITY_POOL)
    strategy, recs = model.recommend(user, pool, fresh_items, fresh_weights, filters=filters, exclude=exclude)
    recs = model.diversify(recs, k, diversity)
    g.strategy = strategy  # counted by app.metrics
    body = {"user": user, "strategy": strategy, "items": scored_items(model, recs)}
    return json_response(stamp(body, model.version, arm, experiment))


@api.get("/recommend")
def recommend():
    return recommend_answer(Query.from_args(), MAX_EXCLUDE_QUERY)


@api.post("/recommend")
def recommend_post():
    """The same as GET, with the parameters in a JSON object: for long ``exclude`` lists."""
    return recommend_answer(Query.from_json(), MAX_EXCLUDE_BODY)


@api.get("/similar")
def similar():
    query = Query.from_args()
    item_id = query.id("item")
    k = query.k()
    model = serving_model()
    row = model.item_index.get(item_id)
    if row is None:
        raise ApiError(404, f"unknown item {item_id!r}")
    filters, exclude = query.filters(model, MAX_EXCLUDE_QUERY)
    ids, titles = model.item_ids, model.titles
    found = model.similar(row, k, model.rules.eligible(filters), exclude)
    items = [{"item_id": ids[i], "title": titles[i], "score": round(s, 6)} for i, s in found]
    return json_response(stamp({"item": item_id, "title": titles[row], "items": items}, model.version, None, None))


@api.get("/history")
def history():
    user = Query.from_args().id("user")
    model = serving_model()
    fresh_items, fresh_weights = live_model().fresh_history(model, user)  # first: reads the record too
    items, weights = model.history(user)
    fresh = set()
    if fresh_items is not None and len(fresh_items):
        from models.recommender import merge_history

        fresh = set(int(i) for i in fresh_items)
        items, weights = merge_history(fresh_items, fresh_weights, items, weights)
    ids, titles = model.item_ids, model.titles
    return json_response(
        {
            "user": user,
            "model_version": model.version,
            "known": model.user(user) is not None or bool(fresh),
            "items": [
                {"item_id": ids[i], "title": titles[i], "weight": round(float(w), 4), "fresh": int(i) in fresh}
                for i, w in zip(items.tolist(), weights.tolist())
            ],
        }
    )


@api.get("/healthz")
def healthz():
    return json_response({"status": "ok"})


@api.get("/readyz")
def readyz():
    live = live_model()
    body = {"model_version": live.version, "redis": "ok" if live.redis_ok else "unreachable"}
    if live.current is None:
        return json_response({"status": "not ready", "error": live.last_error or "no model loaded", **body}, 503)
    fallback = live.fallback
    if fallback is not None:
        # Serving an older kept version while the live one cannot be loaded: still ready to answer.
        return json_response(
            {"status": "fallback", "live_version": fallback["live"], "error": fallback["error"], **body}, 200
        )
    if not live.redis_ok:
        # Still answering from the loaded model; orchestrators may keep routing here.
        return json_response({"status": "degraded", **body}, 200)
    return json_response({"status": "ready", **body})


@api.get("/version")
def version():
    model = serving_model()
    meta = {k: v for k, v in model.meta.items() if k not in ("parts", "inputs")}
    if "user_store" in meta:  # its key names the users' records: not for callers
        meta["user_store"] = {k: v for k, v in meta["user_store"].items() if k != "key"}
    return json_response(meta)
