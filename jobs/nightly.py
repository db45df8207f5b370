"""The nightly job: load and validate -> evaluate -> learn -> build the index -> publish.

    python -m jobs.nightly --events PATH --catalog PATH

Redis comes from ``REDIS_URL`` (default ``redis://localhost:6379/0``). Every
step runs before anything is written to Redis except the final publish, and
the publish switches the live pointer only after the complete version is
stored, so a failure anywhere leaves the live model untouched. A publishing
run goes through :mod:`jobs.runs`: it takes the job lock, is recorded in
Redis, and the new version goes live only if it passes the quality gate
(``--force`` overrides). Exit codes: 0 published and live, 1 failed, 2 bad
input data, 3 kept but rejected by the quality gate, 4 another run holds the lock,
143 stopped by SIGTERM (recorded as failed, lock released).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import redis
import scipy.sparse as sp

from models.build import annoy_bytes, build_parts, candidate_reasons, npy_bytes, open_parts, precompute_candidates
from models.data import (
    DEFAULT_MAX_REJECTED_SHARE,
    Catalog,
    DataError,
    EventFiles,
    Events,
    LoadReport,
    load_catalog,
    load_events,
)
from models.embeddings import PARAM_CHOICES, ModelParams, confidence_and_viewers, learn_embeddings, train_threads
from models.evaluate import evaluation_sample, holdout_split, popularity_ranking, ranking_metrics, recommend_popular
from models.live_events import compact, take_for_job
from models.offline import cold_start_evaluation, select_params, served_top_k
from models.progress import report
from models.store import DEFAULT_KEEP, ModelError, ModelStore, redis_from_url
from models.trending import trending_record

log = logging.getLogger("jobs.nightly")

EVAL_K = 10
MAX_EVAL_USERS = 20000  # evaluation cost grows with users; a sample this size is plenty stable
MAX_EVAL_EVENTS = 1_000_000  # events of the users the evaluation model trains on (see evaluation_sample)


ENGINES = ("implicit", "spark")
# The parameter search and the cold-start check are reused from the live version for this long, and while
# the events and titles stay within RETUNE_FACTOR of what they were searched on (reusable_tuning).
SELECTION_MAX_AGE_DAYS = 7.0
RETUNE_FACTOR = 1.5


@dataclass
class NightlyConfig:
    events: str
    catalog: str
    redis_url: str | None = None
    prefix: str = "recs"
    evaluate: bool = True
    split: str = "temporal"
    holdout: float = 0.2
    publish: bool = True
    keep: int = DEFAULT_KEEP
    max_rejected_share: float = DEFAULT_MAX_REJECTED_SHARE
    params: ModelParams = field(default_factory=ModelParams)
    show_progress: bool = True
    select: bool = True  # tune hyperparameters on a validation split (needs evaluate)
    selection_budget: float | None = None  # seconds; None = grows with the data
    cold_start: bool = True  # measure how well content alone places held-out titles
    # Reuse the live version's parameter search (and cold-start check) while it applies; 0 = search every run.
    selection_max_age_days: float = float(os.environ.get("SELECTION_MAX_AGE_DAYS", str(SELECTION_MAX_AGE_DAYS)))
    previous_tuning: dict | None = None  # the live version's search (set by run_nightly from Redis)
    engine: str = os.environ.get("TRAIN_ENGINE", "implicit")  # "implicit" (one machine) or "spark" (jobs.spark_engine)
    text: bool = os.environ.get("TEXT_EMBEDDINGS", "1") != "0"  # embed catalogue synopses (models.text)
    text_cache: str | None = os.environ.get("TEXT_CACHE") or None  # folder of cached text vectors (var/text-cache)
    live_events: bool = True  # also train on the events stream (POST /events), see models.live_events
    events_archive: str | None = os.environ.get("EVENTS_ARCHIVE") or None  # compacted stream entries (a folder)
    activate: bool = True  # False: publish without moving the live pointer (jobs.runs applies the quality gate)
    # True: each user's data is a record in Redis (models.store.pack_user); False: per-user parts, mapped on every host
    user_records: bool = os.environ.get("USER_RECORDS", "1") != "0"
    # Used by the recorded path (jobs.runs): who started the run, its id, and the quality gate.
    trigger: str = "cli"
    run_id: str | None = None
    force: bool = False
    gate_tolerance: float = float(os.environ.get("GATE_TOLERANCE", "0.01"))


def embed_catalog(catalog: Catalog, cache_dir: str | None, progress: bool) -> tuple[Catalog, dict]:
    """The catalogue with its synopses embedded (models.text); refuses weights that do not verify."""
    from models.text import MODEL_NAME, embed_texts

    # The synopsis alone: a title's words are names, not meaning (exact title matches are handled by /search).
    texts = [str(text) for text in catalog.items["description"]]
    vectors, stats = embed_texts(texts, cache_dir, progress=progress, threads=train_threads())
    log.info(
        "text: %(with_text)d titles with a synopsis, %(encoded)d encoded (%(titles_per_second)s titles/s), %(cached)d from the cache",
        stats,
    )
    return replace(catalog, text_vectors=vectors), {**stats, "model": MODEL_NAME}


def projection(vectors: np.ndarray) -> np.ndarray:
    """2-D principal-component projection of the item vectors (float32 [items, 2]) for the embedding map."""
    centred = vectors.astype(np.float64) - vectors.mean(axis=0)
    _, _, axes = np.linalg.svd(centred[:: max(1, len(centred) // 20000)], full_matrices=False)
    return (centred @ axes[:2].T).astype(np.float32)


@dataclass
class NightlyResult:
    version: str | None
    meta: dict
    timings: dict
    parts: dict[str, bytes] = field(default_factory=dict, repr=False)


def implicit_top_k(train: Events, catalog: Catalog, params: ModelParams, users: np.ndarray, k: int, show_progress: bool = False):
    """The first engine's served top-k lists of ``users``, from a model trained on ``train``."""
    embeddings = learn_embeddings(train, catalog, params, show_progress=show_progress)
    return served_top_k(train, catalog, embeddings, params, users, k)


