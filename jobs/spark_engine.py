"""The nightly job's second training engine: Apache Spark (``--engine spark``, ``TRAIN_ENGINE=spark``).

A second engine of the same job, not a second product: it calls the first
engine's rules (the loader's :func:`models.data.validate_events`, the
confidence rule, the watched-next pairs, the content model and blend, the
served ranking) and publishes the same parts through :mod:`models.store`, so
the service cannot tell which engine trained a version. What runs where:

cluster (executors)
    reading and validating the event files (every batch through the loader's
    rules); user ids to indices; viewing weights and confidences; ALS
    (``pyspark.ml.recommendation.ALS(implicitPrefs=True)``, checkpointed);
    viewers and popularity per title; watched-next pairs, summed and pruned
    per title; recent histories; every user's candidates and their "because"
    (:func:`models.build.precompute_candidates` on a
    :class:`~models.recommender.Recommender` of the item side, shipped to every
    executor); trending counts.
driver
    the catalogue and its synopsis vectors; the content model, the blend,
    Annoy and the 2-D map (one row per title); the evaluation on a bounded
    sample of whole users (the same metric code; selection by the implicit
    engine on that sample, see :func:`train_spark`); publishing.

The driver collects results with one row per title, a bounded evaluation
sample, and the per-user parts it publishes; never the events, never the ALS
user factors. Configuration: ``SPARK_MASTER`` (default ``local[*]``),
``SPARK_DRIVER_MEMORY`` / ``SPARK_EXECUTOR_MEMORY`` (default 2g),
``SPARK_PARTITIONS`` (shuffle partitions, default 4 per core of the driver
machine), ``SPARK_CHECKPOINT_DIR`` (ALS checkpoints; a folder every executor
can reach), ``SPARK_LOG`` (the JVM's console output, default
``var/spark/spark.log``: kept out of the job's progress output).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial, reduce
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from jobs.nightly import MAX_EVAL_EVENTS, NightlyConfig, Trained, evaluate_on_sample, projection
from models.build import (
    candidate_reasons,
    item_parts,
    npy_bytes,
    popular_from_counts,
    precompute_candidates,
    user_parts,
)
from models.data import (
    EVENT_COLUMNS,
    Catalog,
    DataError,
    Events,
    LoadReport,
    Rejections,
    _csv_header,
    expand_paths,
    latest_timestamp,
    require_columns,
    validate_events,
)  # fmt: skip
from models.embeddings import (
    ModelParams,
    ViewerSample,
    blend_vectors,
    content_vectors,
    popularity_scale,
    sampled_viewers,
    scaled_confidence,
    sequence_pairs,
    summed_pairs,
    viewer_rates,
    viewing_weights,
)  # fmt: skip
from models.progress import report
from models.recommender import Recommender
from models.store import ModelStore, cluster_enabled, new_user_store, new_version_id, pack_user, redis_from_url
from models.trending import record, trending_from_counts, window_edges

log = logging.getLogger("jobs.spark_engine")

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_INTERVAL = 5  # ALS iterations between checkpoints: without them 15 sweeps overflow the JVM's stack
ITEM_SIDE = ("item_vectors.npy", "gram.npy", "items.json", "popular.npy", "seq_indptr.npy", "seq_indices.npy", "seq_weights.npy")
_REPORT_MESSAGES = 20  # rejection messages a task sends back (the job prints the first 10)


# -- the session -----------------------------------------------------------------------------


@contextlib.contextmanager
def spark_session(app_name: str = "recs-nightly") -> Iterator:
    """A SparkSession on ``SPARK_MASTER``, its JVM's console output in ``SPARK_LOG``; stopped on exit."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # executors run this interpreter's packages
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    logging.getLogger("py4j").setLevel(logging.WARNING)  # its INFO lines are connection chatter
    master = os.environ.get("SPARK_MASTER", "local[*]")
    partitions = int(os.environ.get("SPARK_PARTITIONS", "0")) or 4 * (os.cpu_count() or 1)
    log_path = Path(os.environ.get("SPARK_LOG", REPO_ROOT / "var" / "spark" / "spark.log"))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="spark-job-"))
    checkpoints = os.environ.get("SPARK_CHECKPOINT_DIR") or str(work / "checkpoints")
    builder = (
        SparkSession.builder.appName(app_name)
        .master(master)
        .config("spark.driver.memory", os.environ.get("SPARK_DRIVER_MEMORY", "2g"))
        .config("spark.executor.memory", os.environ.get("SPARK_EXECUTOR_MEMORY", "2g"))
        .config("spark.sql.shuffle.partitions", str(partitions))
        .config("spark.default.parallelism", str(partitions))
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.executorEnv.OPENBLAS_NUM_THREADS", "1")
        .config("spark.executorEnv.PYSPARK_PYTHON", os.environ["PYSPARK_PYTHON"])
    )
    # The JVM writes its banner and log lines to the console it inherits: give it the log file.
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    handle = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    try:
        spark = builder.getOrCreate()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, handle):
            os.close(fd)
    try:
        spark.sparkContext.setLogLevel("WARN")
        spark.sparkContext.setCheckpointDir(checkpoints)
        spark.sparkContext.addPyFile(str(_code_zip(work)))  # executors import the same rules
        log.info("spark: master %s, %d shuffle partitions, console output in %s", master, partitions, log_path)
        yield spark
    finally:
        spark.stop()
        shutil.rmtree(work, ignore_errors=True)


