"""The model a worker serves, kept in step with the live pointer in Redis.

Each worker holds one :class:`LiveModel`. A background thread watches the
pointer (pub/sub notice plus a poll as a safety net); when it moves, the new
version is fetched, verified, written to the shared local cache and opened,
and only then swapped in with one reference assignment. Requests already
running keep the object they started with, so a switch fails none of them.
A version that fails verification is not served: the current one stays (or,
in a worker that has none, the newest kept version that loads) and the live
one is retried with backoff until it loads (see :meth:`LiveModel.refresh`).
When Redis is unreachable the worker keeps serving what it has loaded and
reports itself degraded.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from pathlib import Path

import orjson
import redis
from flask import g, has_request_context

from app import heap
from app.metrics import LOAD_FAILURES, MODEL_FALLBACK
from models.experiments import Experiment
from models.live_events import EventLog, fresh_overlay
from models.recommender import Recommender
from models.store import ModelError, ModelStore

log = logging.getLogger(__name__)


def _request_records() -> dict | None:
    """This request's user records by (version, user id); None outside a request (no caching)."""
    if not has_request_context():
        return None
    memo = g.get("user_records")
    if memo is None:
        memo = g.user_records = {}
    return memo


# After a failed overlay read, requests skip Redis for this long (no connect timeout per request).
FRESH_RETRY_SECONDS = 1.0
# A live version that does not load is tried again after this, doubling up to the maximum.
RETRY_SECONDS = float(os.environ.get("MODEL_RETRY_SECONDS", "1"))
RETRY_MAX_SECONDS = float(os.environ.get("MODEL_RETRY_MAX_SECONDS", "30"))


class Running:
    """The experiment this worker serves: its record and each arm's opened version."""

    def __init__(self, experiment: Experiment, models: dict[str, Recommender]):
        self.experiment, self.models = experiment, models


