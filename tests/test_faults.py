"""Faults, each with the real component: redis-server stopped under gunicorn load, corrupted
versions, the nightly job SIGKILLed mid-publish, events across a Redis restart and a job run.

Each test prints the counts it measured (run with ``-s`` to see them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from jobs.nightly import run_nightly
from models.live_events import EventLog
from models.recommender import open_version
from models.store import ModelError
from tests.conftest import REPO_ROOT
from tests.helpers import get, nightly_command, post_json, start_gunicorn, stop
from tests.test_events import job_config, make_app

pytestmark = pytest.mark.slow


def wait_until(predicate, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


# -- Redis stopped and restarted while gunicorn serves ---------------------------------------
def test_redis_outage_under_gunicorn_load(redis_server, store, trained_demo, tmp_path):
    first = store.publish(trained_demo.parts, trained_demo.meta)
    users = json.loads(trained_demo.parts["users.json"])[:40] + ["fresh-a", "fresh-b", "nobody"]
    items = json.loads(trained_demo.parts["items.json"])["item_id"]
    process, base = start_gunicorn(redis_server.url, store.keys.prefix, tmp_path / "cache")
    assert post_json(f"{base}/events", [{"user_id": "fresh-a", "item_id": items[0], "timestamp": 1}])[0] == 200
    recommend: list[tuple[float, int, str | None]] = []
    posted: list[tuple[float, int, list[str], dict]] = []
    ready: list[tuple[float, int, str]] = []
    stop_flag = threading.Event()

    def readers(offset: int) -> None:
        n = offset
        while not stop_flag.is_set():
            status, body = get(f"{base}/recommend?user={users[n % len(users)]}&k=10")
            recommend.append((time.monotonic(), status, body.get("strategy")))
            n += 1

    def writer() -> None:
        n = 0
        while not stop_flag.is_set():
            batch = [{"user_id": f"load-{n}", "item_id": items[n % len(items)], "timestamp": 1_700_000_000 + n}]
            status, body = post_json(f"{base}/events", batch)
            posted.append((time.monotonic(), status, body.get("ids", []), batch[0]))
            n += 1
            time.sleep(0.01)

    def prober() -> None:
        while not stop_flag.is_set():
            status, body = get(f"{base}/readyz")
            ready.append((time.monotonic(), status, body.get("status")))
            time.sleep(0.1)

    threads = [threading.Thread(target=readers, args=(i,)) for i in range(3)]
    threads += [threading.Thread(target=writer), threading.Thread(target=prober)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        down_at = time.monotonic()
        redis_server.stop()
        time.sleep(3.0)
        up_at = time.monotonic()
        redis_server.start()
        recovered = wait_until(lambda: ready and ready[-1][2] == "ready" and ready[-1][0] > up_at, 20)
        recovered_at = time.monotonic()
        time.sleep(1.0)
    finally:
        stop_flag.set()
        for thread in threads:
            thread.join(10)
        log = stop(process)

    statuses = Counter(status for _, status, _ in recommend)
    during = Counter(status for t, status, _ in recommend if down_at <= t <= up_at)
    event_statuses = Counter(status for _, status, _, _ in posted)
    accepted = [(ids[0], event) for _, status, ids, event in posted if status == 200]
    stored = {entry_id.decode(): fields for entry_id, fields in store.redis.xrange(store.keys.events_stream)}
    lost = [event for entry_id, event in accepted if entry_id not in stored]
    degraded = [s for t, _, s in ready if down_at < t < up_at]
    print(
        f"\nredis outage: /recommend {sum(statuses.values())} requests ({sum(during.values())} while Redis was down), "
        f"statuses {dict(statuses)}, 5xx {sum(n for s, n in statuses.items() if s >= 500)}; "
        f"POST /events {dict(event_statuses)}, accepted {len(accepted)}, accepted-but-lost {len(lost)}; "
        f"/readyz while down {dict(Counter(degraded))}; recovered {recovered} "
        f"{recovered_at - up_at:.1f}s after restart"
    )
    assert statuses == Counter({200: len(recommend)}), statuses  # not one failed, let alone a 5xx
    # Users are records in Redis: while it is down they get popular answers, and their own again after.
    assert Counter(s for t, _, s in recommend if down_at + 0.5 <= t <= up_at)["popular"] > 10
    assert "personalized" in {s for t, _, s in recommend if t > recovered_at}
    assert sum(during.values()) > 20  # the load really ran through the outage
    assert set(event_statuses) <= {200, 503} and event_statuses[503] > 0 and event_statuses[200] > 0
    assert lost == []
    assert any(t > up_at and status == 200 for t, status, _, _ in posted)  # writes recover by themselves
    assert "degraded" in degraded and recovered
    assert store.live_version() == first
    assert "Traceback" not in log, log[-3000:]


# -- a corrupted stored version ---------------------------------------------------------------------
def corrupt_checksum(store, version):
    meta = store.meta(version)
    store.redis.set(store.keys.meta(version), json.dumps({**meta, "checksum": "0" * 64}))


def corrupt_part_bytes(store, version):
    key = store.keys.part(version, "item_vectors.npy", 0)
    blob = bytearray(store.redis.get(key))
    blob[-1] ^= 0xFF  # one flipped byte
    store.redis.set(key, bytes(blob))


def drop_a_chunk(store, version):
    store.redis.delete(store.keys.part(version, "candidates.npy", 0))


def drop_a_part_from_meta(store, version):
    meta = store.meta(version)
    del meta["parts"]["gram.npy"]
    store.redis.set(store.keys.meta(version), json.dumps(meta))


# activate() makes the cheap check (meta checksum, every chunk present); only a reader hashes the bytes.
@pytest.mark.parametrize(
    "damage, activate_refuses",
    [(corrupt_checksum, True), (corrupt_part_bytes, False), (drop_a_chunk, True), (drop_a_part_from_meta, True)],
)
def test_a_corrupt_version_is_refused_and_the_previous_keeps_serving(
    redis_server, store, trained_demo, tmp_path, damage, activate_refuses
):
    good = store.publish(trained_demo.parts, trained_demo.meta)
    app = make_app(redis_server, store, tmp_path)
    client, live = app.test_client(), app.extensions["live_model"]
    bad = store.write_version(trained_demo.parts, trained_demo.meta)
    damage(store, bad)
    store.redis.set(store.keys.live, bad)  # as if a buggy publisher forced the pointer
    assert live.refresh() is False
    assert bad in live.refused and live.version == good
    user = live.current.user_ids[0]
    assert client.get(f"/recommend?user={user}").status_code == 200
    ready = client.get("/readyz").get_json()
    assert ready["status"] == "fallback" and ready["model_version"] == good and ready["live_version"] == bad
    assert client.get("/version").get_json()["model_version"] == good
    assert not (tmp_path / "cache" / bad).exists()  # nothing half-verified left to open
    if activate_refuses:  # the publisher's own activation refuses it too
        store.redis.set(store.keys.live, good)
        with pytest.raises(ModelError, match=bad):
            store.activate(bad)
        assert store.live_version() == good


# -- the job killed while it publishes ------------------------------------------------------------
def test_sigkill_during_publish_leaves_the_old_version_live(redis_server, store, trained_demo, demo_files, tmp_path):
    old = store.publish(trained_demo.parts, trained_demo.meta)
    marker = tmp_path / "parts-being-written"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "tests" / "fault_hooks"), str(REPO_ROOT)]),
        RECS_FAULT_PAUSE_PARTS=str(marker),
        REDIS_URL=redis_server.url,
    )
    command = nightly_command(
        demo_files["events"],
        demo_files["catalog"],
        "--prefix",
        store.keys.prefix,
        "--no-eval",
        "--quiet",
        "--force",
        "--n-trees",
        "5",
        "--iterations",
        "5",
        "--content-steps",
        "30",
        "--factors",
        "16",
        "--candidates",
        "20",
    )
    job = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: marker.exists() or job.poll() is not None, 180, 0.05), "job never started publishing"
        assert job.poll() is None, job.stdout.read().decode()[-3000:]
        job.send_signal(signal.SIGKILL)
        assert job.wait(10) == -signal.SIGKILL
    finally:
        if job.poll() is None:
            job.kill()
    half = {k.decode().split(":")[2] for k in store.redis.keys(f"{store.keys.prefix}:version:*:part:*")} - {old}
    print(
        f"\nSIGKILL mid-publish: {len(half)} half-written version(s), live pointer on {store.live_version()} (old {old})"
    )
    assert len(half) == 1  # it really died half-way through writing parts
    half_version = half.pop()
    assert store.live_version() == old
    assert [m["model_version"] for m in store.versions()] == [old]
    assert store.meta_or_none(half_version) is None
    assert store.redis.keys(f"{store.keys.prefix}:version:{half_version}:users:*")  # its user records came first
    # Its orphaned parts and records are left alone while they may still be an upload in progress, then removed.
    assert store.drop_orphan_parts() == []
    assert store.drop_orphan_parts(older_than=0) == [half_version]
    assert not store.redis.keys(f"{store.keys.prefix}:version:{half_version}:*")
    app = make_app(redis_server, store, tmp_path)
    assert app.extensions["live_model"].version == old
    assert app.test_client().get("/recommend?user=someone").status_code == 200
    # The next run publishes normally and the service follows.
    meta = run_nightly(job_config(demo_files, store.keys.prefix), store=store).meta
    assert store.live_version() == meta["model_version"] != old
    assert app.extensions["live_model"].refresh() is True


# -- N events through POST /events, Redis restarted, the job run: none lost, none doubled ----------
def test_events_survive_a_redis_restart_and_reach_the_model_exactly_once(
    redis_server, store, trained_demo, demo_files, tmp_path
):
    store.publish(trained_demo.parts, trained_demo.meta)
    client = make_app(redis_server, store, tmp_path).test_client()
    item_ids = json.loads(trained_demo.parts["items.json"])["item_id"]
    newest = int(pd.read_csv(demo_files["events"], usecols=["timestamp"])["timestamp"].max())
    n_users, per_user = 60, 5
    sent = []
    for u in range(n_users):
        batch = [
            {"user_id": f"restart-{u}", "item_id": item_ids[(u * 7 + n * 11) % len(item_ids)], "timestamp": newest}
            for n in range(per_user)
        ]
        if u % 2:  # half as batches, half one event per request
            assert client.post("/events", json=batch).status_code == 200
        else:
            for one in batch:
                assert client.post("/events", json=one).status_code == 200
        sent += batch
    n_sent = len(sent)
    redis_server.restart()  # SIGTERM, then start from the AOF
    in_stream = store.redis.xlen(store.keys.events_stream)

    config = job_config(demo_files, store.keys.prefix)
    meta = run_nightly(config, store=store).meta
    files_only = run_nightly(dataclasses.replace(config, publish=False, live_events=False)).meta
    model = open_version(store, meta["model_version"], tmp_path / "check")
    alpha, eps = config.params.alpha, config.params.eps
    single = 1.0 + alpha * np.log1p(1.0 / eps)  # one full, newest viewing (models.embeddings.confidence_matrix)
    lost = doubled = 0
    for u in range(n_users):
        items, weights = model.history(f"restart-{u}")
        got = {model.item_ids[i]: float(w) for i, w in zip(items.tolist(), weights.tolist(), strict=True)}
        for e in sent[u * per_user : (u + 1) * per_user]:
            if e["item_id"] not in got:
                lost += 1
            elif got[e["item_id"]] > single + 1e-4:
                doubled += 1
    extra_in_counts = meta["counts"]["events"] - files_only["counts"]["events"]

    # A second restart and run must not count them again.
    redis_server.restart()
    again = run_nightly(config, store=store).meta
    print(
        f"\nevents across restart: sent {n_sent}, in stream after restart {in_stream}, in model counts {extra_in_counts}, "
        f"lost {lost}, doubled {doubled}; second run counts {again['counts']['events'] - files_only['counts']['events']}"
    )
    assert in_stream == n_sent
    assert meta["live_events"]["events"] == n_sent and extra_in_counts == n_sent
    assert lost == 0 and doubled == 0
    assert again["counts"]["events"] - files_only["counts"]["events"] == n_sent
    # Served: the overlay no longer holds what the live model contains (no double weight at request time).
    app_live = client.application.extensions["live_model"]
    app_live.refresh()
    assert all(app_live.fresh_history(app_live.current, f"restart-{u}")[0] is None for u in range(n_users))
    assert EventLog(store.redis, store.keys).snapshot() == again["live_events"]["consumed_through"]


# -- hostile input files: a clear error naming the file, and nothing published ----------------------
HEADER = b"user_id,item_id,timestamp\n"
BAD_FILES = {
    "latin-1 rows": (HEADER + b"u1,t1,1700000000\n" * 50 + "u\xe9,t1,1700000000\n".encode("latin-1"), "not UTF-8"),
    "UTF-16": ("user_id,item_id,timestamp\nu1,t1,1700000000\n".encode("utf-16"), "not UTF-8"),
    "semicolons": (b"user_id;item_id;timestamp\nu1;t1;1700000000\n", "not comma-separated"),
    "pipes": (b"user_id|item_id|timestamp\nu1|t1|1700000000\n", "not comma-separated"),
    "giant field": (HEADER + b"u1,t1,1700000000\nu2," + b"x" * (40 << 20) + b",1700000000\n", "larger than 16 MiB"),
    "giant quoted id": (HEADER + b'u1,t1,1700000000\nu2,"' + b"x" * (5 << 20) + b'",1700000000\n', "too long"),
    "years out of range": (HEADER + b"u1,t1,1487-03-11T09:59:39Z\n" * 10, "not unix seconds or ISO-8601"),
    "ragged rows": (HEADER + b"u1,t1,1700000000\nu2,t1\n", "Expected 3 columns"),
    "binary": (bytes(range(256)) * 64, "not comma-separated"),
    "empty": (b"", "Empty CSV"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_hostile_event_files_fail_clearly_and_publish_nothing(store, trained_demo, demo_files, tmp_path, name):
    from models.data import DataError

    live = store.publish(trained_demo.parts, trained_demo.meta)
    content, message = BAD_FILES[name]
    bad = tmp_path / "bad-events.csv"
    bad.write_bytes(content)
    with pytest.raises(DataError) as error:
        run_nightly(job_config(demo_files, store.keys.prefix, events=str(bad)), store=store)
    assert message in str(error.value) and "bad-events.csv" in str(error.value)
    assert store.live_version() == live and [m["model_version"] for m in store.versions()] == [live]


def test_the_cli_exits_2_on_bad_data_and_says_why(redis_server, store, demo_files, tmp_path):
    bad = tmp_path / "catalog.csv"
    bad.write_bytes("item_id,title\nx,Caf\xe9\n".encode("latin-1") * 3)
    done = subprocess.run(
        nightly_command(
            demo_files["events"], bad, "--prefix", store.keys.prefix, "--redis-url", redis_server.url, "--quiet", "--no-eval"
        ),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "nothing was published" in done.stderr and "catalog.csv" in done.stderr and "UTF-8" in done.stderr
    assert "Traceback" not in done.stderr
    assert store.live_version() is None and store.versions() == []
