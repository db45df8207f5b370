"""POST /events: validation, durable storage, the fresh-history overlay, and exactly-once into the job.

Real redis-server (tests/conftest.py), Flask test client, the real nightly job in-process.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from app import create_app
from jobs.nightly import NightlyConfig, run_nightly
from models.embeddings import ModelParams
from models.live_events import FRESH_MAX_BYTES, EventLog, fresh_overlay, parse_stream_id
from models.recommender import open_version

FAST = ModelParams(n_trees=5, iterations=5, content_steps=30, factors=16, candidates=20)


def make_app(redis_server, store, tmp_path, **config):
    return create_app(
        {
            "REDIS_URL": redis_server.url,
            "REDIS_PREFIX": store.keys.prefix,
            "MODEL_CACHE_DIR": str(tmp_path / "cache"),
            "MODEL_WATCHER": False,
            "TESTING": True,
            **config,
        }
    )


@pytest.fixture
def published(store, trained_demo):
    return store.publish(trained_demo.parts, trained_demo.meta)


@pytest.fixture
def client(redis_server, store, published, tmp_path):
    return make_app(redis_server, store, tmp_path).test_client()


def live_of(client):
    return client.application.extensions["live_model"]


def job_config(demo_files, prefix: str, **overrides) -> NightlyConfig:
    """A quick nightly run on the demo data (no evaluation, tiny model) for fault and event tests."""
    settings = dict(
        events=str(demo_files["events"]),
        catalog=str(demo_files["catalog"]),
        prefix=prefix,
        evaluate=False,
        show_progress=False,
        params=FAST,
    )
    settings.update(overrides)
    return NightlyConfig(**settings)


def run_job(demo_files, store, **overrides) -> dict:
    return run_nightly(job_config(demo_files, store.keys.prefix, **overrides), store=store).meta


def event(user, item, ts=1_700_000_000, seconds=None):
    out = {"user_id": user, "item_id": item, "timestamp": ts}
    if seconds is not None:
        out["watch_seconds"] = seconds
    return out


# -- accepting and refusing ------------------------------------------------------------------
def test_one_event_is_stored_and_applied_at_once(client, store):
    model = live_of(client).current
    user = model.user_ids[0]
    before = [i["item_id"] for i in client.get(f"/recommend?user={user}&k=10").get_json()["items"]]
    watched = before[0]  # the top recommendation: surely must disappear once watched
    response = client.post("/events", json=event(user, watched, "2024-05-01T20:00:00Z", 1500))
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["accepted"] == 1 and len(body["ids"]) == 1 and body["not_in_model"] == []
    entries = store.redis.xrange(store.keys.events_stream)
    assert len(entries) == 1
    fields = entries[0][1]
    assert fields[b"u"].decode() == user and fields[b"i"].decode() == watched
    assert int(fields[b"t"]) == 1714593600 and float(fields[b"w"]) == 1500.0
    after = client.get(f"/recommend?user={user}&k=10").get_json()
    assert after["strategy"] == "personalized"
    ids = [i["item_id"] for i in after["items"]]
    assert watched not in ids and len(ids) == 10
    history = client.get(f"/history?user={user}").get_json()["items"]
    assert history[0] == {**history[0], "item_id": watched, "fresh": True}


def test_new_user_gets_personal_recommendations_from_fresh_events(client):
    model = live_of(client).current
    taste = [model.item_ids[i] for i in model.popular[5:9]]
    assert client.get("/recommend?user=brand-new&k=5").get_json()["strategy"] == "popular"
    response = client.post(
        "/events", json=[event("brand-new", item, 1_700_000_000 + n) for n, item in enumerate(taste)]
    )
    assert response.status_code == 200 and response.get_json()["accepted"] == 4
    body = client.get("/recommend?user=brand-new&k=5").get_json()
    assert body["strategy"] == "personalized"
    ids = [i["item_id"] for i in body["items"]]
    assert not set(ids) & set(taste)
    assert all({b["item_id"] for b in i["because"]} <= set(taste) and i["because"] for i in body["items"])
    history = client.get("/history?user=brand-new").get_json()
    assert history["known"] is True
    assert [i["item_id"] for i in history["items"]] == taste[::-1]  # newest first


def test_a_batch_with_a_bad_row_is_refused_whole(client, store):
    batch = [
        event("u1", "t1"),
        event("u1", "", 1_700_000_000),
        {"user_id": "u2", "item_id": "t1", "timestamp": "yesterday"},
        {"user_id": "u2", "item_id": "t1", "timestamp": 1_700_000_000, "watch_seconds": -3},
        "not an object",
        {"item_id": "t1", "timestamp": 1},
    ]
    response = client.post("/events", json=batch)
    assert response.status_code == 400
    body = response.get_json()
    assert "5 of 6 event(s)" in body["error"] and "nothing was stored" in body["error"]
    problems = {(row["index"], row["field"]) for row in body["rows"]}
    assert problems == {(1, "item_id"), (2, "timestamp"), (3, "watch_seconds"), (4, None), (5, "user_id")}
    assert store.redis.xlen(store.keys.events_stream) == 0
    assert store.redis.hlen(store.keys.fresh_history) == 0


@pytest.mark.parametrize(
    "body, headers, status, message",
    [
        (b'{"user_id": "u1"', {"Content-Type": "application/json"}, 400, "not valid JSON"),
        (b"[]", {"Content-Type": "application/json"}, 400, "no events"),
        (b"user_id=u1", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "Content-Type: application/json"),
        (
            b'{"user_id": "u1", "item_id": "a", "timestamp": NaN}',
            {"Content-Type": "application/json"},
            400,
            "not valid JSON",
        ),
        (
            b'{"user_id": "u1", "item_id": "a", "timestamp": 1e999}',
            {"Content-Type": "application/json"},
            400,
            "infinity",
        ),
        (
            b'{"user_id": "u1", "item_id": "a", "timestamp": true}',
            {"Content-Type": "application/json"},
            400,
            "timestamp",
        ),
        (
            b'{"user_id": 17, "item_id": "a", "timestamp": 1}',
            {"Content-Type": "application/json"},
            400,
            "must be a string",
        ),
        (b"[" * 5000 + b"]" * 5000, {"Content-Type": "application/json"}, 400, "not valid JSON"),
    ],
)
def test_bad_bodies_are_400_or_415_json(client, store, body, headers, status, message):
    response = client.post("/events", data=body, headers=headers)
    assert response.status_code == status, response.data
    assert message in json.dumps(response.get_json())
    assert store.redis.xlen(store.keys.events_stream) == 0


def test_too_many_events_and_too_large_bodies(redis_server, store, published, tmp_path):
    client = make_app(redis_server, store, tmp_path, MAX_CONTENT_LENGTH=60_000).test_client()
    many = [event(f"u{n}", "t1") for n in range(1001)]
    response = client.post("/events", data=json.dumps(many)[:49_000], content_type="application/json")
    assert response.status_code == 400  # cut JSON: refused, not a crash
    small = json.dumps([{"user_id": "u", "item_id": "t", "timestamp": 1}] * 1001, separators=(",", ":"))
    response = client.post("/events", data=small, content_type="application/json")
    assert response.status_code == 400 and "at most 1000" in response.get_json()["error"]
    response = client.post("/events", data=b"[" + b" " * 70_000 + b"]", content_type="application/json")
    assert response.status_code == 413 and "error" in response.get_json()
    assert store.redis.xlen(store.keys.events_stream) == 0


HOSTILE_IDS = [
    "test:live",
    "test:events",
    "test:fresh",
    "test:version:x:meta",
    "*",
    "?",
    "[a-z]",
    "../../etc/passwd",
    "ünïcødé 🎬",
    "quote\"and'apostrophe",
    "x" * 128,
    "$(rm -rf /)",
    "%00",
    "\\x00",
]


def test_odd_ids_never_reach_redis_keys(client, store, published):
    keys_before = set(store.redis.keys("*"))
    batch = [event(user, item) for user in HOSTILE_IDS for item in ("test:live", HOSTILE_IDS[8])]
    response = client.post("/events", json=batch)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["not_in_model"] == sorted({"test:live", HOSTILE_IDS[8]})
    new_keys = set(store.redis.keys("*")) - keys_before
    # (the online secret and the events' layout are created on first use; no impression showed these titles)
    made_on_first_use = {store.keys.online_secret, store.keys.events_layout}
    assert {k.decode() for k in new_keys} <= {store.keys.events_stream, store.keys.fresh_history, *made_on_first_use}
    assert {store.keys.events_stream, store.keys.fresh_history} <= {k.decode() for k in new_keys}
    assert store.live_version() == published
    assert store.redis.hlen(store.keys.fresh_history) == len(set(HOSTILE_IDS))
    for user in HOSTILE_IDS:
        for url in ("/recommend", "/history"):
            response = client.get(url, query_string={"user": user})
            assert response.status_code == 200, (url, user)
            assert response.get_json()["user"] == user
    assert client.get("/recommend", query_string={"user": "x" * 129}).status_code == 400
    control = client.post("/events", json=event("evil\nuser", "a"))
    assert control.status_code == 400 and control.get_json()["rows"][0]["field"] == "user_id"


# -- the overlay --------------------------------------------------------------------------------
def test_overlay_weights_follow_the_training_rule(client, store):
    model = live_of(client).current
    minutes = model.items["episode_minutes"]
    row = next(i for i, m in enumerate(minutes) if m)
    item = model.item_ids[row]
    log = EventLog(store.redis, store.keys)
    client.post("/events", json=[event("w", item, 1, minutes[row] * 30), event("w", item, 2, minutes[row] * 30)])
    items, weights = fresh_overlay(model, log.fresh_raw("w"))
    alpha, eps = model.meta["params"]["alpha"], model.meta["params"]["eps"]
    # Two half viewings = one full viewing's worth of completion, log-scaled like training.
    assert items.tolist() == [row] and weights[0] == pytest.approx(1.0 + alpha * np.log1p(1.0 / eps))


def test_overlay_is_capped_per_user(client, store):
    model = live_of(client).current
    batch = [event("binger", model.item_ids[n % model.n_items], n) for n in range(1000)]
    assert client.post("/events", json=batch).status_code == 200
    raw = store.redis.hget(store.keys.fresh_history, "binger")
    assert len(raw) <= FRESH_MAX_BYTES
    last = raw.decode().split("\n")[-1].split("\t")
    assert last[1] == model.item_ids[999 % model.n_items] and last[2] == "999"  # newest kept
    assert store.redis.xlen(store.keys.events_stream) == 1000  # the stream keeps everything


# -- exactly once into the nightly job --------------------------------------------------------------
def history_of(store, version, user, tmp_path):
    model = open_version(store, version, tmp_path / "check")
    items, weights = model.history(user)
    return {model.item_ids[i]: float(w) for i, w in zip(items.tolist(), weights.tolist(), strict=True)}


def test_job_takes_each_stream_event_exactly_once(client, store, demo_files, monkeypatch, tmp_path):
    model = live_of(client).current
    items = [model.item_ids[i] for i in model.popular[:40]]
    first = [event(f"live-{u}", items[(u * 3 + n) % 40], 1_700_000_000 + n) for u in range(10) for n in range(3)]
    assert client.post("/events", json=first).status_code == 200
    first_last_id = store.redis.xrevrange(store.keys.events_stream, count=1)[0][0].decode()

    # Events that arrive while the job runs (after its snapshot) belong to the next run.
    import jobs.nightly

    real_load_catalog = jobs.nightly.load_catalog
    late = [event("late-user", items[0], 1_700_000_100), event("live-0", items[39], 1_700_000_101)]

    def load_catalog_while_events_arrive(*args, **kwargs):
        assert client.post("/events", json=late).status_code == 200
        return real_load_catalog(*args, **kwargs)

    monkeypatch.setattr(jobs.nightly, "load_catalog", load_catalog_while_events_arrive)
    meta = run_job(demo_files, store)
    monkeypatch.setattr(jobs.nightly, "load_catalog", real_load_catalog)
    files_only = run_job(demo_files, store, publish=False, live_events=False)["counts"]["events"]

    assert meta["live_events"] == {
        "stream": store.keys.events_stream, "consumed_through": first_last_id, "events": 30, "archived_through": "0-0"
    }
    assert meta["counts"]["events"] == files_only + 30
    live = live_of(client)
    assert live.refresh() is True
    assert live.current.version == meta["model_version"]
    history = history_of(store, meta["model_version"], "live-3", tmp_path)
    assert set(history) == {e["item_id"] for e in first if e["user_id"] == "live-3"}
    # Consumed events left the overlay (they are in the model now); the late ones are still there.
    items_now, _ = live.fresh_history(live.current, "live-3")
    assert items_now is None
    late_items, _ = live.fresh_history(live.current, "live-0")
    assert [live.current.item_ids[i] for i in late_items] == [items[39]]
    assert client.get("/history?user=late-user").get_json()["items"][0]["fresh"] is True

    second = run_job(demo_files, store, keep=2)  # the fixture version (no live events) is pruned
    assert second["live_events"]["events"] == 32
    assert second["counts"]["events"] == files_only + 32  # the first 30 again, not 60
    assert parse_stream_id(second["live_events"]["consumed_through"]) > parse_stream_id(first_last_id)
    # After it went live, the overlay dropped what every kept version (first and second) already has.
    assert store.redis.hget(store.keys.fresh_history, "live-3") is None


def test_a_failed_job_consumes_nothing(client, store, demo_files, tmp_path):
    assert client.post("/events", json=[event("f1", live_of(client).current.item_ids[0])]).status_code == 200
    live_before = store.live_version()
    bad = tmp_path / "catalog.csv"
    bad.write_text("item_id;title\na;A\n")
    with pytest.raises(Exception, match="not comma-separated"):
        run_nightly(job_config(demo_files, store.keys.prefix, catalog=str(bad)), store=store)
    assert store.live_version() == live_before
    assert live_of(client).fresh_history(live_of(client).current, "f1")[0] is not None
    assert store.redis.xlen(store.keys.events_stream) == 1


def test_a_new_user_with_two_titles_gets_personalised_results(client):
    """Short histories (1-3 titles) are personalised, not the popular list."""
    model = live_of(client).current
    # Two titles of one genre, away from the very top of the popular list.
    genres = model.items["genres"]
    first = next(int(i) for i in model.popular[40:] if genres[int(i)])
    genre = genres[first][0]
    second = next(int(i) for i in model.popular[40:] if int(i) != first and genre in genres[int(i)])
    now = int(time.time()) - 60
    events = [
        {"user_id": "brand-new-viewer", "item_id": model.item_ids[i], "timestamp": now + n, "watch_seconds": 1800}
        for n, i in enumerate((first, second))
    ]
    assert client.post("/events", json=events).status_code == 200
    body = client.get("/recommend?user=brand-new-viewer&k=10").get_json()
    assert body["strategy"] == "personalized"
    ids = [item["item_id"] for item in body["items"]]
    popular = [model.item_ids[i] for i in model.popular[:10]]
    assert ids != popular
    assert not {model.item_ids[first], model.item_ids[second]} & set(ids)
    assert all({b["item_id"] for b in item["because"]} <= {model.item_ids[first], model.item_ids[second]} for item in body["items"])
    # Their taste shows: more of the genre than the popular list has.
    in_genre = sum(genre in genres[model.item_index[i]] for i in ids)
    assert in_genre > sum(genre in genres[model.item_index[i]] for i in popular)


def test_events_spread_over_shards_reach_the_job_once_and_a_changed_shard_count_is_refused(
    redis_server, demo_files, tmp_path, monkeypatch
):
    """EVENT_SHARDS > 1 on one node: each user's events go to one shard's stream and overlay, the job
    takes every shard's exactly once, and a service or job configured with another count refuses."""
    from models.live_events import EventLayoutError
    from models.store import ModelStore

    client_redis = __import__("redis").Redis.from_url(redis_server.url)
    client_redis.flushall()
    monkeypatch.setenv("EVENT_SHARDS", "4")
    sharded = ModelStore(client_redis, "sharded")
    assert sharded.keys.shards == 4
    first = run_nightly(job_config(demo_files, "sharded", redis_url=redis_server.url, keep=1))
    client = make_app(redis_server, sharded, tmp_path).test_client()
    model = live_of(client).current
    users = model.user_ids[:30]
    pick = model.item_ids[0]
    posted = client.post("/events", json=[event(u, pick) for u in users])
    assert posted.status_code == 200, posted.get_json()
    lengths = [client_redis.xlen(sharded.keys.events_stream_of(s)) for s in range(4)]
    assert sum(lengths) == 30 and all(n > 0 for n in lengths), lengths
    assert all(pick not in [i["item_id"] for i in client.get(f"/recommend?user={u}").get_json()["items"]] for u in users[:5])

    # Every night's model has each stream entry once (the stream is the input until it is archived).
    base = first.meta["counts"]["events"]
    for _ in range(2):
        night = run_nightly(job_config(demo_files, "sharded", redis_url=redis_server.url, keep=1))
        info = sharded.meta(night.version)["live_events"]
        assert info["events"] == 30 and sum(s["events"] for s in info["shards"].values()) == 30
        assert night.meta["counts"]["events"] == base + 30
        assert sum(client_redis.hlen(sharded.keys.fresh_of(s)) for s in range(4)) == 0  # the overlays are in the model

    monkeypatch.setenv("EVENT_SHARDS", "2")  # an operator changes the count under stored events
    again = make_app(redis_server, sharded, tmp_path / "two").test_client()
    refused = again.post("/events", json=event(users[0], pick))
    assert refused.status_code == 503 and "EVENT_SHARDS=4" in refused.get_json()["error"]
    with pytest.raises(EventLayoutError, match="EVENT_SHARDS=4"):
        run_nightly(job_config(demo_files, "sharded", redis_url=redis_server.url))


