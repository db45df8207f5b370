"""The retraining scheduler: a long-running worker, ``python -m jobs.scheduler``.

It owns *when* the nightly job runs:

* on a cron schedule (``RETRAIN_CRON``, default ``0 3 * * *``: 03:00 every
  night, in the host's local time zone like system cron; a sixth field gives
  seconds);
* and whenever someone presses "Retrain now" on the dashboard, which only
  queues a request in Redis: the requests are executed here, in order.

Each run is exactly the command a system cron would run (see
``deploy/crontab``): ``python -m jobs.nightly --trigger ...`` in a child
process, so a crash or an out-of-memory kill of one run never takes the
scheduler down, and each run's memory goes back to the host when it ends.
The job itself takes the lock, records the run and applies the quality gate
(:mod:`jobs.runs`). Input locations come from ``EVENTS_PATH`` and
``CATALOG_PATH`` (globs allowed, e.g. daily partitions); flags this command
does not know are passed on to ``python -m jobs.nightly``.

The scheduler announces itself in Redis (a heartbeat with its next scheduled
time) so the dashboard can tell whether queued runs will be picked up.
SIGTERM or Ctrl-C stops it; a run in progress is told to stop (it records
itself as failed and releases the lock).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime

import orjson
from croniter import croniter

from jobs.runs import pop_request
from models.store import ModelStore, redis_from_url

log = logging.getLogger("jobs.scheduler")

DEFAULT_CRON = "0 3 * * *"
EXIT_MEANING = {
    0: "succeeded",
    1: "failed",
    2: "failed: bad input data",
    3: "rejected by the quality gate",
    4: "skipped: another run holds the lock",
    143: "stopped (SIGTERM)",
}


class Schedule:
    """A cron expression, evaluated in local time."""

    def __init__(self, expression: str):
        if not croniter.is_valid(expression):
            raise ValueError(f"{expression!r} is not a valid cron expression (e.g. '0 3 * * *' for 03:00 every night)")
        self.expression = expression

    def next_after(self, moment: float) -> float:
        start = datetime.fromtimestamp(moment).astimezone()
        return croniter(self.expression, start).get_next(float)


class Scheduler:
    """Fires scheduled runs and executes queued ones, one at a time, each as a child process."""

    def __init__(
        self,
        store: ModelStore,
        schedule: Schedule,
        job_args: list[str],
        poll_seconds: float = 2.0,
        clock: Callable[[], float] = time.time,
        run_child: Callable[[list[str]], int] | None = None,
        trending_seconds: float | None = None,
    ):
        self.store = store
        self.schedule = schedule
        self.job_args = job_args
        self.poll_seconds = poll_seconds
        self.clock = clock
        self.run_child = run_child or self._run_child
        self.next_run_at = schedule.next_after(clock())
        self.started_at = clock()
        self.current: str | None = None  # what is running now, for the heartbeat
        self.stopping = threading.Event()
        self._child: subprocess.Popen | None = None
        # The trending row of /page: refreshed between runs (python -m jobs.trending), None = off.
        self.trending_seconds = trending_seconds
        self.next_trending_at = clock() if trending_seconds else float("inf")

    def job_command(self, trigger: str, run_id: str | None = None, force: bool = False, reselect: bool = False) -> list[str]:
        command = [sys.executable, "-m", "jobs.nightly", "--trigger", trigger, "--quiet"]
        if run_id:
            command += ["--run-id", run_id]
        if force:
            command.append("--force")
        if reselect:
            command.append("--reselect")
        return command + self.job_args

    def trending_args(self) -> list[str]:
        """The job's input flags (--events, --catalog, --events-archive, --prefix) that jobs.trending knows too."""
        wanted = ("--events", "--catalog", "--events-archive", "--prefix")
        out, args = [], list(self.job_args)
        for n, arg in enumerate(args):
            name = arg.split("=", 1)[0]
            if name in wanted:
                out.append(arg)
                if "=" not in arg and n + 1 < len(args):
                    out.append(args[n + 1])
        return out

    # -- one turn of the loop -------------------------------------------------------------------
    def step(self) -> str | None:
        """Start whatever is due; wait at most ``poll_seconds`` for a queued request. Returns what ran."""
        now = self.clock()
        if now >= self.next_trending_at:
            self.next_trending_at = now + self.trending_seconds
            code = self.run_child([sys.executable, "-m", "jobs.trending", *self.trending_args()])
            log.info("trending refresh exit %s; next in %.0f s", code, self.trending_seconds)
            return "trending"
        if now >= self.next_run_at:
            # Fire once for any missed slots (e.g. a long manual run overlapped one); the next slot is
            # counted from the end of this run, so queued runs get their turn before the schedule's next.
            try:
                self._execute("scheduled")
            finally:
                self.next_run_at = self.schedule.next_after(self.clock())
                self.beat()
                log.info("next scheduled run at %s", _local(self.next_run_at))
            return "scheduled"
        if self.store.redis.exists(self.store.keys.job_lock):
            # Someone (a CLI run, another scheduler) is training: leave the queue alone until it ends.
            self.stopping.wait(min(self.poll_seconds, max(self.next_run_at - now, 0.01)))
            return None
        request = pop_request(self.store, min(self.poll_seconds, max(self.next_run_at - now, 0.01)))
        if request is None:
            return None
        self._execute("manual", request["run_id"], bool(request.get("force")), bool(request.get("reselect")))
        return "manual"

    def _execute(self, trigger: str, run_id: str | None = None, force: bool = False, reselect: bool = False) -> int:
        self.current = run_id or trigger
        self.beat()
        log.info("starting a %s run%s%s", trigger, f" {run_id}" if run_id else "", " (forced)" if force else "")
        started = time.monotonic()
        try:
            code = self.run_child(self.job_command(trigger, run_id, force, reselect))
        finally:
            self.current = None
        log.info(
            "%s run %s after %.0fs (exit %s)",
            trigger,
            EXIT_MEANING.get(code, "failed"),
            time.monotonic() - started,
            code,
        )
        self.beat()
        return code

    def _run_child(self, command: list[str]) -> int:
        # Output goes to the scheduler's own stdout/stderr (its log); the run's tail is also in Redis.
        self._child = subprocess.Popen(command)
        try:
            return self._child.wait()
        finally:
            self._child = None

    # -- presence --------------------------------------------------------------------------------
    def beat(self) -> None:
        """Tell the dashboard this scheduler is alive, what it runs and when it will run next."""
        status = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "cron": self.schedule.expression,
            "next_run_at": self.next_run_at,
            "started_at": self.started_at,
            "seen_at": self.clock(),
            "running": self.current,
        }
        ttl = max(10, int(3 * self.poll_seconds))
        self.store.redis.set(self.store.keys.scheduler, orjson.dumps(status), ex=ttl)

    def _heartbeat(self) -> None:
        # A thread, so the dashboard still sees the scheduler during a run of several hours.
        while not self.stopping.wait(self.poll_seconds):
            try:
                self.beat()
            except Exception as exc:
                log.warning("scheduler heartbeat failed (will retry): %s", exc)

    def run_forever(self) -> None:
        log.info(
            "scheduler started: cron %r, next run at %s; waiting for queued runs",
            self.schedule.expression,
            _local(self.next_run_at),
        )
        self.beat()
        threading.Thread(target=self._heartbeat, name="scheduler-heartbeat", daemon=True).start()
        while not self.stopping.is_set():
            try:
                self.step()
            except Exception:  # Redis away for a moment, etc.: the scheduler must outlive it
                log.exception("scheduler step failed; retrying")
                self.stopping.wait(self.poll_seconds)
        self.store.redis.delete(self.store.keys.scheduler)
        log.info("scheduler stopped")

    def stop(self, signum=None, frame=None) -> None:
        self.stopping.set()
        child = self._child
        if child is not None and child.poll() is None:
            log.info("stopping the run in progress (pid %d)", child.pid)
            child.terminate()


