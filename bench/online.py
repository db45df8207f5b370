"""Online experiment simulation: does an A/B test between model versions find the truth?

    .venv/bin/python bench/online.py                  # 5,000 viewers, 7 days, then 500 A/A runs
    .venv/bin/python bench/online.py --users 2000 --days 5 --aa-runs 200

Demo data with hidden viewer tastes (:func:`jobs.make_demo_data.true_tastes`)
is trained by the real nightly job; a popularity-only twin of the version is
published (``python -m jobs.experiments baseline``); an experiment splits the
viewers between them. Simulated viewers (``bench/online_sim.py``) visit
through the service's own endpoints, with the experiment's counters in a
private redis-server. The report: per arm the impressions, clicks and CTR the
service counted, the true expected CTR of the lists each arm showed, the true
and the measured lift with its always-valid interval, the decision; then
A/A runs (both arms one version) over fresh salts, each looked at every day:
how often a winner was declared, against the nominal 5 %.
Also timed: ``POST /impressions`` and ``POST /events`` batches of 200 with
their attribution, next to ``orjson.loads`` of the same body (the floor).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
from harness import RedisServer, demo_data, machine

from bench.online_sim import Viewers, aa_false_positives, row_of, simulate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--events", type=int, default=250_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--active", type=float, default=0.4, help="share of viewers who visit on a given day")
    parser.add_argument("--aa-runs", type=int, default=500)
    args = parser.parse_args(argv)

    from app import create_app
    from jobs.make_demo_data import true_tastes
    from jobs.nightly import NightlyConfig, run_nightly
    from models import experiments
    from models.store import ModelStore, redis_from_url

    print(f"machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M %Z')}")
    data = demo_data(args.users, args.items, args.events, args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-online-") as tmp_name, RedisServer(Path(tmp_name)) as server:
        tmp = Path(tmp_name)
        store = ModelStore(redis_from_url(server.url), "bench")
        started = time.perf_counter()
        result = run_nightly(NightlyConfig(events=str(data["events"]), catalog=str(data["catalog"]), publish=False, show_progress=False))
        real = store.publish(result.parts, result.meta)
        weak = experiments.publish_baseline(store, real)
        print(f"model: nightly job {time.perf_counter() - started:.0f}s -> {real}; popularity twin {weak}")
        start = time.time() - (args.days + 1) * 86400
        experiments.start(store, "real vs popularity", [("control", weak, 0.5), ("treatment", real, 0.5)], now=start)
        token = "bench-token"
        app = create_app({"REDIS_URL": server.url, "REDIS_PREFIX": "bench", "MODEL_CACHE_DIR": str(tmp / "cache"),
                          "MODEL_WATCHER": False, "EVENTS_TOKEN": token})  # fmt: skip
        app.extensions["live_model"].refresh_experiment()
        client = app.test_client()
        headers = {"Authorization": f"Bearer {token}"}
        model = app.extensions["live_model"].current
        viewers = Viewers(true_tastes(args.users, args.items, args.events, args.seed))

        started = time.perf_counter()
        truth = simulate(client, viewers, model.user_ids, args.days, args.active, args.seed, headers, start)
        took = time.perf_counter() - started
        status = experiments.status(store, experiments.current(store))
        visits = sum(t["impressions"] for t in truth.values())
        print(f"simulation: {args.days} days, {visits:,} visits through /recommend, /impressions, /events in {took:.0f}s")
        print(f"  {'arm':<10}{'version':<26}{'users':>7}{'impr.':>8}{'clicks':>8}{'CTR':>8}{'true CTR':>10}{'watch-through':>15}")
        for arm in ("control", "treatment"):
            a = status["arms"][arm]
            print(f"  {arm:<10}{a['version']:<26}{a['users']:>7}{a['impressions']:>8}{a['clicks']:>8}{a['ctr']:>8.4f}"
                  f"{truth[arm]['expected_ctr']:>10.4f}{a['watch_through']:>15.3f}")  # fmt: skip
        ctr = status["comparisons"]["treatment"]["ctr"]
        true_lift = truth["treatment"]["expected_ctr"] / truth["control"]["expected_ctr"] - 1
        low, high = ctr["lift_interval"]
        print(f"  lift: true {true_lift:+.1%}, measured {ctr['lift']:+.1%} (always-valid 95% {low:+.1%} .. {high:+.1%}); "
              f"always-valid p {ctr['always_valid_p']:.2g}; winner: {status['winner']}")  # fmt: skip
        through = status["comparisons"]["treatment"]["watch_through"]
        print(f"  watch-through lift {through['lift']:+.1%} (p {through['always_valid_p']:.2g})")
        found = status["winner"] == "treatment" and low <= true_lift <= high

        # Write-path costs: 200-impression and 200-event batches, next to parsing the same body.
        user = model.user_ids[0]
        rid = client.get(f"/recommend?user={user}").get_json()["recommendation_id"]
        now = int(time.time())
        shown = model.item_ids[:10]
        impressions = [{"user_id": user, "recommendation_id": rid, "items": shown, "timestamp": now} for _ in range(200)]
        views = [{"user_id": user, "item_id": shown[n % 10], "timestamp": now + n, "watch_seconds": 900} for n in range(200)]
        for path, body in (("/impressions", impressions), ("/events", views)):
            raw = orjson.dumps(body)
            times, floor = [], []
            for _ in range(20):
                t = time.perf_counter()
                assert client.post(path, data=raw, content_type="application/json", headers=headers).status_code == 200
                times.append(time.perf_counter() - t)
                t = time.perf_counter()
                orjson.loads(raw)
                floor.append(time.perf_counter() - t)
            print(f"  POST {path} (200 per batch): {1000 * statistics.median(times):.2f} ms "
                  f"(orjson.loads of the body {1000 * statistics.median(floor):.3f} ms)")  # fmt: skip

    # A/A: the same lists in both arms, fresh salts, a look every day.
    probabilities = np.zeros((len(model.user_ids), 10))
    for n, user in enumerate(model.user_ids):
        _, recs = model.recommend(user, 10)
        rows = np.array([row_of(model.item_ids[r.item]) for r in recs])
        probabilities[n, : len(rows)] = viewers.click_probabilities(row_of(user), rows)
    started = time.perf_counter()
    aa = aa_false_positives(probabilities, runs=args.aa_runs, days=14, active=args.active, seed=args.seed)
    print(f"A/A: {aa['declared']} of {aa['runs']} runs declared a winner at some daily look over 14 days "
          f"({aa['rate']:.1%}; nominal {aa['alpha']:.0%}) in {time.perf_counter() - started:.0f}s")  # fmt: skip
    ok = found and aa["rate"] <= aa["alpha"]
    print("result:", "MEETS" if ok else "MISSES", "(winner named, truth inside the interval, A/A rate <= alpha)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
