"""Recommendation ids, impressions, attribution and experiments, against a real redis-server (and gunicorn once)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from jobs import experiments as experiments_cli
from models import experiments
from models.attribution import RecommendationIds, compact_impressions, hourly, totals
from tests.conftest import REPO_ROOT
from tests.helpers import get, start_gunicorn, stop
from tests.test_events import make_app

TOKEN = "online-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def versions(store, trained_demo):
    """Two kept versions (the second live); same parts, so both are real, servable models."""
    first = store.publish(trained_demo.parts, trained_demo.meta)
    time.sleep(0.01)
    second = store.publish(trained_demo.parts, {**trained_demo.meta, "params": {**trained_demo.meta["params"]}})
    return first, second


@pytest.fixture
def app(redis_server, store, versions, tmp_path):
    return make_app(redis_server, store, tmp_path, EVENTS_TOKEN=TOKEN)


@pytest.fixture
def client(app):
    return app.test_client()


def model_of(client):
    return client.application.extensions["live_model"].current


def impression(user, rid, items, ts, **extra):
    return {"user_id": user, "recommendation_id": rid, "items": items, "timestamp": ts, **extra}


def event(user, item, ts, **extra):
    return {"user_id": user, "item_id": item, "timestamp": ts, **extra}


# -- 1. recommendation ids ------------------------------------------------------------------------------------
def test_every_answer_carries_a_signed_unique_recommendation_id(client, versions):
    model = model_of(client)
    user, item = model.user_ids[1], model.item_ids[5]
    answers = [
        client.get(f"/recommend?user={user}").get_json(),
        client.get(f"/recommend?user={user}").get_json(),
        client.get(f"/similar?item={item}").get_json(),
        client.get(f"/page?user={user}").get_json(),
    ]
    ids = client.application.extensions["online"].ids()
    rids = [a["recommendation_id"] for a in answers]
    assert len(set(rids)) == 4  # unique, even for the same request twice
    for answer in answers:
        assert answer["model_version"] == versions[1] and answer["arm"] is None
        origin = ids.verify(answer["recommendation_id"])
        assert origin is not None and origin.version == versions[1] and origin.arm is None
    # Not guessable or forgeable: another secret, a changed payload or signature, garbage: all refused.
    other = RecommendationIds(b"another secret")
    forged = other.issue(versions[1])
    assert ids.verify(forged) is None
    prefix, body, signature = rids[0].split(".")
    assert ids.verify(f"{prefix}.{body[:-2]}AA.{signature}") is None
    assert ids.verify(f"{prefix}.{body}.{signature[:-2]}AA") is None
    for junk in ("", "r1", "r1..", "x.y.z", "r1.!!!.???", "r1." + "A" * 5000 + ".B"):
        assert ids.verify(junk) is None


# -- 2. impressions -------------------------------------------------------------------------------------------
def test_impressions_need_the_writer_token_and_are_validated_per_row(client, store):
    model = model_of(client)
    user = model.user_ids[2]
    rid = client.get(f"/recommend?user={user}").get_json()["recommendation_id"]
    now = int(time.time())
    good = impression(user, rid, model.item_ids[:3], now, row="top_picks")
    assert client.post("/impressions", json=good).status_code == 401
    bad = [
        good,
        impression(user, rid, [], now),
        impression(user, "r1.forged.sig", model.item_ids[:2], now),
        impression(user, rid, model.item_ids[:2], now + 10 * 86400),
        {"user_id": user},
    ]
    response = client.post("/impressions", json=bad, headers=AUTH)
    assert response.status_code == 400
    body = response.get_json()
    fields = {(e["index"], e["field"]) for e in body["rows"]}
    assert {(1, "items"), (3, "timestamp"), (4, "recommendation_id"), (4, "items"), (4, "timestamp")} <= fields
    assert store.redis.xlen(store.keys.impressions_stream) == 0  # all or nothing
    # The forged id is caught once the rest is valid.
    response = client.post("/impressions", json=[good, bad[2]], headers=AUTH)
    assert response.status_code == 400 and response.get_json()["rows"][0]["index"] == 1
    response = client.post("/impressions", json=[good, impression(user, rid, model.item_ids[3:6], now)], headers=AUTH)
    assert response.status_code == 200 and response.get_json() == {"accepted": 2}
    assert store.redis.xlen(store.keys.impressions_stream) == 2
    entry = store.redis.xrange(store.keys.impressions_stream)[0][1]
    assert entry[b"u"].decode() == user and entry[b"i"].decode().split("\n") == model.item_ids[:3]
    assert all(user.encode() not in key for key in store.redis.keys("*"))  # user ids never in key names


# -- 3. attribution --------------------------------------------------------------------------------------------
def test_viewings_are_credited_to_the_latest_impression_within_the_window(client, store, versions):
    model = model_of(client)
    user = model.user_ids[4]
    a, b, c, d = model.item_ids[10:14]
    t0 = (int(time.time()) // 3600 - 30) * 3600 + 60  # a whole UTC hour, 30 hours ago
    rid = client.get(f"/recommend?user={user}").get_json()["recommendation_id"]
    assert client.post("/impressions", json=impression(user, rid, [a, b, c], t0), headers=AUTH).status_code == 200
    events = [
        event(user, b, t0 + 100, watch_seconds=600),  # click 1
        event(user, b, t0 + 200),  # another viewing of b: no second click
        event(user, c, t0 + 2 * 86400),  # after the window: not credited
        event(user, a, t0 - 50),  # before it was shown: not credited
        event(model.user_ids[5], a, t0 + 100),  # another user: not credited
    ]
    assert client.post("/events", json=events, headers=AUTH).status_code == 200
    rid2 = client.get(f"/recommend?user={user}").get_json()["recommendation_id"]
    # A viewing naming its answer is credited to it even without an impression.
    assert client.post("/events", json=[event(user, d, t0 + 300, recommendation_id=rid2)], headers=AUTH).status_code == 200
    forged = event(user, d, t0 + 300, recommendation_id="r1.bogus.id")
    response = client.post("/events", json=[forged], headers=AUTH)
    assert response.status_code == 400 and response.get_json()["rows"][0]["field"] == "recommendation_id"

    hour = t0 // 3600
    counts = hourly(store.redis, store.keys, [(versions[1], "-")], [hour])[(versions[1], "-")][0]
    assert counts["impressions"] == 1 and counts["shown"] == 3 and counts["users"] == 1
    assert counts["clicks"] == 2 and counts["viewings"] == 3  # b (twice), d
    minutes = model.items["episode_minutes"][model.item_index[b]]
    expected = min(600 / (minutes * 60 if minutes else 1800), 1.0) + 1.0 + 1.0
    assert counts["completion"] == pytest.approx(expected, rel=1e-6)
    metrics = client.get("/metrics").get_data(as_text=True)
    assert f'recs_online_clicks_total{{arm="-",version="{versions[1]}"}} 2.0' in metrics
    assert f'recs_online_impressions_total{{arm="-",version="{versions[1]}"}} 1.0' in metrics
    # Kept for at least 30 days.
    assert store.redis.ttl(store.keys.online_hour(hour)) >= 30 * 86400


def test_impressions_are_compacted_and_archived(client, store, tmp_path):
    model = model_of(client)
    user = model.user_ids[6]
    rid = client.get(f"/recommend?user={user}").get_json()["recommendation_id"]
    now = int(time.time())
    batch = [impression(user, rid, model.item_ids[:2], now - 3 * 86400 + n) for n in range(5)]
    batch += [impression(user, rid, model.item_ids[:2], now)]
    assert client.post("/impressions", json=batch, headers=AUTH).status_code == 200
    # The stream ids are arrival times: pretend the compaction runs three days later.
    result = compact_impressions(store.redis, store.keys, tmp_path / "archive", now=time.time() + 3 * 86400)
    assert result["archived"] == 6 and result["trimmed"] == 6 and result["impressions_kept"] == 0
    import pyarrow.parquet as pq

    table = pq.read_table(result["archive_file"])
    assert table.num_rows == 6 and table.column("user_id").to_pylist() == [user] * 6
    assert compact_impressions(store.redis, store.keys, None)["trimmed"] == 0  # nothing young is dropped


# -- 4. experiments --------------------------------------------------------------------------------------------
def run_cli(redis_server, prefix, *args) -> tuple[int, dict | list | None, str]:
    out = subprocess.run(
        [sys.executable, "-m", "jobs.experiments", "--redis-url", redis_server.url, "--prefix", prefix, *args],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
    )  # fmt: skip
    return out.returncode, json.loads(out.stdout) if out.stdout.strip() else None, out.stderr


def test_experiment_lifecycle_assigns_users_stably_and_counts_per_arm(redis_server, store, versions, client, trained_demo):
    first, second = versions
    code, _, err = run_cli(redis_server, "test", "start", "bad", "--arm", f"control={first}:0.5", "--arm", f"t={second}:0.4")
    assert code == 2 and "sum to" in err
    code, _, err = run_cli(redis_server, "test", "start", "bad", "--arm", "control=nope:0.5", "--arm", f"t={second}:0.5")
    assert code == 2 and "not a kept version" in err
    code, status, err = run_cli(
        redis_server, "test", "start", "ranker", "--arm", f"control={second}:0.5", "--arm", f"treatment={first}:0.5"
    )
    assert code == 0, err
    assert status["name"] == "ranker" and set(status["arms"]) == {"control", "treatment"}
    code, _, err = run_cli(redis_server, "test", "start", "again", "--arm", f"a={first}:0.5", "--arm", f"b={second}:0.5")
    assert code == 2 and "is running" in err

    live = client.application.extensions["live_model"]
    live.refresh_experiment()  # what the watcher does every poll
    model = live.current
    arms = {}
    for user in model.user_ids[:300]:
        answer = client.get(f"/recommend?user={user}").get_json()
        assert answer["arm"] in ("control", "treatment")
        assert answer["model_version"] == (second if answer["arm"] == "control" else first)
        assert client.get(f"/page?user={user}").get_json()["arm"] == answer["arm"]  # same user, same arm
        arms[user] = answer["arm"]
        if len(arms) <= 40:  # some impressions and clicks for the status
            now = int(time.time())
            shown = [i["item_id"] for i in answer["items"]]
            client.post("/impressions", json=impression(user, answer["recommendation_id"], shown, now), headers=AUTH)
            client.post("/events", json=event(user, shown[0], now + 5), headers=AUTH)
    share = sum(a == "treatment" for a in arms.values()) / len(arms)
    assert 0.4 < share < 0.6
    # Assignment needs no state: another app (another worker) assigns the same.
    running = experiments.current(store)
    assert all(running.assign(user) == arm for user, arm in arms.items())

    code, status, _ = run_cli(redis_server, "test", "status")
    assert code == 0
    assert sum(a["users"] for a in status["arms"].values()) == 40
    assert sum(a["impressions"] for a in status["arms"].values()) == 40
    assert sum(a["clicks"] for a in status["arms"].values()) == 40
    assert all(a["ctr"] == pytest.approx(1.0) for a in status["arms"].values())
    assert set(status["comparisons"]["treatment"]) == {"ctr", "watch_through"}

    # The nightly job's pruning keeps the arms' versions while the experiment runs.
    extra = store.publish(trained_demo.parts, trained_demo.meta, activate=False)
    assert store.prune(keep=0) == [extra]  # live is `second`, `first` is an arm: both stay
    code, record, _ = run_cli(redis_server, "test", "promote", "treatment")
    assert code == 0 and record["status"] == "promoted" and record["promoted"] == "treatment"
    assert store.live_version() == first
    live.refresh()
    live.refresh_experiment()
    answer = client.get(f"/recommend?user={model.user_ids[0]}").get_json()
    assert answer["arm"] is None and answer["model_version"] == first
    code, kept, _ = run_cli(redis_server, "test", "list")
    assert code == 0 and kept[0]["status"] == "promoted"
    code, status, _ = run_cli(redis_server, "test", "status", "--id", kept[0]["id"])
    assert code == 0 and status["status"] == "promoted"  # results stay readable after the end
    code, _, err = run_cli(redis_server, "test", "stop")
    assert code == 2 and "no experiment" in err


def test_gunicorn_workers_pick_up_an_experiment_within_seconds(redis_server, store, versions, tmp_path):
    first, second = versions
    process, base = start_gunicorn(redis_server.url, "test", tmp_path / "cache", workers=2)
    try:
        status, answer = get(f"{base}/recommend?user=u000001")
        assert status == 200 and answer["arm"] is None
        experiments.start(store, "pickup", [("control", second, 0.5), ("treatment", first, 0.5)])
        started = time.monotonic()
        seen: set = set()
        while time.monotonic() - started < 10 and seen != {"control", "treatment"}:
            for n in range(20):
                status, answer = get(f"{base}/recommend?user=u{n:06d}")
                assert status == 200
                if answer["arm"]:
                    seen.add(answer["arm"])
        took = time.monotonic() - started
        assert seen == {"control", "treatment"}, f"arms seen after {took:.1f}s: {seen}"
        experiments.stop(store)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            arms = {get(f"{base}/recommend?user=u{n:06d}")[1]["arm"] for n in range(20)}
            if arms == {None}:
                break
        assert arms == {None}
    finally:
        log = stop(process)
    assert "Traceback" not in log


# -- 5. statistics ---------------------------------------------------------------------------------------------
def moments(n: np.ndarray, c: np.ndarray, w: np.ndarray, v: np.ndarray) -> dict:
    return {
        "users": float(len(n)), "n": n.sum(), "c": c.sum(), "w": w.sum(), "v": v.sum(),
        "nn": (n * n).sum(), "cc": (c * c).sum(), "cn": (c * n).sum(),
        "ww": (w * w).sum(), "vv": (v * v).sum(), "wv": (w * v).sum(),
    }  # fmt: skip


def test_ratio_variance_matches_the_spread_of_repeated_experiments():
    rng = np.random.default_rng(0)
    estimates, variances = [], []
    for _ in range(400):
        n = rng.poisson(5, 2000) + 1
        c = rng.binomial(n, rng.beta(2, 20, 2000))
        estimate, variance = experiments.ratio(moments(n, c, c * 0.5, c), "ctr")
        estimates.append(estimate)
        variances.append(variance)
    assert np.var(estimates) == pytest.approx(np.mean(variances), rel=0.2)


def test_incremental_sums_in_redis_equal_the_sums_of_the_final_counters(client, store, versions):
    """The Lua bookkeeping of squares and products (models.attribution) against numpy on the same counters."""
    first, second = versions
    experiments.start(store, "sums", [("control", second, 0.5), ("treatment", first, 0.5)])
    live = client.application.extensions["live_model"]
    live.refresh_experiment()
    model = live.current
    rng = np.random.default_rng(5)
    now = int(time.time())
    for user in model.user_ids[:60]:
        for _ in range(int(rng.integers(1, 4))):
            answer = client.get(f"/recommend?user={user}").get_json()
            shown = [i["item_id"] for i in answer["items"]]
            client.post("/impressions", json=impression(user, answer["recommendation_id"], shown, now), headers=AUTH)
            clicked = [shown[k] for k in range(len(shown)) if rng.random() < 0.2]
            views = [event(user, t, now + 10, watch_seconds=float(rng.integers(0, 3000))) for t in clicked for _ in range(2)]
            if views:
                client.post("/events", json=views, headers=AUTH)
    running = experiments.current(store)
    sums = experiments.arm_sums(store, running)
    for arm in running.arms:
        raw = store.redis.hgetall(store.keys.experiment_users(running.id, arm))
        rows = np.array([[float(x) for x in value.split()] for value in raw.values()])
        expected = moments(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3])
        for name, value in expected.items():
            assert sums[arm][name] == pytest.approx(value, rel=1e-9, abs=1e-6), (arm, name)


def test_users_needed_shrinks_with_the_effect_and_the_sequence_is_wider_than_a_fixed_interval():
    small = experiments.users_needed(0.05, 0.1, 0.02)
    large = experiments.users_needed(0.05, 0.1, 0.10)
    assert small > large > 0
    v, tau2 = 1e-5, 1e-4
    assert experiments.confidence_sequence(v, tau2) > 1.96 * v**0.5
    # The p-value is below alpha exactly when the sequence excludes 0.
    half = experiments.confidence_sequence(v, tau2)
    assert experiments.always_valid_p(half * 1.01, v, tau2) < 0.05 < experiments.always_valid_p(half * 0.99, v, tau2)


def test_arm_totals_reach_metrics_with_labels(client, store, versions):
    first, second = versions
    experiments.start(store, "labels", [("control", second, 0.5), ("treatment", first, 0.5)])
    client.application.extensions["live_model"].refresh_experiment()
    model = model_of(client)
    for user in model.user_ids[:20]:
        answer = client.get(f"/recommend?user={user}").get_json()
        shown = [i["item_id"] for i in answer["items"]]
        client.post("/impressions", json=impression(user, answer["recommendation_id"], shown, int(time.time())), headers=AUTH)
    counted = totals(store.redis, store.keys)
    assert sum(v["impressions"] for (version, arm), v in counted.items() if arm in ("control", "treatment")) == 20
    text = client.get("/metrics").get_data(as_text=True)
    assert 'arm="control"' in text and 'arm="treatment"' in text


def test_cli_status_without_experiment_is_a_clear_refusal(redis_server, store):
    code, _, err = run_cli(redis_server, "test", "status")
    assert code == 2 and "no experiment is running" in err
    assert experiments_cli.main(["--redis-url", "redis://127.0.0.1:1/0", "status"]) == 1


def test_an_unreadable_experiment_record_splits_nobody_and_stop_removes_it(client, store, versions):
    store.redis.set(store.keys.experiment, b"{not json")
    live = client.application.extensions["live_model"]
    live.refresh_experiment()
    answer = client.get(f"/recommend?user={live.current.user_ids[0]}")
    assert answer.status_code == 200 and answer.get_json()["arm"] is None
    with pytest.raises(experiments.ExperimentError, match="unreadable"):
        experiments.start(store, "x", [("control", versions[0], 0.5), ("t", versions[1], 0.5)])
    assert experiments.stop(store)["status"] == "removed"
    assert not store.redis.exists(store.keys.experiment)
    experiments.start(store, "x", [("control", versions[0], 0.5), ("t", versions[1], 0.5)])
    record = experiments.stop(store)
    assert record["status"] == "stopped"
    assert 0 < store.redis.ttl(store.keys.experiment_sums(record["id"], "control")) or not store.redis.exists(
        store.keys.experiment_sums(record["id"], "control")
    )


def test_an_arm_whose_version_vanished_is_not_served_and_nothing_is_miscounted(client, store, versions):
    first, second = versions
    experiments.start(store, "gone", [("control", second, 0.5), ("treatment", first, 0.5)])
    store.delete(first)  # an operator removed it by hand
    live = client.application.extensions["live_model"]
    live.refresh_experiment()
    assert live.running is None and "cannot serve the experiment" in live.experiment_error
    answer = client.get(f"/recommend?user={live.current.user_ids[0]}").get_json()
    assert answer["arm"] is None and answer["model_version"] == second


def test_an_oversized_impressions_body_is_413_and_nothing_is_stored(client, store):
    model = model_of(client)
    user = model.user_ids[0]
    rid = client.get(f"/recommend?user={user}").get_json()["recommendation_id"]
    one = impression(user, rid, model.item_ids[:10], int(time.time()))
    body = json.dumps([one] * 20000).encode()  # ~6 MB, past MAX_BODY_BYTES (1 MiB)
    response = client.post("/impressions", data=body, content_type="application/json", headers=AUTH)
    assert response.status_code == 413 and "error" in response.get_json()
    too_many = client.post("/impressions", json=[one] * 1001, headers=AUTH)
    assert too_many.status_code in (400, 413)
    assert store.redis.xlen(store.keys.impressions_stream) == 0


def test_counts_summed_over_user_shards_equal_the_unsharded_counts(redis_client):
    """The same impressions and viewings counted in one shard and spread over five give the same hourly
    counts, users, totals and experiment sums: readers add up the shards (each user is in one)."""
    from models.attribution import OnlineLog, Origin
    from models.data import Impression, LiveEvent
    from models.store import ModelStore

    ids = RecommendationIds(b"k" * 32)
    now = (int(time.time()) // 3600) * 3600 + 30
    running = experiments.Experiment.from_record({
        "id": "exp-1", "name": "e", "started_at": now, "salt": "s", "mde": 0.05, "status": "running", "control": "a",
        "arms": {"a": {"version": "v1", "share": 0.5}, "b": {"version": "v2", "share": 0.5}},
    })  # fmt: skip
    results = {}
    for shards in (1, 5):
        store = ModelStore(redis_client, f"sh{shards}", shards=shards)
        log = OnlineLog(store.redis, store.keys, ids)
        shown, viewed = [], []
        for n in range(80):
            user, arm = f"u{n}", "a" if n % 2 else "b"
            origin = Origin("v1" if arm == "a" else "v2", arm, "exp-1")
            rid = ids.issue(origin.version, arm, "exp-1")
            shown.append((Impression(user, rid, (f"t{n % 7}", f"t{n % 5}"), now + n), origin))
            if n % 3:
                viewed.append((LiveEvent(user, f"t{n % 7}", now + n + 60, 600.0), None, 0.5))
        assert log.record(shown, "exp-1") == 80
        credited, clicks = log.attribute(viewed, "exp-1")
        hours = hourly(store.redis, store.keys, [("v1", "a"), ("v2", "b")], [now // 3600])
        results[shards] = (credited, clicks, hours, totals(store.redis, store.keys), experiments.arm_sums(store, running))
        if shards > 1:  # really spread: every shard holds some users' impressions
            assert all(store.redis.xlen(store.keys.impressions_of(s)) > 0 for s in range(shards))
    assert results[1] == results[5]
    credited, clicks, hours, _, sums = results[1]
    assert credited == clicks == 53 and hours[("v1", "a")][0]["users"] == 40 and sums["a"]["users"] == 40
