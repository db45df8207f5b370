"""Online results: recommendation ids on every answer, ``POST /impressions``, viewings credited to answers.

See :mod:`models.attribution` for what is counted and :mod:`models.experiments`
for experiments. This module is the service's side: it signs each answer
(``recommendation_id``, ``model_version``, ``arm``), validates and stores
impressions, and credits the events ``POST /events`` accepted.
"""

from __future__ import annotations

import logging
import secrets
import threading

import redis
from flask import Blueprint, Flask, current_app
from prometheus_client import Counter

from app.errors import ApiError, json_response, retry_later
from models.attribution import OnlineLog, Origin, RecommendationIds, completion, load_secret
from models.data import LiveEvent, validate_impression_records

log = logging.getLogger(__name__)
online_api = Blueprint("online", __name__)

MAX_IMPRESSIONS = 1000
ATTRIBUTION_FAILURES = Counter(
    "recs_attribution_failures_total", "Accepted events whose crediting to impressions failed (Redis error)"
)


class Online:
    """The worker's recommendation-id signer and online log; the secret is read from Redis on first use."""

    def __init__(self, client: redis.Redis, keys):
        self.client, self.keys = client, keys
        self._ids: RecommendationIds | None = None
        self._log: OnlineLog | None = None
        self._local: RecommendationIds | None = None
        self._lock = threading.Lock()

    def ids(self) -> RecommendationIds:
        """The shared signer; while Redis cannot be read, a process-local one (its ids will not verify later)."""
        if self._ids is not None:
            return self._ids
        with self._lock:
            if self._ids is None:
                try:
                    self._ids = RecommendationIds(load_secret(self.client, self.keys))
                except redis.RedisError as exc:
                    if self._local is None:
                        log.warning("online secret unreadable (%s): recommendation ids are signed locally until it is", exc)
                        self._local = RecommendationIds(secrets.token_bytes(32))
                    return self._local
        return self._ids

    def log(self) -> OnlineLog:
        ids = self.ids()
        if self._log is None or self._log.ids is not ids:
            self._log = OnlineLog(self.client, self.keys, ids)
        return self._log


def init_online(app: Flask) -> None:
    writer = app.extensions["event_log"].redis  # the write path's client (5 s timeout, no blind retries)
    app.extensions["online"] = Online(writer, app.extensions["live_model"].store.keys)
    app.register_blueprint(online_api)


def stamp(body: dict, version: str, arm: str | None, experiment: str | None) -> dict:
    """The answer with its signed ``recommendation_id``, ``model_version`` and ``arm`` (null outside experiments)."""
    rid = current_app.extensions["online"].ids().issue(version, arm, experiment)
    return {"recommendation_id": rid, "model_version": version, "arm": arm, **body}


def running_experiment() -> str | None:
    running = current_app.extensions["live_model"].running
    return running.experiment.id if running is not None else None


@online_api.post("/impressions")
def post_impressions():
    from app.events import batch_from_body

    records = batch_from_body("impression", MAX_IMPRESSIONS)
    impressions, errors = validate_impression_records(records)
    online = current_app.extensions["online"]
    ids = online.ids()
    verified = []
    if not errors:
        for index, shown in enumerate(impressions):
            origin = ids.verify(shown.recommendation_id)
            if origin is None:
                errors.append({"index": index, "field": "recommendation_id", "error": "not a recommendation_id this service issued"})
            verified.append((shown, origin))
    if errors:
        bad = len({e["index"] for e in errors})
        raise ApiError(400, f"{bad} of {len(records)} impression(s) are invalid; nothing was stored", rows=errors[:100])
    try:
        stored = online.log().record(verified, running_experiment())
    except redis.OutOfMemoryError:
        raise
    except redis.TimeoutError as exc:
        log.warning("impressions store timed out: %s", exc)
        return retry_later("the store did not confirm in time; the impressions may not be stored: retry", 1)
    except redis.RedisError as exc:
        log.warning("impressions store unavailable: %s", exc)
        return retry_later("the store (Redis) is unavailable; nothing was stored: retry later", 1)
    return json_response({"accepted": stored})


def origins_of(events: list[LiveEvent]) -> tuple[list[Origin | None], list[dict]]:
    """Each event's recommendation id read back (None without one), and a row error per id not issued here."""
    ids = current_app.extensions["online"].ids()
    origins, errors = [], []
    for index, event in enumerate(events):
        origin = None
        if event.recommendation_id is not None:
            origin = ids.verify(event.recommendation_id)
            if origin is None:
                errors.append({"index": index, "field": "recommendation_id", "error": "not a recommendation_id this service issued"})
        origins.append(origin)
    return origins, errors


def credit(events: list[LiveEvent], origins: list[Origin | None]) -> None:
    """Credit stored events to what was shown (after they are stored: a failure here loses no event)."""
    model = current_app.extensions["live_model"].current
    minutes = model.items.get("episode_minutes") if model is not None else None
    index = model.item_index if model is not None else {}
    rows = []
    for event, origin in zip(events, origins):
        row = index.get(event.item_id)
        rows.append((event, origin, completion(event, minutes[row] if minutes is not None and row is not None else None)))
    try:
        current_app.extensions["online"].log().attribute(rows, running_experiment())
    except redis.RedisError as exc:
        ATTRIBUTION_FAILURES.inc(len(events))
        log.warning("%d stored event(s) could not be credited to impressions: %s", len(events), exc)