def evaluate_params(
    train: Events, test_mask_events: Events, catalog: Catalog, params: ModelParams, show_progress: bool, seed: int = 0,
    rank=None,
) -> dict:
    """Train on ``train``, score top-k for users with held-out titles, compare to popularity."""
    truth: dict[int, set[int]] = {}
    for user, item in zip(test_mask_events.user.tolist(), test_mask_events.item.tolist()):
        truth.setdefault(user, set()).add(item)
    users = np.array(sorted(truth), dtype=np.int64)
    if len(users) > MAX_EVAL_USERS:
        users = np.sort(np.random.default_rng(seed).choice(users, MAX_EVAL_USERS, replace=False))
    relevant = [truth[int(u)] for u in users]
    if rank is None:
        model_lists = implicit_top_k(train, catalog, params, users, EVAL_K, show_progress)
    else:
        model_lists = rank(train, catalog, params, users, EVAL_K)
    metrics = ranking_metrics(model_lists, relevant, EVAL_K, len(catalog))
    ranking = popularity_ranking(train, len(catalog))
    seen = sp.csr_matrix(
        (np.ones(len(train), np.float32), (train.user, train.item)), shape=(len(train.user_ids), len(catalog))
    )
    seen.sum_duplicates()
    popular_lists = [
        recommend_popular(ranking, set(seen.indices[seen.indptr[u] : seen.indptr[u + 1]].tolist()), EVAL_K) for u in users
    ]
    baseline = ranking_metrics(popular_lists, relevant, EVAL_K, len(catalog))
    return {"model": metrics, "popularity": baseline}


