"""The HTTP contract, every case, through the Flask test client against a real Redis."""

from __future__ import annotations

import pytest

from app import create_app


@pytest.fixture
def app(store, tmp_path):
    return create_app(
        {
            "REDIS_URL": store.redis.connection_pool.connection_kwargs and _url(store),
            "REDIS_PREFIX": store.keys.prefix,
            "MODEL_CACHE_DIR": str(tmp_path / "cache"),
            "MODEL_WATCHER": False,
            "TESTING": True,
        }
    )


def _url(store) -> str:
    kwargs = store.redis.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


@pytest.fixture
def published(store, trained_demo):
    return store.publish(trained_demo.parts, trained_demo.meta)


@pytest.fixture
def client(published, app):
    app.extensions["live_model"].refresh()
    return app.test_client()


def model_of(client):
    return client.application.extensions["live_model"].current


def test_no_model_published_is_503(app):
    client = app.test_client()
    for url in ("/recommend?user=u1", "/similar?item=t1", "/history?user=u1", "/version"):
        response = client.get(url)
        assert response.status_code == 503, url
        assert "no model" in response.get_json()["error"]
    assert client.get("/readyz").status_code == 503
    assert client.get("/healthz").status_code == 200


def test_recommend_known_user(client, published):
    model = model_of(client)
    user = model.user_ids[0]
    body = client.get(f"/recommend?user={user}").get_json()
    assert body["user"] == user and body["model_version"] == published
    assert body["strategy"] == "personalized"
    assert len(body["items"]) == 10
    history_items, _ = model.history(user)
    history = {model.item_ids[i] for i in history_items}
    ids = [item["item_id"] for item in body["items"]]
    assert len(set(ids)) == len(ids), "duplicates"
    assert not set(ids) & history, "recommended something already watched"
    for item in body["items"]:
        assert set(item) == {"item_id", "title", "score", "because"}
        assert item["title"] == model.titles[model.item_index[item["item_id"]]]
        assert item["because"] and {b["item_id"] for b in item["because"]} <= history
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("k", [1, 37, 100])
def test_recommend_k_and_heavy_live_path(client, k):
    model = model_of(client)
    heavy = max(model.user_ids, key=lambda u: len(model.history(u)[0]))
    body = client.get(f"/recommend?user={heavy}&k={k}").get_json()
    ids = [item["item_id"] for item in body["items"]]
    history = {model.item_ids[i] for i in model.history(heavy)[0]}
    available = {model.item_ids[i] for i in model.rules.eligible(None).nonzero()[0]}  # in their window today
    expected = min(k, len(available - history))  # a heavy user may have seen most titles
    assert len(ids) == expected and len(set(ids)) == expected and not set(ids) & history


def test_unknown_user_gets_popular(client):
    body = client.get("/recommend?user=someone-new&k=5").get_json()
    assert body["strategy"] == "popular" and len(body["items"]) == 5
    model = model_of(client)
    available = model.rules.eligible(None)
    assert [i["item_id"] for i in body["items"]] == [model.item_ids[i] for i in model.popular if available[i]][:5]


@pytest.mark.parametrize(
    "query, message",
    [
        ("", "missing required parameter 'user'"),
        ("user=", "missing required parameter 'user'"),
        ("user=%20%20", "missing required parameter 'user'"),
        ("user=u1&k=abc", "integer"),
        ("user=u1&k=1.5", "integer"),
        ("user=u1&k=0", "between 1 and 100"),
        ("user=u1&k=101", "between 1 and 100"),
        ("user=u1&k=-3", "between 1 and 100"),
        ("user=u1&k=99999999999999999999", "integer"),
        ("user=u1&user=u2", "given 2 times"),
        ("user=" + "x" * 129, "longer than 128"),
        ("user=a%00b", "control characters"),
    ],
)
def test_recommend_bad_parameters_are_400(client, query, message):
    response = client.get(f"/recommend?{query}")
    assert response.status_code == 400
    assert message in response.get_json()["error"]


def test_similar(client):
    model = model_of(client)
    item = model.item_ids[model.popular[0]]
    body = client.get(f"/similar?item={item}&k=7").get_json()
    ids = [i["item_id"] for i in body["items"]]
    assert len(ids) == 7 and item not in ids and len(set(ids)) == 7
    assert client.get("/similar?item=no-such-title").status_code == 404
    assert "unknown item" in client.get("/similar?item=no-such-title").get_json()["error"]
    assert client.get("/similar").status_code == 400
    assert client.get(f"/similar?item={item}&k=0").status_code == 400


def test_history(client):
    model = model_of(client)
    user = model.user_ids[1]
    body = client.get(f"/history?user={user}").get_json()
    items, _ = model.history(user)
    assert [i["item_id"] for i in body["items"]] == [model.item_ids[i] for i in items]
    assert body["known"] is True
    unknown = client.get("/history?user=nobody").get_json()
    assert unknown["items"] == [] and unknown["known"] is False
    assert client.get("/history").status_code == 400


def test_health_ready_version(client, published, trained_demo):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz").get_json()
    assert ready["status"] == "ready" and ready["model_version"] == published
    version = client.get("/version").get_json()
    assert version["model_version"] == published
    assert version["counts"] == trained_demo.meta["counts"]
    assert version["checksum"] and "parts" not in version


