"""The model store: publish, verify, roll back, refuse damaged versions (real redis-server)."""

from __future__ import annotations

import pytest

from models.recommender import Recommender
from models.store import ModelError


def test_round_trip_through_redis(store, trained_demo, tmp_path):
    version = store.publish(trained_demo.parts, trained_demo.meta)
    assert store.live_version() == version
    folder = store.materialize(version, tmp_path)
    for name, blob in trained_demo.parts.items():
        assert (folder / name).read_bytes() == blob
    model = Recommender(folder)
    assert model.version == version
    assert model.rec_index.get_n_items() == trained_demo.meta["counts"]["titles"]
    user = model.user_ids[0]
    strategy, recs = model.recommend(user, 5)
    assert strategy == "personalized" and len(recs) == 5


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
