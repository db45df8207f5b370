"""Writes: EVENTS_TOKEN on POST /events, bodies over MAX_BODY_BYTES (chunked too), values out of range.

Flask test client for the rules; real gunicorn for the token and the chunked body.
"""

from __future__ import annotations

import http.client
import json
import time

import pytest

from models.data import MAX_RECORD_ERRORS, MAX_WATCH_SECONDS, load_catalog, load_events, validate_event_records
from tests.conftest import write_csv
from tests.helpers import get, start_gunicorn, stop
from tests.helpers import http as http_call
from tests.test_events import event, make_app

NOW = int(time.time())


@pytest.fixture
def guarded(redis_server, store, trained_demo, tmp_path):
    store.publish(trained_demo.parts, trained_demo.meta)
    app = make_app(redis_server, store, tmp_path, EVENTS_TOKEN="old-token-1234567890, new-token-0987654321")
    return app.test_client()


def test_events_need_one_of_the_tokens_and_reads_stay_open(guarded, store):
    model = guarded.application.extensions["live_model"].current
    user = model.user_ids[0]
    before = guarded.get(f"/recommend?user={user}&k=10").get_json()["items"]
    # The attack from the issue: ten events for someone else's account, to rewrite their top 10.
    forged = [event(user, item["item_id"], NOW - 60) for item in before]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic old-token-1234567890"},
                    {"Authorization": "Bearer "}, {"Authorization": "Bearer old-token-1234567890x"}):
        response = guarded.post("/events", json=forged, headers=headers)
        assert response.status_code == 401 and "EVENTS_TOKEN" in response.get_json()["error"], headers
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert store.redis.xlen(store.keys.events_stream) == 0
    assert guarded.get(f"/recommend?user={user}&k=10").get_json()["items"] == before
    for token in ("old-token-1234567890", "new-token-0987654321"):  # rotation: both work while both are listed
        response = guarded.post("/events", json=forged[:1], headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200
    assert store.redis.xlen(store.keys.events_stream) == 2
    assert guarded.get(f"/similar?item={model.item_ids[0]}").status_code == 200


def test_values_out_of_range_are_refused():
    records = [
        event("u", "t", NOW + 2 * 86400),  # dated the day after tomorrow
        event("u", "t", "2100-01-01T00:00:00Z"),
        event("u", "t", NOW, 1e308),
        event("u", "t", NOW, MAX_WATCH_SECONDS + 1),
        event("u", "t", NOW + 3600, MAX_WATCH_SECONDS),  # an hour ahead (clock skew) and a day long: fine
        event("u", "t", "2024-05-01T20:00:00+02:00", 1500),
        event("u", "t", "1714586400", 0),
    ]
    events, errors = validate_event_records(records)
    assert [(e["index"], e["field"]) for e in errors] == [(0, "timestamp"), (1, "timestamp"), (2, "watch_seconds"), (3, "watch_seconds")]
    assert [e.timestamp for e in events] == [NOW + 3600, 1714586400, 1714586400]


def test_a_hostile_batch_costs_a_bounded_amount_of_work():
    bad = [{"user_id": "", "item_id": None, "timestamp": "soon", "watch_seconds": -1}] * 1000
    events, errors = validate_event_records(bad)
    assert events == [] and len(errors) == MAX_RECORD_ERRORS
    assert max(e["index"] for e in errors) < 30  # it stopped looking after the first records


def test_the_loader_rejects_future_rows_so_one_cannot_move_the_recency_reference(tmp_path, tiny_catalog):
    rows = ["user_id,item_id,timestamp,watch_seconds"] + [f"u{i % 7},{'abc'[i % 3]},{1700000000 + i},60" for i in range(300)]
    rows[5] = "u1,a,4102444799,60"  # 2099-12-31
    rows[6] = "u2,b,1700000000,1e308"
    events, report = load_events(write_csv(tmp_path / "events.csv", "\n".join(rows) + "\n"), load_catalog(tiny_catalog)[0])
    assert len(events) == 298 and events.timestamp.max() < NOW
    assert report.rows_rejected == {"timestamp: later than a day from now": 1, "watch_seconds: not a number from 0 to 86400": 1}


def chunked_post(base: str, path: str, chunks: list[bytes], headers: dict) -> tuple[int, dict]:
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.putrequest("POST", path)
    for name, value in {**headers, "Transfer-Encoding": "chunked", "Content-Type": "application/json"}.items():
        connection.putheader(name, value)
    connection.endheaders()
    try:
        for chunk in chunks:
            connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        connection.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may answer 413 and close before the rest is sent
    response = connection.getresponse()
    body = json.loads(response.read() or b"{}")
    connection.close()
    return response.status, body


@pytest.mark.slow
def test_through_gunicorn_token_and_a_chunked_body_over_the_limit(redis_server, store, trained_demo, tmp_path):
    store.publish(trained_demo.parts, trained_demo.meta)
    items = json.loads(trained_demo.parts["items.json"])["item_id"]
    process, base = start_gunicorn(
        redis_server.url, store.keys.prefix, tmp_path / "cache", EVENTS_TOKEN="tok-abcdefghijklmnop", MAX_BODY_BYTES="4096"
    )
    auth = {"Authorization": "Bearer tok-abcdefghijklmnop"}
    try:
        valid = json.dumps([event("chunky", items[n], NOW - n) for n in range(10)]).encode()
        # A valid array, then whitespace past the limit: before, the prefix was taken (200, 10 stored).
        status, body = chunked_post(base, "/events", [valid, b" " * 3000, b" " * 3000], auth)
        assert status == 413 and "MAX_BODY_BYTES" in body["error"]
        assert store.redis.xlen(store.keys.events_stream) == 0
        status, body = chunked_post(base, "/events", [valid[:100], valid[100:]], auth)  # within the limit: fine
        assert status == 200 and body["accepted"] == 10
        status, body = http_call("POST", f"{base}/events", valid, headers={"Content-Type": "application/json"})
        assert status == 401
        assert get(f"{base}/recommend?user=chunky")[0] == 200
        assert store.redis.xlen(store.keys.events_stream) == 10
    finally:
        log = stop(process)
    assert "Traceback" not in log
