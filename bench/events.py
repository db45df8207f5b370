"""Cost of POST /events validation, and what hostile posters do to everyone else.

    .venv/bin/python bench/events.py

1. ``validate_event_records`` on 1000-event batches (unix seconds, ISO-8601,
   and every field wrong), next to the baseline of parsing the same body with
   ``orjson.loads`` (work any JSON endpoint must do), best of 20, in one run.
2. Production gunicorn on a small published demo model: ``/healthz`` latency
   alone, then while two clients post rejected 1000-event batches as fast as
   they are answered. Reports median and p99 of each and the ratio.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
from harness import RedisServer, demo_data, gunicorn, machine, run_measured

from models.data import validate_event_records

NOW = int(time.time()) - 3600


def batches() -> dict[str, list[dict]]:
    unix = [{"user_id": f"user-{n}", "item_id": f"t{n % 500}", "timestamp": NOW + n, "watch_seconds": 1500} for n in range(1000)]
    iso = [{**e, "timestamp": "2026-11-20T20:00:00Z"} for e in unix]
    bad = [{"user_id": "", "item_id": None, "timestamp": "soon", "watch_seconds": -1}] * 1000
    return {"unix seconds": unix, "ISO-8601": iso, "all fields wrong": bad}


def validation_cost() -> None:
    print("validation of one 1000-event batch (best of 20):")
    for name, batch in batches().items():
        body = orjson.dumps(batch)
        parse = check = float("inf")
        for _ in range(20):
            started = time.perf_counter()
            records = orjson.loads(body)
            parse = min(parse, time.perf_counter() - started)
            started = time.perf_counter()
            validate_event_records(records)
            check = min(check, time.perf_counter() - started)
        print(f"  {name:<17} validate {check * 1000:7.2f} ms   orjson.loads baseline {parse * 1000:5.2f} ms   ratio {check / parse:5.1f}x")


def healthz_latencies(base: str, seconds: float) -> list[float]:
    out, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        with urllib.request.urlopen(f"{base}/healthz", timeout=10) as response:
            response.read()
        out.append(time.perf_counter() - started)
    return out


def poster(base: str, body: bytes, stop: threading.Event, counts: list[int]) -> None:
    while not stop.is_set():
        request = urllib.request.Request(f"{base}/events", data=body, headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=10).read()
        except urllib.error.HTTPError as exc:
            exc.read()
            counts.append(exc.code)


def summary(latencies: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies)
    return statistics.median(ordered) * 1000, ordered[int(0.99 * (len(ordered) - 1))] * 1000


def under_hostile_posters(seconds: float = 8.0) -> None:
    data = demo_data(600, 300, 30000, 3, "csv")
    with tempfile.TemporaryDirectory(prefix="bench-events-") as tmp, RedisServer(Path(tmp)) as redis_server:
        env = {"REDIS_URL": redis_server.url}
        cmd = [sys.executable, "-m", "jobs.nightly", "--events", str(data["events"]), "--catalog", str(data["catalog"]), "--quiet", "--no-eval"]
        code, *_ = run_measured(cmd, env)
        if code != 0:
            sys.exit("error: the nightly job failed")
        bad = orjson.dumps(batches()["all fields wrong"])
        with gunicorn(redis_server.url) as base:
            healthz_latencies(base, 1.0)  # warm up
            alone = healthz_latencies(base, seconds)
            stop, counts = threading.Event(), []
            threads = [threading.Thread(target=poster, args=(base, bad, stop, counts)) for _ in range(2)]
            for thread in threads:
                thread.start()
            loaded = healthz_latencies(base, seconds)
            stop.set()
            for thread in threads:
                thread.join(15)
    (m0, p0), (m1, p1) = summary(alone), summary(loaded)
    print(f"/healthz alone: median {m0:.2f} ms, p99 {p0:.2f} ms ({len(alone)} requests)")
    print(f"/healthz with 2 clients posting rejected 1000-event batches ({len(counts)} batches, all "
          f"{sorted(set(counts))}): median {m1:.2f} ms, p99 {p1:.2f} ms; median ratio {m1 / m0:.2f}x")


def main() -> int:
    print(f"machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M %Z')}")
    validation_cost()
    under_hostile_posters()
    return 0


if __name__ == "__main__":
    sys.exit(main())
