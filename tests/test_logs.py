"""Request ids and JSON-lines logs: the Flask test client for the app's lines, real gunicorn for the access log."""

from __future__ import annotations

import io
import json
import logging
import urllib.error
import urllib.request

import pytest

from app.logs import JsonFormatter, hashed_user, loggable_query
from tests.helpers import start_gunicorn, stop
from tests.test_admin import csrf_from
from tests.test_events import make_app


def test_request_ids_are_taken_or_made_and_on_every_line_of_the_request(redis_server, store, trained_demo, tmp_path):
    store.publish(trained_demo.parts, trained_demo.meta)
    app = make_app(redis_server, store, tmp_path, ADMIN_TOKEN="correct-horse-battery-staple-42")
    client = app.test_client()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(handler)
    try:
        page = client.get("/admin/login", headers={"Accept": "text/html", "X-Request-ID": "login-page-1"})
        assert page.headers["X-Request-ID"] == "login-page-1"
        response = client.post(
            "/admin/login",
            data={"csrf_token": csrf_from(page.text), "token": "wrong", "next": "/admin/"},
            headers={"X-Request-ID": "signin-attempt-7"},
        )
        assert response.status_code == 401 and response.headers["X-Request-ID"] == "signin-attempt-7"
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    failed = [line for line in lines if "sign-in failed" in line["message"]]
    assert failed and failed[0]["request_id"] == "signin-attempt-7" and failed[0]["level"] == "WARNING"
    # A header that is not a sane token is replaced, never echoed or logged.
    hostile = client.get("/healthz", headers={"X-Request-ID": "x\" injected=1 " + "a" * 200})
    made = hostile.headers["X-Request-ID"]
    assert "injected" not in made and len(made) == 24
    assert client.get("/healthz").headers["X-Request-ID"] != client.get("/healthz").headers["X-Request-ID"]


def test_user_ids_in_logged_queries_are_hashed(monkeypatch):
    assert loggable_query("user=alice&k=5") == f"user={hashed_user('alice')}&k=5"
    assert loggable_query("k=5&user=al%20ice&user_id=bob") == f"k=5&user={hashed_user('al ice')}&user_id={hashed_user('bob')}"
    assert loggable_query("k=5&nouser=x") == "k=5&nouser=x"
    assert hashed_user("alice") == hashed_user("alice") != hashed_user("bob")
    monkeypatch.setenv("LOG_USER_IDS", "1")
    assert loggable_query("user=alice&k=5") == "user=alice&k=5"


@pytest.mark.slow
def test_gunicorn_writes_json_lines_with_status_latency_and_no_raw_user_ids(redis_server, store, trained_demo, tmp_path):
    store.publish(trained_demo.parts, trained_demo.meta)
    user = json.loads(trained_demo.parts["users.json"])[0]
    access = tmp_path / "access.log"
    process, base = start_gunicorn(redis_server.url, store.keys.prefix, tmp_path / "cache", GUNICORN_ACCESSLOG=str(access))
    try:
        request = urllib.request.Request(f"{base}/recommend?user={user}&k=3", headers={"X-Request-ID": "trace-abc-123"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.headers["X-Request-ID"] == "trace-abc-123"
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{base}/similar?item=no-such-title", timeout=5)
        assert missing.value.code == 404 and missing.value.headers["X-Request-ID"]
    finally:
        errors = stop(process)
    access_lines = [json.loads(line) for line in access.read_text().splitlines()]
    error_lines = [json.loads(line) for line in errors.splitlines() if line.strip()]  # every line is JSON
    assert any("Booting worker" in line["message"] for line in error_lines)
    mine = [line for line in access_lines if line.get("request_id") == "trace-abc-123"]
    assert len(mine) == 1 and mine[0]["status"] == 200 and mine[0]["method"] == "GET"
    assert mine[0]["path"].startswith("/recommend?user=h:") and 0 < mine[0]["latency_ms"] < 5000
    assert any(line["status"] == 404 and line["request_id"] for line in access_lines)
    assert user not in access.read_text() and user not in errors
