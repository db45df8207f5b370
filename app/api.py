"""The public API: /recommend, /similar, /history, /healthz, /readyz, /version."""

from __future__ import annotations

import re

from flask import Blueprint, current_app, request

from app.errors import ApiError, json_response
from models.recommender import Recommender

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


def id_param(name: str) -> str:
    values = request.args.getlist(name)
    if len(values) > 1:
        raise ApiError(400, f"parameter '{name}' given {len(values)} times; give it once")
    value = values[0].strip() if values else ""
    if not value:
        raise ApiError(400, f"missing required parameter '{name}'")
    if len(value) > MAX_ID_LENGTH:
        raise ApiError(400, f"parameter '{name}' is longer than {MAX_ID_LENGTH} characters")
    if _CONTROL.search(value):
        raise ApiError(400, f"parameter '{name}' contains control characters")
    return value


def k_param() -> int:
    values = request.args.getlist("k")
    if len(values) > 1:
        raise ApiError(400, f"parameter 'k' given {len(values)} times; give it once")
    if not values:
        return 10
    raw = values[0].strip()
    if not re.fullmatch(r"[+-]?\d{1,6}", raw):
        raise ApiError(400, f"parameter 'k' must be an integer between 1 and {MAX_K}, not {raw[:20]!r}")
    k = int(raw)
    if not 1 <= k <= MAX_K:
        raise ApiError(400, f"parameter 'k' must be between 1 and {MAX_K}, not {k}")
    return k


@api.get("/recommend")
def recommend():
    user = id_param("user")
    k = k_param()
    model = serving_model()
    fresh_items, fresh_weights = live_model().fresh_history(model, user)
    strategy, recs = model.recommend(user, k, fresh_items, fresh_weights)
    ids, titles = model.item_ids, model.titles
    items = [
        {
            "item_id": ids[r.item],
            "title": titles[r.item],
            "score": round(r.score, 6),
            "because": [ids[b] for b in r.because],
        }
        for r in recs
    ]
    return json_response({"user": user, "model_version": model.version, "strategy": strategy, "items": items})


@api.get("/similar")
def similar():
    item_id = id_param("item")
    k = k_param()
    model = serving_model()
    row = model.item_index.get(item_id)
    if row is None:
        raise ApiError(404, f"unknown item {item_id!r}")
    ids, titles = model.item_ids, model.titles
    items = [{"item_id": ids[i], "title": titles[i], "score": round(s, 6)} for i, s in model.similar(row, k)]
    return json_response({"item": item_id, "title": titles[row], "model_version": model.version, "items": items})


@api.get("/history")
def history():
    user = id_param("user")
    model = serving_model()
    items, weights = model.history(user)
    fresh_items, fresh_weights = live_model().fresh_history(model, user)
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
            "known": user in model.user_index or bool(fresh),
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
    return json_response(meta)
