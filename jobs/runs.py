"""Recorded batch runs: the job lock, the run records and the quality gate.

Every publishing run of the nightly job (scheduled, queued from the dashboard,
or started by hand with ``python -m jobs.nightly``) goes through :func:`run_job`:

1. It takes the **job lock**: a Redis key naming the run, with an expiry
   (``JOB_LOCK_TTL`` seconds, default 120) that a heartbeat thread keeps
   pushing back. A second run finds the key and stops, saying which run holds
   it. A run that crashes or is killed stops heartbeating, so its lock lapses
   within the expiry and the next run marks its record as abandoned.
2. It keeps a **run record** in Redis: trigger, start and end, status, current
   step and progress %, row counts, metrics, gate decision, error and the tail
   of its log. The last ``RUNS_KEEP`` runs (default 50) are kept.
3. It calls :func:`jobs.nightly.run_nightly`, which publishes the new version
   *without* making it live.
4. It applies the **quality gate**: the new version goes live only if its
   holdout nDCG@10 is no worse than the live version's by more than
   ``gate_tolerance``. Otherwise it is kept, marked ``rejected`` and the live
   model stays. ``force`` makes it live regardless.

Run statuses: ``queued`` (waiting for the scheduler), ``running``,
``succeeded`` (new version live), ``rejected`` (by the gate), ``failed``,
``skipped`` (another run held the lock).

The web app reads run records through this module too, so nothing here
imports the training code at import time (that would load torch into every
web worker).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import orjson
import redis

from models import progress
from models.store import CorruptMeta, ModelStore, new_version_id, redis_from_url

log = logging.getLogger("jobs.runs")

GATE_METRIC = "ndcg@10"
LOG_TAIL_LINES = 200
RUN_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{4,32}")
ACTIVE = ("queued", "running")
# Job durations for the /metrics histogram: a demo run takes seconds, a full catalogue hours.
DURATION_BUCKETS = (10, 30, 60, 300, 900, 1800, 3600, 7200, 14400)
# Rough share of a run's time per stage, so the dashboard can show one progress %.
# Stages run_nightly announces (models.progress.report(stage, 0, ...)); unknown ones count as part of the last.
STAGES = (
    ("load", 3),
    ("evaluate", 15),
    ("select", 35),
    ("cold_start", 7),
    ("train", 20),
    ("index", 13),
    ("publish", 5),
    ("gate", 2),
)


def lock_ttl() -> float:
    """Seconds a run's lock outlives its last heartbeat (env ``JOB_LOCK_TTL``)."""
    return float(os.environ.get("JOB_LOCK_TTL", "120"))


def runs_keep() -> int:
    """How many run records are kept (env ``RUNS_KEEP``)."""
    return int(os.environ.get("RUNS_KEEP", "50"))


class LockHeld(RuntimeError):
    """Another run holds the job lock."""

    def __init__(self, holder: str | None):
        super().__init__(f"another run ({holder or 'unknown'}) is in progress; try again when it has finished")
        self.holder = holder


class Terminated(BaseException):
    """The process was asked to stop (SIGTERM) in the middle of a run.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception``
    on the way swallows it and the run really stops.
    """


# -- the lock ----------------------------------------------------------------------------------
class JobLock:
    """A Redis key holding the id of the run that owns it, with an expiry kept alive by a heartbeat.

    Extending and releasing check the owner in one Lua script, so a run whose
    lock already lapsed (and was taken by another run) cannot extend or delete
    the new owner's lock.
    """

    _EXTEND = (
        "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
    )
    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"

    def __init__(self, client: redis.Redis, key: str, owner: str, ttl: float, on_beat=None):
        self.redis = client
        self.key = key
        self.owner = owner
        self.ttl_ms = max(1, int(ttl * 1000))
        self.on_beat = on_beat
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        if not self.redis.set(self.key, self.owner, nx=True, px=self.ttl_ms):
            raise LockHeld(self.holder())
        self._thread = threading.Thread(target=self._heartbeat, name="job-lock-heartbeat", daemon=True)
        self._thread.start()

    def holder(self) -> str | None:
        value = self.redis.get(self.key)
        return value.decode() if value else None

    def held(self) -> bool:
        return self.holder() == self.owner

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.redis.eval(self._RELEASE, 1, self.key, self.owner)

    def _heartbeat(self) -> None:
        # Three beats per expiry: one lost beat (a slow Redis, a GC pause) does not lose the lock.
        while not self._stop.wait(self.ttl_ms / 3000):
            try:
                if not self.redis.eval(self._EXTEND, 1, self.key, self.owner, self.ttl_ms):
                    self.lost = True
                    log.error(
                        "run %s lost the job lock (it expired); this run will not make its version live", self.owner
                    )
                    return
                if self.on_beat is not None:
                    self.on_beat()
            except redis.RedisError as exc:
                log.warning("job lock heartbeat failed (will retry): %s", exc)


