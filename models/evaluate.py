"""Offline evaluation: the one holdout split and the one set of ranking metrics.

The nightly job, the quality benchmark and the tests all call
:func:`holdout_split` and :func:`ranking_metrics`, so a number printed by one
means the same as a number printed by another.

Protocol: per user, a share of their distinct titles is held out (at random, or
the most recent ones for ``temporal``); the model is trained on the rest; the
top ``k`` titles, excluding the user's training titles, are scored against the
held-out titles, every one of which is relevant.
"""

from __future__ import annotations

import numpy as np

from models.data import Events


def holdout_split(events: Events, fraction: float = 0.25, mode: str = "random", seed: int = 0) -> np.ndarray:
    """Boolean mask over events: True = training. Held-out pairs leave *all* their viewings.

    Users with fewer than two distinct titles stay entirely in training.
    """
    if mode not in ("random", "temporal"):
        raise ValueError(f"split mode must be 'random' or 'temporal', not {mode!r}")
    pair = events.user.astype(np.int64) * (int(events.item.max()) + 1) + events.item
    unique_pairs, first, inverse = np.unique(pair, return_index=True, return_inverse=True)
    pair_user = events.user[first]
    if mode == "random":
        key = np.random.default_rng(seed).random(len(unique_pairs))
    else:
        # Most recent first viewing = last in time; hold those out.
        last_time = np.zeros(len(unique_pairs), dtype=np.int64)
        np.maximum.at(last_time, inverse, events.timestamp)
        key = -last_time.astype(np.float64)
    order = np.lexsort((key, pair_user))  # within a user: ascending key
    users_sorted = pair_user[order]
    counts = np.bincount(pair_user, minlength=len(events.user_ids))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(order)) - starts[users_sorted]
    n_test = np.floor(counts * fraction + 0.5).astype(np.int64)
    n_test[counts < 2] = 0
    held_sorted = rank < n_test[users_sorted]
    held_pair = np.zeros(len(unique_pairs), dtype=bool)
    held_pair[order] = held_sorted
    return ~held_pair[inverse]


def evaluation_sample(events: Events, max_events: int, seed: int = 0) -> Events:
    """Every event of a random sample of users, at most ``max_events`` in all: the evaluation's budget.

    Evaluation trains a second model; past ``max_events`` its cost would grow
    with the data while the metrics it reports are already stable. Whole users
    are kept, so their histories and held-out titles stay intact.
    """
    if len(events) <= max_events:
        return events
    counts = np.bincount(events.user, minlength=len(events.user_ids))
    order = np.random.default_rng(seed).permutation(len(counts))
    chosen = np.zeros(len(counts), dtype=bool)
    chosen[order[np.cumsum(counts[order]) <= max_events]] = True
    return events.subset(chosen[events.user])


def relevant_sets(events: Events, mask: np.ndarray) -> dict[int, set[int]]:
    """user index -> set of title indices among the events selected by ``mask``."""
    out: dict[int, set[int]] = {}
    for user, item in zip(events.user[mask].tolist(), events.item[mask].tolist()):
        out.setdefault(user, set()).add(item)
    return out


def ranking_metrics(recommended: list[list[int]], relevant: list[set[int]], k: int, n_items: int) -> dict:
    """Mean nDCG@k, precision@k, recall@k, MAP@k over users, and catalogue coverage.

    nDCG uses binary gains with the ideal DCG over min(|relevant|, k);
    MAP@k divides by min(|relevant|, k); coverage is the share of the
    catalogue that appears in anyone's top k.
    """
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ndcg = precision = recall = average_precision = 0.0
    shown: set[int] = set()
    users = 0
    for recs, truth in zip(recommended, relevant):
        if not truth:
            continue
        users += 1
        recs = recs[:k]
        shown.update(recs)
        hits = np.array([item in truth for item in recs], dtype=bool)
        n_hits = int(hits.sum())
        ideal = discounts[: min(len(truth), k)].sum()
        ndcg += float(discounts[: len(recs)][hits].sum() / ideal)
        precision += n_hits / k
        recall += n_hits / len(truth)
        if n_hits:
            cumulative = np.cumsum(hits)
            average_precision += float((cumulative[hits] / (np.flatnonzero(hits) + 1)).sum() / min(len(truth), k))
    if users == 0:
        return {"users": 0, f"ndcg@{k}": 0.0, f"precision@{k}": 0.0, f"recall@{k}": 0.0, f"map@{k}": 0.0, "coverage": 0.0}
    return {
        "users": users,
        f"ndcg@{k}": ndcg / users,
        f"precision@{k}": precision / users,
        f"recall@{k}": recall / users,
        f"map@{k}": average_precision / users,
        "coverage": len(shown) / max(n_items, 1),
    }


def popularity_ranking(train: Events, n_items: int) -> np.ndarray:
    """Titles by distinct training viewers: the baseline every model must beat."""
    pairs = np.unique(train.user.astype(np.int64) * n_items + train.item)
    viewers = np.bincount((pairs % n_items).astype(np.int64), minlength=n_items)
    return np.argsort(-viewers, kind="stable")


def recommend_popular(ranking: np.ndarray, seen: set[int], k: int) -> list[int]:
    out = []
    for item in ranking:
        if int(item) not in seen:
            out.append(int(item))
            if len(out) == k:
                break
    return out


def intra_list_similarity(recommended: list[list[int]], unit_vectors: np.ndarray) -> float:
    """Mean pairwise cosine between the titles of each list (over the item vectors), averaged over lists.

    1.0 = every list is one title repeated; lower = more varied lists. Lists
    with fewer than two titles are skipped.
    """
    values = []
    for items in recommended:
        if len(items) < 2:
            continue
        v = unit_vectors[np.asarray(items)]
        sims = v @ v.T
        n = len(items)
        values.append((sims.sum() - np.trace(sims)) / (n * (n - 1)))
    return float(np.mean(values)) if values else 0.0