def _local(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


def scheduler_status(store: ModelStore) -> dict | None:
    """The heartbeat of the scheduler, or None when none is running (its key expired)."""
    raw = store.redis.get(store.keys.scheduler)
    return orjson.loads(raw) if raw else None


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.scheduler",
        description="Run the nightly job on a cron schedule and execute runs queued from the dashboard. "
        "Flags not listed here are passed on to python -m jobs.nightly.",
    )
    parser.add_argument(
        "--cron",
        default=os.environ.get("RETRAIN_CRON", DEFAULT_CRON),
        help=f"when to retrain, cron syntax in local time (env RETRAIN_CRON, default {DEFAULT_CRON!r})",
    )
    parser.add_argument(
        "--events",
        default=os.environ.get("EVENTS_PATH"),
        help="events file(s): path, glob or comma list (env EVENTS_PATH)",
    )
    parser.add_argument(
        "--catalog", default=os.environ.get("CATALOG_PATH"), help="catalogue file(s) (env CATALOG_PATH)"
    )
    parser.add_argument(
        "--redis-url", default=None, help="Redis holding models, runs and the queue (default: env REDIS_URL)"
    )
    parser.add_argument(
        "--prefix", default=os.environ.get("REDIS_PREFIX", "recs"), help="key prefix (env REDIS_PREFIX)"
    )
    parser.add_argument(
        "--poll-seconds",
        type=float,
        default=float(os.environ.get("SCHEDULER_POLL_SECONDS", "2")),
        help="how often to check the queue and the clock",
    )
    args, job_args = parser.parse_known_args(argv)
    if not args.events or not args.catalog:
        parser.error("--events and --catalog are required (or set EVENTS_PATH and CATALOG_PATH)")
    try:
        args.schedule = Schedule(args.cron)
    except ValueError as exc:
        parser.error(f"--cron / RETRAIN_CRON: {exc}")
    return args, ["--events", args.events, "--catalog", args.catalog, "--prefix", args.prefix, *job_args]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, job_args = parse_args(argv)
    if args.redis_url:
        os.environ["REDIS_URL"] = args.redis_url  # the runs inherit it (a URL may hold a password: not in argv)
    store = ModelStore(redis_from_url(args.redis_url), args.prefix)
    trending = float(os.environ.get("TRENDING_SECONDS", "3600")) or None  # 0 turns the hourly refresh off
    scheduler = Scheduler(store, args.schedule, job_args, args.poll_seconds, trending_seconds=trending)
    signal.signal(signal.SIGTERM, scheduler.stop)
    signal.signal(signal.SIGINT, scheduler.stop)
    scheduler.run_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
