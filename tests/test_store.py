"""The model store: publish, verify, roll back, refuse damaged versions (real redis-server)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from models.build import open_parts
from models.recommender import open_version
from models.store import RECORD_PARTS, CorruptUser, ModelError, pack_user, unpack_user


def test_round_trip_through_redis(store, trained_demo, tmp_path):
    version = store.publish(trained_demo.parts, trained_demo.meta)
    assert store.live_version() == version
    folder = store.materialize(version, tmp_path)
    for name, blob in trained_demo.parts.items():
        if name in RECORD_PARTS:  # per-user data: records in Redis, not files on the host
            assert not (folder / name).exists()
        else:
            assert (folder / name).read_bytes() == blob
    model = open_version(store, version, tmp_path)
    assert model.version == version
    assert model.rec_index.get_n_items() == trained_demo.meta["counts"]["titles"]
    user = model.user_ids[0]
    strategy, recs = model.recommend(user, 5)
    assert strategy == "personalized" and len(recs) == 5


def test_user_records_hold_exactly_the_per_user_parts(store, trained_demo, tmp_path):
    version = store.publish(trained_demo.parts, trained_demo.meta)
    info = store.meta(version)["user_store"]
    parts_model = open_parts(trained_demo.parts, trained_demo.meta, tmp_path / "parts")
    assert info["users"] == len(parts_model.user_ids) == store.count_users(version, info)
    assert info["bytes"] > 0 and info["seconds"] >= 0
    served = open_version(store, version, tmp_path / "cache")
    assert served.user_index == {} and served.hist_items is None  # nothing per user in the worker
    for user in parts_model.user_ids[::7]:
        want, got = parts_model.user(user), served.user(user)
        np.testing.assert_array_equal(got.items, want.items)
        np.testing.assert_array_equal(got.weights, want.weights)
        valid = want.candidates >= 0
        np.testing.assert_array_equal(got.candidates, want.candidates[valid])
        np.testing.assert_array_equal(got.scores, want.scores[valid])
        np.testing.assert_array_equal(got.because, want.because[valid])
        assert served.recommend(user, 10) == parts_model.recommend(user, 10)
    assert served.user("nobody-at-all") is None
    # Bucket keys only: no user id in any key name.
    names = [k.decode() for k in store.redis.scan_iter(match=f"test:version:{version}:users:*")]
    assert len(names) == info["buckets"] and not any(u in n for n in names for u in parts_model.user_ids[:50])


def test_versions_with_per_user_parts_still_serve(store, trained_demo, tmp_path):
    version = store.publish(trained_demo.parts, trained_demo.meta, per_user=False)  # as before user records
    assert "user_store" not in store.meta(version)
    model = open_version(store, version, tmp_path)
    assert model.user_store is None and len(model.user_index) == len(model.user_ids)
    assert model.recommend(model.user_ids[0], 5)[0] == "personalized"


def test_pruning_removes_a_versions_user_records(store, trained_demo):
    first = store.publish(trained_demo.parts, {**trained_demo.meta, "created_at": 1.0})
    info = store.meta(first)["user_store"]
    for n in range(2):
        store.publish(trained_demo.parts, {**trained_demo.meta, "created_at": 2.0 + n}, keep=2)
    assert first not in {m["model_version"] for m in store.versions()}
    assert not any(store.redis.exists(k) for k in store.user_buckets(first, info))


def test_missing_or_corrupt_user_records(store, trained_demo, tmp_path):
    good = store.publish(trained_demo.parts, trained_demo.meta)
    second = store.publish(trained_demo.parts, trained_demo.meta, activate=False)
    info = store.meta(second)["user_store"]
    store.redis.delete(store.user_buckets(second, info)[0])  # a lost bucket: the version is incomplete
    with pytest.raises(ModelError, match="user records"):
        store.activate(second)
    assert store.live_version() == good
    model = open_version(store, good, tmp_path)
    user = model.user_ids[3]
    key, field = store.user_address(good, model.user_store, user)
    raw = store.redis.hget(key, field)
    for bad in (raw[:-3], b"XX" + raw[2:], raw[:7] + np.full(len(raw) - 7, 255, np.uint8).tobytes()):
        store.redis.hset(key, field, bad)
        assert model.user(user) is None  # counted as unknown, not a crash
        assert model.recommend(user, 5)[0] == "popular"
    with pytest.raises(CorruptUser):
        unpack_user(raw[:-1], model.n_items)


def test_pointer_moves_only_on_activate_and_rollback_works(store, trained_demo):
    first = store.publish(trained_demo.parts, trained_demo.meta)
    second = store.write_version(trained_demo.parts, trained_demo.meta)
    assert store.live_version() == first  # written but not live
    store.activate(second)
    assert store.live_version() == second
    store.activate(first)
    assert store.live_version() == first
    statuses = {m["model_version"]: m["status"] for m in store.versions()}
    assert statuses == {first: "live", second: "ready"}


def test_incomplete_or_corrupt_versions_are_refused(store, trained_demo, tmp_path):
    good = store.publish(trained_demo.parts, trained_demo.meta)
    incomplete = dict(trained_demo.parts)
    del incomplete["recommend.ann"]
    with pytest.raises(ModelError, match="recommend.ann"):
        store.write_version(incomplete, trained_demo.meta)
    bad = store.write_version(trained_demo.parts, trained_demo.meta)
    store.redis.set(store.keys.part(bad, "item_vectors.npy", 0), b"garbage")
    with pytest.raises(ModelError, match="item_vectors.npy"):
        store.materialize(bad, tmp_path)
    store.redis.delete(store.keys.part(bad, "popular.npy", 0))
    with pytest.raises(ModelError, match="incomplete"):
        store.activate(bad)
    assert store.live_version() == good


def test_prune_keeps_the_newest_and_the_live_one(store, trained_demo):
    live = store.publish(trained_demo.parts, {**trained_demo.meta, "created_at": 1.0})
    for n in range(4):
        store.write_version(trained_demo.parts, {**trained_demo.meta, "created_at": 10.0 + n})
    dropped = store.prune(keep=2)
    kept = [m["model_version"] for m in store.versions()]
    assert live in kept and len(kept) == 3 and len(dropped) == 2
    assert not store.redis.keys(f"test:version:{dropped[0]}:*")


def test_the_job_publishes_user_records_unless_told_to_keep_parts():
    from jobs.nightly import parse_args

    base = ["--events", "e.csv", "--catalog", "c.csv"]
    assert parse_args(base).user_records is True
    assert parse_args([*base, "--user-parts"]).user_records is False


def test_a_record_without_stored_reasons_is_explained_live():
    items, weights = np.array([3, 1], np.int32), np.array([2.0, 1.0], np.float32)
    candidates, scores = np.array([5, 7, -1], np.int32), np.array([0.9, 0.5, 0.0], np.float32)
    record = unpack_user(pack_user(items, weights, candidates, scores, np.zeros((3, 0), np.uint8)), 10)
    assert record.because is None and record.candidates.tolist() == [5, 7]
    record = unpack_user(pack_user(items, weights, candidates, scores, np.array([[0, 255], [1, 0], [255, 255]], np.uint8)), 10)
    assert record.because.tolist() == [[0, 255], [1, 0]]


@pytest.mark.parametrize("value", ["abc", "0", "-3", "2000", "1.5"])
def test_a_bad_event_shards_setting_is_refused_with_its_value(monkeypatch, value):
    from models.store import event_shards

    monkeypatch.setenv("EVENT_SHARDS", value)
    with pytest.raises(ValueError, match=f"EVENT_SHARDS='{re.escape(value)}': use a whole number from 1 to 1024"):
        event_shards(cluster=False)
    monkeypatch.setenv("EVENT_SHARDS", "")
    assert event_shards(cluster=False) == 1 and event_shards(cluster=True) == 16


@pytest.mark.parametrize("gap", [False, True])
def test_user_records_are_pack_users_bytes_whatever_the_padding(gap):
    """models.store.user_records packs the job's layout (each list -1 padded at its end) from slices; any other
    layout (a -1 between titles) goes through pack_user. Both give pack_user's bytes."""
    import io

    import orjson

    from models.build import npy_bytes
    from models.store import user_records

    rng = np.random.default_rng(2)
    lengths = np.array([0, 3, 1, 5])
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    candidates = np.array([[4, 2, -1, -1], [1, -1, -1, -1], [-1, -1, -1, -1], [0, 1, 2, 3]], np.int32)
    if gap:
        candidates[3, 1] = -1
    arrays = {
        "history_indptr.npy": indptr, "history_items.npy": rng.integers(0, 9, lengths.sum()).astype(np.int32),
        "history_weights.npy": rng.random(lengths.sum()).astype(np.float32), "candidates.npy": candidates,
        "candidate_scores.npy": rng.random(candidates.shape).astype(np.float32),
        "candidate_because.npy": (rng.integers(0, 5, (*candidates.shape, 2)) % np.maximum(lengths, 1)[:, None, None]).astype(np.uint8),
    }  # fmt: skip
    arrays["candidate_because.npy"][lengths == 0] = 255  # NO_REASON: nothing to explain with
    parts = {name: npy_bytes(a) for name, a in arrays.items()} | {"users.json": orjson.dumps(["a", "b", "c", "d"])}
    records = list(user_records(parts))
    assert [user for user, _ in records] == ["a", "b", "c", "d"]
    a = {name: np.load(io.BytesIO(blob)) for name, blob in parts.items() if name.endswith(".npy")}
    for row, (_, record) in enumerate(records):
        start, end = indptr[row], indptr[row + 1]
        expected = pack_user(a["history_items.npy"][start:end], a["history_weights.npy"][start:end],
                             candidates[row], a["candidate_scores.npy"][row], a["candidate_because.npy"][row])  # fmt: skip
        assert record == expected
        assert unpack_user(record, 9).candidates.tolist() == [c for c in candidates[row].tolist() if c >= 0]
