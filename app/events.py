"""``POST /events``: viewings that just happened, stored durably and applied at once.

A batch is all or nothing: every event is validated by the data contract
(:func:`models.data.validate_event_records`); if any breaks it, the answer is
400 with one error per bad field and nothing is stored. A valid batch is
appended in one atomic Redis step to the events stream (AOF-persisted) and
to each user's fresh-history overlay (:mod:`models.live_events`), so the
next ``/recommend`` already excludes and learns from it, and the nightly job
trains on it exactly once. If Redis cannot take it the answer is 503 and
nothing counts as accepted.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

import orjson
import redis
from flask import Blueprint, Flask, current_app, request
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.errors import ApiError, json_response, retry_later
from models.data import validate_event_records
from models.live_events import EventLayoutError, EventLog
from models.store import ModelStore, redis_from_url

log = logging.getLogger(__name__)

events_api = Blueprint("events", __name__)

MAX_BATCH = 1000
READ_TIMEOUT_SECONDS = 0.25  # the overlay read on /recommend: give up fast, serve without it


def init_events(app: Flask) -> None:
    """Create the event log for writes (this blueprint) and the short-timeout one for reads (LiveModel).

    Only a failed *connection* is retried (once, e.g. a pooled socket from
    before a Redis restart): a write that timed out may have been applied,
    and retrying it could store the batch twice.
    """
    writer = redis_from_url(
        app.config["REDIS_URL"],
        socket_timeout=5.0,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
    )
    reader = redis_from_url(
        app.config["REDIS_URL"],
        socket_timeout=READ_TIMEOUT_SECONDS,
        socket_connect_timeout=READ_TIMEOUT_SECONDS,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
    )
    keys = ModelStore(writer, app.config["REDIS_PREFIX"]).keys  # the layout (cluster tags, shards) of the store
    app.extensions["event_log"] = EventLog(writer, keys)
    raw = app.config.get("EVENTS_TOKEN") or ""
    tokens = [t.strip() for t in (raw or "").split(",") if t.strip()]
    app.config["EVENTS_TOKENS"] = [hashlib.sha256(t.encode()).digest() for t in tokens]
    if not tokens:
        log.warning("EVENTS_TOKEN is not set: anyone who can reach POST /events can write events")
    app.extensions["live_model"].events = EventLog(reader, keys)


def read_body(limit: int) -> bytes:
    """The request body; 413 if it is longer than ``limit`` bytes, whether or not it said so up front.

    A chunked body has no Content-Length, and werkzeug's limited stream stops
    at the limit without an error: a long body would be cut and its prefix
    taken. Here the body is read to one byte past the limit, straight from
    the server's stream when the server ends it (gunicorn does, for chunked
    bodies), and refused whole if that byte exists.
    """
    length = request.content_length
    if length is not None and length > limit:
        raise ApiError(413, f"the body is {length} bytes; at most {limit} are accepted (MAX_BODY_BYTES)")
    environ = request.environ
    stream = environ["wsgi.input"] if length is None and environ.get("wsgi.input_terminated") else request.stream
    chunks, size = [], 0
    while size <= limit:
        chunk = stream.read(min(1 << 16, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise ApiError(413, f"the body is longer than {limit} bytes (MAX_BODY_BYTES); nothing was stored")
    return b"".join(chunks)


def json_body(what: str):
    """The request's JSON body, parsed: 415 if it is not JSON, 413 past ``MAX_BODY_BYTES``, 400 if it does not parse."""
    if not request.is_json:
        raise ApiError(415, f"send {what} as JSON with 'Content-Type: application/json'")
    try:
        return orjson.loads(read_body(current_app.config["MAX_CONTENT_LENGTH"]))
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None


def require_writer() -> None:
    """``EVENTS_TOKEN`` set: the request must carry ``Authorization: Bearer <one of its tokens>``.

    Several comma-separated tokens are accepted at once, so a token can be
    rotated without downtime (add the new one, move the clients, drop the old).
    Every configured token is compared, each in constant time (digests of equal
    length), so neither a match's position nor a token's length shows in timing.
    """
    tokens = current_app.config.get("EVENTS_TOKENS")
    if not tokens:
        return
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    digest = hashlib.sha256(given.strip().encode()).digest()
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(digest, token)
    if scheme.lower() != "bearer" or not given or not matched:
        raise ApiError(401, "send 'Authorization: Bearer <token>' with a token from EVENTS_TOKEN", headers={"WWW-Authenticate": "Bearer"})


def batch_from_body(noun: str, limit: int) -> list:
    """A writer's batch (``POST /events``, ``POST /impressions``): one object or a non-empty array of at most ``limit``."""
    require_writer()
    payload = json_body(f"the {noun}s")
    records = payload if isinstance(payload, list) else [payload]
    if not records:
        raise ApiError(400, f"no {noun}s: send one {noun} object or a non-empty array of them")
    if len(records) > limit:
        raise ApiError(400, f"{len(records)} {noun}s in one request; send at most {limit} per request")
    return records


@events_api.post("/events")
def post_events():
    records = batch_from_body("event", MAX_BATCH)
    events, errors = validate_event_records(records)
    if not errors:
        from app.online import origins_of

        origins, errors = origins_of(events)
    if errors:
        bad = len({e["index"] for e in errors})
        raise ApiError(
            400, f"{bad} of {len(records)} event(s) break the data contract; nothing was stored", rows=errors[:100]
        )
    try:
        ids = current_app.extensions["event_log"].append(events)
    except redis.TimeoutError as exc:
        log.warning("events store timed out: %s", exc)
        return retry_later("the event store did not confirm in time; the events may not be stored: retry", 1)
    except redis.OutOfMemoryError:
        raise  # 503 with Retry-After (app.errors): full, not down
    except EventLayoutError as exc:
        log.error("events refused: %s", exc)
        return retry_later(f"the event store is misconfigured; nothing was stored: {exc}", 60)
    except redis.RedisError as exc:
        log.warning("events store unavailable: %s", exc)
        return retry_later("the event store (Redis) is unavailable; nothing was stored: retry later", 1)
    current_app.extensions["live_model"].note_fresh({e.user_id for e in events})
    from app.online import credit

    credit(events, origins)  # viewings credited to what was shown (models.attribution)
    model = current_app.extensions["live_model"].current
    known = model.item_index if model is not None else {}
    not_in_model = sorted({e.item_id for e in events if e.item_id not in known})
    return json_response({"accepted": len(ids), "ids": ids, "not_in_model": not_in_model[:100]})
