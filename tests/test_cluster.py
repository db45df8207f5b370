"""Redis Cluster (``REDIS_CLUSTER=1``): a real cluster of 3 masters and 3 replicas (tests/cluster.py).

The key layout keeps every script's and transaction's keys in one slot and
spreads per-user records and user shards over every master; both engines'
nightly jobs, the service, ``POST /events``, the online path and the
dashboard run on it unchanged; a stalled replica turns writes away rather
than confirm what it does not hold; and a master killed (or resharded) under
load loses no accepted event while reads keep answering.
"""

from __future__ import annotations

import collections
import threading
import time

import pytest
import redis

from app import create_app
from jobs.nightly import NightlyConfig, run_nightly
from models.data import LiveEvent
from models.embeddings import ModelParams
from models.live_events import EventLog, take_for_job
from models.recommender import open_version
from models.store import ModelStore, redis_from_url
from tests.cluster import RedisCluster
from tests.helpers import get, post_json, start_gunicorn, stop

FAST = ModelParams(n_trees=5, iterations=5, content_steps=30, factors=16, candidates=20)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    nodes = RedisCluster(tmp_path_factory.mktemp("cluster"))
    nodes.start()
    yield nodes
    nodes.stop()


@pytest.fixture
def cluster_store(cluster, monkeypatch) -> ModelStore:
    monkeypatch.setenv("REDIS_CLUSTER", "1")
    client = redis_from_url(cluster.url)
    client.flushall()  # every master
    yield ModelStore(client, "cl")
    client.close()


def keys_by_master(cluster: RedisCluster, pattern: str) -> dict[int, list[str]]:
    return {port: [k.decode() for k in redis.Redis(port=port).scan_iter(match=pattern, count=1000)] for port in cluster.masters()}


def stored_events(store: ModelStore) -> collections.Counter:
    """(user, item, timestamp) of every entry in every shard's stream."""
    found: collections.Counter = collections.Counter()
    log = EventLog(store.redis, store.keys)
    for shard in log.shards:
        for _, event in log.read(log.snapshot(shard), shard=shard):
            found[(event.user_id, event.item_id, event.timestamp)] += 1
    return found


def test_layout_groups_control_keys_and_spreads_users_and_events(cluster, cluster_store, trained_demo, tmp_path):
    store = cluster_store
    assert store.keys.cluster and store.keys.shards == 16 and store.keys.tag == "{cl}"
    version = store.publish(trained_demo.parts, trained_demo.meta)
    masters = cluster.masters()
    assert len(masters) == 3

    # Every key that a script or transaction touches together lives in the {cl} slot, on one master.
    grouped = keys_by_master(cluster, "{cl}:*")
    holders = [port for port, keys in grouped.items() if keys]
    assert holders == [cluster.master_of("{cl}:live")]
    assert f"{{cl}}:version:{version}:meta" in grouped[holders[0]]

    # Per-user records: buckets on every master, none under the tag.
    buckets = keys_by_master(cluster, f"cl:version:{version}:users:*")
    assert all(len(keys) > 0 for keys in buckets.values()), {p: len(k) for p, k in buckets.items()}
    assert sum(len(k) for k in buckets.values()) == store.meta(version)["user_store"]["buckets"]

    # The service's reads work across slots: every user's record decodes, recommendations come back.
    model = open_version(store, version, tmp_path / "cache")
    users = model.user_ids[:50]
    assert all(model.user(u) is not None for u in users)
    assert all(model.recommend(u, k=5)[0] == "personalized" and len(model.recommend(u, k=5)[1]) == 5 for u in users[:10])

    # Events: one stream (and overlay) per shard, spread over every master; each user's events in one shard.
    log = EventLog(store.redis, store.keys)
    events = [LiveEvent(f"viewer-{n}", model.item_ids[n % 20], 1_700_000_000 + n, 600.0) for n in range(300)]
    ids = log.append(events)
    assert len(ids) == 300 and all(ids)
    streams = keys_by_master(cluster, "{cl:shard:*}:events")
    assert all(len(keys) > 0 for keys in streams.values()), streams
    assert sum(stored_events(store).values()) == 300
    assert log.fresh_raw("viewer-7").decode().split("\t")[1] == model.item_ids[7]  # from the user's own shard
    assert log.fresh_users() == {f"viewer-{n}" for n in range(300)}

    # Pruning a version removes its buckets from every master.
    store.delete(version)
    assert sum(len(k) for k in keys_by_master(cluster, f"cl:version:{version}:*").values()) == 0