# -- run records -------------------------------------------------------------------------------
class RunRecord:
    """One run in Redis: a hash of JSON-encoded fields and a capped list of log lines."""

    def __init__(self, store: ModelStore, run_id: str):
        self.store = store
        self.id = run_id
        self.key = store.keys.run(run_id)

    def save(self, **fields) -> None:
        """Create or update the record and list it among the kept runs."""
        pipe = self.store.redis.pipeline(transaction=True)
        pipe.hset(self.key, mapping={name: orjson.dumps(value) for name, value in {"id": self.id, **fields}.items()})
        pipe.zadd(
            self.store.keys.runs,
            {self.id: fields.get("requested_at") or fields.get("started_at") or time.time()},
            nx=True,
        )
        pipe.execute()

    def update(self, **fields) -> None:
        self.store.redis.hset(self.key, mapping={name: orjson.dumps(value) for name, value in fields.items()})

    def append_log(self, line: str) -> None:
        pipe = self.store.redis.pipeline(transaction=False)
        pipe.rpush(self.store.keys.run_log(self.id), line)
        pipe.ltrim(self.store.keys.run_log(self.id), -LOG_TAIL_LINES, -1)
        pipe.execute()


def valid_run_id(run_id: str) -> bool:
    return bool(RUN_ID.fullmatch(run_id or ""))


def get_run(store: ModelStore, run_id: str) -> dict | None:
    # Ids come from URLs: check the shape before it becomes part of a key name.
    if not valid_run_id(run_id):
        return None
    raw = store.redis.hgetall(store.keys.run(run_id))
    return {k.decode(): orjson.loads(v) for k, v in raw.items()} if raw else None


def list_runs(store: ModelStore, limit: int = 50) -> list[dict]:
    """Kept run records, newest first."""
    ids = [v.decode() for v in store.redis.zrevrange(store.keys.runs, 0, limit - 1)]
    pipe = store.redis.pipeline(transaction=False)
    for run_id in ids:
        pipe.hgetall(store.keys.run(run_id))
    return [{k.decode(): orjson.loads(v) for k, v in raw.items()} for raw in pipe.execute() if raw]


def run_log(store: ModelStore, run_id: str) -> list[str]:
    if not valid_run_id(run_id):
        return []
    return [line.decode(errors="replace") for line in store.redis.lrange(store.keys.run_log(run_id), 0, -1)]


def prune_runs(store: ModelStore, keep: int) -> list[str]:
    """Drop the oldest records beyond ``keep``, never a queued or running one."""
    dropped = []
    for raw in store.redis.zrevrange(store.keys.runs, keep, -1):
        run_id = raw.decode()
        status = store.redis.hget(store.keys.run(run_id), "status")
        if status is not None and orjson.loads(status) in ACTIVE:
            continue
        pipe = store.redis.pipeline(transaction=True)
        pipe.zrem(store.keys.runs, run_id)
        pipe.delete(store.keys.run(run_id), store.keys.run_log(run_id))
        pipe.execute()
        dropped.append(run_id)
    return dropped


def mark_abandoned(store: ModelStore, own_id: str) -> list[str]:
    """Records still 'running' when we hold the lock belong to runs that died: say so."""
    abandoned = []
    for record in list_runs(store, runs_keep()):
        if record.get("status") == "running" and record["id"] != own_id:
            RunRecord(store, record["id"]).update(
                status="failed",
                ended_at=record.get("heartbeat_at") or record.get("started_at"),
                error="abandoned: its process stopped without finishing (the job lock expired)",
            )
            abandoned.append(record["id"])
    return abandoned


