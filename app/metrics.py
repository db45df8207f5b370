"""The service's own metrics: ``GET /metrics`` in Prometheus text format, and the dashboard's health figures.

Owns the metric definitions:

``recs_http_requests_total{endpoint,method,status}``  every answered request
``recs_http_request_duration_seconds{endpoint}``      latency histogram
``recs_http_errors_total{endpoint}``                  answers with a 5xx status
``recs_recommendations_total{strategy}``              /recommend answers; ``strategy="popular"`` is the fallback
``recs_model_fallback{pid}``                          1 while a worker serves a fallback version (live one broken)
``recs_model_load_failures_total``                    failed attempts to load the live version
``recs_online_{impressions,shown,clicks,viewings,completion}_total{version,arm}``
    online results (models.attribution), from the counters kept in Redis; CTR =
    clicks / impressions, watch-through = completion / viewings, over any window
``recs_attribution_failures_total``                   accepted events that could not be credited (Redis error)
``recs_job_runs_total{status}``, ``recs_job_duration_seconds``, ``recs_job_last_success_timestamp_seconds``
    batch runs, from the counters :mod:`jobs.runs` keeps in Redis, so any web
    worker reports runs done by the scheduler, cron or the CLI.

Several processes: under gunicorn every worker counts in its own process. With
``PROMETHEUS_MULTIPROC_DIR`` set (``gunicorn.conf.py`` sets it to a fresh
temporary folder unless you give one), prometheus-client keeps the values in
files there and ``/metrics`` adds up all workers. Without it (one process: the
Flask dev server, tests) the in-process registry is used.

The endpoint label is the URL rule (``/recommend``), never the raw path, so
odd URLs cannot blow up the number of series.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from collections import deque

import redis
from flask import Flask, Response, current_app, g, request
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from jobs.runs import job_stats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter("recs_http_requests_total", "HTTP requests answered", ["endpoint", "method", "status"])
LATENCY = Histogram(
    "recs_http_request_duration_seconds", "Time to answer a request", ["endpoint"], buckets=LATENCY_BUCKETS
)
ERRORS = Counter("recs_http_errors_total", "Answers with a 5xx status (server errors)", ["endpoint"])
RECOMMENDATIONS = Counter(
    "recs_recommendations_total", "/recommend answers by strategy (popular = the popularity fallback)", ["strategy"]
)

MODEL_FALLBACK = Gauge(
    "recs_model_fallback",
    "1 while this worker serves another version because the live one cannot be loaded",
    multiprocess_mode="liveall",
)
LOAD_FAILURES = Counter("recs_model_load_failures_total", "Attempts to load the live version that failed")
WORKER_CONNECTIONS = Gauge(
    "recs_worker_connections",
    "Client connections this gunicorn worker holds (app.gunicorn_worker keeps them even across workers)",
    multiprocess_mode="liveall",
)

PROCESS_STARTED = time.time()  # "since start" figures count from here (a worker's import)

# Traffic that is not the service's own work: left out of the dashboard's health figures.
NOT_SERVICE = ("/admin", "/metrics")


def init_metrics(app: Flask) -> None:
    """Count every request of ``app`` and serve ``/metrics``."""
    app.before_request(_start_timer)
    app.after_request(_observe)
    app.add_url_rule("/metrics", "metrics", metrics_view)
    app.extensions["health_history"] = HealthHistory()


def _start_timer() -> None:
    g.metrics_started = time.perf_counter()


def _observe(response: Response) -> Response:
    started = g.pop("metrics_started", None)
    if started is None:
        return response
    endpoint = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
    REQUESTS.labels(endpoint, request.method, str(response.status_code)).inc()
    LATENCY.labels(endpoint).observe(time.perf_counter() - started)
    if response.status_code >= 500:
        ERRORS.labels(endpoint).inc()
    strategy = g.get("strategy")  # set by /recommend's answer (app.api.recommend_answer)
    if strategy is not None and response.status_code == 200:
        RECOMMENDATIONS.labels(strategy).inc()
    return response


# -- collecting ----------------------------------------------------------------------------------
class _Registered:
    """The process's default registry as one collector (single-process mode)."""

    def collect(self):
        yield from REGISTRY.collect()


class JobCollector:
    """Batch run outcomes and durations, read from Redis at scrape time."""

    def __init__(self, store):
        self.store = store

    def collect(self):
        up = GaugeMetricFamily("recs_job_stats_up", "1 if the job counters could be read from Redis")
        try:
            stats = job_stats(self.store)
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        runs = CounterMetricFamily("recs_job_runs", "Nightly job runs by outcome", labels=["status"])
        for status in ("succeeded", "rejected", "failed", "skipped"):
            runs.add_metric([status], stats["runs"].get(status, 0))
        yield runs
        buckets = [(str(float(bound)), count) for bound, count in stats["duration_buckets"]]
        buckets.append(("+Inf", stats["duration_count"]))
        yield HistogramMetricFamily(
            "recs_job_duration_seconds", "Nightly job run time", buckets=buckets, sum_value=stats["duration_sum"]
        )
        if stats["last_success"]:
            last = GaugeMetricFamily("recs_job_last_success_timestamp_seconds", "When a run last made a version live")
            last.add_metric([], stats["last_success"])
            yield last


