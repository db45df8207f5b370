"""Bounded Redis: the events stream is archived to Parquet and trimmed once every kept version has it.

Real redis-server, events posted through the API (Flask test client), the
recorded nightly job (jobs.runs.run_job, what ``python -m jobs.nightly`` runs)
with ``--keep 2`` and an ``EVENTS_ARCHIVE`` folder.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from collections import Counter

import pandas as pd
import pytest

from jobs.runs import run_job
from models.live_events import ARCHIVE_GLOB, archived_through
from tests.conftest import REPO_ROOT
from tests.helpers import nightly_command
from tests.test_events import event, job_config, make_app

pytestmark = pytest.mark.slow


def archive_rows(folder) -> list[tuple]:
    rows = []
    for path in sorted(folder.glob(ARCHIVE_GLOB)):
        frame = pd.read_parquet(path)
        rows += list(zip(frame["user_id"], frame["item_id"], frame["timestamp"].astype(int)))
    return rows


def test_stream_is_archived_and_trimmed_without_loss_or_doubles(redis_server, store, trained_demo, demo_files, tmp_path):
    store.publish(trained_demo.parts, trained_demo.meta)  # a version without live events: holds the floor at 0
    archive = tmp_path / "archive"
    app = make_app(redis_server, store, tmp_path)
    client, live = app.test_client(), app.extensions["live_model"]
    items = list(live.current.item_ids[:200])
    config = job_config(demo_files, store.keys.prefix, keep=2, events_archive=str(archive), force=True)
    files_only = trained_demo.meta["counts"]["events"]
    accepted: list[tuple] = []
    now = int(time.time()) - 3600

    def post(batch_no: int, users: int = 5, per_user: int = 4) -> list[dict]:
        batch = [
            event(f"c{batch_no}-{u}", items[(batch_no * 17 + u * 5 + n) % len(items)], now + batch_no * 100 + n, 1200)
            for u in range(users) for n in range(per_user)
        ]
        response = client.post("/events", json=batch)
        assert response.status_code == 200, response.get_json()
        accepted.extend((e["user_id"], e["item_id"], e["timestamp"]) for e in batch)
        return batch

    def run() -> dict:
        outcome = run_job(dataclasses.replace(config, run_id=None), store)
        assert outcome.status == "succeeded"
        return outcome.result.meta

    post(1)
    run()  # kept: first + the old version, which has no live events: nothing can be archived yet
    assert archive_rows(archive) == [] and store.redis.xlen(store.keys.events_stream) == 20
    post(2)
    second = run()  # kept: second, first -> everything up to first's snapshot is in both
    assert Counter(archive_rows(archive)) == Counter(accepted[:20])
    assert store.redis.xlen(store.keys.events_stream) == 20
    batch3 = post(3)
    third = run()
    assert Counter(archive_rows(archive)) == Counter(accepted[:40])
    assert third["counts"]["events"] == files_only + 60  # archive 40 + stream 20: each once

    # Roll back to the previous kept version: it lacks batch 3, so batch 3 must still be excluded and fresh.
    store.activate(second["model_version"])
    assert live.refresh() is True and live.version == second["model_version"]
    user = batch3[0]["user_id"]
    watched = {e["item_id"] for e in batch3 if e["user_id"] == user}
    history = client.get(f"/history?user={user}").get_json()["items"]
    assert {i["item_id"] for i in history if i["fresh"]} == watched
    recommended = {i["item_id"] for i in client.get(f"/recommend?user={user}&k=50").get_json()["items"]}
    assert not recommended & watched
    # ...and batch 2, which it has, is not shown twice (fresh overlay pruned up to what every kept version has).
    user2 = f"c2-{0}"
    assert all(not i["fresh"] for i in client.get(f"/history?user={user2}").get_json()["items"])
    store.activate(third["model_version"])

    fourth = run()  # no new events: kept fourth + third, both have all 60
    assert fourth["counts"]["events"] == files_only + 60
    assert Counter(archive_rows(archive)) == Counter(accepted)  # 0 lost, 0 doubled
    assert store.redis.xlen(store.keys.events_stream) == 0
    assert store.redis.hlen(store.keys.fresh_history) == 0

    # A compaction that dies between writing its archive file and trimming the stream doubles nothing.
    post(5)
    fifth = run()
    assert fifth["counts"]["events"] == files_only + 80
    real_xtrim = store.redis.xtrim
    store.redis.xtrim = lambda *a, **k: (_ for _ in ()).throw(ConnectionError("killed before the trim"))
    try:
        sixth = run()  # archives batch 5, then fails to trim: logged, the version is live anyway
    finally:
        store.redis.xtrim = real_xtrim
    assert store.live_version() == sixth["model_version"]
    assert store.redis.xlen(store.keys.events_stream) == 20  # still there...
    assert Counter(archive_rows(archive)) == Counter(accepted)  # ...and in the archive
    seventh = run()
    assert seventh["counts"]["events"] == files_only + 80  # not 100
    assert store.redis.xlen(store.keys.events_stream) == 0
    assert Counter(archive_rows(archive)) == Counter(accepted)
    assert archived_through(archive) == seventh["live_events"]["consumed_through"]
    # The same through the command line, as cron or the scheduler runs it: EVENTS_ARCHIVE from the environment.
    post(8)
    env = dict(os.environ, REDIS_URL=redis_server.url, REDIS_PREFIX=store.keys.prefix, EVENTS_ARCHIVE=str(archive))
    flags = ["--no-eval", "--quiet", "--keep", "2", "--force", "--n-trees", "5", "--iterations", "5", "--factors", "16"]
    for _ in range(2):
        result = subprocess.run(
            nightly_command(demo_files["events"], demo_files["catalog"], *flags),
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr[-2000:]
    assert Counter(archive_rows(archive)) == Counter(accepted) and len(accepted) == 100
    assert store.redis.xlen(store.keys.events_stream) == 0
    assert store.meta(store.live_version())["counts"]["events"] == files_only + 100
    print(
        f"\ncompaction: {len(accepted)} events accepted over 9 runs (--keep 2, the last two on the command line); archive rows {len(archive_rows(archive))}, "
        f"stream left {store.redis.xlen(store.keys.events_stream)}, overlay users {store.redis.hlen(store.keys.fresh_history)}"
    )