def _code_zip(folder: Path) -> Path:
    """The ``models`` and ``jobs`` packages as a zip for the executors' Python workers."""
    path = folder / "recs-code.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for package in ("models", "jobs"):
            for source in sorted((REPO_ROOT / package).glob("*.py")):
                archive.write(source, f"{package}/{source.name}")
    return path


# -- loading and validating ------------------------------------------------------------------


def read_events(spark, spec: str, catalog: Catalog, max_rejected_share: float):
    """The event files, validated on the executors by the loader's rules.

    Returns (events [user, item, timestamp, watch_seconds], user ids
    [user_id, user] sorted as the loader sorts them, report). Raises
    :class:`DataError` with the loader's messages (rows are not numbered:
    Spark reads a file in parts).
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    frames, paths = [], expand_paths(spec)  # the same missing-file and glob errors
    for path in paths:
        suffix, url = path.suffix.lower(), path.resolve().as_uri()
        if suffix in (".parquet", ".pq"):
            frame = spark.read.parquet(url)
            require_columns(frame.columns, path, EVENT_COLUMNS)
            types = dict(frame.dtypes)
            timestamp = F.col("timestamp").cast("long") if types["timestamp"].startswith("timestamp") else F.col("timestamp")
        elif suffix in (".csv", ".txt", ".gz"):
            require_columns(_csv_header(path), path, EVENT_COLUMNS)  # the same header errors
            frame = spark.read.csv(url, header=True, inferSchema=False, escape='"')
            timestamp = F.col("timestamp")
        else:
            raise DataError(f"{path}: unknown file type {suffix!r}; use .csv or .parquet")
        watch = F.col("watch_seconds") if "watch_seconds" in frame.columns else F.lit(None)
        frames.append(
            frame.select(
                F.col("user_id").cast("string").alias("user_id"),
                F.col("item_id").cast("string").alias("item_id"),
                timestamp.cast("string").alias("timestamp"),
                watch.cast("string").alias("watch_seconds"),
                F.lit(str(path)).alias("_file"),
            )
        )
    raw = reduce(lambda a, b: a.unionByName(b), frames)
    catalog_ids = pa.array(catalog.item_ids.astype(str), type=pa.string())
    checked = raw.mapInArrow(
        partial(_validated_batches, catalog_ids=catalog_ids, latest=latest_timestamp()),
        "user_id string, item int, timestamp long, watch_seconds float, report string",
    ).persist(StorageLevel.MEMORY_AND_DISK)
    load_report = LoadReport(files=[str(p) for p in paths])
    rejections = Rejections(load_report, numbered=False)
    for row in checked.where(F.col("report").isNotNull()).select("report").collect():
        part = orjson.loads(row["report"])
        load_report.rows_read += part["rows_read"]
        load_report.unknown_items += part["unknown_items"]
        for key, n in part["rows_rejected"].items():
            load_report.rows_rejected[key] = load_report.rows_rejected.get(key, 0) + n
        for example in part["unknown_item_examples"]:
            if len(load_report.unknown_item_examples) < 5 and example not in load_report.unknown_item_examples:
                load_report.unknown_item_examples.append(example)
        rejections.first.extend((count, message) for count, message in part["first"])
    rejections.first.sort(key=lambda pair: -pair[0])
    rejections.check(load_report.rows_read, max_rejected_share, "events")
    valid = checked.where(F.col("report").isNull()).drop("report")
    users = (
        valid.select("user_id").distinct().rdd.map(lambda row: row[0]).sortBy(lambda user: user)
        .zipWithIndex().toDF("user_id string, user long")
        .select("user_id", F.col("user").cast("int").alias("user"))
        .persist(StorageLevel.MEMORY_AND_DISK)
    )  # fmt: skip
    events = (
        valid.join(users, "user_id").select("user", "item", "timestamp", "watch_seconds")
        .persist(StorageLevel.MEMORY_AND_DISK)
    )  # fmt: skip
    if events.limit(1).count() == 0:
        raise DataError(f"{', '.join(load_report.files)}: no valid events (of {load_report.rows_read} rows read)")
    checked.unpersist()
    return events, users, load_report


def _validated_batches(batches, catalog_ids: pa.Array, latest: int):
    """(executor) Each batch through :func:`models.data.validate_events`; last, one row with this task's report."""
    load_report = LoadReport()
    rejections = Rejections(load_report, numbered=False)
    columns = ["user_id", "item_id", "timestamp", "watch_seconds"]
    for batch in batches:
        files = batch.column("_file")
        names = pc.unique(files).to_pylist()
        for name in names:
            part = batch.filter(pc.equal(files, name)) if len(names) > 1 else batch
            table = pa.Table.from_batches([part]).select(columns)
            load_report.rows_read += table.num_rows
            users, items, ts, ws = validate_events(table, Path(name), catalog_ids, latest, rejections, load_report)
            n = len(items)
            yield pa.RecordBatch.from_arrays(
                [users.combine_chunks().cast(pa.string()), pa.array(items, pa.int32()), pa.array(ts, pa.int64()),
                 pa.array(ws, pa.float32()), pa.nulls(n, pa.string())],
                names=[*("user_id", "item", "timestamp", "watch_seconds"), "report"],
            )  # fmt: skip
    summary = {
        **load_report.as_dict(),
        "first": sorted(rejections.first, key=lambda pair: -pair[0])[:_REPORT_MESSAGES],
    }
    yield pa.RecordBatch.from_arrays(
        [pa.nulls(1, pa.string()), pa.nulls(1, pa.int32()), pa.nulls(1, pa.int64()), pa.nulls(1, pa.float32()),
         pa.array([orjson.dumps(summary).decode()], pa.string())],
        names=["user_id", "item", "timestamp", "watch_seconds", "report"],
    )  # fmt: skip