def job(demo_files, cluster, **overrides) -> NightlyConfig:
    settings = dict(
        events=str(demo_files["events"]), catalog=str(demo_files["catalog"]), redis_url=cluster.url, prefix="cl",
        evaluate=False, show_progress=False, params=FAST, text=False,
    )  # fmt: skip
    settings.update(overrides)
    return NightlyConfig(**settings)


def test_job_service_and_events_run_on_the_cluster(cluster, cluster_store, demo_files, tmp_path):
    store = cluster_store
    archive = tmp_path / "archive"
    first = run_nightly(job(demo_files, cluster, events_archive=str(archive)))
    assert store.live_version() == first.version
    app = create_app({
        "REDIS_URL": cluster.url, "REDIS_PREFIX": "cl", "MODEL_CACHE_DIR": str(tmp_path / "cache"),
        "MODEL_WATCHER": False, "TESTING": True,
    })  # fmt: skip
    client = app.test_client()
    model = app.extensions["live_model"].current
    users = model.user_ids[:40]
    picks = {}
    for user in users:
        answer = client.get(f"/recommend?user={user}&k=5")
        assert answer.status_code == 200, answer.json
        assert len(answer.json["items"]) == 5 and answer.json["items"][0]["because"]
        picks[user] = answer.json["items"][0]["item_id"]

    posted = client.post("/events", json=[{"user_id": u, "item_id": picks[u], "timestamp": int(time.time()), "watch_seconds": 1200} for u in users])
    assert posted.status_code == 200 and posted.json["accepted"] == 40, posted.json
    for user in users[:10]:  # the fresh overlay (read from the user's shard) excludes what was just watched
        items = [i["item_id"] for i in client.get(f"/recommend?user={user}&k=5").json["items"]]
        assert picks[user] not in items
    shards = {store.keys.user_shard(u) for u in users}
    assert len(shards) > 4

    # The next night takes every shard's events exactly once, and with keep=1 compacts them into the archive.
    second = run_nightly(job(demo_files, cluster, events_archive=str(archive), keep=1))
    taken = store.meta(second.version)["live_events"]
    assert taken["events"] == 40 and set(taken["shards"]) == {str(s) for s in range(16)}
    assert sum(store.redis.xlen(store.keys.events_stream_of(s)) for s in range(16)) == 0
    assert sum(store.redis.hlen(store.keys.fresh_of(s)) for s in range(16)) == 0
    info, files = take_for_job(store, tmp_path, str(archive))
    assert info["events"] == 0 and sorted({f.parent.name for f in files}) == sorted(f"shard-{s}" for s in shards)
    import pyarrow.parquet as pq

    assert sum(pq.read_metadata(f).num_rows for f in files) == 40


