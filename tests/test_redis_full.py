"""Redis at its memory limit (maxmemory, noeviction): writes are refused with 503 + Retry-After, never 500.

Real redis-server (started with ``--maxmemory ... --maxmemory-policy noeviction``
by the fixture, as the demo starts it); the limit is lowered below what is in
use, so every write is refused, then restored. Flask test client for the
dashboard's writes, real gunicorn for ``POST /events``, and the nightly job.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import REPO_ROOT
from tests.helpers import get, nightly_command, post_json, start_gunicorn, stop
from tests.test_admin import csrf_from, sign_in
from tests.test_events import event, make_app


@pytest.fixture
def full_redis(store):
    assert store.redis.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    limit = store.redis.config_get("maxmemory")["maxmemory"]
    assert int(limit) > 0  # the Redis the project starts has a limit

    def fill():
        store.redis.config_set("maxmemory", "1")  # below what is in use: every write is refused

    yield fill
    store.redis.config_set("maxmemory", limit)


@pytest.mark.slow
def test_post_events_through_gunicorn_is_503_with_retry_after(redis_server, store, trained_demo, tmp_path, full_redis):
    store.publish(trained_demo.parts, trained_demo.meta)
    items = json.loads(trained_demo.parts["items.json"])["item_id"]
    users = json.loads(trained_demo.parts["users.json"])
    process, base = start_gunicorn(redis_server.url, store.keys.prefix, tmp_path / "cache")
    try:
        full_redis()
        statuses = []
        for n in range(20):
            status, body = post_json(f"{base}/events", [event(f"u{n}", items[n], 1_700_000_000 + n)])
            statuses.append(status)
            assert status == 503 and "retry" in body["error"], body
        reads = [get(f"{base}/recommend?user={users[n]}")[0] for n in range(20)]
        assert store.redis.xlen(store.keys.events_stream) == 0
    finally:
        store.redis.config_set("maxmemory", "2gb")
        log = stop(process)
    assert reads == [200] * 20  # reading is not writing: recommendations go on
    assert "Traceback" not in log


def test_dashboard_writes_and_the_job_fail_cleanly_when_redis_is_full(
    redis_server, store, trained_demo, demo_files, tmp_path, full_redis, monkeypatch
):
    older = store.publish(trained_demo.parts, trained_demo.meta)
    store.publish(trained_demo.parts, trained_demo.meta)
    app = make_app(redis_server, store, tmp_path, ADMIN_TOKEN="correct-horse-battery-staple-42")
    app.extensions["live_model"].refresh()
    client = app.test_client()
    assert sign_in(client, "correct-horse-battery-staple-42").status_code == 303
    csrf = csrf_from(client.get("/admin/runs", headers={"Accept": "text/html"}).text)
    full_redis()
    for response in (
        client.post("/events", json=event("u", "t", 1_700_000_000)),
        client.post("/admin/runs", data={"csrf_token": csrf}),
        client.post("/admin/models/activate", data={"csrf_token": csrf, "version": older}),
    ):
        assert response.status_code == 503, (response.status_code, response.get_data()[:300])
        assert int(response.headers["Retry-After"]) > 0 and "error" in response.get_json()
    env = dict(os.environ, REDIS_URL=redis_server.url, REDIS_PREFIX=store.keys.prefix)
    result = subprocess.run(
        nightly_command(demo_files["events"], demo_files["catalog"], "--no-eval", "--quiet", "--iterations", "3"),
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1 and "OOM" in result.stderr and "Traceback" not in result.stderr