class LiveModel:
    def __init__(self, store: ModelStore, cache_dir: str | Path, poll_seconds: float = 2.0):
        self.store = store
        self.cache_dir = Path(cache_dir)
        self.poll_seconds = poll_seconds
        self.current: Recommender | None = None
        self.redis_ok = True
        self.last_error: str | None = None
        self.refused: dict[str, str] = {}  # version -> why it could not be loaded (last attempt)
        self.fallback: dict | None = None  # {"live", "serving", "error"} while the live version does not load
        self._retries: dict[str, tuple[int, float]] = {}  # version -> (failures, monotonic time of the next try)
        self.fresh_users: set[str] | None = None  # None = unknown: ask Redis on every request
        self.events: EventLog | None = None  # set by app.events.init_events (short-timeout client)
        self._fresh_retry_at = 0.0
        self.running: Running | None = None  # the experiment served (models.experiments), if any
        self.experiment_error: str | None = None
        self._experiment_raw: bytes | None = None
        self._experiment_retry_at = 0.0
        self._switch_lock = threading.Lock()
        # The listener's pub/sub socket and the lock it holds while it reads and applies notices: a
        # request that finds either busy asks Redis instead of trusting fresh_users (_notice_pending).
        self._notice_socket = None
        self._notice_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def version(self) -> str | None:
        current = self.current
        return current.version if current is not None else None

    def fresh_history(self, model: Recommender, user_id: str):
        """(items, weights) of events accepted since ``model`` was built, or (None, None).

        One round trip: the HGET of the user's overlay field (see
        models.live_events), pipelined with the HGET of the user's record
        when ``model`` keeps users in Redis (the record is then kept for the
        rest of the request, :meth:`user_record`). When Redis fails, the
        request goes on without fresh history (and, for such a version, as
        an unknown user: popular and item-based answers), and the next
        ``FRESH_RETRY_SECONDS`` of requests do not try, so an outage costs no
        latency; the first read that works again marks Redis reachable.
        """
        # A notice of this user's fresh events may still be on its way into fresh_users (unread on the
        # listener's socket, or being applied): then ask Redis. Checked before the set, see _listen.
        pending = self.events is not None and self._notice_pending()
        known = self.fresh_users
        want_fresh = self.events is not None and (known is None or pending or user_id in known)  # else: none
        memo = _request_records()
        want_user = model.user_store is not None and (memo is None or (model.version, user_id) not in memo)
        raw_user, raw_fresh = self._read(model, user_id, want_user, want_fresh)
        if want_user and memo is not None:
            memo[(model.version, user_id)] = model.decode_user(raw_user)
        return fresh_overlay(model, raw_fresh, self.store.keys.user_shard(user_id)) if raw_fresh is not None else (None, None)

    def user_record(self, model: Recommender, user_id: str):
        """``model.read_user`` of a version whose users are records in Redis: the request's copy if
        :meth:`fresh_history` already read it, else one HGET (None while Redis is unreachable)."""
        memo = _request_records()
        if memo is not None and (model.version, user_id) in memo:
            return memo[(model.version, user_id)]
        record = model.decode_user(self._read(model, user_id, True, False)[0])
        if memo is not None:
            memo[(model.version, user_id)] = record
        return record

    def _read(self, model: Recommender, user_id: str, want_user: bool, want_fresh: bool) -> tuple[bytes | None, bytes | None]:
        """(the user's record, the user's overlay) as stored, in one pipeline; None for what was not asked."""
        if not (want_user or want_fresh) or time.monotonic() < self._fresh_retry_at:
            return None, None
        client = self.events.redis if self.events is not None else self.store.redis  # short timeouts
        reads = []
        if want_user:
            reads.append(self.store.user_address(model.version, model.user_store, user_id))
        if want_fresh:
            keys = self.store.keys
            reads.append((keys.fresh_of(keys.user_shard(user_id)), user_id))
        try:
            if len(reads) == 1:  # most requests (no fresh events): one command costs less than a pipeline
                found = [client.hget(*reads[0])]
            else:
                pipe = client.pipeline(transaction=False)
                for key, field in reads:
                    pipe.hget(key, field)
                found = pipe.execute()
        except redis.RedisError as exc:
            self._fresh_retry_at = time.monotonic() + FRESH_RETRY_SECONDS
            self._mark_redis_down(exc)
            return None, None
        if not self.redis_ok:
            self.redis_ok = True
        return (found.pop(0) if want_user else None), (found.pop(0) if want_fresh else None)

    def serving(self, user_id: str) -> tuple[Recommender | None, str | None, str | None]:
        """(model, arm, experiment id) for this user: the arm's version while an experiment runs, else the live one."""
        running = self.running
        if running is None:
            return self.current, None, None
        arm = running.experiment.assign(user_id)
        return running.models[arm], arm, running.experiment.id

    def refresh_experiment(self) -> None:
        """Follow the experiment record: open every arm's version (memory-mapped, as the live one) or stop serving one.

        An arm whose version does not load means this worker serves no
        experiment (everyone gets the live version, ``arm`` null, so nothing is
        miscounted) and tries again after ``RETRY_MAX_SECONDS``.
        """
        try:
            raw = self.store.redis.get(self.store.keys.experiment)
        except redis.RedisError as exc:
            self._mark_redis_down(exc)
            return  # keep serving what we have
        if raw == self._experiment_raw and (raw is None or self.running is not None or time.monotonic() < self._experiment_retry_at):
            return
        if raw is None:
            if self.running is not None:
                log.info("experiment %s ended: serving the live version to everyone", self.running.experiment.name)
            self.running, self._experiment_raw, self.experiment_error = None, None, None
            return
        self._experiment_raw = raw
        try:
            experiment = Experiment.from_record(orjson.loads(raw))
            opened: dict[str, Recommender] = {}
            have = {m.version: m for m in ([self.current] + list(self.running.models.values() if self.running else [])) if m}
            for arm, spec in experiment.arms.items():
                version = spec["version"]
                if version not in have:
                    have[version] = self._load(version)
                opened[arm] = have[version]
        except Exception as exc:
            self.running = None
            self.experiment_error = f"cannot serve the experiment: {exc!r}"
            self._experiment_retry_at = time.monotonic() + RETRY_MAX_SECONDS
            log.error("%s; serving the live version to everyone (next try in %.0f s)", self.experiment_error, RETRY_MAX_SECONDS)
            return
        self.running, self.experiment_error = Running(experiment, opened), None
        heap.settle(f"opening experiment {experiment.name}")
        log.info("serving experiment %s: %s", experiment.name, {a: s["version"] for a, s in experiment.arms.items()})

    def refresh(self) -> bool:
        """Serve the live version, or the best fallback while it cannot be loaded. True if it switched.

        A live version that fails to load (unreadable metadata, a part that
        fails its checksum, files that do not open) is retried with backoff
        (``RETRY_SECONDS``, doubling up to ``RETRY_MAX_SECONDS``; at once when a
        new pointer is announced), never given up: an operator who repairs it
        needs no restart. Meanwhile a worker that has a model keeps it, and a
        worker that has none (restarted, or a fresh host with an empty cache)
        loads the newest kept version that verifies and is not ``rejected``
        or ``corrupt``. ``fallback`` says so (``/readyz``, the log, the
        ``recs_model_fallback`` metric).
        """
        with self._switch_lock:
            try:
                live = self.store.live_version()
                self.redis_ok = True
            except redis.RedisError as exc:
                self._mark_redis_down(exc)
                return False
            if live is None or live == self.version:
                self._set_fallback(None)
                return False
            retry = self._retries.get(live)
            if retry is not None and time.monotonic() < retry[1]:
                return self._ensure_fallback(live) if self.current is None else False
            try:
                model = self._load(live)
            except redis.RedisError as exc:
                self._mark_redis_down(exc)
                return False
            except Exception as exc:  # a bad version of any kind: keep serving, try again later
                failures = retry[0] + 1 if retry else 1
                wait = min(RETRY_SECONDS * 2 ** (failures - 1), RETRY_MAX_SECONDS)
                self._retries[live] = (failures, time.monotonic() + wait)
                self.refused[live] = str(exc) if isinstance(exc, ModelError) else repr(exc)
                self.last_error = f"cannot load live version {live}: {self.refused[live]}"
                log.error("%s (attempt %d; next try in %.0f s)", self.last_error, failures, wait)
                LOAD_FAILURES.inc()
                if self.current is None:
                    return self._ensure_fallback(live)
                self._set_fallback(live)
                return False
            self._retries.pop(live, None)
            self.refused.pop(live, None)
            self._swap(model)
            self._set_fallback(None)
            return True

    def _load(self, version: str) -> Recommender:
        folder = self.store.materialize(version, self.cache_dir)
        model = Recommender(folder)
        if model.user_store is not None:
            model.read_user = lambda user_id: self.user_record(model, user_id)
        return model

    def _swap(self, model: Recommender) -> None:
        previous, self.current = self.current, model
        self.last_error = None
        log.info("serving model version %s (was %s)", model.version, previous.version if previous else None)
        self._forget_old_copies()
        del previous
        heap.settle(f"opening version {model.version}")

    def _ensure_fallback(self, live: str) -> bool:
        """Load the newest kept version that verifies (never ``live``, rejected or corrupt ones)."""
        try:
            kept = self.store.versions()
        except redis.RedisError as exc:
            self._mark_redis_down(exc)
            return False
        for meta in kept:  # newest first
            version = meta.get("model_version")
            if version == live or meta.get("status") in ("rejected", "corrupt"):
                continue
            try:
                model = self._load(version)
            except redis.RedisError as exc:
                self._mark_redis_down(exc)
                return False
            except Exception as exc:
                log.warning("fallback candidate %s does not load either: %s", version, exc)
                continue
            self._swap(model)
            self.last_error = f"cannot load live version {live}: {self.refused.get(live)}"
            self._set_fallback(live)
            return True
        log.error("no kept version loads; nothing to serve until the live version %s is repaired", live)
        return False

    def _set_fallback(self, live: str | None) -> None:
        """Record that this worker serves another version than ``live`` (None: it serves the live one)."""
        if live is not None and self.current is not None:
            if self.fallback is None or self.fallback["live"] != live:
                log.warning("serving fallback version %s while live version %s cannot be loaded", self.version, live)
            self.fallback = {"live": live, "serving": self.version, "error": self.refused.get(live)}
            MODEL_FALLBACK.set(1)
        else:
            if self.fallback is not None:
                log.info("fallback over: serving the live version %s", self.version)
            self.fallback = None
            MODEL_FALLBACK.set(0)

    def retry_now(self) -> None:
        """A new pointer was announced: try the live version at once, whatever the backoff says."""
        self._retries.clear()

    def _mark_redis_down(self, exc: Exception) -> None:
        if self.redis_ok:
            log.warning("redis unreachable, serving the loaded model: %s", exc)
        self.redis_ok = False
        self.last_error = f"redis unreachable: {exc}"

    def _forget_old_copies(self) -> None:
        try:
            kept = {meta["model_version"] for meta in self.store.versions()}
            arms = {m.version for m in self.running.models.values()} if self.running else set()
            self.store.prune_cache(self.cache_dir, kept | {self.version} | arms)
        except redis.RedisError:
            pass

    # -- background watcher ---------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._watch, name="live-model-watcher", daemon=True)
        self._thread.start()
        threading.Thread(target=self._listen, name="live-model-listener", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
                self.refresh_experiment()
            except Exception:  # the watcher must outlive any single failure
                log.exception("model refresh failed")
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def note_fresh(self, user_ids) -> None:
        """Users who just got fresh events through this worker (others learn by pub/sub)."""
        known = self.fresh_users
        if known is not None:
            known.update(user_ids)

    def _sync_fresh_users(self) -> None:
        """Who has fresh history at all; after this, notices keep the set current."""
        self.fresh_users = EventLog(self.store.redis, self.store.keys).fresh_users()

    def _notice_pending(self) -> bool:
        """Whether a notice may be unapplied: bytes unread on the listener's socket, or the listener applying them.

        The socket is looked at first: the listener reads it only while holding the lock and releases
        the lock once fresh_users holds what it read, so a notice is always in one of the three places
        a request looks (socket, lock, set). Redis writes a notice to the subscribers in the same pass
        as its reply to the POST that caused it, so it is on every worker's socket before that POST's
        answer can reach a client, let alone a client's next request.
        """
        sock = self._notice_socket
        if sock is None:
            return False  # no subscription: fresh_users is None, and every request asks Redis anyway
        try:
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            if poller.poll(0):
                return True
        except (OSError, ValueError):  # closed under us: the listener is reconnecting
            return True
        return self._notice_lock.locked()

    def _listen(self) -> None:
        """Wake the watcher as soon as a publish is announced (the poll stays as a fallback),
        and keep the set of users with fresh events, so that /recommend asks Redis only
        for them. Until the subscription works (or while it is broken) the set is None
        and every request asks Redis, which is always correct. Notices are read and applied
        under ``_notice_lock`` (see :meth:`_notice_pending`)."""
        keys = self.store.keys
        while not self._stop.is_set():
            try:
                pubsub = self.store.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(keys.live_channel, keys.fresh_channel)
                self._notice_socket = pubsub.connection._sock
                self._sync_fresh_users()  # after subscribing: no notice can fall in between
                while not self._stop.is_set():
                    if not pubsub.connection.can_read(timeout=1.0):  # waits without the lock
                        continue
                    with self._notice_lock:  # drain: socket and parser buffer, confirmations included
                        while pubsub.connection.can_read(timeout=0):
                            message = pubsub.get_message(timeout=0)
                            if message is not None:
                                self._apply_notice(message, keys)
            except Exception:
                self._notice_socket = None
                self.fresh_users = None
                time.sleep(1.0)

    def _apply_notice(self, message: dict, keys) -> None:
        if message["channel"].decode() == keys.fresh_channel:
            self.note_fresh(message["data"].decode().split("\n"))
        else:
            self.retry_now()
            self._wake.set()
            self._sync_fresh_users()  # a new version: the job dropped consumed entries
