"""Issue 13's simulation: the real model against a popularity-only baseline, and A/A runs (real Redis)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from bench.online_sim import Viewers, aa_false_positives, row_of, simulate
from jobs.make_demo_data import true_tastes
from models import experiments
from tests.conftest import DEMO_SIZE
from tests.test_events import make_app

TOKEN = "sim-token"


SIM_SIZE = {"users": 3000, "items": 400, "events": 60_000, "seed": 4}  # enough users per arm for a verdict


@pytest.fixture(scope="module")
def sim_model(tmp_path_factory):
    from jobs.make_demo_data import write_demo_data
    from jobs.nightly import NightlyConfig, run_nightly
    from models.embeddings import ModelParams

    paths = write_demo_data(tmp_path_factory.mktemp("sim"), *SIM_SIZE.values(), "csv", progress=False)
    config = NightlyConfig(events=str(paths["events"]), catalog=str(paths["catalog"]), publish=False, show_progress=False,
                           evaluate=False, params=ModelParams(n_trees=10))  # fmt: skip
    return run_nightly(config)


def test_the_experiment_names_the_real_model_with_a_lift_close_to_the_truth(redis_server, store, sim_model, tmp_path):
    real = store.publish(sim_model.parts, sim_model.meta)
    weak = experiments.publish_baseline(store, real)
    # With 3 days a clean-clone CI run measured +0.126 for a true +0.195 (interval -0.015 .. +0.266): no verdict.
    days = 6
    start = time.time() - (days + 1) * 86400
    experiments.start(store, "real vs popularity", [("control", weak, 0.5), ("treatment", real, 0.5)], now=start)
    app = make_app(redis_server, store, tmp_path, EVENTS_TOKEN=TOKEN)
    app.extensions["live_model"].refresh_experiment()
    client = app.test_client()
    model = app.extensions["live_model"].current
    viewers = Viewers(true_tastes(*SIM_SIZE.values()))
    truth = simulate(client, viewers, model.user_ids, days, 0.5, 11, {"Authorization": f"Bearer {TOKEN}"}, start)
    status = experiments.status(store, experiments.current(store))
    ctr = status["comparisons"]["treatment"]["ctr"]
    true_lift = truth["treatment"]["expected_ctr"] / truth["control"]["expected_ctr"] - 1
    print(f"\nsimulation: true lift {true_lift:+.3f}, measured {ctr['lift']:+.3f} "
          f"(always-valid 95% {ctr['lift_interval'][0]:+.3f} .. {ctr['lift_interval'][1]:+.3f}), p {ctr['always_valid_p']:.2g}; "
          f"users {status['arms']['control']['users']} / {status['arms']['treatment']['users']}")  # fmt: skip
    # The counters the service kept are exactly the simulated viewers' behaviour.
    for arm in ("control", "treatment"):
        assert status["arms"][arm]["impressions"] == truth[arm]["impressions"]
        assert status["arms"][arm]["clicks"] <= truth[arm]["clicks"]  # a repeat viewing of a title is one click
        assert status["arms"][arm]["clicks"] >= 0.95 * truth[arm]["clicks"]
    assert true_lift > 0.1  # the simulation is meaningful: personalisation helps these viewers
    assert status["winner"] == "treatment" and ctr["significant"]
    # Close to the truth: within 4 standard errors of the clicks' own randomness (the lists shown are
    # known, so only the viewers' coin flips separate the measured lift from the true one).
    relative = [truth[a]["expected_clicks"] ** 0.5 / truth[a]["expected_clicks"] for a in ("control", "treatment")]
    standard_error = (1 + true_lift) * (relative[0] ** 2 + relative[1] ** 2) ** 0.5
    assert abs(ctr["lift"] - true_lift) <= 4 * standard_error, (ctr["lift"], true_lift, standard_error)
    assert ctr["lift_interval"][0] > 0  # the always-valid interval excludes no effect


def test_aa_runs_declare_a_winner_no_more_often_than_alpha(store, trained_demo, tmp_path):
    from models.build import open_parts

    model = open_parts(trained_demo.parts, trained_demo.meta, tmp_path / "m")
    viewers = Viewers(true_tastes(DEMO_SIZE["users"], DEMO_SIZE["items"], DEMO_SIZE["events"], DEMO_SIZE["seed"]))
    probabilities = np.zeros((len(model.user_ids), 10))
    for n, user in enumerate(model.user_ids):
        _, recs = model.recommend(user, 10)
        rows = np.array([row_of(model.item_ids[r.item]) for r in recs])
        probabilities[n, : len(rows)] = viewers.click_probabilities(row_of(user), rows)
    result = aa_false_positives(probabilities, runs=200, days=14, active=0.6, seed=2)
    print(f"\nA/A: {result['declared']} of {result['runs']} runs declared a winner at some daily look (alpha {result['alpha']})")
    assert result["rate"] <= result["alpha"]
