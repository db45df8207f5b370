"""The scheduler: its timing and queue logic with a controlled clock, then as real processes."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime

import pytest
from croniter import croniter

from jobs.nightly import parse_args as nightly_args
from jobs.runs import JobLock, get_run, list_runs, queue_run, queued_requests
from jobs.scheduler import Schedule, Scheduler, parse_args, scheduler_status
from tests.conftest import REPO_ROOT
from tests.test_runs import FAST_FLAGS


def local(*args) -> float:
    return datetime(*args).astimezone().timestamp()


def test_schedule_is_cron_in_local_time():
    nightly = Schedule("0 3 * * *")
    assert nightly.next_after(local(2026, 1, 1, 12, 0)) == local(2026, 1, 2, 3, 0)
    assert nightly.next_after(local(2026, 1, 2, 2, 59)) == local(2026, 1, 2, 3, 0)
    with pytest.raises(ValueError, match="not a valid cron expression"):
        Schedule("61 * * * *")


def test_bad_configuration_is_refused_with_the_reason(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--cron", "every night", "--events", "e.csv", "--catalog", "c.csv"])
    assert exit_info.value.code == 2 and "RETRAIN_CRON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--events", "", "--catalog", ""])
    assert "EVENTS_PATH" in capsys.readouterr().err
    # A model parameter with a fixed set of values is refused before any data is read.
    with pytest.raises(SystemExit) as exit_info:
        nightly_args(["--events", "e.csv", "--catalog", "c.csv", "--content-objective", "exact"])
    assert exit_info.value.code == 2 and "invalid choice: 'exact' (choose from 'regression', 'als')" in capsys.readouterr().err
    assert nightly_args(["--events", "e.csv", "--catalog", "c.csv", "--content-objective", "als"]).params.content_objective == "als"


class FakeClock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_scheduler_runs_queued_runs_in_order_and_fires_when_due(store):
    clock = FakeClock(local(2026, 1, 1, 12, 0))
    commands: list[list[str]] = []

    def run_child(command: list[str]) -> int:
        commands.append(command)
        clock.now += 600  # each run takes ten minutes
        return 0

    scheduler = Scheduler(
        store, Schedule("0 3 * * *"), ["--events", "e.csv"], poll_seconds=0.05, clock=clock, run_child=run_child
    )
    assert scheduler.next_run_at == local(2026, 1, 2, 3, 0)
    first, second = queue_run(store), queue_run(store, force=True, reselect=True)

    # While another run holds the lock, queued runs stay queued.
    lock = JobLock(store.redis, store.keys.job_lock, "cli-run", ttl=5)
    lock.acquire()
    assert scheduler.step() is None and len(queued_requests(store)) == 2
    lock.release()

    assert scheduler.step() == "manual" and scheduler.step() == "manual" and scheduler.step() is None
    assert [c[c.index("--run-id") + 1] for c in commands] == [first, second]
    assert "--force" not in commands[0] and "--force" in commands[1]
    assert "--reselect" not in commands[0] and "--reselect" in commands[1]
    assert commands[0][:4] == [sys.executable, "-m", "jobs.nightly", "--trigger"] and commands[0][4] == "manual"

    clock.now = local(2026, 1, 2, 3, 0, 1)
    assert scheduler.step() == "scheduled"
    assert commands[-1][3:5] == ["--trigger", "scheduled"] and "--run-id" not in commands[-1]
    assert commands[-1][-2:] == ["--events", "e.csv"]
    assert scheduler.next_run_at == local(2026, 1, 3, 3, 0)
    status = scheduler_status(store)
    assert status["cron"] == "0 3 * * *" and status["next_run_at"] == local(2026, 1, 3, 3, 0)


def test_crontab_runs_the_same_job_command():
    lines = [
        line
        for line in (REPO_ROOT / "deploy" / "crontab").read_text().splitlines()
        if line.strip() and not line.startswith("#") and "=" not in line.split()[0]
    ]
    assert len(lines) == 2  # the nightly job, and the hourly trending refresh
    commands = {}
    for line in lines:
        fields = line.split()
        assert croniter.is_valid(" ".join(fields[:5]))
        command = shlex.split(line.split("&&", 1)[1].split(">>")[0])
        commands[command[2]] = command
    assert set(commands) == {"jobs.nightly", "jobs.trending"}
    config = nightly_args(["--events", "e.csv", "--catalog", "c.csv", *commands["jobs.nightly"][3:]])
    assert config.trigger == "scheduled" and config.publish


def start_scheduler(redis_server, store, demo_files, cron: str, tmp_path, **env_extra):
    env = dict(os.environ, REDIS_URL=redis_server.url, REDIS_PREFIX=store.keys.prefix, **env_extra)
    env.update(EVENTS_PATH=str(demo_files["events"]), CATALOG_PATH=str(demo_files["catalog"]))
    log = open(tmp_path / "scheduler.log", "w+")  # noqa: SIM115 (closed by stop_scheduler)
    process = subprocess.Popen(
        [sys.executable, "-m", "jobs.scheduler", "--cron", cron, "--poll-seconds", "0.3", *FAST_FLAGS],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    process.log = log
    return process


def stop_scheduler(process) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    process.log.seek(0)
    text = process.log.read()
    process.log.close()
    return text


def wait_for(condition, timeout: float, what: str, process=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the scheduler exited while waiting for {what}: {stop_scheduler(process)[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_scheduler_process_executes_a_queued_run(redis_server, store, demo_files, tmp_path):
    process = start_scheduler(redis_server, store, demo_files, "0 3 1 1 *", tmp_path)  # never during the test
    try:
        status = wait_for(lambda: scheduler_status(store), 30, "the scheduler's heartbeat", process)
        assert status["cron"] == "0 3 1 1 *" and status["next_run_at"] > time.time() and status["running"] is None
        run_id = queue_run(store)
        assert get_run(store, run_id)["status"] == "queued"
        record = wait_for(
            lambda: (r := get_run(store, run_id)) and r["status"] not in ("queued", "running") and r,
            180,
            "the queued run to finish",
            process,
        )
        assert record["status"] == "succeeded", record
        assert record["trigger"] == "manual" and record["version"] == store.live_version()
        assert queued_requests(store) == []
    finally:
        output = stop_scheduler(process)
    assert process.returncode == 0, output[-3000:]
    assert scheduler_status(store) is None  # a stopped scheduler says so at once


def test_scheduler_process_retrains_on_its_schedule(redis_server, store, demo_files, tmp_path):
    process = start_scheduler(
        redis_server, store, demo_files, "* * * * * */2", tmp_path
    )  # every 2 s (6th field: seconds)
    try:
        record = wait_for(
            lambda: next((r for r in list_runs(store) if r["status"] == "succeeded"), None),
            180,
            "a scheduled run to succeed",
            process,
        )
        assert record["trigger"] == "scheduled" and store.live_version() == record["version"]
    finally:
        output = stop_scheduler(process)
    # Stopping mid-run (a next scheduled run may have begun) leaves neither the lock nor a 'running' record.
    assert process.returncode == 0, output[-3000:]
    assert store.redis.get(store.keys.job_lock) is None
    assert all(r["status"] != "running" for r in list_runs(store)), list_runs(store)


def test_the_scheduler_refreshes_trending_between_runs(store):
    ran = []
    now = [1_000_000.0]
    scheduler = Scheduler(
        store, Schedule("0 3 * * *"), ["--events", "e.csv", "--catalog", "c.csv", "--prefix", "p", "--factors", "8"],
        poll_seconds=0.01, clock=lambda: now[0], run_child=lambda cmd: ran.append(cmd) or 0, trending_seconds=3600,
    )
    assert scheduler.step() == "trending"
    assert ran[-1][1:3] == ["-m", "jobs.trending"] and ran[-1][3:] == ["--events", "e.csv", "--catalog", "c.csv", "--prefix", "p"]
    now[0] += 1800
    assert scheduler.step() is None  # not due yet
    now[0] += 1801
    assert scheduler.step() == "trending" and len(ran) == 2
