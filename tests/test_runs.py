"""Recorded runs against a real Redis: the lock (expiry, heartbeat, crash), run records, progress, the gate."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace

import orjson
import pytest

from jobs.nightly import NightlyConfig, main
from jobs.runs import (
    JobLock,
    LockHeld,
    RunRecord,
    get_run,
    job_stats,
    list_runs,
    prune_runs,
    quality_gate,
    run_job,
    run_log,
)
from models.embeddings import ModelParams
from tests.conftest import REPO_ROOT

# Small and quick: the tests are about the run around the training, not its quality.
FAST_PARAMS = ModelParams(n_trees=5, iterations=4, content_steps=30, factors=16)
FAST_FLAGS = [
    "--quiet",
    "--no-select",
    "--n-trees",
    "5",
    "--iterations",
    "4",
    "--content-steps",
    "30",
    "--factors",
    "16",
]


def job_config(demo_files, prefix: str = "test", **overrides) -> NightlyConfig:
    config = NightlyConfig(
        events=str(demo_files["events"]),
        catalog=str(demo_files["catalog"]),
        prefix=prefix,
        show_progress=False,
        params=FAST_PARAMS,
    )
    # Hyperparameter selection and the cold-start study (models.offline) are slow and beside the point here.
    extras = {name: False for name in ("select", "cold_start") if hasattr(config, name)}
    return replace(config, **extras, **overrides)


def cli_args(demo_files, redis_url: str, prefix: str = "test") -> list[str]:
    return [
        "--events",
        str(demo_files["events"]),
        "--catalog",
        str(demo_files["catalog"]),
        "--redis-url",
        redis_url,
        "--prefix",
        prefix,
        *FAST_FLAGS,
    ]


def with_score(meta: dict, ndcg: float) -> dict:
    """A copy of a version's metadata whose holdout nDCG@10 is ``ndcg``."""
    meta = orjson.loads(orjson.dumps(meta, option=orjson.OPT_SERIALIZE_NUMPY))
    meta["metrics"]["model"]["ndcg@10"] = ndcg
    return meta


# -- the gate -------------------------------------------------------------------------------------
def meta_with(ndcg):
    return {"model_version": "v-live", "metrics": None if ndcg is None else {"model": {"ndcg@10": ndcg}}}


@pytest.mark.parametrize(
    ("candidate", "live", "passed", "why"),
    [
        (0.20, "none", True, "no version is live"),
        (0.20, None, True, "live version has no holdout"),
        (None, 0.20, False, "new version has no holdout"),
        (0.30, 0.20, True, "vs live"),
        (0.195, 0.20, True, "vs live"),  # worse, but within the tolerance
        (0.19, 0.20, True, "vs live"),  # exactly at the tolerance still passes
        (0.18, 0.20, False, "below live 0.2000 by more than 0.01"),
    ],
)
def test_quality_gate(candidate, live, passed, why):
    decision = quality_gate(meta_with(candidate), None if live == "none" else meta_with(live), tolerance=0.01)
    assert decision.passed is passed
    assert why in decision.reason


# -- the lock -------------------------------------------------------------------------------------
def test_lock_is_exclusive_and_only_its_owner_releases_it(store):
    first = JobLock(store.redis, store.keys.job_lock, "run-a", ttl=5)
    first.acquire()
    second = JobLock(store.redis, store.keys.job_lock, "run-b", ttl=5)
    with pytest.raises(LockHeld) as info:
        second.acquire()
    assert info.value.holder == "run-a" and "another run (run-a) is in progress" in str(info.value)
    second.release()  # not the owner: must not free someone else's lock
    assert first.held()
    first.release()
    assert store.redis.get(store.keys.job_lock) is None
    second.acquire()
    second.release()


def test_heartbeat_keeps_the_lock_past_its_expiry(store):
    lock = JobLock(store.redis, store.keys.job_lock, "run-a", ttl=0.6)
    lock.acquire()
    try:
        time.sleep(1.5)  # 2.5 expiries
        assert lock.held() and not lock.lost
        assert 0 < store.redis.pttl(store.keys.job_lock) <= 600
    finally:
        lock.release()