# -- manual runs: the queue the scheduler executes ---------------------------------------------
def queue_run(store: ModelStore, force: bool = False, requested_by: str = "dashboard", reselect: bool = False) -> str:
    """Queue a run for ``python -m jobs.scheduler``; its record shows as 'queued' until it starts.

    ``reselect``: search parameters again instead of reusing the live version's search (``--reselect``).
    """
    run_id = new_version_id()
    now = time.time()
    RunRecord(store, run_id).save(
        trigger="manual", status="queued", requested_at=now, requested_by=requested_by, force=force,
        reselect=reselect, progress=0,
    )  # fmt: skip
    request = {"run_id": run_id, "force": force, "reselect": reselect, "requested_at": now}
    store.redis.rpush(store.keys.run_queue, orjson.dumps(request))
    return run_id


def queued_requests(store: ModelStore) -> list[dict]:
    return [orjson.loads(raw) for raw in store.redis.lrange(store.keys.run_queue, 0, -1)]


def pop_request(store: ModelStore, timeout: float) -> dict | None:
    popped = store.redis.blpop([store.keys.run_queue], timeout=max(timeout, 0.01))
    return orjson.loads(popped[1]) if popped else None


# -- job outcome counters (read by app.metrics for /metrics) ---------------------------------------
def record_outcome(store: ModelStore, status: str, duration: float) -> None:
    key = store.keys.job_stats
    pipe = store.redis.pipeline(transaction=True)
    pipe.hincrby(key, f"runs:{status}", 1)
    if status != "skipped":  # a skipped run did no work: its zero duration would flatter the histogram
        pipe.hincrbyfloat(key, "duration_sum", duration)
        pipe.hincrby(key, "duration_count", 1)
        for bound in DURATION_BUCKETS:
            if duration <= bound:
                pipe.hincrby(key, f"duration_le:{bound}", 1)
    if status == "succeeded":
        pipe.hset(key, "last_success", time.time())
    pipe.execute()


def job_stats(store: ModelStore) -> dict:
    raw = {k.decode(): float(v) for k, v in store.redis.hgetall(store.keys.job_stats).items()}
    return {
        "runs": {k.split(":", 1)[1]: int(v) for k, v in raw.items() if k.startswith("runs:")},
        "duration_sum": raw.get("duration_sum", 0.0),
        "duration_count": int(raw.get("duration_count", 0)),
        "duration_buckets": [(bound, int(raw.get(f"duration_le:{bound}", 0))) for bound in DURATION_BUCKETS],
        "last_success": raw.get("last_success"),
    }


# -- the quality gate ----------------------------------------------------------------------------
@dataclass
class GateDecision:
    passed: bool
    reason: str
    candidate: float | None
    live: float | None
    live_version: str | None
    tolerance: float
    forced: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def holdout_score(meta: dict | None) -> float | None:
    """The gate's metric (holdout nDCG@10 of the model) from a version's metadata, if it was evaluated."""
    value = (((meta or {}).get("metrics") or {}).get("model") or {}).get(GATE_METRIC)
    return float(value) if value is not None else None


def quality_gate(candidate_meta: dict, live_meta: dict | None, tolerance: float) -> GateDecision:
    """Pass unless the candidate's holdout nDCG@10 is below the live one's by more than ``tolerance``.

    Both scores are measured on each version's own most recent data, so small
    night-to-night differences are noise; the tolerance absorbs them.
    """
    candidate, live = holdout_score(candidate_meta), holdout_score(live_meta)
    live_version = (live_meta or {}).get("model_version")
    decision = {"candidate": candidate, "live": live, "live_version": live_version, "tolerance": tolerance}
    if live_meta is None:
        return GateDecision(True, "no version is live yet", **decision)
    if live is None:
        return GateDecision(True, f"the live version has no holdout {GATE_METRIC} to compare with", **decision)
    if candidate is None:
        return GateDecision(False, f"the new version has no holdout {GATE_METRIC} (evaluation was off)", **decision)
    if candidate >= live - tolerance:
        return GateDecision(
            True, f"{GATE_METRIC} {candidate:.4f} vs live {live:.4f} (tolerance {tolerance})", **decision
        )
    return GateDecision(
        False, f"{GATE_METRIC} {candidate:.4f} is below live {live:.4f} by more than {tolerance}", **decision
    )