def test_a_notice_still_on_its_way_does_not_hide_fresh_events(redis_server, store, published, tmp_path):
    """Two workers (two apps in one process, each with its pub/sub listener). An event accepted by one
    reaches the other's answers on the very next request even while that worker's listener has not
    applied the notice yet (held here by holding its notice lock): the request sees the notice
    pending and asks Redis instead of trusting its set of users with fresh events."""
    first = make_app(redis_server, store, tmp_path, MODEL_WATCHER=True).test_client()
    second = make_app(redis_server, store, tmp_path / "second", MODEL_WATCHER=True).test_client()
    lives = [live_of(first), live_of(second)]
    try:
        deadline = time.monotonic() + 10
        while not all(live.current is not None and live.fresh_users is not None for live in lives):
            assert time.monotonic() < deadline, "the listeners did not subscribe"
            time.sleep(0.05)
        live = lives[1]
        user = live.current.user_ids[0]
        watched = second.get(f"/recommend?user={user}&k=10").get_json()["items"][0]["item_id"]
        assert user not in live.fresh_users
        with live._notice_lock:  # the second worker's listener is stalled
            assert first.post("/events", json=event(user, watched, "2024-05-01T20:00:00Z", 1500)).status_code == 200
            assert user not in live.fresh_users  # the notice is not applied...
            stalled = [i["item_id"] for i in second.get(f"/recommend?user={user}&k=10").get_json()["items"]]
        assert watched not in stalled  # ...yet the answer has the event
        deadline = time.monotonic() + 5
        while user not in live.fresh_users:  # released, the listener applies it
            assert time.monotonic() < deadline, "the notice was never applied"
            time.sleep(0.05)
        after = [i["item_id"] for i in second.get(f"/recommend?user={user}&k=10").get_json()["items"]]
        assert watched not in after
    finally:
        for live in lives:
            live.stop()