def evaluate_on_sample(
    config: NightlyConfig, evaluated: Events, catalog: Catalog, params: ModelParams, n_events: int, timings: dict,
    rank=None, chosen=None,
) -> tuple[ModelParams, dict, list[dict]]:
    """Selection, the holdout evaluation and the cold-start check on a sample of whole users (either engine).

    ``rank(train, catalog, params, users, k)``: the engine's top-k lists of
    ``users`` from a model trained on ``train``; the implicit engine's by default.
    ``chosen(params)``: called once the parameters are final, before the
    holdout evaluation (the engine may start the final model's work then).
    Returns (chosen parameters, metrics, selection trials).
    """
    report("evaluate", 0, 1)
    started = time.perf_counter()
    selection: list[dict] = []
    train_mask = holdout_split(evaluated, config.holdout, config.split, seed=params.seed)
    train = evaluated.subset(train_mask)
    reused = reusable_tuning(config, n_events, len(catalog))
    if reused is not None:
        params = replace(params, **reused["params"])
        log.info(
            "parameters: reusing the search of version %s (%.1f days old, %d trials; SELECTION_MAX_AGE_DAYS %g)",
            reused["version"], (time.time() - reused["searched_at"]) / 86400, reused.get("trials", 0),
            config.selection_max_age_days,
        )  # fmt: skip
    elif config.select:
        # Tuned on a validation split of the training part only: the holdout stays unseen.
        report("select", 0, 1)
        selected_at = time.perf_counter()
        params, selection = select_params(
            train, catalog, params, config.split, config.selection_budget, params.seed, final_events=n_events
        )
        timings["select"] = time.perf_counter() - selected_at
    # The cold-start check picks the content model; it runs before the holdout evaluation, so the holdout
    # (and the quality gate) measures the parameters the final model trains with, searched or reused.
    cold = None
    if reused is not None and reused.get("cold_start"):
        cold = {**reused["cold_start"], "reused_from": reused["version"]}
    elif config.cold_start:  # searched now, or the reused search had no check
        report("cold_start", 0, 1)
        cold_at = time.perf_counter()
        cold = cold_start_evaluation(train, catalog, params, seed=params.seed)
        if cold.get("content_model"):  # the content model form and objective that placed new titles best
            params = replace(params, content_model=cold["content_model"], content_objective=cold["content_objective"])
        timings["cold_start"] = time.perf_counter() - cold_at
    if chosen is not None:
        chosen(params)
    evaluation = evaluate_params(
        train, evaluated.subset(~train_mask), catalog, params.at_scale(train), config.show_progress, rank=rank
    )
    evaluation.update(split=config.split, holdout=config.holdout, k=EVAL_K)
    if cold is not None:
        evaluation["cold_start"] = cold
    if reused is not None:
        evaluation["tuning"] = {k: v for k, v in reused.items() if k not in ("version", "cold_start")}
        evaluation["tuning"]["reused_from"] = reused["version"]
    elif config.select:
        evaluation["tuning"] = {
            "params": params.as_dict(),  # what select_params, then the cold-start check, chose
            "base": config.params.as_dict(),
            "engine": config.engine,
            "searched_at": time.time(),
            "events": n_events,
            "titles": len(catalog),
            "trials": len(selection),
        }
    timings["evaluate"] = time.perf_counter() - started
    log.info(
        "holdout nDCG@%d %.4f (popularity %.4f), recall@%d %.4f, coverage %.3f",
        EVAL_K, evaluation["model"][f"ndcg@{EVAL_K}"], evaluation["popularity"][f"ndcg@{EVAL_K}"],
        EVAL_K, evaluation["model"][f"recall@{EVAL_K}"], evaluation["model"]["coverage"],
    )
    return params, evaluation, selection


def live_tuning(store: ModelStore) -> dict | None:
    """The parameter search the live version was trained with (its ``metrics.tuning``), with the version
    and its cold-start check; None when there is none or the record cannot be read."""
    try:
        version = store.live_version()
        if version is None:
            return None
        metrics = store.meta(version).get("metrics") or {}
        tuning = metrics.get("tuning")
        if not isinstance(tuning, dict):
            return None  # reusable_tuning checks the rest (_malformed_tuning)
        origin = tuning.get("reused_from") or version  # the version whose run searched
        return {**tuning, "version": origin, "cold_start": metrics.get("cold_start")}
    except (redis.RedisError, ModelError, ValueError, TypeError, KeyError, AttributeError) as exc:  # damaged: search again
        log.warning("parameters: the live version's search record cannot be read (%s); searching again", exc)
        return None


def _malformed_tuning(tuning: dict) -> str | None:
    """Why a stored search record cannot be used (it is read back from Redis), or None."""
    defaults = ModelParams().as_dict()
    params = tuning.get("params")
    if not isinstance(params, dict) or set(params) != set(defaults) or not isinstance(tuning.get("base"), dict):
        return "it was made with other model parameters than this version has"
    for name, default in defaults.items():
        value = params[name]
        kind = (int, float) if isinstance(default, float) else type(default)
        if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, kind):
            return f"its parameter {name} is not a {type(default).__name__}"
        if name in PARAM_CHOICES and value not in PARAM_CHOICES[name]:
            return f"its parameter {name} is not one of {', '.join(PARAM_CHOICES[name])}"
    for name in ("searched_at", "events", "titles"):
        value = tuning.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            return f"its '{name}' is not a positive number"
    return None


