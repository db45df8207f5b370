"""A poisoned live version (unreadable metadata, or one part corrupted in Redis) never takes a worker down.

Real redis-server, real gunicorn (2 workers) started on an empty
``MODEL_CACHE_DIR`` as a fresh host (or a restarted worker) would be, and
the real nightly job on the command line.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest

from tests.conftest import REPO_ROOT
from tests.helpers import get, nightly_command, start_gunicorn, stop
from tests.test_faults import wait_until

pytestmark = pytest.mark.slow


def poison_meta(store, version):
    original = store.redis.get(store.keys.meta(version))
    store.redis.set(store.keys.meta(version), b'{"model_version": "' + version.encode() + b'", "parts": {tru')
    return lambda: store.redis.set(store.keys.meta(version), original)


def poison_part(store, version):
    key = store.keys.part(version, "item_vectors.npy", 0)
    original = store.redis.get(key)
    store.redis.set(key, original[:-64] + b"\x00" * 64)
    return lambda: store.redis.set(key, original)


@pytest.mark.parametrize("poison", [poison_meta, poison_part], ids=["metadata", "part"])
def test_workers_serve_a_fallback_and_recover_when_the_live_version_is_repaired(
    redis_server, store, trained_demo, tmp_path, poison
):
    good = store.publish(trained_demo.parts, trained_demo.meta)
    time.sleep(1.1)  # versions sort by creation time
    rejected = store.publish(trained_demo.parts, trained_demo.meta, activate=False)
    store.set_status(rejected, "rejected")  # the gate said no: never a fallback
    time.sleep(1.1)
    bad = store.publish(trained_demo.parts, trained_demo.meta)
    repair = poison(store, bad)
    users = json.loads(trained_demo.parts["users.json"])[:30]
    process, base = start_gunicorn(
        redis_server.url, store.keys.prefix, tmp_path / "empty-cache", MODEL_RETRY_SECONDS="0.5", MODEL_RETRY_MAX_SECONDS="2"
    )
    answers: list[tuple[int, str | None]] = []
    stop_flag = threading.Event()

    def load():
        n = 0
        while not stop_flag.is_set():
            status, body = get(f"{base}/recommend?user={users[n % len(users)]}&k=10")
            answers.append((status, body.get("model_version")))
            n += 1

    threads = [threading.Thread(target=load) for _ in range(3)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(2.0)
        poisoned = list(answers)
        ready = get(f"{base}/readyz")
        metrics = subprocess.run(["curl", "-s", f"{base}/metrics"], capture_output=True, text=True).stdout
        repair()
        recovered = wait_until(lambda: answers and all(v == bad for _, v in answers[-30:]), 15)
        repaired_at = len(answers)
        time.sleep(1.0)
        stop_flag.set()
        for thread in threads:
            thread.join(10)
        after = get(f"{base}/readyz")
    finally:
        stop_flag.set()
        log = stop(process)
    statuses = [s for s, _ in answers]
    print(
        f"\npoisoned {poison.__name__}: {len(poisoned)} answers while poisoned "
        f"({sum(s == 200 for s, _ in poisoned)} x 200, versions {sorted({v for _, v in poisoned if v})}), "
        f"{len(answers) - repaired_at} after recovery; non-200 in all: {sum(s != 200 for s in statuses)}"
    )
    assert len(poisoned) > 50
    assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in set(statuses)}
    assert {v for _, v in poisoned} == {good}  # the newest kept version that verifies and was not rejected
    assert ready[0] == 200 and ready[1]["status"] == "fallback"
    assert ready[1]["model_version"] == good and ready[1]["live_version"] == bad
    assert any(line.startswith("recs_model_fallback{") and line.endswith(" 1.0") for line in metrics.splitlines())
    assert recovered, "the workers did not switch to the repaired live version"
    assert after[1]["status"] == "ready" and after[1]["model_version"] == bad
    assert f"cannot load live version {bad}" in log and "serving fallback version" in log
    assert "Traceback" not in log


def test_the_job_publishes_when_the_live_metadata_is_unreadable(redis_server, store, trained_demo, demo_files):
    bad = store.publish(trained_demo.parts, trained_demo.meta)
    poison_meta(store, bad)
    env_args = ["--no-select", "--n-trees", "5", "--iterations", "5", "--content-steps", "30", "--factors", "16"]
    import os

    env = dict(os.environ, REDIS_URL=redis_server.url, REDIS_PREFIX=store.keys.prefix)
    result = subprocess.run(
        nightly_command(demo_files["events"], demo_files["catalog"], *env_args, "--quiet"),
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "metadata is unreadable; the quality gate treats it as absent" in result.stderr
    live = store.live_version()
    assert live != bad and store.meta(live)["status"] == "live"
    assert [m["status"] for m in store.versions() if m["model_version"] == bad] == ["corrupt"]


def test_a_worker_killed_while_the_live_version_is_poisoned_comes_back_on_the_fallback(
    redis_server, store, trained_demo, tmp_path
):
    import os
    import signal

    from bench.harness import children_of

    good = store.publish(trained_demo.parts, trained_demo.meta)
    time.sleep(1.1)
    bad = store.publish(trained_demo.parts, trained_demo.meta)
    poison_part(store, bad)
    user = json.loads(trained_demo.parts["users.json"])[0]
    process, base = start_gunicorn(redis_server.url, store.keys.prefix, tmp_path / "cache")
    try:
        workers = children_of(process.pid)
        os.kill(workers[0], signal.SIGKILL)  # the OOM killer, or an operator's kill -9
        replaced = wait_until(lambda: len(set(children_of(process.pid)) - set(workers)) == 1, 30)
        answers = []
        for _ in range(200):
            try:
                answers.append(get(f"{base}/recommend?user={user}"))
            except OSError as exc:  # a request that was in flight on the killed worker
                answers.append((repr(exc), {}))
        ready = get(f"{base}/readyz")
    finally:
        log = stop(process)
    assert replaced, "gunicorn did not replace the killed worker"
    assert [s for s, _ in answers] == [200] * 200
    assert {b["model_version"] for _, b in answers} == {good}
    assert ready[1]["status"] == "fallback" and ready[1]["model_version"] == good
    assert "Traceback" not in log