# -- training ----------------------------------------------------------------------------------


@dataclass
class SparkModel:
    """What one fit leaves: the confidences (on the cluster) and the item side (on the driver)."""

    confidence: object  # DataFrame [user, item, last, confidence], persisted
    newest: int  # the newest event's time: the recency reference
    vectors: np.ndarray
    sequence: sp.csr_matrix
    popular: np.ndarray
    viewers: np.ndarray
    viewer_sample: ViewerSample | None  # the content model's sample, drawn on the cluster (content_objective "als")
    timings: dict


def fit(spark, events, catalog: Catalog, params: ModelParams, label: str = "") -> SparkModel:
    """The first engine's model, learned on the cluster: confidences, ALS, watched-next; content and blend here."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    timings: dict[str, float] = {}
    started = time.perf_counter()
    n_items = len(catalog)
    newest = int(events.agg(F.max("timestamp")).first()[0])
    minutes = catalog.items["episode_minutes"].to_numpy(dtype=np.float32)
    weighted = events.mapInArrow(
        partial(_weights, minutes=minutes, newest=newest, params=params), "user int, item int, timestamp long, weight float"
    )
    summed = weighted.groupBy("user", "item").agg(F.sum("weight").alias("weight"), F.max("timestamp").alias("last"))
    confidence = summed.mapInArrow(
        partial(_confidences, params=params), "user int, item int, last long, confidence float"
    ).persist(StorageLevel.MEMORY_AND_DISK)
    per_title = confidence.groupBy("item").agg(F.count("*").alias("viewers"), F.sum("confidence").alias("strength")).toPandas()
    viewers = np.zeros(n_items, dtype=np.int64)
    strength = np.zeros(n_items, dtype=np.float64)
    viewers[per_title["item"].to_numpy()] = per_title["viewers"].to_numpy()
    strength[per_title["item"].to_numpy()] = per_title["strength"].to_numpy()
    timings["confidence_matrix"] = time.perf_counter() - started
    log.info("spark%s: confidences of %d (user, title) pairs in %.1fs", label, int(viewers.sum()), timings["confidence_matrix"])

    started = time.perf_counter()
    cf_items, user_factors = fit_als(confidence, n_items, params)
    sample = viewer_sample_on_cluster(confidence, user_factors, viewers, params) if params.content_objective == "als" else None
    timings["als"] = time.perf_counter() - started
    log.info("spark%s: ALS (%d factors, %d iterations) in %.1fs", label, params.factors, params.iterations, timings["als"])

    started = time.perf_counter()
    sequence = watched_next(events, n_items, viewers, params)
    timings["sequence"] = time.perf_counter() - started
    log.info("spark%s: watched-next neighbours (%d pairs kept) in %.1fs", label, sequence.nnz, timings["sequence"])

    started = time.perf_counter()
    content = content_vectors(catalog, cf_items, viewers, params, sample)  # one row per title: the driver's work
    vectors = blend_vectors(cf_items, content, viewers, params)
    timings["content_model"] = time.perf_counter() - started
    return SparkModel(confidence, newest, vectors, sequence, popular_from_counts(viewers, strength), viewers, sample, timings)


def _weights(batches, minutes: np.ndarray, newest: int, params: ModelParams):
    """(executor) The confidence rule's per-viewing weight (models.embeddings.viewing_weights)."""
    for batch in batches:
        item = batch.column("item").to_numpy(zero_copy_only=False)
        timestamp = batch.column("timestamp").to_numpy(zero_copy_only=False)
        watch = batch.column("watch_seconds").to_numpy(zero_copy_only=False).astype(np.float32)
        weight = viewing_weights(watch, minutes[item], (newest - timestamp) / 86400.0, params)
        yield pa.RecordBatch.from_arrays(
            [batch.column("user"), batch.column("item"), batch.column("timestamp"), pa.array(weight, pa.float32())],
            names=["user", "item", "timestamp", "weight"],
        )