def reusable_tuning(config: NightlyConfig, n_events: int, n_titles: int) -> dict | None:
    """The live version's search when it still applies to this run, else None (the reason is logged).

    It applies while it is younger than ``selection_max_age_days``, was made by
    the same engine from the same given parameters, and the events and titles
    are within :data:`RETUNE_FACTOR` of what it searched on. The holdout
    evaluation and the quality gate still run on every run.
    """
    previous = config.previous_tuning
    if previous is None or not config.select:
        return None
    reason = _why_not_reusable(previous, config, n_events, n_titles)
    if reason is not None:
        log.info("parameters: searching, not reusing the search of version %s: %s", previous.get("version"), reason)
        return None
    return previous


def _why_not_reusable(previous: dict, config: NightlyConfig, n_events: int, n_titles: int) -> str | None:
    malformed = _malformed_tuning(previous)
    if malformed is not None:
        return malformed
    if config.selection_max_age_days <= 0:
        return "SELECTION_MAX_AGE_DAYS is 0 (or --reselect)"
    if previous.get("engine") != config.engine:
        return f"it was made by the {previous.get('engine')} engine"
    if previous["base"] != config.params.as_dict():
        return "the given parameters (or their defaults) changed since"
    age_days = (time.time() - previous["searched_at"]) / 86400
    if not 0 <= age_days <= config.selection_max_age_days:
        return f"it is {age_days:.1f} days old (SELECTION_MAX_AGE_DAYS {config.selection_max_age_days:g})"
    for what, then, now in (("events", previous["events"], n_events), ("titles", previous["titles"], n_titles)):
        if not 1 / RETUNE_FACTOR <= now / then <= RETUNE_FACTOR:
            return f"the {what} went from {then:,} to {now:,}"
    return None


