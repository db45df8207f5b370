"""The service on a Redis Cluster (3 masters, 3 replicas) next to one redis-server, in one run.

    .venv/bin/python bench/cluster.py [--users 20000 --items 3000 --events 400000]

For each store the same demo data is published by the nightly job (timed),
then production gunicorn is loaded with wrk: ``/healthz``, ``/recommend``
(random known users) and ``POST /events`` (10-event batches of random users;
on the cluster each confirmed by a replica, ``WAIT``). Rounds alternate so
noisy neighbours hit both alike. The baseline of every figure is the same
request against the single node in the same run; the cluster's own
``/recommend`` ÷ ``/healthz`` ratio is reported too. Last, a failover: one
master is killed while writers post events, and the seconds until its slots
are served again and until writes to them are accepted are printed.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import REPO_ROOT, children_of, demo_data, machine, require_tool, run_measured
from serve import WRK_DONE, WRK_SCRIPT, measured_wrk, run_wrk, start_gunicorn, wait_until_idle

sys.path.insert(0, str(REPO_ROOT))
from tests.cluster import RedisCluster  # noqa: E402 (the same launchers the tests use)
from tests.conftest import RedisServer as SingleNode  # noqa: E402

PREFIX = "recs"  # serve.start_gunicorn's

EVENTS_SCRIPT = r"""
-- POST /events: 10 events of random users (unique per request) for random titles.
local titles = {}
for line in io.lines("%(titles)s") do titles[#titles + 1] = line end
local counter = 0
function setup(thread) counter = counter + 1; thread:set("seed", counter) end
function init(args) math.randomseed(os.time() * 1000 + (seed or 0)) end
local n = 0
request = function()
  n = n + 1
  local parts = {}
  for k = 1, 10 do
    parts[k] = string.format('{"user_id":"bench-%%d-%%d-%%d","item_id":"%%s","timestamp":%%d}',
      seed or 0, n, k, titles[math.random(#titles)], 1700000000 + n)
  end
  return wrk.format("POST", "/events", {["Content-Type"] = "application/json"}, "[" .. table.concat(parts, ",") .. "]")
end
%(done)s
"""


def publish(events: Path, catalog: Path, env: dict) -> float:
    cmd = [sys.executable, "-m", "jobs.nightly", "--events", str(events), "--catalog", str(catalog), "--quiet", "--no-eval", "--prefix", PREFIX]
    code, seconds, _, tail = run_measured(cmd, dict(os.environ, **env))
    if code != 0:
        sys.exit(f"error: the nightly job failed:\n{tail}")
    return seconds


def measure(args, wrk: str, redis_url: str, env: dict, tmp: Path, users: Path, titles: Path) -> dict:
    process, base = start_gunicorn(redis_url, tmp / "models", {"env": {**env, "GUNICORN_ACCESSLOG": "off"}})
    try:
        workers = children_of(process.pid)
        wait_until_idle(workers)
        scripts = {"healthz": tmp / "healthz.lua", "recommend": tmp / "recommend.lua", "events": tmp / "events.lua"}
        scripts["healthz"].write_text(WRK_DONE)
        scripts["recommend"].write_text(WRK_SCRIPT % {"users": users, "done": WRK_DONE, "path": "/recommend", "suffix": ""})
        scripts["events"].write_text(EVENTS_SCRIPT % {"titles": titles, "done": WRK_DONE})
        paths = {"healthz": "/healthz", "recommend": "/recommend", "events": "/events"}
        for name, script in scripts.items():
            run_wrk(wrk, base + paths[name], script, args.warmup, args.connections, 2)
        rounds = collections.defaultdict(list)
        for _ in range(args.rounds):
            for name, script in scripts.items():
                rounds[name].append(measured_wrk(wrk, base + paths[name], script, args, workers))
    finally:
        process.terminate()
        process.wait(30)
    out = {}
    for name, results in rounds.items():
        requests = sum(r["requests"] for r in results)
        out[name] = {
            "rps": requests / sum(r["seconds"] for r in results),
            "p50": statistics.median(r["p50_ms"] for r in results),
            "p99": statistics.median(r["p99_ms"] for r in results),
            "cpu_us": statistics.median(r["cpu_us"] for r in results),
            "errors": sum(r["errors"] for r in results),
            "rounds_p99": [round(r["p99_ms"], 1) for r in results],
        }
    return out


def failover(nodes: RedisCluster, redis_url: str, env: dict, tmp: Path, titles: list[str]) -> str:
    """Kill the master of the most event shards under writers; seconds to failover and to accepted writes."""
    from models.store import ModelStore, redis_from_url
    from tests.helpers import post_json

    store = ModelStore(redis_from_url(redis_url, cluster=True), PREFIX)
    owners = {s: nodes.master_of(store.keys.events_stream_of(s)) for s in range(store.keys.shards)}
    victim = collections.Counter(owners.values()).most_common(1)[0][0]
    moved = {s for s, port in owners.items() if port == victim}
    process, base = start_gunicorn(redis_url, tmp / "models-failover", {"env": env})
    results, stop, killed = collections.Counter(), threading.Event(), []
    first_ok: list[float] = []

    def writer(worker: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            user = f"fo-{worker}-{n}"
            sent = time.monotonic()
            try:
                status, _ = post_json(f"{base}/events", {"user_id": user, "item_id": titles[n % len(titles)], "timestamp": 1_700_000_000 + n}, timeout=10)
            except OSError:
                status = "error"
            results[status] += 1
            if status == 200 and killed and sent > killed[0] and store.keys.user_shard(user) in moved and not first_ok:
                first_ok.append(time.monotonic() - killed[0])

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(3)
        killed.append(time.monotonic())
        nodes.kill(victim)
        seconds = nodes.wait_failover(victim)
        time.sleep(5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(20)
        process.terminate()
        process.wait(30)
    recovered = f"{first_ok[0]:.1f} s" if first_ok else "not within 5 s"
    return (f"failover: killed the master of {len(moved)} of {store.keys.shards} event shards; its replica served its slots "
            f"after {seconds:.1f} s; writes to those shards accepted again {recovered} after the kill; answers {dict(results)}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=3_000)
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args(argv)
    args.wrk_threads = 2
    wrk = require_tool("wrk", "wrk")
    print(f"machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M %Z')}")
    data = demo_data(args.users, args.items, args.events, 7)
    import pyarrow.parquet as pq

    results, jobs = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp_name:
        tmp = Path(tmp_name)
        users = tmp / "users.txt"
        users.write_text("\n".join(sorted(set(pq.read_table(data["events"], columns=["user_id"]).column(0).to_pylist()))[:5000]))
        title_ids = pq.read_table(data["catalog"], columns=["item_id"]).column(0).to_pylist()
        titles = tmp / "titles.txt"
        titles.write_text("\n".join(title_ids))
        for name in ("single", "cluster"):
            (tmp / name).mkdir()
            if name == "single":  # AOF on (everysec), as every cluster node: the same durability work
                server = SingleNode(tmp / name)
                server.start()
                url, env = server.url, {"REDIS_CLUSTER": "0"}
            else:
                server = RedisCluster(tmp / name)
                server.start()
                url, env = server.url, {"REDIS_CLUSTER": "1"}
            try:
                if name == "single":
                    publish(data["events"], data["catalog"], {"REDIS_URL": url, **env})  # warms the text cache: untimed
                jobs[name] = publish(data["events"], data["catalog"], {"REDIS_URL": url, **env})
                print(f"{name}: published in {jobs[name]:.1f} s", flush=True)
                results[name] = measure(args, wrk, url, env, tmp / name, users, titles)
                if name == "cluster":
                    print(failover(server, url, env, tmp / name, title_ids[:200]))
            finally:
                server.stop()
    print(f"\n{args.users:,} users, {args.items:,} titles, {args.events:,} events; gunicorn as in production, wrk -c{args.connections}")
    print(f"nightly job (--no-eval): single node {jobs['single']:.1f} s, cluster {jobs['cluster']:.1f} s, ratio {jobs['cluster'] / jobs['single']:.2f}")
    print(f"{'endpoint':<12} {'single req/s':>12} {'p99 ms':>7} {'cluster req/s':>14} {'p99 ms':>7} {'cluster/single':>15} {'errors':>7}")
    for name in ("healthz", "recommend", "events"):
        a, b = results["single"][name], results["cluster"][name]
        print(f"{name:<12} {a['rps']:12.0f} {a['p99']:7.1f} {b['rps']:14.0f} {b['p99']:7.1f} {b['rps'] / a['rps']:15.2f} {a['errors'] + b['errors']:7d}")
    for name in ("single", "cluster"):
        print(f"{name}: p99 per round (ms): " + "; ".join(f"{e} {results[name][e]['rounds_p99']}" for e in ("healthz", "recommend", "events")))
    for name in ("single", "cluster"):
        r = results[name]
        print(f"{name}: /recommend ÷ /healthz {r['recommend']['rps'] / r['healthz']['rps']:.2f}; worker CPU per request "
              f"healthz {r['healthz']['cpu_us']:.0f} µs, recommend {r['recommend']['cpu_us']:.0f} µs, events (10) {r['events']['cpu_us']:.0f} µs")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