LOCK_AND_HANG = textwrap.dedent(
    """
    import sys, time
    from jobs.runs import JobLock
    from models.store import redis_from_url
    lock = JobLock(redis_from_url(sys.argv[1]), sys.argv[2], "crashing-run", ttl=float(sys.argv[3]))
    lock.acquire()
    print("locked", flush=True)
    time.sleep(600)
    """
)


def test_a_killed_run_frees_the_lock_within_the_expiry(store, redis_server):
    ttl = 1.5
    process = subprocess.Popen(
        [sys.executable, "-c", LOCK_AND_HANG, redis_server.url, store.keys.job_lock, str(ttl)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "locked"
        time.sleep(ttl * 1.5)  # the heartbeat keeps a live holder's lock
        assert store.redis.get(store.keys.job_lock) == b"crashing-run"
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        killed_at = time.monotonic()
        assert store.redis.get(store.keys.job_lock) == b"crashing-run"  # still there right after the crash
        while store.redis.get(store.keys.job_lock) is not None:
            assert time.monotonic() - killed_at < ttl + 1.0, "the lock outlived its expiry"
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# -- run records ---------------------------------------------------------------------------------
def test_a_run_is_recorded_with_live_progress_and_goes_live(store, demo_files):
    # A record left "running" by a run that died (its lock expired) is marked abandoned by the next run.
    RunRecord(store, "20260101T000000Z-dead").save(trigger="scheduled", status="running", started_at=time.time() - 60)
    seen: list[tuple] = []
    done = threading.Event()
    run_id = "20260101T000001Z-beef"

    def watch():
        while not done.is_set():
            record = get_run(store, run_id)
            if record:
                seen.append((record["status"], record.get("progress"), record.get("step")))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        outcome = run_job(job_config(demo_files, run_id=run_id, trigger="manual"), store)
    finally:
        done.set()
        watcher.join()

    assert outcome.status == "succeeded" and outcome.gate.passed and "no version is live" in outcome.gate.reason
    assert store.live_version() == outcome.version
    record = get_run(store, run_id)
    assert record["trigger"] == "manual" and record["status"] == "succeeded"
    assert record["started_at"] <= record["ended_at"] and record["progress"] == 100.0 and record["step"] == "done"
    assert record["counts"]["events"] == 30000 and record["counts"]["users"] == 600
    assert record["metrics"]["model"]["ndcg@10"] > 0
    assert record["version"] == outcome.version and record["error"] is None
    assert store.meta(outcome.version)["run_id"] == run_id

    # Progress was visible while it ran, and only ever went forward.
    running = [(p, step) for status, p, step in seen if status == "running"]
    assert any(0 < p < 100 for p, _ in running), running
    assert {step.split(" ")[0] for _, step in running} >= {"load", "evaluate", "train"}
    progress_values = [p for p, _ in running]
    assert progress_values == sorted(progress_values)

    log_lines = run_log(store, run_id)
    assert any("holdout nDCG@10" in line for line in log_lines)
    assert any(f"version {outcome.version} is live" in line for line in log_lines)

    dead = get_run(store, "20260101T000000Z-dead")
    assert dead["status"] == "failed" and "abandoned" in dead["error"]
    assert job_stats(store)["runs"] == {"succeeded": 1}
    assert store.redis.get(store.keys.job_lock) is None


def test_the_gate_keeps_a_worse_version_off_air_and_force_overrides(
    store, demo_files, trained_demo, redis_server, capsys
):
    # The live version scores far better than anything this data can reach.
    live = store.publish(trained_demo.parts, with_score(trained_demo.meta, 0.99))

    outcome = run_job(job_config(demo_files), store)
    assert outcome.status == "rejected" and not outcome.gate.passed
    assert store.live_version() == live
    kept = store.meta(outcome.version)
    assert kept["status"] == "rejected" and kept["gate"]["live"] == 0.99 and "below live" in kept["gate"]["reason"]
    record = get_run(store, outcome.run_id)
    assert record["status"] == "rejected" and record["version"] == outcome.version

    # The CLI: rejected is exit 3; --force makes the new version live.
    assert main(cli_args(demo_files, redis_server.url)) == 3
    assert store.live_version() == live
    assert main([*cli_args(demo_files, redis_server.url), "--force"]) == 0
    forced = store.live_version()
    assert forced != live and store.meta(forced)["gate"]["forced"] is True
    out = capsys.readouterr().out
    assert "quality gate: rejected" in out and "made live by --force" in out
    assert [r["trigger"] for r in list_runs(store)] == ["cli", "cli", "cli"]
    assert job_stats(store)["runs"] == {"rejected": 2, "succeeded": 1}


def run_cli(demo_files, redis_url: str, *extra: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.nightly", *cli_args(demo_files, redis_url), *extra],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def test_a_cli_run_ends_with_its_whole_summary_and_log_on_pipes(store, demo_files, redis_server):
    # The job leaves through os._exit (jobs.nightly.exit_now): nothing buffered may be lost on the way.
    # Buffered as under cron or a scheduler, not as this shell may have it (PYTHONUNBUFFERED).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    run = run_cli(demo_files, redis_server.url, env=env)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-3000:]
    live = store.live_version()
    assert f"version {live} is live" in stderr
    assert f"model_version: {live}" in stdout
    last = stdout.rstrip().splitlines()[-1]  # the summary's last line
    assert last.startswith("run: ") and "succeeded" in last, stdout
    [record] = list_runs(store)
    assert record["status"] == "succeeded" and store.redis.get(store.keys.job_lock) is None


def test_a_second_run_says_which_run_is_going_and_exits_nonzero(store, demo_files, redis_server):
    going = JobLock(store.redis, store.keys.job_lock, "20260101T000000Z-0001", ttl=5)  # a run in progress
    going.acquire()
    try:
        second = run_cli(demo_files, redis_server.url)
        _, stderr = second.communicate(timeout=120)
    finally:
        going.release()
    assert second.returncode == 4, stderr
    assert "another run (20260101T000000Z-0001) is in progress" in stderr
    [record] = list_runs(store)
    assert record["status"] == "skipped" and "20260101T000000Z-0001" in record["error"]
    assert store.live_version() is None and store.versions() == []
    assert job_stats(store)["runs"] == {"skipped": 1}


def test_sigterm_stops_a_run_records_why_and_releases_the_lock_at_once(store, demo_files, redis_server, tmp_path):
    # The test-only hook pauses the run while it writes model parts, so the signal
    # lands mid-run however fast the machine is.
    marker = tmp_path / "publishing"
    env = dict(
        os.environ,
        JOB_LOCK_TTL="60",
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "tests" / "fault_hooks"), str(REPO_ROOT)]),
        RECS_FAULT_PAUSE_PARTS=str(marker),
    )
    run = run_cli(demo_files, redis_server.url, env=env)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert run.poll() is None, run.communicate()
            assert time.monotonic() < deadline, "the run never reached publishing"
            time.sleep(0.05)
        holder = store.redis.get(store.keys.job_lock).decode()
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 143, stderr
    assert "stopped by signal SIGTERM" in stderr
    assert store.redis.get(store.keys.job_lock) is None  # not after the 60 s expiry
    record = get_run(store, holder)
    assert record["status"] == "failed" and "SIGTERM" in record["error"] and record["ended_at"]
    assert store.live_version() is None


def test_only_the_last_runs_are_kept_but_never_an_active_one(store):
    for n in range(6):
        status = "queued" if n == 0 else "succeeded"
        record = RunRecord(store, f"2026010{n + 1}T000000Z-000{n}")
        record.save(trigger="cli", status=status, started_at=1_700_000_000 + n)
        record.append_log(f"line {n}")
    dropped = prune_runs(store, keep=3)
    assert sorted(dropped) == ["20260102T000000Z-0001", "20260103T000000Z-0002"]
    assert [r["id"] for r in list_runs(store)] == [
        "20260106T000000Z-0005",
        "20260105T000000Z-0004",
        "20260104T000000Z-0003",
        "20260101T000000Z-0000",
    ]
    assert run_log(store, "20260102T000000Z-0001") == []
    assert get_run(store, "../../etc") is None  # ids from URLs never reach a key name
