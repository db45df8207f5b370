"""The shared evaluation: split, metrics (checked by hand), selection and cold start."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.data import Events
from models.embeddings import ModelParams
from models.evaluate import holdout_split, popularity_ranking, ranking_metrics, recommend_popular

DEFAULTS = ModelParams().as_dict()


def make_events(pairs: list[tuple[int, int, int]]) -> Events:
    users, items, times = zip(*pairs)
    n_users = max(users) + 1
    return Events(
        user_ids=np.array([f"u{i}" for i in range(n_users)], dtype=object),
        user=np.array(users, np.int32),
        item=np.array(items, np.int32),
        timestamp=np.array(times, np.int64),
        watch_seconds=np.full(len(users), np.nan, np.float32),
    )


def test_metrics_by_hand():
    recs = [[1, 2, 3], [4, 5, 6]]
    truth = [{1, 3, 9}, {7}]
    m = ranking_metrics(recs, truth, k=3, n_items=10)
    dcg = 1 + 1 / math.log2(4)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg@3"] == pytest.approx((dcg / idcg + 0) / 2)
    assert m["precision@3"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["recall@3"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["map@3"] == pytest.approx(((1 + 2 / 3) / 3 + 0) / 2)
    assert m["coverage"] == pytest.approx(6 / 10)
    assert m["users"] == 2


def test_users_without_held_out_titles_are_not_scored():
    m = ranking_metrics([[1], [2]], [{1}, set()], k=1, n_items=3)
    assert m["users"] == 1 and m["ndcg@1"] == 1.0


@pytest.mark.parametrize("mode", ["random", "temporal"])
def test_holdout_split_per_user(mode):
    rng = np.random.default_rng(0)
    pairs = []
    for user in range(50):
        for item in rng.choice(100, size=rng.integers(1, 30), replace=False):
            for _ in range(rng.integers(1, 3)):  # repeated viewings of one title
                pairs.append((user, int(item), int(rng.integers(0, 10**6))))
    events = make_events(pairs)
    train = holdout_split(events, 0.25, mode, seed=1)
    for user in range(50):
        mine = events.user == user
        train_items = set(events.item[mine & train].tolist())
        test_items = set(events.item[mine & ~train].tolist())
        distinct = len(train_items | test_items)
        assert not train_items & test_items, "a title's viewings must not straddle the split"
        expected = 0 if distinct < 2 else int(np.floor(distinct * 0.25 + 0.5))
        assert len(test_items) == expected
        if mode == "temporal" and test_items and train_items:
            last = {i: events.timestamp[mine & (events.item == i)].max() for i in train_items | test_items}
            assert min(last[i] for i in test_items) >= max(last[i] for i in train_items)


def test_popularity_baseline_counts_viewers_not_viewings():
    events = make_events([(0, 1, 0)] * 5 + [(0, 2, 0), (1, 2, 0)])  # title 1 binged by one user
    ranking = popularity_ranking(events, 3)
    assert list(ranking[:2]) == [2, 1]
    assert recommend_popular(ranking, {2}, 2) == [1, 0]


@pytest.mark.slow
def test_selection_and_cold_start_on_demo_data(demo_files):
    from models.data import load_catalog, load_events
    from models.embeddings import ModelParams
    from models.offline import cold_start_evaluation, select_params

    catalog, _ = load_catalog(demo_files["catalog"])
    events, _ = load_events(demo_files["events"], catalog)
    base = ModelParams(content_steps=100)
    best, trials = select_params(events, catalog, base, budget=15.0)
    assert trials[0]["params"] == {} and len(trials) >= 2
    winner = max(trials, key=lambda t: t["ndcg@10"])
    assert all(getattr(best, name) == value for name, value in winner["params"].items())
    # 300 titles: top-15 is 5 % of the catalogue, like top-50 of 1,000.
    cold = cold_start_evaluation(events, catalog, base, k=15)
    assert cold["titles_held_out"] > 0 and cold["pairs"] > 0
    # Structured features only here (no text vectors): titles also differ by theme, which they cannot see.
    assert cold["lift"] >= 2.5, cold


def test_selection_at_scale_tries_only_cheap_changes_with_shorter_trial_fits(demo_files, monkeypatch):
    """Above COSTLY_CHANGES_MAX_EVENTS: no more factors or neighbours, and trials fit fewer ALS sweeps."""
    from models import offline
    from models.data import load_catalog, load_events
    from models.embeddings import ModelParams

    catalog, _ = load_catalog(demo_files["catalog"])
    events, _ = load_events(demo_files["events"], catalog)
    fitted = []
    real_learn = offline.learn_embeddings

    def recording_learn(fit, catalog, params, show_progress=True, reuse=None):
        fitted.append(params.iterations)
        return real_learn(fit, catalog, params, show_progress, reuse)

    monkeypatch.setattr(offline, "learn_embeddings", recording_learn)
    base = ModelParams(content_steps=50, iterations=12)
    best, trials = offline.select_params(
        events, catalog, base, budget=600.0, final_events=offline.COSTLY_CHANGES_MAX_EVENTS + 1
    )
    assert len(trials) == len(offline.candidate_params(base, costly=False)) >= 5
    assert all("factors" not in t["params"] and "seq_neighbors" not in t["params"] for t in trials)
    assert fitted == [offline.SCALE_TRIAL_ITERATIONS] * len(trials)
    assert best.iterations == 12  # the chosen parameters keep the full fit

    fitted.clear()
    _, trials = offline.select_params(events, catalog, base, budget=600.0, final_events=1000)
    assert any("factors" in t["params"] for t in trials) and set(fitted) == {12}


def test_selection_on_a_user_sample_hands_its_regularization_to_the_job_scaled(demo_files, monkeypatch):
    """Selection on a sample records the users it chose on; the job's final fit scales to all users."""
    from jobs.nightly import NightlyConfig, run_nightly
    from models import offline
    from models.data import load_catalog, load_events
    from models.embeddings import ModelParams

    catalog, _ = load_catalog(demo_files["catalog"])
    events, _ = load_events(demo_files["events"], catalog)
    base = ModelParams(content_steps=30, iterations=4)
    unsampled, _ = offline.select_params(events, catalog, base, budget=3.0)
    assert unsampled.regularization_users == 0

    monkeypatch.setattr(offline, "MAX_TRIAL_EVENTS", len(events) // 4)
    sampled, _ = offline.select_params(events, catalog, base, budget=3.0)
    all_users = events.active_users()
    assert 0 < sampled.regularization_users < all_users / 2

    config = NightlyConfig(
        events=str(demo_files["events"]), catalog=str(demo_files["catalog"]), publish=False, show_progress=False,
        params=base, selection_budget=3.0, cold_start=False,
    )  # fmt: skip
    meta = run_nightly(config).meta
    scaled = meta["scaled_regularization"]
    assert scaled["fit_users"] == all_users
    expected = scaled["chosen"] * (all_users / scaled["chosen_on_users"]) ** 0.5
    assert scaled["value"] == pytest.approx(expected) and meta["params"]["regularization"] == pytest.approx(expected)
    assert meta["params"]["regularization_users"] == 0


def test_the_next_run_reuses_the_live_versions_search_while_it_applies(demo_files, store):
    """Run 2 takes run 1's chosen parameters and cold-start check instead of searching; the holdout
    evaluation still runs. --reselect (age 0), or other given parameters, search again."""
    from dataclasses import replace

    from jobs.nightly import NightlyConfig, run_nightly
    from models.embeddings import ModelParams

    config = NightlyConfig(
        events=str(demo_files["events"]), catalog=str(demo_files["catalog"]), show_progress=False,
        params=ModelParams(content_steps=30, iterations=4, n_trees=5), selection_budget=3.0, live_events=False,
        text=False,
    )  # fmt: skip
    first = run_nightly(config, store)
    searched = first.meta["metrics"]["tuning"]
    assert first.meta["selection"] and "select" in first.timings and "cold_start" in first.timings
    assert searched["trials"] == len(first.meta["selection"]) and "reused_from" not in searched
    assert searched["events"] == first.meta["counts"]["events"] and searched["titles"] == first.meta["counts"]["titles"]

    second = run_nightly(config, store)
    tuning = second.meta["metrics"]["tuning"]
    assert tuning["reused_from"] == first.version and tuning["searched_at"] == searched["searched_at"]
    assert second.meta["selection"] == [] and "select" not in second.timings and "cold_start" not in second.timings
    assert second.meta["params"] == first.meta["params"]  # the same choice, scaled the same way
    assert second.meta["metrics"]["cold_start"]["reused_from"] == first.version
    assert second.meta["metrics"]["cold_start"]["lift"] == first.meta["metrics"]["cold_start"]["lift"]
    # The holdout evaluation (and the gate) still run; on the same parameters and data both nights measure
    # the same model: the holdout runs after the cold-start check, with its content model, in both.
    assert second.meta["metrics"]["model"]["ndcg@10"] == pytest.approx(first.meta["metrics"]["model"]["ndcg@10"], abs=1e-3)

    third = run_nightly(replace(config, selection_max_age_days=0.0), store)  # --reselect
    assert "select" in third.timings and "reused_from" not in third.meta["metrics"]["tuning"]

    fourth = run_nightly(replace(config, params=replace(config.params, factors=32)), store)
    assert "select" in fourth.timings and "reused_from" not in fourth.meta["metrics"]["tuning"]

    store.redis.set(store.keys.meta(store.live_version()), b"{not json")  # a damaged live record: search again
    fifth = run_nightly(replace(config, params=replace(config.params, factors=32)), store)
    assert "select" in fifth.timings and fifth.version == store.live_version()


@pytest.mark.parametrize(
    "change, reused",
    [
        ({}, True),
        ({"run_events": 2_000}, True),  # within 1.5x of 1,500
        ({"run_events": 3_000}, False),  # doubled
        ({"run_titles": 50}, False),
        ({"engine": "spark"}, False),
        ({"searched_at": -8 * 86400}, False),  # older than 7 days
        ({"searched_at": +3600}, False),  # from the future: a clock or a forged record
        ({"params": {"factors": 64}}, False),  # another version's parameter set
        # A damaged or forged record in Redis: searched again, never trained on.
        ({"params": "garbage"}, False),
        ({"params": {**DEFAULTS, "factors": "64"}}, False),
        ({"params": {**DEFAULTS, "factors": True}}, False),
        ({"params": {**DEFAULTS, "content_model": "rm -rf"}}, False),
        ({"params": {**DEFAULTS, "regularization": 40}}, True),  # an int where a float is: fine
        ({"searched_at": "yesterday"}, False),
        ({"events": 0}, False),
        ({"titles": None}, False),
        ({"base": None}, False),
    ],
)
def test_a_search_is_reused_only_while_it_applies(change, reused):
    import time

    from jobs.nightly import NightlyConfig, reusable_tuning

    previous = {
        "params": DEFAULTS, "base": DEFAULTS, "engine": "implicit", "searched_at": time.time() - 86400,
        "events": 1_500, "titles": 100, "trials": 4, "version": "v1",
    }  # fmt: skip
    change = dict(change)
    events, titles = change.pop("run_events", 1_500), change.pop("run_titles", 100)
    if isinstance(change.get("searched_at"), (int, float)):
        change["searched_at"] = time.time() + change["searched_at"]
    config = NightlyConfig(events="e", catalog="c", previous_tuning={**previous, **change}, selection_max_age_days=7)
    assert (reusable_tuning(config, events, titles) is not None) == reused
    assert reusable_tuning(NightlyConfig(events="e", catalog="c", previous_tuning=previous, selection_max_age_days=0), 1_500, 100) is None


def test_the_full_confidence_matrix_is_built_beside_the_holdout_with_the_chosen_parameters(demo_files, monkeypatch):
    """Once selection has chosen, the job builds the final model's confidence matrix in a thread while the
    holdout evaluation runs, with the chosen parameters; the model is the one built without the head start."""
    import threading
    from dataclasses import replace

    import jobs.nightly as nightly
    from models.embeddings import ModelParams, confidence_and_viewers

    calls = []

    def spy(events, catalog, params):
        calls.append((params, threading.current_thread() is threading.main_thread(), len(events)))
        return confidence_and_viewers(events, catalog, params)

    monkeypatch.setattr(nightly, "confidence_and_viewers", spy)
    config = nightly.NightlyConfig(
        events=str(demo_files["events"]), catalog=str(demo_files["catalog"]), show_progress=False, publish=False,
        params=ModelParams(content_steps=20, iterations=3, n_trees=4), selection_budget=3.0, live_events=False, text=False,
    )  # fmt: skip
    result = nightly.run_nightly(config)
    assert len(calls) == 1
    chosen, on_main_thread, n_events = calls[0]
    assert not on_main_thread and n_events == result.meta["counts"]["events"]
    assert chosen.alpha == result.meta["params"]["alpha"] and chosen.recency_half_life_days == result.meta["params"]["recency_half_life_days"]
    assert result.meta["selection"]  # a search ran first, and the matrix used what it chose
    # Without an evaluation there is nothing to run beside: the matrix is built in learn_embeddings.
    nightly.run_nightly(replace(config, evaluate=False))
    assert len(calls) == 1