def _confidences(batches, params: ModelParams):
    """(executor) Summed weights of a (user, title) to its confidence (models.embeddings.scaled_confidence)."""
    for batch in batches:
        summed = batch.column("weight").to_numpy(zero_copy_only=False)
        yield pa.RecordBatch.from_arrays(
            [batch.column("user"), batch.column("item"), batch.column("last"), pa.array(scaled_confidence(summed, params), pa.float32())],
            names=["user", "item", "last", "confidence"],
        )


# MLlib's regParam per unit of the first engine's penalty (0.25 at the first engine's default 20; see below).
SPARK_REGULARIZATION_PER_LAMBDA = 0.25 / 20.0


def spark_regularization(params: ModelParams) -> float:
    """MLlib's ``regParam`` for the first engine's L2 penalty ``params.regularization``.

    implicit penalises every factor vector by the same lambda; MLlib scales
    its regParam by each row's count of ratings (ALS-WR), which makes it
    roughly independent of the data's density, so no count maps one onto the
    other. Measured with default parameters (served ranking, nDCG@10; implicit
    in brackets): ml-latest-small (random 25 % split, seed 0) regParam 0.16 ->
    0.414, 0.2 -> 0.414, 0.3 -> 0.410, 0.5 -> 0.396 [0.406]; 300-title demo
    data (temporal 20 %) 1.2 -> 0.124, 0.3 -> 0.226, 0.15 -> 0.219, 0.1 ->
    0.220, 0.05 -> 0.214 [0.238]. 0.2-0.3 is on both plateaus, so the default
    lambda maps to 0.25 and a lambda that selection doubles or halves (or
    at_scale grows) moves regParam in proportion.
    """
    return params.regularization * SPARK_REGULARIZATION_PER_LAMBDA


def fit_als(confidence, n_items: int, params: ModelParams):
    """MLlib's implicit-feedback ALS on the confidences: (item factors [titles, factors], zero if unseen; user factors).

    MLlib's confidence is 1 + alpha x rating: rating = confidence - 1 with alpha 1
    gives the first engine's confidences. The user factors stay on the cluster
    (a DataFrame [id, features]).
    """
    from pyspark.ml.recommendation import ALS
    from pyspark.sql import functions as F

    ratings = confidence.select("user", "item", (F.col("confidence") - 1.0).alias("rating"))
    als = ALS(
        rank=params.factors,
        maxIter=params.iterations,
        regParam=spark_regularization(params),
        implicitPrefs=True,
        alpha=1.0,
        userCol="user",
        itemCol="item",
        ratingCol="rating",
        seed=params.seed,
        checkpointInterval=CHECKPOINT_INTERVAL,
        coldStartStrategy="drop",
    )
    model = als.fit(ratings)
    factors = model.itemFactors.toPandas()
    out = np.zeros((n_items, params.factors), dtype=np.float32)
    if len(factors):
        out[factors["id"].to_numpy()] = np.stack(factors["features"].to_numpy()).astype(np.float32)
    return out, model.userFactors


def viewer_sample_on_cluster(confidence, user_factors, viewers: np.ndarray, params: ModelParams) -> ViewerSample:
    """The content model's :class:`ViewerSample`, drawn where the user factors are.

    The same rule as the first engine (models.embeddings.sampled_viewers, seeded per
    partition); the driver collects Σ u uᵀ (one d x d matrix per partition) and the
    sampled pairs with their viewers' factors: at most about CONTENT_PAIRS rows,
    bounded by the catalogue, not by the events or the users.
    """
    from pyspark.sql import functions as F

    factors = user_factors.select(F.col("id").alias("user"), "features")
    grams = factors.mapInArrow(partial(_partial_gram, d=params.factors), "gram binary").collect()
    gram = sum((np.frombuffer(row["gram"], np.float64).reshape(params.factors, params.factors) for row in grams), np.zeros((params.factors, params.factors)))
    picked = confidence.select("user", "item", "confidence").mapInArrow(
        partial(_sampled_pairs, rates=viewer_rates(viewers), seed=params.seed), "user int, item int, confidence float"
    )
    rows = picked.join(factors, "user").select("item", "confidence", "features").toPandas()
    if len(rows):
        item = rows["item"].to_numpy(np.int64)
        pair_factors = np.stack(rows["features"].to_numpy()).astype(np.float32)
    else:
        item, pair_factors = np.zeros(0, np.int64), np.zeros((0, params.factors), np.float32)
    return ViewerSample.of(gram, item, pair_factors, rows["confidence"].to_numpy(np.float32), viewers)


