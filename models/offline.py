"""Offline experiments that train models: hyperparameter selection and the cold-start check.

Both rank users exactly as the job ranks for serving (:func:`served_top_k`:
the served user step and blend over every title, batched), on samples of at
most ``MAX_TRIAL_EVENTS`` events so a trial's cost does not grow with the data.

Selection never sees the evaluation holdout: it carves its own validation
split out of the training part and picks the parameters with the best
validation nDCG@10 within a time budget that grows with the data.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from models.build import build_parts, catalog_json, open_parts, precompute_candidates
from models.data import Catalog, Events
from models.embeddings import (
    CONTENT_MODELS,
    CONTENT_OBJECTIVES,
    Embeddings,
    ModelParams,
    learn_embeddings,
    with_content,
)
from models.evaluate import evaluation_sample, holdout_split, ranking_metrics, relevant_sets

log = logging.getLogger(__name__)

K = 10
MAX_SCORED_USERS = 3000  # users scored per trial: enough for a stable mean, bounded cost
# Trials (and the cold-start model) train on the events of a user sample of at most this size,
# so one costs about the same at any scale; the final model always trains on everything.
MAX_TRIAL_EVENTS = 500_000
# Above this many events the job's own time is the constraint (issue 5), so selection does not
# try parameters that make the final training or ranking slower (see candidate_params).
COSTLY_CHANGES_MAX_EVENTS = 5_000_000
# Above COSTLY_CHANGES_MAX_EVENTS trials fit ALS with this many sweeps: what counts is how settings
# compare, and on the 20M-event bench 8 and 15 sweeps made the same choices but one (a 0.001 call).
SCALE_TRIAL_ITERATIONS = 8
ROUNDS = 1  # one pass over candidate_params: a second one mostly fitted validation noise (MovieLens, 3 splits)


def served_top_k(
    fit: Events, catalog: Catalog, embeddings: Embeddings, params: ModelParams, users: np.ndarray, k: int,
    items_json: bytes | None = None,
) -> list[list[int]]:
    """Top ``k`` unseen titles of each of ``users``, ranked exactly as the job ranks for serving.

    The parts of a version (without Annoy indexes) are opened as the service
    opens them and ranked by :func:`models.build.precompute_candidates`: the
    served user step, blend and exclusions, batched over all titles.
    """
    parts = build_parts(catalog, fit, embeddings, params, indexes=False, items_json=items_json)
    seen = (embeddings.confidence > 0).tocsr()
    with tempfile.TemporaryDirectory(prefix="ranking-") as tmp:
        recommender = open_parts(parts, {"params": params.as_dict()}, Path(tmp))
        candidates, _ = precompute_candidates(recommender, seen, np.asarray(users, dtype=np.int64), k, show_progress=False)
        recommender.close()
    return [[int(i) for i in row if i >= 0] for row in candidates]


def _sample_users(users: list[int], seed: int) -> np.ndarray:
    users = np.array(sorted(users), dtype=np.int64)
    if len(users) > MAX_SCORED_USERS:
        users = np.sort(np.random.default_rng(seed).choice(users, MAX_SCORED_USERS, replace=False))
    return users


def validation_score(
    fit: Events, truth: dict[int, set[int]], catalog: Catalog, params: ModelParams, users: np.ndarray,
    items_json: bytes | None = None, iterations: int | None = None, reuse: Embeddings | None = None,
) -> tuple[float, Embeddings]:
    """Validation nDCG@10 of ``params`` trained on ``fit``, and the trial's embeddings.

    ``reuse``: an earlier trial's embeddings on the same ``fit``, whose
    unchanged stages are not learned again (see ``learn_embeddings``).
    """
    # A shorter content fit (and ALS fit, given ``iterations``) is enough to compare settings;
    # the chosen ones get the full fit.
    trial = replace(params, content_steps=min(params.content_steps, 100), iterations=iterations or params.iterations)
    embeddings = learn_embeddings(fit, catalog, trial, show_progress=False, reuse=reuse)
    recs = served_top_k(fit, catalog, embeddings, params, users, K, items_json)
    return ranking_metrics(recs, [truth[int(u)] for u in users], K, len(catalog))[f"ndcg@{K}"], embeddings


def candidate_params(base: ModelParams, costly: bool = True) -> list[dict]:
    """The few knobs that matter, most promising first (so a short budget still tries them).

    ``costly=False`` leaves out changes that make the final job slower (more
    factors: ALS cost grows with their square; more watched-next neighbours:
    the batch ranking's sparse term grows with them), for data so large that
    the job's time is the constraint.
    """
    recency = {"recency_half_life_days": 0.0} if base.recency_half_life_days else {"recency_half_life_days": 120.0}
    changes = [
        {},
        recency,  # whether recency helps depends on the catalogue's time span: decide first
        {"regularization": base.regularization * 2},
        {"regularization": base.regularization / 2},
        {"seq_weight": base.seq_weight * 1.5},
        {"seq_weight": base.seq_weight / 2},
        {"alpha": base.alpha * 2},
        {"alpha": base.alpha / 2},
        {"seq_neighbors": base.seq_neighbors * 2},
        {"factors": base.factors * 2},
        {"factors": base.factors * 4, "regularization": base.regularization / 2},
        {"content_shrink": base.content_shrink * 4},
    ]
    if not costly:
        changes = [c for c in changes if c.get("factors", 0) <= base.factors and c.get("seq_neighbors", 0) <= base.seq_neighbors]
    return changes


def time_budget(n_events: int) -> float:
    """Seconds for selection: 20 s up to 100k events, then growing slowly (~25 s at 1M, ~28 s at 3M).

    Trials run on at most ``MAX_TRIAL_EVENTS``, so a larger catalogue needs no
    more time per trial; the budget grows so it gets a few more trials, and
    stays a small share of a job at scale, whose own training dominates
    (issue 5: the whole job within 3x loading plus one bare ALS fit).
    """
    return float(min(600.0, 20.0 * max(1.0, n_events / 1e5) ** 0.1))


def select_params(
    train: Events, catalog: Catalog, base: ModelParams, split: str = "random", budget: float | None = None, seed: int = 0,
    final_events: int | None = None,
) -> tuple[ModelParams, list[dict]]:
    """Coordinate search from ``base`` on a validation split of ``train``; returns (best, trials).

    ``final_events``: how many events the chosen parameters will train on;
    above ``COSTLY_CHANGES_MAX_EVENTS`` changes that slow the job are not tried
    and trials fit ALS with ``SCALE_TRIAL_ITERATIONS`` sweeps.
    """
    budget = time_budget(len(train)) if budget is None else budget
    costly = final_events is None or final_events <= COSTLY_CHANGES_MAX_EVENTS
    iterations = None if costly else min(base.iterations, SCALE_TRIAL_ITERATIONS)
    started = time.perf_counter()
    sampled = len(train) > MAX_TRIAL_EVENTS
    train = evaluation_sample(train, MAX_TRIAL_EVENTS, seed=seed)
    fit_mask = holdout_split(train, 0.2, split, seed=seed + 101)
    fit = train.subset(fit_mask)
    truth = relevant_sets(train, ~fit_mask)
    users = _sample_users(list(truth), seed)
    items_json = catalog_json(catalog)  # the same for every trial
    best_score, best_embeddings = validation_score(fit, truth, catalog, base, users, items_json, iterations)
    best = base
    trials = [{"params": {}, "ndcg@10": best_score, "seconds": time.perf_counter() - started}]
    log.info("selection: base validation nDCG@10 %.4f (budget %.0fs)", best_score, budget)
    for round_ in range(ROUNDS):  # ROUNDS > 1: further passes around the winner
        improved = False
        for change in candidate_params(best, costly)[1:]:
            elapsed = time.perf_counter() - started
            candidate = replace(best, **change)
            # Trials cost roughly in proportion to the embedding size: skip what would overrun.
            per_trial = elapsed / len(trials) * max(1.0, candidate.factors / base.factors)
            if elapsed + per_trial > budget:
                continue
            t0 = time.perf_counter()
            score, embeddings = validation_score(
                fit, truth, catalog, candidate, users, items_json, iterations, reuse=best_embeddings
            )
            trials.append({"params": change, "ndcg@10": score, "seconds": time.perf_counter() - t0, "round": round_})
            log.info("selection: %s -> %.4f", change, score)
            if score > best_score + 1e-4:
                best, best_score, best_embeddings, improved = candidate, score, embeddings, True
        if not improved:
            break
    if sampled:  # chosen on a user sample: fits on more users scale it up (ModelParams.at_scale)
        best = replace(best, regularization_users=fit.active_users())
    return best, trials


def cold_start_evaluation(
    events: Events, catalog: Catalog, params: ModelParams, share: float = 0.1, k: int = 50, seed: int = 0,
    min_viewers: int = 5,
) -> dict:
    """How well content alone places new titles.

    A share of titles (with at least ``min_viewers``) is removed from training
    entirely, so their vectors come from the content model only. For each such
    title and each user who really watched it, is it in that user's top ``k``
    (training titles excluded)? Compared with random placement of the same
    titles, whose chance is k / (titles the user could be shown).
    """
    rng = np.random.default_rng(seed)
    events = evaluation_sample(events, MAX_TRIAL_EVENTS, seed=seed)
    viewers = np.bincount(
        np.unique(events.user.astype(np.int64) * len(catalog) + events.item) % len(catalog), minlength=len(catalog)
    )
    eligible = np.flatnonzero(viewers >= min_viewers)
    if len(eligible) < 10:
        return {}
    held = rng.choice(eligible, max(5, int(len(eligible) * share)), replace=False)
    is_held = np.zeros(len(catalog), bool)
    is_held[held] = True
    train = events.subset(~is_held[events.item])
    truth_all = relevant_sets(events, is_held[events.item])
    users = _sample_users(list(truth_all), seed)
    # Placement by the embeddings alone: watched-next cannot know a title nobody has watched. The ALS
    # fit draws the viewer sample, so every content objective is tried on the same fit.
    content_only = replace(params.at_scale(train), seq_weight=0.0, content_objective="als")
    embeddings = learn_embeddings(train, catalog, content_only, show_progress=False)
    confidence = embeddings.confidence
    pairs = sum(len(truth_all[int(u)]) for u in users)
    random_rate = 0.0
    for user in users:
        shown = len(catalog) - (confidence.indptr[user + 1] - confidence.indptr[user])
        random_rate += len(truth_all[int(user)]) * min(1.0, k / max(shown, 1))
    random_hit_rate = random_rate / max(pairs, 1)

    def hit_rate(of_catalog: Catalog, form: str, objective: str) -> float:
        """Held-out titles placed by content model ``form`` fitted on ``objective`` (the same ALS fit)."""
        trial = replace(content_only, content_model=form, content_objective=objective)
        same = of_catalog is catalog and trial == content_only
        recs = served_top_k(train, of_catalog, embeddings if same else with_content(embeddings, of_catalog, trial), trial, users, k)
        hits = sum(sum(1 for t in truth_all[int(u)] if t in set(top)) for u, top in zip(users, recs))
        return hits / max(pairs, 1)

    # Each content model form on each objective, with the synopses and without: the job trains the
    # final model with the best pair (with text, when the catalogue has it). Which objective wins
    # depends on the catalogue (docs/benchmarks.md, eleventh session), so it is measured, not fixed.
    choices = [(form, objective) for objective in CONTENT_OBJECTIVES for form in CONTENT_MODELS]
    rates = {choice: hit_rate(catalog, *choice) for choice in choices}
    best = max(rates, key=lambda c: (rates[c], c == (params.content_model, params.content_objective)))
    result = {
        "k": k,
        "titles_held_out": int(len(held)),
        "pairs": int(pairs),
        "hit_rate": float(rates[best]),
        "random_hit_rate": float(random_hit_rate),
        "lift": float(rates[best] / random_hit_rate) if random_hit_rate else 0.0,
        "content_model": best[0],
        "content_objective": best[1],
        "hit_rate_by_content_model": {form: float(max(rates[(form, o)] for o in CONTENT_OBJECTIVES)) for form in CONTENT_MODELS},
        "hit_rate_by_choice": {f"{form}/{objective}": float(rate) for (form, objective), rate in rates.items()},
    }
    if catalog.text_vectors is not None:
        # The same held-out titles and users, placed by the structured features alone (the best pair).
        plain = replace(catalog, text_vectors=None)
        without = max(hit_rate(plain, *choice) for choice in choices)
        result["hit_rate_without_text"] = float(without)
        result["lift_without_text"] = float(without / random_hit_rate) if random_hit_rate else 0.0
        result["text_lift"] = float(rates[best] / without) if without else None
    return result
