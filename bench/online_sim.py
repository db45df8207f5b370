"""Simulated viewers for online experiments: shared by ``bench/online.py`` and ``tests/test_online_sim.py``.

The demo data's viewers have hidden tastes (favourite genres with weights,
:func:`jobs.make_demo_data.true_tastes`). Shown a list, a viewer looks at
position ``p`` with probability ``decay**p`` and watches a title she looked
at with probability ``base + gain x affinity + popular_gain x hit`` (affinity:
the weight of her favourite genres the title has, 0..1; hit: 1 for the most
popular title down to 0 for the least); what she watches she finishes mostly
(Beta(8, 2)) if it is to her taste, else Beta(2, 4). Everything goes through
the service's real endpoints (``/recommend``, ``POST /impressions``,
``POST /events``) and the experiment's real counters in Redis.

The truth the experiment should find: each arm's expected CTR is the mean of
``sum(p)`` over the lists that arm actually showed (known exactly to the
simulator), so the true lift is their ratio minus one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from jobs.make_demo_data import TrueTastes
from models import experiments


@dataclass
class Viewers:
    tastes: TrueTastes
    base: float = 0.01
    gain: float = 0.2  # for a title wholly to her taste (genre and theme)
    popular_gain: float = 0.08  # for the most popular title (by popularity rank: everyone likes a hit a little)
    decay: float = 0.85

    def __post_init__(self):
        order = np.argsort(-self.tastes.popularity, kind="stable")
        self.hit = np.empty(len(order))
        self.hit[order] = 1.0 - np.arange(len(order)) / max(len(order) - 1, 1)  # 1 for the top title, 0 for the last

    def click_probabilities(self, user_row: int, item_rows: np.ndarray) -> np.ndarray:
        affinity = self.tastes.affinity(np.full(len(item_rows), user_row), item_rows)
        chance = self.base + self.gain * affinity + self.popular_gain * self.hit[item_rows]
        return self.decay ** np.arange(len(item_rows)) * chance

    def completion(self, rng: np.random.Generator, user_row: int, item_row: int) -> float:
        liked = self.tastes.affinity(np.array([user_row]), np.array([item_row]))[0] > 0
        return float(rng.beta(8, 2) if liked else rng.beta(2, 4))


def row_of(item_or_user_id: str) -> int:
    """Demo ids are a letter and a zero-padded row number (``u000042``, ``t00017``)."""
    return int(item_or_user_id[1:])


def simulate(client, viewers: Viewers, users: list[str], days: int, active: float, seed: int, headers: dict,
             start: float | None = None) -> dict:  # fmt: skip
    """Run ``days`` of visits through the service; per arm: impressions, expected clicks, simulated clicks."""
    rng = np.random.default_rng(seed)
    start = time.time() - (days + 1) * 86400 if start is None else start
    truth: dict[str, dict[str, float]] = {}
    for day in range(days):
        batch_events, batch_impressions = [], []
        for n, user in enumerate(users):
            if rng.random() >= active:
                continue
            answer = client.get(f"/recommend?user={user}&k=10").get_json()
            shown = [item["item_id"] for item in answer["items"]]
            if not shown:
                continue
            when = int(start + day * 86400 + n % 80000)
            rows = np.array([row_of(i) for i in shown])
            p = viewers.click_probabilities(row_of(user), rows)
            arm = answer["arm"] or "-"
            t = truth.setdefault(arm, {"impressions": 0, "expected_clicks": 0.0, "clicks": 0})
            t["impressions"] += 1
            t["expected_clicks"] += float(p.sum())
            batch_impressions.append(
                {"user_id": user, "recommendation_id": answer["recommendation_id"], "items": shown, "timestamp": when}
            )
            for position in np.flatnonzero(rng.random(len(p)) < p).tolist():
                t["clicks"] += 1
                seconds = viewers.completion(rng, row_of(user), rows[position]) * float(viewers.tastes.episode_seconds[rows[position]])
                viewing = {"user_id": user, "item_id": shown[position], "timestamp": when + 60 + position, "watch_seconds": seconds}
                if rng.random() < 0.5:  # half the clients say which answer it came from; the window credits the rest
                    viewing["recommendation_id"] = answer["recommendation_id"]
                batch_events.append(viewing)
            if len(batch_impressions) >= 200 or len(batch_events) >= 200:  # a client reports what it showed first
                _post(client, "/impressions", batch_impressions, headers)
                if batch_events:
                    _post(client, "/events", batch_events, headers)
                batch_impressions, batch_events = [], []
        for path, batch in (("/impressions", batch_impressions), ("/events", batch_events)):
            if batch:
                _post(client, path, batch, headers)
    for t in truth.values():
        t["expected_ctr"] = t["expected_clicks"] / t["impressions"] if t["impressions"] else None
    return truth


def _post(client, path: str, batch: list, headers: dict) -> None:
    response = client.post(path, json=batch, headers=headers)
    if response.status_code != 200:
        raise RuntimeError(f"{path}: {response.status_code} {response.get_data(as_text=True)[:500]}")


def aa_false_positives(probabilities: np.ndarray, runs: int, days: int, active: float, seed: int, mde: float = experiments.DEFAULT_MDE) -> dict:
    """A/A experiments at scale without HTTP: both arms show every user the same list (``probabilities``:
    [users, positions] click chances); users split by a fresh salted hash per run, looked at every day
    through :func:`models.experiments.compare`. Returns how often a 'significant' difference was ever seen."""
    rng = np.random.default_rng(seed)
    n_users = len(probabilities)
    ids = [f"u{n:06d}" for n in range(n_users)]
    declared, peeks = 0, 0
    for _ in range(runs):
        experiment = experiments.Experiment("aa", "aa", 0.0, rng.bytes(16).hex(), {"a": {"version": "v", "share": 0.5}, "b": {"version": "v", "share": 0.5}}, "a", mde)
        in_b = np.array([experiment.assign(u) == "b" for u in ids])
        n = np.zeros(n_users)
        c = np.zeros(n_users)
        w = np.zeros(n_users)
        v = np.zeros(n_users)
        seen = np.zeros(n_users, dtype=bool)
        significant = False
        for _day in range(days):
            visits = rng.random(n_users) < active
            clicks = ((rng.random(probabilities.shape) < probabilities) & visits[:, None]).sum(axis=1)
            n += visits
            c += clicks
            v += clicks
            w += clicks * rng.beta(5, 3, n_users)
            seen |= visits
            sums = {arm: _moments(n[seen & mask], c[seen & mask], w[seen & mask], v[seen & mask]) for arm, mask in (("a", ~in_b), ("b", in_b))}
            result = experiments.compare(sums["a"], sums["b"], "ctr", mde)
            peeks += 1
            significant |= bool(result["significant"])
        declared += significant
    return {"runs": runs, "looks_per_run": days, "declared": declared, "rate": declared / runs, "alpha": experiments.ALPHA}


def _moments(n: np.ndarray, c: np.ndarray, w: np.ndarray, v: np.ndarray) -> dict:
    return {
        "users": float(len(n)), "n": float(n.sum()), "c": float(c.sum()), "w": float(w.sum()), "v": float(v.sum()),
        "nn": float((n * n).sum()), "cc": float((c * c).sum()), "cn": float((c * n).sum()),
        "ww": float((w * w).sum()), "vv": float((v * v).sum()), "wv": float((w * v).sum()),
    }  # fmt: skip