def _partial_gram(batches, d: int):
    """(executor) Σ u uᵀ over this partition's user factors, as float64 bytes."""
    gram = np.zeros((d, d))
    for batch in batches:
        column = batch.column("features")
        if len(column):
            u = np.asarray(column.flatten().to_numpy(zero_copy_only=False), np.float64).reshape(len(column), d)
            gram += u.T @ u
    yield pa.RecordBatch.from_arrays([pa.array([gram.tobytes()], pa.binary())], names=["gram"])


def _sampled_pairs(batches, rates: np.ndarray, seed: int):
    """(executor) The (viewer, title) pairs the content model's sample keeps (models.embeddings.sampled_viewers)."""
    from pyspark import TaskContext

    rng = np.random.default_rng([seed, TaskContext.get().partitionId()])
    for batch in batches:
        keep = sampled_viewers(batch.column("item").to_numpy(zero_copy_only=False), rates, rng)
        yield batch.filter(pa.array(keep))


def watched_next(events, n_items: int, viewers: np.ndarray, params: ModelParams) -> sp.csr_matrix:
    """Watched-next neighbours as the first engine builds them, each user's pairs on the executor holding the user."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ordered = events.select("user", "timestamp", "item").repartition("user").sortWithinPartitions("user", "timestamp", "item")
    pairs = ordered.mapInArrow(partial(_pairs, n_items=n_items, params=params), "a int, b int, w float")
    summed = pairs.groupBy("a", "b").agg(F.sum("w").alias("w"))
    both = summed.unionByName(summed.select(F.col("b").alias("a"), F.col("a").alias("b"), "w"))
    scaled = both.mapInArrow(partial(_scaled, scale=popularity_scale(viewers, params)), "a int, b int, w float")
    rank = F.row_number().over(Window.partitionBy("a").orderBy(F.desc("w"), "b"))
    kept = scaled.withColumn("rank", rank).where(F.col("rank") <= params.seq_neighbors).select("a", "b", "w").toPandas()
    matrix = sp.csr_matrix(
        (kept["w"].to_numpy(np.float32), (kept["a"].to_numpy(), kept["b"].to_numpy())), shape=(n_items, n_items)
    )
    matrix.sort_indices()
    return matrix


def _pairs(batches, n_items: int, params: ModelParams):
    """(executor) One partition of users, in time order: models.embeddings.sequence_pairs, summed per pair."""
    parts = [batch for batch in batches if batch.num_rows]
    if not parts:
        return
    table = pa.Table.from_batches(parts)
    users = table.column("user").to_numpy()
    items = table.column("item").to_numpy()
    rows, cols, weights = sequence_pairs(users, items, params)
    if not len(rows):
        return
    summed = summed_pairs([rows, cols, weights.astype(np.float64)], n_items)
    a = np.repeat(np.arange(n_items, dtype=np.int32), np.diff(summed.indptr))
    total = summed.data.astype(np.float32)
    for at in range(0, len(a), 1_000_000):
        yield pa.RecordBatch.from_arrays(
            [
                pa.array(a[at : at + 1_000_000]),
                pa.array(summed.indices[at : at + 1_000_000].astype(np.int32)),
                pa.array(total[at : at + 1_000_000]),
            ],
            names=["a", "b", "w"],
        )


def _scaled(batches, scale: np.ndarray):
    """(executor) A pair's strength divided by both titles' popularity (models.embeddings.popularity_scale)."""
    for batch in batches:
        a = batch.column("a").to_numpy(zero_copy_only=False)
        b = batch.column("b").to_numpy(zero_copy_only=False)
        w = batch.column("w").to_numpy(zero_copy_only=False).astype(np.float32) * scale[a] * scale[b]
        yield pa.RecordBatch.from_arrays([batch.column("a"), batch.column("b"), pa.array(w, pa.float32())], names=["a", "b", "w"])


# -- the user side -------------------------------------------------------------------------


def ship_item_side(spark, parts: dict[str, bytes]):
    """The item side (no Annoy indexes: ranking is exact), broadcast to every executor once."""
    blobs = {part: parts[part] for part in ITEM_SIDE}
    # No users: each task brings its own histories (Recommender.with_histories).
    blobs.update(user_parts([], np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)))
    return spark.sparkContext.broadcast({"name": uuid.uuid4().hex, "parts": blobs})


def rank_users(spark, model: SparkModel, parts: dict[str, bytes], params: ModelParams, only=None):
    """Every user's recent history, candidates and "because", computed on the executors (a DataFrame by user).

    ``only``: a DataFrame of the ``user`` indices to rank (the evaluation's users).
    """
    from pyspark.sql import functions as F

    item_side = ship_item_side(spark, parts)
    per_user = model.confidence.groupBy("user").agg(
        F.sort_array(F.collect_list(F.struct("last", "item", "confidence")), asc=False).alias("titles")
    )  # newest first; at the same time the larger title id first, as the first engine orders them
    if only is not None:
        per_user = per_user.join(F.broadcast(only), "user")
    return per_user.mapInArrow(
        partial(_ranked, item_side=item_side, meta={"params": params.as_dict()}, cap=params.history_cap, size=params.candidates),
        "user int, history_items array<int>, history_weights array<float>, candidates array<int>, "
        "scores array<float>, because array<int>",
    )


_ITEM_SIDE_CACHE: dict[str, Recommender] = {}


def _item_side(item_side, meta: dict) -> Recommender:
    """(executor) The broadcast item side, written to a local folder and opened once per Python worker."""
    name = item_side.value["name"]
    if name not in _ITEM_SIDE_CACHE:
        for old in _ITEM_SIDE_CACHE.values():  # an earlier fit's (the evaluation's): nothing uses it any more
            old.close()
            shutil.rmtree(old.folder, ignore_errors=True)
        _ITEM_SIDE_CACHE.clear()
        folder = Path(tempfile.mkdtemp(prefix=f"recs-item-side-{name[:8]}-"))
        for part, blob in item_side.value["parts"].items():
            (folder / part).write_bytes(blob)
        _ITEM_SIDE_CACHE[name] = Recommender(folder, meta)  # memory-mapped: the folder must stay
    return _ITEM_SIDE_CACHE[name]


def _ranked(batches, item_side, meta: dict, cap: int, size: int):
    """(executor) A batch of users through the served ranking (models.build.precompute_candidates)."""
    recommender = _item_side(item_side, meta)
    for batch in batches:
        n = batch.num_rows
        if n == 0:
            continue
        titles = batch.column("titles")
        offsets = titles.offsets.to_numpy().astype(np.int64)
        flat = titles.flatten()
        items = flat.field("item").to_numpy(zero_copy_only=False).astype(np.int32)
        weights = flat.field("confidence").to_numpy(zero_copy_only=False).astype(np.float32)
        lengths = np.diff(offsets)
        kept = np.minimum(lengths, cap)
        positions = np.repeat(offsets[:-1], kept) + (np.arange(kept.sum()) - np.repeat(np.cumsum(kept) - kept, kept))
        hist_indptr = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
        hist_items, hist_weights = items[positions], weights[positions]
        users = batch.column("user").to_numpy(zero_copy_only=False)
        view = recommender.with_histories([str(u) for u in users], hist_indptr, hist_items, hist_weights)
        seen = sp.csr_matrix((np.ones(len(items), np.float32), items, offsets), shape=(n, recommender.n_items))
        rows = np.arange(n, dtype=np.int64)
        candidates, scores = precompute_candidates(view, seen, rows, size, show_progress=False, threads=1)
        because = candidate_reasons(view, rows, candidates)
        yield pa.RecordBatch.from_arrays(
            [
                pa.array(users, pa.int32()),
                pa.ListArray.from_arrays(pa.array(hist_indptr.astype(np.int32)), pa.array(hist_items, pa.int32())),
                pa.ListArray.from_arrays(pa.array(hist_indptr.astype(np.int32)), pa.array(hist_weights, pa.float32())),
                _fixed_lists(candidates.reshape(n, -1), pa.int32()),
                _fixed_lists(scores.reshape(n, -1), pa.float32()),
                _fixed_lists(because.reshape(n, -1).astype(np.int32), pa.int32()),  # uint8 positions; Spark has no unsigned byte
            ],
            names=["user", "history_items", "history_weights", "candidates", "scores", "because"],
        )


def _fixed_lists(values: np.ndarray, kind) -> pa.ListArray:
    n, width = values.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * width), pa.array(values.ravel(), kind))


def user_side_parts(ranked, users, n_users: int, params: ModelParams) -> dict[str, bytes]:
    """The published per-user parts, collected in user order (the driver holds what it publishes, no more)."""
    table = ranked.orderBy("user").toArrow()
    index = table.column("user").to_numpy()
    if len(index) != n_users or not np.array_equal(index, np.arange(n_users)):
        raise RuntimeError(f"spark: ranked {len(index)} users, expected every one of {n_users} in order")
    history = table.column("history_items").combine_chunks()
    weights = table.column("history_weights").combine_chunks()
    size = params.candidates
    ids = users.orderBy("user").select("user_id").toArrow().column("user_id").to_pylist()
    parts = user_parts(
        ids,
        history.offsets.to_numpy().astype(np.int64),
        history.flatten().to_numpy().astype(np.int32),
        weights.flatten().to_numpy(zero_copy_only=False).astype(np.float32),
    )
    candidates = table.column("candidates").combine_chunks().flatten().to_numpy().astype(np.int32).reshape(n_users, size)
    scores = table.column("scores").combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    because = table.column("because").combine_chunks().flatten().to_numpy().astype(np.uint8)
    parts["candidates.npy"] = npy_bytes(candidates)
    parts["candidate_scores.npy"] = npy_bytes(scores.reshape(n_users, size))
    parts["candidate_because.npy"] = npy_bytes(because.reshape(n_users, size, -1))
    return parts


def write_user_records(ranked, users, n_users: int, config: NightlyConfig, version: str) -> tuple[bytes, dict]:
    """Each executor packs its users' records and writes them to Redis (``ModelStore.write_users``, pipelined;
    on a cluster each record's bucket goes to its own master) under ``version``, before the driver publishes
    the item side under the same id: the switch stays one pointer move, and the driver holds no
    per-user arrays, only the ids (``users.json``). A retried task writes the same fields again.
    Returns ``users.json`` and the version's ``user_store``.
    """
    started = time.perf_counter()
    store = new_user_store(n_users)
    url = config.redis_url or os.environ.get("REDIS_URL", "redis://localhost:6379/0")
    written = (
        ranked.join(users, "user")
        .mapInArrow(
            partial(_write_records, url=url, cluster=cluster_enabled(), prefix=config.prefix, version=version, store=store),
            "users long, bytes long",
        )
        .collect()
    )
    count = sum(row["users"] for row in written)
    if count != n_users:
        raise RuntimeError(f"spark: the executors wrote {count} user records, expected {n_users}")
    store.update(users=count, bytes=sum(row["bytes"] for row in written), seconds=time.perf_counter() - started)
    log.info("spark: %d user records written by the executors in %.1fs", count, store["seconds"])
    ids = users.orderBy("user").select("user_id").toArrow().column("user_id").to_pylist()
    return orjson.dumps(ids), store


def _write_records(batches, url: str, cluster: bool, prefix: str, version: str, store: dict):
    """(executor) Pack and write a partition's user records; yields how many and their bytes."""
    target = ModelStore(redis_from_url(url, cluster=cluster), prefix)
    users = size = 0
    try:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            n = batch.num_rows
            ids = batch.column("user_id").to_pylist()
            history = batch.column("history_items")
            offsets = history.offsets.to_numpy().astype(np.int64)
            offsets -= offsets[0]  # a sliced batch: flatten() starts at its first list
            items = history.flatten().to_numpy(zero_copy_only=False)
            weights = batch.column("history_weights").flatten().to_numpy(zero_copy_only=False)
            candidates = batch.column("candidates").flatten().to_numpy(zero_copy_only=False).reshape(n, -1)
            scores = batch.column("scores").flatten().to_numpy(zero_copy_only=False).reshape(n, -1)
            because = batch.column("because").flatten().to_numpy(zero_copy_only=False).reshape(n, candidates.shape[1], -1)
            records = (
                (str(ids[r]), pack_user(items[offsets[r] : offsets[r + 1]], weights[offsets[r] : offsets[r + 1]], candidates[r], scores[r], because[r]))
                for r in range(n)
            )  # fmt: skip
            done = target.write_users(version, store, records)
            users, size = users + done["users"], size + done["bytes"]
    finally:
        target.redis.close()
    yield pa.RecordBatch.from_arrays([pa.array([users], pa.int64()), pa.array([size], pa.int64())], names=["users", "bytes"])


# -- evaluation ---------------------------------------------------------------------------------


def evaluation_events(events, users, n_events: int, max_events: int, seed: int) -> Events:
    """Every event of a hashed sample of users, about ``max_events`` in all, on the driver (bounded)."""
    from pyspark.sql import functions as F

    share = min(1.0, max_events / max(n_events, 1))
    chosen = users.where(F.pmod(F.xxhash64("user_id", F.lit(seed)), F.lit(1_000_000)) < int(share * 1_000_000))
    frame = events.join(chosen, "user").select("user", "user_id", "item", "timestamp", "watch_seconds").toPandas()
    ids, codes = np.unique(frame["user_id"].to_numpy(dtype=object).astype(str), return_inverse=True)
    sample = Events(
        user_ids=ids,
        user=codes.astype(np.int32),
        item=frame["item"].to_numpy(np.int32),
        timestamp=frame["timestamp"].to_numpy(np.int64),
        watch_seconds=frame["watch_seconds"].to_numpy(np.float32),
    )
    return sample.in_time_order()


def spark_top_k(spark, train: Events, catalog: Catalog, params: ModelParams, users: np.ndarray, k: int) -> list[list[int]]:
    """The Spark engine's top-k lists of ``users`` from a model trained on ``train`` (the evaluation sample)."""
    import pandas as pd

    frame = spark.createDataFrame(
        pd.DataFrame(
            {"user": train.user.astype(np.int32), "item": train.item.astype(np.int32), "timestamp": train.timestamp,
             "watch_seconds": train.watch_seconds.astype(np.float32)}
        ),
        "user int, item int, timestamp long, watch_seconds float",
    )  # fmt: skip
    model = fit(spark, frame, catalog, params, label=" (evaluation)")
    parts = item_parts(catalog, model.vectors, model.sequence, model.popular, params, indexes=False)
    wanted = spark.createDataFrame(pd.DataFrame({"user": np.asarray(users, dtype=np.int32)}), "user int")
    ranked = rank_users(spark, model, parts, params, only=wanted).select("user", "candidates").toPandas()
    model.confidence.unpersist()
    by_user = {int(u): [int(i) for i in c[:k] if i >= 0] for u, c in zip(ranked["user"], ranked["candidates"])}
    return [by_user.get(int(u), []) for u in users]


# -- the job's engine -----------------------------------------------------------------------


def train_spark(config: NightlyConfig, events_spec: str, catalog: Catalog, timings: dict) -> Trained:
    """The nightly job on Spark: the same steps, results and parts as :func:`jobs.nightly.train_implicit`.

    Selection: parameters are chosen by the implicit engine on the
    evaluation's user sample (models.offline.select_params), as the first
    engine chooses them. A Spark fit costs ~10-30 s of scheduling at any size,
    so a search within the same budget would try one or two settings; the
    implicit trials on a bounded sample try about twelve, and both engines fit
    the same model, so what the sample chooses carries over. The holdout
    evaluation itself trains and ranks with this engine.
    """
    from pyspark.sql import functions as F

    params = config.params
    with spark_session() as spark:
        report("load", 0, 1)
        started = time.perf_counter()
        events, users, events_report = read_events(spark, events_spec, catalog, config.max_rejected_share)
        n_events, n_users = events.count(), users.count()
        timings["load"] = time.perf_counter() - started
        log.info(
            "spark: %d events from %d users (%d rows rejected, %d events for unknown titles) in %.1fs",
            n_events, n_users, events_report.rejected_total, events_report.unknown_items, timings["load"],
        )  # fmt: skip

        evaluation, selection = None, []
        if config.evaluate:
            sample = evaluation_events(events, users, n_events, MAX_EVAL_EVENTS, params.seed)
            params, evaluation, selection = evaluate_on_sample(
                config, sample, catalog, params, n_events, timings, rank=partial(spark_top_k, spark)
            )

        report("train", 0, 1)
        started = time.perf_counter()
        scaled = None
        if params.regularization_users:
            scaled = {"chosen": params.regularization, "chosen_on_users": params.regularization_users}
            params = params.for_users(n_users)
            scaled.update(fit_users=n_users, value=params.regularization)
        model = fit(spark, events, catalog, params)
        timings.update({f"train_{k}": v for k, v in model.timings.items()})
        timings["train"] = time.perf_counter() - started

        report("index", 0, 1)
        started = time.perf_counter()
        parts = item_parts(catalog, model.vectors, model.sequence, model.popular, params)
        parts["map.npy"] = npy_bytes(projection(model.vectors))
        timings["index"] = time.perf_counter() - started

        report("candidates", 0, 1)
        started = time.perf_counter()
        ranked = rank_users(spark, model, parts, params)
        version = user_store = None
        if config.publish and config.user_records:  # the executors write the records; the driver never holds them
            version = new_version_id()
            ids, user_store = write_user_records(ranked, users, n_users, config, version)
            parts["users.json"] = ids
        else:
            parts.update(user_side_parts(ranked, users, n_users, params))
        timings["candidates"] = time.perf_counter() - started
        log.info("spark: histories, candidates and reasons of %d users in %.1fs", n_users, timings["candidates"])

        reference, recent_from, long_from = window_edges(model.newest)
        counts = events.groupBy("item").agg(
            F.sum(((F.col("timestamp") > recent_from) & (F.col("timestamp") <= reference)).cast("long")).alias("recent"),
            F.sum(((F.col("timestamp") > long_from) & (F.col("timestamp") <= recent_from)).cast("long")).alias("long"),
        ).toPandas()
        recent = np.zeros(len(catalog), np.int64)
        long = np.zeros(len(catalog), np.int64)
        recent[counts["item"].to_numpy()] = counts["recent"].to_numpy()
        long[counts["item"].to_numpy()] = counts["long"].to_numpy()
        trending = record(list(catalog.item_ids), *trending_from_counts(recent, long), reference)
        return Trained(
            parts=parts, params=params, evaluation=evaluation, selection=selection, scaled=scaled,
            events_report=events_report, users=n_users, events=n_events,
            titles_with_viewers=int((model.viewers > 0).sum()), trending=trending, engine="spark",
            version=version, user_store=user_store,
        )  # fmt: skip