def test_the_spark_engine_writes_user_records_into_the_cluster(cluster, cluster_store, demo_files, tmp_path):
    """--engine spark on local[2] with REDIS_CLUSTER=1: the executors write every user's record to the
    masters of its bucket; the service serves the version."""
    import subprocess

    from tests.helpers import nightly_command
    from tests.test_spark import REPO, spark_env

    env = spark_env(REDIS_URL=cluster.url, REDIS_CLUSTER="1", SPARK_LOG=str(tmp_path / "spark.log"))
    run = subprocess.run(
        nightly_command(demo_files["events"], demo_files["catalog"], "--engine", "spark", "--prefix", "cl", "--no-eval", "--n-trees", "5"),
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "user records written by the executors" in run.stderr
    store = cluster_store
    version = store.live_version()
    meta = store.meta(version)
    assert meta["engine"] == "spark" and store.count_users(version, meta["user_store"]) == meta["counts"]["users"] == 600
    buckets = keys_by_master(cluster, f"cl:version:{version}:users:*")
    assert all(len(keys) > 0 for keys in buckets.values())
    app = create_app({
        "REDIS_URL": cluster.url, "REDIS_PREFIX": "cl", "MODEL_CACHE_DIR": str(tmp_path / "cache"),
        "MODEL_WATCHER": False, "TESTING": True,
    })  # fmt: skip
    model = app.extensions["live_model"].current
    body = app.test_client().get(f"/recommend?user={model.user_ids[0]}&k=5").json
    assert body["model_version"] == version and body["strategy"] == "personalized" and len(body["items"]) == 5


def test_impressions_attribution_and_an_experiment_run_on_the_cluster(cluster, cluster_store, trained_demo, tmp_path):
    """The online path's scripts and transactions find their keys in one slot: impressions, credited
    viewings, an experiment's per-arm sums, promotion, and the impressions' compaction."""
    from models import experiments
    from models.attribution import compact_impressions, hourly

    store = cluster_store
    first = store.publish(trained_demo.parts, trained_demo.meta)
    second = store.publish(trained_demo.parts, trained_demo.meta)
    experiments.start(store, "on-a-cluster", [("control", second, 0.5), ("treatment", first, 0.5)])
    app = create_app({
        "REDIS_URL": cluster.url, "REDIS_PREFIX": "cl", "MODEL_CACHE_DIR": str(tmp_path / "cache"),
        "MODEL_WATCHER": False, "TESTING": True,
    })  # fmt: skip
    client = app.test_client()
    live = app.extensions["live_model"]
    live.refresh_experiment()
    now = int(time.time())
    arms = collections.Counter()
    for user in live.current.user_ids[:60]:
        answer = client.get(f"/recommend?user={user}").json
        shown = [i["item_id"] for i in answer["items"]]
        assert client.post("/impressions", json={"user_id": user, "recommendation_id": answer["recommendation_id"], "items": shown, "timestamp": now}).status_code == 200
        assert client.post("/events", json={"user_id": user, "item_id": shown[0], "timestamp": now + 5}).status_code == 200
        arms[answer["arm"]] += 1
    assert set(arms) == {"control", "treatment"}
    shown = keys_by_master(cluster, "{cl:shard:*}:shown:*")  # per-user keys: in every master's shards
    assert all(len(keys) > 0 for keys in shown.values()) and sum(len(k) for k in shown.values()) == 60
    assert not keys_by_master(cluster, "{cl}:shown:*")[cluster.master_of("{cl}:live")]
    status = experiments.status(store, experiments.current(store))
    assert {arm: a["impressions"] for arm, a in status["arms"].items()} == dict(arms)
    assert {arm: a["clicks"] for arm, a in status["arms"].items()} == dict(arms)
    counts = hourly(store.redis, store.keys, [(second, "control"), (first, "treatment")], [now // 3600])
    assert counts[(second, "control")][0]["clicks"] == arms["control"]
    assert counts[(first, "treatment")][0]["users"] == arms["treatment"]
    metrics = client.get("/metrics").get_data(as_text=True)  # the counters, summed over the shards
    assert f'recs_online_clicks_total{{arm="control",version="{second}"}} {float(arms["control"])}' in metrics
    record = experiments.promote(store, "treatment")
    assert record["status"] == "promoted" and store.live_version() == first
    archived = compact_impressions(store.redis, store.keys, tmp_path / "archive", now=now + 2 * 86400)
    assert archived["archived"] == 60 and archived["impressions_kept"] == 0


def test_the_dashboard_works_on_the_cluster(cluster, cluster_store, trained_demo, tmp_path, monkeypatch):
    """Sign-in (sessions and rate limits), every page, a rollback, a queued run and a promotion."""
    from tests.test_admin import HTML, TOKEN, csrf_from, sign_in

    monkeypatch.delenv("SECRET_KEY", raising=False)
    store = cluster_store
    older = store.publish(trained_demo.parts, trained_demo.meta)
    newer = store.publish(trained_demo.parts, trained_demo.meta)
    app = create_app({
        "REDIS_URL": cluster.url, "REDIS_PREFIX": "cl", "MODEL_CACHE_DIR": str(tmp_path / "cache"),
        "MODEL_WATCHER": False, "TESTING": True, "ADMIN_TOKEN": TOKEN,
    })  # fmt: skip
    client = app.test_client()
    assert sign_in(client, "wrong").status_code == 401
    assert sign_in(client).status_code == 303
    model = app.extensions["live_model"].current
    user, title = model.user_ids[0], model.item_ids[0]
    for page in ("/admin/", "/admin/models", "/admin/runs", "/admin/explore", f"/admin/explore/user?user={user}",
                 f"/admin/explore/title?item={title}", "/admin/promotions", "/admin/experiments", "/admin/map.json"):  # fmt: skip
        assert client.get(page, headers=HTML).status_code == 200, page
    csrf = csrf_from(client.get("/admin/runs", headers=HTML).text)
    assert client.post("/admin/models/activate", data={"csrf_token": csrf, "version": older}).status_code == 303
    assert store.live_version() == older
    assert client.post("/admin/runs", data={"csrf_token": csrf}).status_code == 303
    assert store.redis.llen(store.keys.run_queue) == 1
    saved = client.post("/admin/promotions", data={"csrf_token": csrf, "kind": "top_picks", "items": title, "share": "0.2"})
    assert saved.status_code in (200, 303) and title.encode() in store.redis.get(store.keys.promotions)
    assert newer in {v["model_version"] for v in store.versions()}


def test_an_event_no_replica_confirmed_is_not_reported_accepted(cluster, cluster_store, tmp_path):
    """WAIT: while the shard master's replica stalls, POST /events answers 503 (retry), never 200."""
    store = cluster_store
    app = create_app({
        "REDIS_URL": cluster.url, "REDIS_PREFIX": "cl", "MODEL_CACHE_DIR": str(tmp_path / "cache"),
        "MODEL_WATCHER": False, "TESTING": True,
    })  # fmt: skip
    client = app.test_client()
    event = {"user_id": "stalled-viewer", "item_id": "t1", "timestamp": 1_700_000_000}
    master = cluster.master_of(store.keys.events_stream_of(store.keys.user_shard("stalled-viewer")))
    replica = cluster.replica_of(master)
    assert client.post("/events", json=event).status_code == 200
    cluster.pause(replica)
    try:
        stalled = client.post("/events", json=event)
    finally:
        cluster.resume(replica)
    assert stalled.status_code == 503 and "retry" in stalled.json["error"], stalled.json
    assert stalled.headers["Retry-After"]
    cluster.wait_healthy()
    assert client.post("/events", json=event).status_code == 200


class Load:
    """Writers posting 4-event batches of new users and readers asking /recommend, through gunicorn."""

    def __init__(self, base: str, keys, users: list[str], titles: list[str], writers: int = 3, readers: int = 2):
        self.base, self.keys, self.users, self.titles = base, keys, users, titles
        self.accepted: list[tuple[str, str, int]] = []
        self.refused: collections.Counter = collections.Counter()
        self.reads: collections.Counter = collections.Counter()
        self.watched: set[int] = set()  # shards whose first accepted write after ``since`` is timed
        self.since: float | None = None
        self.first_ok: list[float] = []
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self.write, args=(w,)) for w in range(writers)]
        self.threads += [threading.Thread(target=self.read) for _ in range(readers)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(30)

    def write(self, worker: int) -> None:
        n = 0
        while not self.done.is_set():
            batch = [(f"w{worker}-{n}-{k}", self.titles[(n + k) % len(self.titles)], 1_700_000_000 + n) for k in range(4)]
            n += 1
            sent = time.monotonic()
            try:
                status, _ = post_json(f"{self.base}/events", [{"user_id": u, "item_id": i, "timestamp": t} for u, i, t in batch], timeout=10)
            except OSError as exc:
                self.refused[type(exc).__name__] += 1
                continue
            if status == 200:
                self.accepted.extend(batch)
                touches = any(self.keys.user_shard(u) in self.watched for u, _, _ in batch)
                if self.since is not None and sent > self.since and touches and not self.first_ok:
                    self.first_ok.append(time.monotonic() - self.since)
            else:
                self.refused[status] += 1
                time.sleep(0.05)

    def read(self) -> None:
        n = 0
        while not self.done.is_set():
            status, _ = get(f"{self.base}/recommend?user={self.users[n % len(self.users)]}&k=5", timeout=10)
            self.reads[status] += 1
            n += 1

    def lost(self, nodes: RedisCluster, prefix: str) -> list:
        counts = stored_events(ModelStore(redis_from_url(nodes.url), prefix))
        return [event for event in self.accepted if counts[event] == 0]


@pytest.fixture
def served_cluster(tmp_path, trained_demo, monkeypatch):
    """A cluster of its own (the tests below break it), a published model and gunicorn serving it."""
    nodes = RedisCluster(tmp_path / "nodes")
    (tmp_path / "nodes").mkdir()
    nodes.start()
    process = None
    try:
        monkeypatch.setenv("REDIS_CLUSTER", "1")
        store = ModelStore(redis_from_url(nodes.url), "fo")
        store.publish(trained_demo.parts, trained_demo.meta)
        model = open_version(store, store.live_version(), tmp_path / "local")
        process, base = start_gunicorn(nodes.url, "fo", tmp_path / "cache", workers=2, REDIS_CLUSTER="1")
        yield nodes, store, base, model
        assert "Traceback" not in stop(process)
        process = None
    finally:
        if process is not None:
            stop(process)
        nodes.stop()


def test_killing_a_master_under_load_loses_no_accepted_event(served_cluster):
    """SIGKILL the master of the most event shards while writers and readers run through gunicorn."""
    nodes, store, base, model = served_cluster
    owners = {s: nodes.master_of(store.keys.events_stream_of(s)) for s in range(store.keys.shards)}
    victim = collections.Counter(owners.values()).most_common(1)[0][0]
    with Load(base, store.keys, model.user_ids[:20], model.item_ids[:50]) as load:
        load.watched = {s for s, port in owners.items() if port == victim}
        time.sleep(3)
        before = len(load.accepted)
        load.since = time.monotonic()
        nodes.kill(victim)
        failed_over = nodes.wait_failover(victim)  # its replica took over its slots
        time.sleep(5)
    after = len(load.accepted) - before
    recovered = f"{load.first_ok[0]:.1f}s" if load.first_ok else "never"
    print(f"\nkilled {victim} (master of {len(load.watched)} of {store.keys.shards} event shards): failover in {failed_over:.1f}s, "
          f"writes to its shards accepted again {recovered} after the kill; accepted {len(load.accepted)} events "
          f"({before} before the kill), refused {dict(load.refused)}, reads {dict(load.reads)}")  # fmt: skip
    assert before > 50 and after > 50
    assert set(load.reads) == {200}, load.reads  # reads answered throughout (degraded while the slots moved)
    assert load.first_ok and load.first_ok[0] < 15.0
    lost = load.lost(nodes, "fo")
    assert not lost, f"{len(lost)} of {len(load.accepted)} accepted events lost, e.g. {lost[:3]}"


def test_moving_slots_under_load_loses_no_accepted_event(served_cluster):
    """An operator reshards (redis-cli --cluster reshard) while events flow: writes to moving slots are
    refused or retried (MOVED, ASK, TRYAGAIN), never lost, and the moved shards take writes again."""
    nodes, store, base, model = served_cluster
    owners = {s: nodes.master_of(store.keys.events_stream_of(s)) for s in range(store.keys.shards)}
    source = collections.Counter(owners.values()).most_common(1)[0][0]
    target = next(port for port in nodes.masters() if port != source)
    with Load(base, store.keys, model.user_ids[:20], model.item_ids[:50]) as load:
        time.sleep(2)
        before = len(load.accepted)
        nodes.reshard(source, target, slots=5461)  # every slot of the source
        load.watched = {s for s in owners if nodes.master_of(store.keys.events_stream_of(s)) == target and owners[s] == source}
        load.since = time.monotonic()
        time.sleep(3)
    print(f"\nmoved {len(load.watched)} event shards from {source} to {target}: accepted {len(load.accepted)} ({before} before), "
          f"refused {dict(load.refused)}, reads {dict(load.reads)}")  # fmt: skip
    assert load.watched and load.first_ok, "the moved shards took no write after the move"
    assert set(load.reads) == {200}, load.reads
    lost = load.lost(nodes, "fo")
    assert not lost, f"{len(lost)} of {len(load.accepted)} accepted events lost, e.g. {lost[:3]}"