class OnlineCollector:
    """Impressions, clicks and watch-through per model version and experiment arm, read from Redis at scrape time."""

    METRICS = {
        "impressions": "Lists of titles shown (POST /impressions)",
        "shown": "Titles shown, over all impressions",
        "clicks": "First viewings of a shown title credited to its impression (attribution window)",
        "viewings": "Viewings credited to an impression",
        "completion": "Sum of the credited viewings' completion (watch seconds / episode length, at most 1)",
    }

    def __init__(self, store):
        self.store = store

    def collect(self):
        from models.attribution import totals

        up = GaugeMetricFamily("recs_online_stats_up", "1 if the online counters could be read from Redis")
        try:
            counts = totals(self.store.redis, self.store.keys)
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        for metric, help_text in self.METRICS.items():
            family = CounterMetricFamily(f"recs_online_{metric}", help_text, labels=["version", "arm"])
            for (version, arm), values in sorted(counts.items()):
                family.add_metric([version, arm], values.get(metric, 0.0))
            yield family


def service_registry() -> CollectorRegistry:
    """This server's request metrics: every worker's under gunicorn (multiprocess), else this process's."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_Registered())
    return registry


def metrics_view() -> Response:
    registry = service_registry()
    registry.register(JobCollector(current_app.extensions["live_model"].store))
    registry.register(OnlineCollector(current_app.extensions["live_model"].store))
    return Response(generate_latest(registry), mimetype="text/plain; version=0.0.4; charset=utf-8")


# -- health figures for the dashboard ----------------------------------------------------------------
def snapshot() -> dict:
    """Cumulative totals of the service's own traffic (all workers), for windowed figures."""
    totals = {"time": time.time(), "requests": 0.0, "errors": 0.0, "buckets": {}, "strategies": {}}
    for family in service_registry().collect():
        for sample in family.samples:
            endpoint = sample.labels.get("endpoint", "")
            if endpoint.startswith(NOT_SERVICE):
                continue
            if sample.name == "recs_http_requests_total":
                totals["requests"] += sample.value
            elif sample.name == "recs_http_errors_total":
                totals["errors"] += sample.value
            elif sample.name == "recs_http_request_duration_seconds_bucket":
                bound = float(sample.labels["le"])
                totals["buckets"][bound] = totals["buckets"].get(bound, 0.0) + sample.value
            elif sample.name == "recs_recommendations_total":
                strategy = sample.labels["strategy"]
                totals["strategies"][strategy] = totals["strategies"].get(strategy, 0.0) + sample.value
    return totals


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Like Prometheus' histogram_quantile: linear inside the bucket holding the q-th observation."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # past the last finite bucket: its bound is the best we can say
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower


def figures(older: dict | None, newer: dict) -> dict:
    """Rate, p50/p99 latency, error rate and fallback share between two snapshots (or since start)."""
    older = older or {"time": PROCESS_STARTED, "requests": 0.0, "errors": 0.0, "buckets": {}, "strategies": {}}
    seconds = max(newer["time"] - older["time"], 1e-9)
    requests = newer["requests"] - older["requests"]
    buckets = {b: c - older["buckets"].get(b, 0.0) for b, c in newer["buckets"].items()}
    answers = sum(newer["strategies"].values()) - sum(older["strategies"].values())
    popular = newer["strategies"].get("popular", 0.0) - older["strategies"].get("popular", 0.0)
    p50, p99 = quantile(0.5, buckets), quantile(0.99, buckets)
    return {
        "seconds": seconds,
        "requests": requests,
        "rate": requests / seconds,
        "p50_ms": None if p50 is None else 1000 * p50,
        "p99_ms": None if p99 is None else 1000 * p99,
        "error_rate": (newer["errors"] - older["errors"]) / requests if requests else None,
        "fallback_share": popular / answers if answers else None,
    }


class HealthHistory:
    """Snapshots taken while someone looks at the dashboard (at most one per ``every`` seconds).

    Every snapshot holds server-wide totals, so whichever worker answers has a
    valid (if sparser) series; nothing runs in the background.
    """

    def __init__(self, every: float = 5.0, keep: int = 360):
        self.every = every
        self.samples: deque[dict] = deque(maxlen=keep)
        self._lock = threading.Lock()

    def sample(self) -> dict:
        now = snapshot()
        with self._lock:
            if not self.samples or now["time"] - self.samples[-1]["time"] >= self.every:
                self.samples.append(now)
        return now

    def current(self, window: float = 300.0) -> dict:
        """Figures over the last ``window`` seconds, or since the server started if no older sample."""
        now = self.sample()
        with self._lock:
            older = [s for s in self.samples if now["time"] - window <= s["time"] < now["time"] - 1.0]
        result = figures(older[0] if older else None, now)
        result["since_start"] = not older
        return result

    def series(self) -> list[dict]:
        """Figures between consecutive snapshots, oldest first: the dashboard's charts."""
        with self._lock:
            samples = list(self.samples)
        return [{"time": b["time"], **figures(a, b)} for a, b in itertools.pairwise(samples)]