# -- progress and log capture -----------------------------------------------------------------------
class ProgressRecorder:
    """A models.progress listener: stage markers (done=0) and in-stage progress -> step and overall %."""

    def __init__(self, record: RunRecord, min_interval: float = 0.5):
        self.record = record
        self.min_interval = min_interval
        self.starts: dict[str, float] = {}
        total, start = sum(weight for _, weight in STAGES), 0.0
        self.weights = {}
        for name, weight in STAGES:
            self.starts[name], self.weights[name] = 100 * start / total, 100 * weight / total
            start += weight
        self.stage: str | None = None
        self.percent = 0.0
        self._last_write = 0.0

    def __call__(self, step: str, done: int, total: int) -> None:
        if done == 0 and step in self.starts:
            self.stage, share, label = step, 0.0, step
        else:
            share = min(done / total, 1.0) if total else 0.0
            detail = f"{step} {100 * share:.0f}%" if done else step
            label = f"{self.stage} · {detail}" if self.stage and step != self.stage else detail
        stage = self.stage or step
        # Sub-steps restart (e.g. candidates per trial); the overall % only moves forward.
        self.percent = max(self.percent, self.starts.get(stage, 0.0) + self.weights.get(stage, 0.0) * share)
        now = time.monotonic()
        if done == 0 or now - self._last_write >= self.min_interval or share >= 1.0:
            self._last_write = now
            self.record.update(step=label, progress=round(self.percent, 1))


class RunLogHandler(logging.Handler):
    """Copies log lines into the run's log tail in Redis."""

    def __init__(self, record: RunRecord):
        super().__init__(logging.INFO)
        self.record = record
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))

    def emit(self, entry: logging.LogRecord) -> None:
        if entry.name.startswith(("redis", "urllib3")):  # a Redis failure must not log into Redis
            return
        try:
            self.record.append_log(self.format(entry))
        except Exception:  # the log tail is a convenience; never fail the run over it
            pass


@contextlib.contextmanager
def recording(record: RunRecord) -> Iterator[None]:
    """Route progress reports and INFO log lines of the run into its record while it runs."""
    root = logging.getLogger()
    handler, tracker = RunLogHandler(record), ProgressRecorder(record)
    previous_level = root.level
    # The tail should show the job's INFO lines even when the caller configured logging quieter.
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    progress.add_listener(tracker)
    try:
        yield
    finally:
        progress.remove_listener(tracker)
        root.removeHandler(handler)
        root.setLevel(previous_level)


# -- running ------------------------------------------------------------------------------------
@dataclass
class RunOutcome:
    run_id: str
    status: str  # succeeded | rejected
    version: str | None
    gate: GateDecision
    result: object  # jobs.nightly.NightlyResult