def test_unknown_route_and_method_are_json(client):
    response = client.get("/nope")
    assert response.status_code == 404 and "error" in response.get_json()
    response = client.delete("/recommend?user=u1")
    assert response.status_code == 405 and "error" in response.get_json()
    response = client.post("/recommend?user=u1")  # POST takes a JSON body
    assert response.status_code == 415 and "error" in response.get_json()


def test_switches_to_a_newly_published_version(client, store, trained_demo):
    before = client.get("/version").get_json()["model_version"]
    newer = store.publish(trained_demo.parts, trained_demo.meta)
    client.application.extensions["live_model"].refresh()
    assert client.get("/version").get_json()["model_version"] == newer != before


def test_gc_freeze_keeps_the_model_out_of_collections_and_frees_the_old_one(client, store, trained_demo, monkeypatch):
    """GC_FREEZE=1 (gunicorn.conf.py): after a switch the new version's objects are frozen, so a
    collection does not walk them, and the version it replaced is freed, not frozen with it."""
    import gc
    import weakref

    monkeypatch.setenv("GC_FREEZE", "1")
    live = client.application.extensions["live_model"]
    old = weakref.ref(live.current)
    try:
        store.publish(trained_demo.parts, trained_demo.meta)
        assert live.refresh() is True
        assert client.get(f"/recommend?user={live.current.user_ids[0]}").status_code == 200
        assert gc.get_freeze_count() > 0
        assert not any(o is live.current.item_index for o in gc.get_objects())  # frozen: not walked
        assert old() is None  # the replaced version (a cycle through its read_user) was collected
    finally:
        gc.unfreeze()


def test_corrupt_version_is_refused_and_previous_keeps_serving(client, store, trained_demo):
    good = client.get("/version").get_json()["model_version"]
    bad = store.write_version(trained_demo.parts, trained_demo.meta)
    store.redis.set(store.keys.part(bad, "recommend.ann", 0), b"\x00" * 100)
    store.redis.set(store.keys.live, bad)  # as if a buggy publisher forced the pointer
    live = client.application.extensions["live_model"]
    assert live.refresh() is False
    assert bad in live.refused
    assert client.get("/version").get_json()["model_version"] == good
    assert client.get(f"/recommend?user={model_of(client).user_ids[0]}").status_code == 200


def test_a_request_reads_its_user_from_redis_in_one_round_trip(client, published, store, monkeypatch):
    """The user's record and fresh overlay come in one pipeline; the worker holds no per-user data."""
    import redis

    model = model_of(client)
    assert model.user_store is not None and model.user_index == {} and model.candidates is None
    user = model.user_ids[5]
    client.get(f"/page?user={model.user_ids[6]}")  # opens the connection, caches trending and promotions: not per request
    sent = []
    original = redis.connection.Connection.send_packed_command
    monkeypatch.setattr(
        redis.connection.Connection, "send_packed_command", lambda self, *a, **k: (sent.append(a), original(self, *a, **k))[1]
    )
    for path in (f"/recommend?user={user}", f"/page?user={user}", f"/recommend?user={user}&genre=Drama&exclude=t1"):
        sent.clear()
        body = client.get(path).get_json()
        assert body.get("strategy", "personalized") == "personalized", body
        assert len(sent) == 1, (path, sent)  # HGET record + HGET overlay, pipelined
        assert b":users:" in b"".join(sent[0][0])  # the record's HGET (with the overlay's, unless known empty)
    # A user unknown to the version is a popular answer, from the same single read.
    sent.clear()
    assert client.get("/recommend?user=nobody-here").get_json()["strategy"] == "popular"
    assert len(sent) == 1
    # /version says where the users are, never the key that names their records.
    shown = client.get("/version").get_json()["user_store"]
    assert shown["users"] == len(model.user_ids) and "key" not in shown


def test_the_serving_benchmarks_floor_route_does_recommends_redis_read_and_nothing_more(store, published, tmp_path):
    """bench/serve.py's floor (/_bench/read, bench/serve_app.py): the user's Redis read, as /recommend does it."""
    from bench.serve_app import FLOOR_PATH
    from bench.serve_app import create_app as create_bench_app

    config = {
        "REDIS_URL": _url(store), "REDIS_PREFIX": store.keys.prefix, "MODEL_CACHE_DIR": str(tmp_path / "cache"),
        "MODEL_WATCHER": False, "TESTING": True,
    }  # fmt: skip
    app = create_bench_app(config)
    app.extensions["live_model"].refresh()
    client = app.test_client()
    user = client.get("/history?user=u1").get_json()["user"]  # warm: the model is open

    def hgets() -> int:
        return int(store.redis.info("commandstats").get("cmdstat_hget", {}).get("calls", 0))

    reads = {}
    for path in (FLOOR_PATH, "/recommend"):
        before = hgets()
        response = client.get(f"{path}?user={user}")
        assert response.status_code == 200, path
        reads[path] = hgets() - before
    # The same reads (the record, and the fresh overlay: this app runs no pub/sub listener), one pipeline.
    assert reads[FLOOR_PATH] == reads["/recommend"] >= 1
    assert client.get(FLOOR_PATH).status_code == 400  # the same checks of the user id
    assert create_app(config).test_client().get(f"{FLOOR_PATH}?user={user}").status_code == 404  # the service has none