def run_nightly(config: NightlyConfig, store: ModelStore | None = None) -> NightlyResult:
    timings: dict[str, float] = {}
    if store is None and config.publish:
        store = ModelStore(redis_from_url(config.redis_url), config.prefix)
    if store is not None:
        store.redis.ping()  # fail before hours of work, not after
        if config.evaluate and config.select and config.selection_max_age_days > 0 and config.previous_tuning is None:
            config = replace(config, previous_tuning=live_tuning(store))

    report("load", 0, 1)
    started = time.perf_counter()
    events_spec, live_info = config.events, None
    live_dir = tempfile.TemporaryDirectory(prefix="live-events-")
    if store is not None and config.live_events:
        # Snapshot before loading: events accepted from now on belong to the next run.
        live_info, live_files = take_for_job(store, live_dir.name, config.events_archive)
        if live_files:
            events_spec = ",".join([config.events, *map(str, live_files)])
    if config.engine != "spark":  # the implicit engine's files are read while the catalogue loads
        events_spec = EventFiles(events_spec)
    try:
        catalog, catalog_report = load_catalog(config.catalog, config.max_rejected_share)
        timings["load_catalog"] = time.perf_counter() - started
        text_info = None
        if config.text and catalog.has_text:
            report("text", 0, 1)
            started = time.perf_counter()
            catalog, text_info = embed_catalog(catalog, config.text_cache, config.show_progress)
            timings["text"] = time.perf_counter() - started
    except BaseException:
        if isinstance(events_spec, EventFiles):
            events_spec.close()
        raise
    try:  # the engine reads the stream's snapshot files in live_dir
        if config.engine == "spark":
            from jobs.spark_engine import train_spark

            trained = train_spark(config, events_spec, catalog, timings)
        else:
            trained = train_implicit(config, events_spec, catalog, timings)
    finally:
        live_dir.cleanup()
    parts, params, events_report = trained.parts, trained.params, trained.events_report
    text_index_recipe = None
    if catalog.text_vectors is not None:  # GET /search: titles by meaning
        parts["text_vectors.npy"] = npy_bytes(catalog.text_vectors.astype(np.float16))
        started = time.perf_counter()
        text_index_recipe = {
            "vectors_sha256": hashlib.sha256(np.ascontiguousarray(catalog.text_vectors, np.float32)).hexdigest(),
            "trees": max(10, params.n_trees // 2),
            "seed": params.seed,
        }
        parts["text.ann"], text_index_recipe["reused_from"] = text_index(store, catalog.text_vectors, text_index_recipe)
        timings["text_index"] = time.perf_counter() - started

    meta = {
        "created_at": time.time(),
        "counts": {
            "titles": len(catalog),
            "users": trained.users,
            "events": trained.events,
            "titles_with_viewers": trained.titles_with_viewers,
            "rows_rejected": events_report.rejected_total + catalog_report.rejected_total,
            "events_unknown_title": events_report.unknown_items,
        },
        "inputs": {"events": events_report.as_dict(), "catalog": catalog_report.as_dict()},
        "params": params.as_dict(),
        "selection": trained.selection,
        "scaled_regularization": trained.scaled,
        "metrics": trained.evaluation,
        "timings": timings,
        "text": text_info,
        "text_index": text_index_recipe,
        "engine": trained.engine,
    }
    if live_info is not None:
        meta["live_events"] = live_info  # goes live with the version, atomically (exactly-once)
    if trained.user_store is not None:
        meta["user_store"] = trained.user_store
    version = None
    if config.publish:
        report("publish", 0, 1)
        started = time.perf_counter()
        version = store.publish(
            parts, meta, activate=config.activate, keep=config.keep, version=trained.version, per_user=config.user_records
        )
        timings["publish"] = time.perf_counter() - started
        meta["model_version"] = version
        if config.activate:
            compact_live_events(store, config)
    if config.publish:
        # The trending row of /page, from the events this run read (refreshed hourly by jobs.trending).
        store.redis.set(store.keys.trending, trained.trending)
    return NightlyResult(version=version, meta=meta, timings=timings, parts=parts)


def text_index(store: ModelStore | None, vectors: np.ndarray, recipe: dict) -> tuple[bytes, str | None]:
    """The ``text.ann`` part and the version it was taken from (None: built now).

    The synopsis index changes only when the synopses do: while the live version's was built from
    the same vectors (their sha256) with the same trees and seed, its part is fetched, checksum
    verified, instead of built again (1.4 s a night at 30,000 titles). Anything else builds it.
    """
    live = store.live_version() if store is not None else None
    if live:
        try:
            meta = store.meta(live)
            previous = meta.get("text_index")
            if isinstance(previous, dict) and all(previous.get(k) == recipe[k] for k in ("vectors_sha256", "trees", "seed")):
                blob = store.fetch_part(live, "text.ann", meta["parts"]["text.ann"])
                log.info("text index: the synopses are unchanged, taken from version %s", live)
                return blob, live
        except (ModelError, KeyError, TypeError, ValueError) as exc:  # missing, damaged or forged: build it
            log.warning("text index: cannot reuse version %s's (%r); building it", live, exc)
    return annoy_bytes(vectors, "angular", recipe["trees"], recipe["seed"]), None


@dataclass
class Trained:
    """What a training engine hands back to the job: every part but the text ones, and what the metadata says."""

    parts: dict[str, bytes]
    params: ModelParams
    evaluation: dict | None
    selection: list[dict]
    scaled: dict | None
    events_report: LoadReport
    users: int
    events: int
    titles_with_viewers: int
    trending: bytes  # the trending record (models.trending) of the events trained on
    engine: str
    # An engine that wrote the per-user records itself (the Spark executors) names the version they were
    # written under and their ``user_store``; the job publishes the item side under that version.
    version: str | None = None
    user_store: dict | None = None


def train_implicit(config: NightlyConfig, events_spec: str | EventFiles, catalog: Catalog, timings: dict) -> Trained:
    """The first engine, on one machine: load -> evaluate (select) -> ALS (implicit) + content -> parts -> candidates."""
    params = config.params
    started = time.perf_counter()
    events, events_report = load_events(events_spec, catalog, config.max_rejected_share)
    timings["load"] = time.perf_counter() - started
    log.info(
        "loaded %d titles, %d events from %d users (%d rows rejected, %d events for unknown titles)",
        len(catalog), len(events), len(events.user_ids), events_report.rejected_total, events_report.unknown_items,
    )

    evaluation, selection = None, []
    with ThreadPoolExecutor(1) as beside:
        # The holdout evaluation leaves a core idle for seconds: once the parameters are final, the
        # full confidence matrix is built beside it (20M events: 1.9 s off the job).
        confidence = None

        def start_confidence(chosen: ModelParams) -> None:
            nonlocal confidence
            confidence = beside.submit(confidence_and_viewers, events, catalog, chosen)

        if config.evaluate:
            sample = evaluation_sample(events, MAX_EVAL_EVENTS, seed=params.seed)
            params, evaluation, selection = evaluate_on_sample(
                config, sample, catalog, params, len(events), timings, chosen=start_confidence
            )
        confidence = confidence.result() if confidence is not None else None

    report("train", 0, 1)
    started = time.perf_counter()
    scaled = None
    if params.regularization_users:  # chosen on a user sample (models.offline.select_params)
        scaled = {"chosen": params.regularization, "chosen_on_users": params.regularization_users}
        params = params.at_scale(events)
        scaled.update(fit_users=events.active_users(), value=params.regularization)
        log.info("regularization %(chosen).1f chosen on %(chosen_on_users)d users -> %(value).1f for %(fit_users)d", scaled)
    embeddings = learn_embeddings(events, catalog, params, show_progress=config.show_progress, confidence=confidence)
    timings.update({f"train_{k}": v for k, v in embeddings.timings.items()})
    timings["train"] = time.perf_counter() - started

    report("index", 0, 1)
    started = time.perf_counter()
    parts = build_parts(catalog, events, embeddings, params)
    parts["map.npy"] = npy_bytes(projection(embeddings.vectors))  # the dashboard's embedding map
    timings["index"] = time.perf_counter() - started

    started = time.perf_counter()
    seen = (embeddings.confidence > 0).tocsr()
    all_users = np.arange(len(events.user_ids), dtype=np.int64)
    with tempfile.TemporaryDirectory(prefix="build-") as tmp:
        recommender = open_parts(parts, {"params": params.as_dict()}, Path(tmp))
        candidates, scores = precompute_candidates(
            recommender, seen, all_users, params.candidates, show_progress=config.show_progress
        )
        because = candidate_reasons(recommender, all_users, candidates)  # so requests only look them up
        recommender.close()
    parts["candidates.npy"] = npy_bytes(candidates)
    parts["candidate_scores.npy"] = npy_bytes(scores)
    parts["candidate_because.npy"] = npy_bytes(because)
    timings["candidates"] = time.perf_counter() - started

    return Trained(
        parts=parts, params=params, evaluation=evaluation, selection=selection, scaled=scaled, events_report=events_report,
        users=len(events.user_ids), events=len(events), titles_with_viewers=int((embeddings.viewers > 0).sum()),
        trending=trending_record(list(catalog.item_ids), events.item, events.timestamp), engine="implicit",
    )  # fmt: skip


def compact_live_events(store: ModelStore, config: NightlyConfig) -> dict | None:
    """After a version went live: archive and trim the stream, prune the overlay (models.live_events.compact).

    The new version is live whatever happens here; a failure is logged and
    returned, and the next run tries again (nothing is lost or doubled).
    """
    if not config.live_events:
        return None
    if not config.events_archive:
        log.warning("EVENTS_ARCHIVE is not set: the events stream is not trimmed and grows with every event")
    try:
        result = compact(store, config.events_archive)
    except Exception as exc:
        log.error("compacting the events stream failed (the new version is live; the next run retries): %r", exc)
        return {"error": repr(exc)}
    log.info(
        "events: %(archived)d archived, %(trimmed)d trimmed from the stream (%(stream_length)d left), "
        "%(overlay_lines_removed)d overlay lines pruned; kept versions have all consumed through %(floor)s",
        result,
    )
    return result


def print_summary(result: NightlyResult, out=sys.stdout) -> None:
    meta = result.meta
    counts = meta["counts"]
    print(f"model_version: {result.version or '(not published)'}", file=out)
    print(
        f"data: {counts['events']} events, {counts['users']} users, {counts['titles']} titles "
        f"({counts['titles_with_viewers']} with viewers); {counts['rows_rejected']} rows rejected; "
        f"{counts['events_unknown_title']} events for titles not in the catalogue",
        file=out,
    )
    for example in meta["inputs"]["events"]["unknown_item_examples"]:
        print(f"  unknown title id e.g. {example!r}", file=out)
    for reason, n in meta["inputs"]["events"]["rows_rejected"].items():
        print(f"  events rejected: {n} x {reason}", file=out)
    metrics = meta.get("metrics")
    if metrics:
        m, p = metrics["model"], metrics["popularity"]
        print(f"holdout ({metrics['split']}, {metrics['holdout']:.0%}, {m['users']} users):", file=out)
        for name in ("ndcg@10", "precision@10", "recall@10", "map@10", "coverage"):
            print(f"  {name:<13} model {m[name]:.4f}   popularity {p[name]:.4f}", file=out)
        cold = metrics.get("cold_start")
        if cold:
            print(
                f"  cold start: {cold['titles_held_out']} titles placed by content alone, hit rate@{cold['k']} "
                f"{cold['hit_rate']:.4f} vs random {cold['random_hit_rate']:.4f} ({cold['lift']:.1f}x)",
                file=out,
            )
            if cold.get("content_objective"):
                text = f"; text_lift {cold['text_lift']:.2f}" if cold.get("text_lift") else ""
                print(f"  content model: {cold['content_model']} on the {cold['content_objective']} objective{text}", file=out)
    if meta.get("selection"):
        best = max(meta["selection"], key=lambda t: t["ndcg@10"])
        print(f"selection: {len(meta['selection'])} trials on a validation split, best {best['ndcg@10']:.4f}", file=out)
    tuning = (meta.get("metrics") or {}).get("tuning") or {}
    if tuning.get("reused_from"):
        age = (time.time() - tuning["searched_at"]) / 86400
        print(f"parameters: from the search of version {tuning['reused_from']} ({age:.1f} days old, {tuning.get('trials', 0)} "
              "trials; --reselect searches again)", file=out)  # fmt: skip
    print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()), file=out)