def run_job(config, store: ModelStore | None = None) -> RunOutcome:
    """Lock, record, train and publish (not live), gate, then activate or reject. See the module doc.

    ``config`` is a :class:`jobs.nightly.NightlyConfig` with ``publish`` on. Raises
    :class:`LockHeld` when another run is going (the attempt is recorded as
    skipped) and re-raises whatever made the run fail (recorded as failed).
    """
    from jobs.nightly import compact_live_events, run_nightly  # heavy (torch): only a job process pays for it

    if not config.publish:
        raise ValueError("run_job publishes; use run_nightly directly for a dry run")
    store = store or ModelStore(redis_from_url(config.redis_url), config.prefix)
    run_id = config.run_id or new_version_id()
    if not valid_run_id(run_id):
        raise ValueError(f"run id {run_id!r} does not look like one made by jobs.runs")
    record = RunRecord(store, run_id)
    started = time.time()
    base = {"trigger": config.trigger, "force": config.force, "host": socket.gethostname(), "pid": os.getpid()}
    lock = JobLock(
        store.redis, store.keys.job_lock, run_id, lock_ttl(), on_beat=lambda: record.update(heartbeat_at=time.time())
    )
    status = "failed"
    # One try from the lock on: a SIGTERM at any point still records the run and frees the lock.
    try:
        lock.acquire()
        for other in mark_abandoned(store, run_id):
            log.warning("run %s was abandoned by its process; marked failed", other)
        record.save(
            **base,
            status="running",
            started_at=started,
            heartbeat_at=started,
            step="starting",
            progress=0.0,
            error=None,
        )
        with recording(record):
            log.info("run %s (%s) started on %s", run_id, config.trigger, base["host"])
            result = run_nightly(replace(config, activate=False), store)
            compaction = None
            progress.report("gate", 0, 1)
            version = result.version
            live_version = store.live_version()
            try:
                live_meta = store.meta_or_none(live_version) if live_version else None
            except CorruptMeta as exc:
                # Nothing to compare with, and nothing to protect: a worker cannot load it either.
                log.warning("the live version's metadata is unreadable; the quality gate treats it as absent: %s", exc)
                live_meta = None
            gate = quality_gate(result.meta, live_meta, config.gate_tolerance)
            gate.forced = config.force and not gate.passed
            if lock.lost or not lock.held():
                raise RuntimeError(
                    "this run lost the job lock (it expired); the new version was kept but not made live"
                )
            if gate.passed or config.force:
                store.set_status(version, "ready", gate=gate.as_dict(), run_id=run_id)
                store.activate(version)
                status = "succeeded"
                log.info("version %s is live (%s%s)", version, gate.reason, "; forced" if gate.forced else "")
                compaction = compact_live_events(store, config)
            else:
                store.set_status(version, "rejected", gate=gate.as_dict(), run_id=run_id)
                status = "rejected"
                log.warning(
                    "version %s rejected by the quality gate: %s; %s stays live", version, gate.reason, live_version
                )
        record.update(
            status=status,
            ended_at=time.time(),
            step="done",
            progress=100.0,
            version=version,
            counts=result.meta.get("counts"),
            metrics=result.meta.get("metrics"),
            timings=result.timings,
            gate=gate.as_dict(),
            compaction=compaction,
        )
        return RunOutcome(run_id, status, version, gate, result)
    except LockHeld as exc:
        status = "skipped"
        record.save(**base, status="skipped", started_at=started, ended_at=time.time(), error=str(exc))
        raise
    except BaseException as exc:
        message = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc) or type(exc).__name__
        with _bookkeeping("record the failed run"):
            record.save(
                **base, status="failed", started_at=started, ended_at=time.time(), error=f"{type(exc).__name__}: {message}"
            )
        raise
    finally:
        # Bookkeeping must not hide why the run stopped (e.g. Redis refusing writes when it is full).
        with _bookkeeping("release the job lock"):
            lock.release()  # deletes the key only if this run holds it
        with _bookkeeping("count the run's outcome"):
            record_outcome(store, status, 0.0 if status == "skipped" else time.time() - started)
            prune_runs(store, runs_keep())


@contextlib.contextmanager
def _bookkeeping(what: str) -> Iterator[None]:
    try:
        yield
    except redis.RedisError as exc:
        log.warning("could not %s: %s", what, exc)


def run_from_cli(config) -> int:
    """``python -m jobs.nightly`` for a publishing run: exit codes as documented there."""
    from jobs.nightly import failure_exit_code, print_summary

    def terminate(signum, frame):
        raise Terminated(f"stopped by signal {signal.Signals(signum).name}")

    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        # So a stopped run records why and releases its lock instead of leaving both to expire.
        previous_handler = signal.signal(signal.SIGTERM, terminate)
    try:
        outcome = run_job(config)
    except Terminated as exc:
        print(f"error: {exc}; the run is recorded as failed and its lock released", file=sys.stderr)
        return 143
    except LockHeld as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    except Exception as exc:  # the live model stays as it was; say why we stopped
        return failure_exit_code(exc)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
    print_summary(outcome.result)
    gate = outcome.gate
    print(
        f"run: {outcome.run_id} {outcome.status}; quality gate: {'passed' if gate.passed else 'rejected'} ({gate.reason})"
        + ("; made live by --force" if gate.forced else "")
    )
    return 0 if outcome.status == "succeeded" else 3