def parse_args(argv: list[str] | None = None) -> NightlyConfig:
    parser = argparse.ArgumentParser(prog="python -m jobs.nightly", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", default=os.environ.get("EVENTS_PATH"), help="events file(s): CSV/Parquet path, glob or comma list (env EVENTS_PATH)")
    parser.add_argument("--catalog", default=os.environ.get("CATALOG_PATH"), help="catalogue file(s) (env CATALOG_PATH)")
    parser.add_argument("--redis-url", default=None, help="Redis to publish to (default: env REDIS_URL, else redis://localhost:6379/0)")
    parser.add_argument("--prefix", default=os.environ.get("REDIS_PREFIX", "recs"), help="key prefix, to run several catalogues in one Redis")
    parser.add_argument("--split", choices=("random", "temporal"), default="temporal", help="holdout: each user's random or most recent titles")
    parser.add_argument("--holdout", type=float, default=0.2, help="share of each user's titles held out for evaluation")
    parser.add_argument("--engine", choices=ENGINES, default=os.environ.get("TRAIN_ENGINE", "implicit"), help="training engine: implicit (one machine) or spark (SPARK_MASTER, default local[*]; see docs/scaling.md) (env TRAIN_ENGINE)")
    parser.add_argument("--no-eval", action="store_true", help="skip the holdout evaluation (faster, no metrics)")
    parser.add_argument("--no-select", action="store_true", help="skip hyperparameter selection; use the given parameters")
    parser.add_argument("--selection-budget", type=float, default=None, help="seconds for selection (default grows with the data)")
    parser.add_argument(
        "--reselect", action="store_true",
        help="search parameters (and rerun the cold-start check) even if the live version's search still applies "
        f"(it is reused for SELECTION_MAX_AGE_DAYS, default {SELECTION_MAX_AGE_DAYS:g}, while events and titles "
        f"stay within {RETUNE_FACTOR:g}x)",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="do everything except publishing")
    parser.add_argument(
        "--user-parts", action="store_true",
        help="publish per-user data as parts every web host maps (env USER_RECORDS=0), not as records in Redis",
    )  # fmt: skip
    parser.add_argument("--keep", type=int, default=DEFAULT_KEEP, help="versions kept in Redis for rollback")
    parser.add_argument("--max-rejected-share", type=float, default=DEFAULT_MAX_REJECTED_SHARE, help="fail if more than this share of rows break the contract")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
    parser.add_argument("--no-live-events", action="store_true", help="train on the files only, not on the events stream of POST /events")
    parser.add_argument("--events-archive", default=os.environ.get("EVENTS_ARCHIVE") or None, help="folder where stream entries every kept version has consumed are archived as Parquet, then trimmed from Redis; its files are read as input (env EVENTS_ARCHIVE)")
    parser.add_argument("--force", action="store_true", help="make the new version live even if the quality gate rejects it")
    parser.add_argument("--gate-tolerance", type=float, default=float(os.environ.get("GATE_TOLERANCE", "0.01")), help="quality gate: the new version goes live unless its holdout nDCG@10 is lower than the live one's by more than this (env GATE_TOLERANCE)")
    parser.add_argument("--trigger", choices=("cli", "scheduled", "manual"), default="cli", help="who started this run, kept in its run record (the scheduler passes scheduled/manual)")
    parser.add_argument("--run-id", default=None, help="record under this run id (the scheduler passes the id of a queued run)")
    defaults = ModelParams()
    for f in fields(ModelParams):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)), default=None,
            choices=PARAM_CHOICES.get(f.name), help=f"model parameter (default {getattr(defaults, f.name)})",
        )  # fmt: skip
    args = parser.parse_args(argv)
    if not args.events or not args.catalog:
        parser.error("--events and --catalog are required (or set EVENTS_PATH and CATALOG_PATH)")
    if not 0.0 < args.holdout < 1.0:
        parser.error("--holdout must be between 0 and 1")
    overrides = {f.name: getattr(args, f.name) for f in fields(ModelParams) if getattr(args, f.name) is not None}
    return NightlyConfig(
        events=args.events,
        catalog=args.catalog,
        redis_url=args.redis_url,
        prefix=args.prefix,
        evaluate=not args.no_eval,
        select=not args.no_select,
        selection_budget=args.selection_budget,
        selection_max_age_days=0.0 if args.reselect else NightlyConfig.selection_max_age_days,
        split=args.split,
        holdout=args.holdout,
        publish=not args.dry_run,
        keep=args.keep,
        user_records=not args.user_parts and NightlyConfig.user_records,
        max_rejected_share=args.max_rejected_share,
        params=ModelParams(**overrides),
        show_progress=not args.quiet,
        live_events=not args.no_live_events,
        events_archive=args.events_archive,
        trigger=args.trigger,
        run_id=args.run_id,
        force=args.force,
        gate_tolerance=args.gate_tolerance,
        engine=args.engine,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    if config.publish:
        # Publishing runs are recorded, locked and gated (jobs.runs); a dry run touches no Redis.
        from jobs.runs import run_from_cli

        return run_from_cli(config)
    try:
        result = run_nightly(config)
    except Exception as exc:  # the live model stays as it was; say why we stopped
        return failure_exit_code(exc)
    print_summary(result)
    return 0


def failure_exit_code(exc: Exception) -> int:
    """Say why the job stopped; exit code 2 for bad input data, 1 for anything else."""
    if isinstance(exc, DataError):
        print(f"error: bad input data; nothing was published.\n{exc}", file=sys.stderr)
        return 2
    if isinstance(exc, redis.OutOfMemoryError):
        print(
            f"error: Redis is full (OOM: maxmemory reached, and it evicts nothing) and refused a write; the live "
            f"model is unchanged. Free memory (fewer kept versions, --keep; set EVENTS_ARCHIVE so the events "
            f"stream is trimmed) or raise Redis' maxmemory, then run again. ({exc})",
            file=sys.stderr,
        )
        return 1
    log.error("nightly job failed", exc_info=exc)
    print(f"error: nightly job failed; the live model is unchanged: {exc}", file=sys.stderr)
    return 1


def exit_now(code: int) -> None:
    """End the process once its work and output are done, without the interpreter's teardown.

    Unloading torch, pandas and the rest module by module took 0.5-0.8 s of every run's wall time and
    does nothing a finished job needs: the version is stored, the run recorded, the lock released.
    Logs and streams are flushed first; nothing else is left (no thread or temporary file outlives
    :func:`main`)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
