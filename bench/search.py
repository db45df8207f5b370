"""Search benchmark: GET /search through production gunicorn, next to /healthz and /recommend, in one run.

    .venv/bin/python bench/search.py           # default demo data (5,000 users, 2,000 titles, 300k events)

The nightly job embeds the demo synopses (models.text) and publishes to a
private redis-server. gunicorn runs twice: with ``SEARCH_ENCODER=preload``
(every worker holds the encoder) and ``off``. ``wrk`` drives 8 connections at
``/healthz``, at ``/recommend`` (random real users) and at ``/search`` for
short queries (one fixed query, the issue's case, then 200 distinct ones
that miss the query cache on their first use). Both services run side by
side and the rounds alternate between them, so both see the same neighbours. Reported:
req/s, p50/p99, errors, ratios to ``/healthz``, RSS/PSS per worker, and the
job's encoding rate (titles per second on this machine's 2 cores).

Targets (issue 14): /search p99 <= 30 ms for a short query at 8 connections;
the encoder must not drop /recommend below 0.6 x /healthz: met when the
ratio with the encoder is >= 0.6, or (when /recommend is below 0.6 without
the encoder too: issue 16's per-user Redis read) >= 90 % of the ratio
without it in the same run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

from harness import RedisServer, children_of, demo_data, machine, mb, memory_of
from serve import WRK_DONE, WRK_SCRIPT, combine, measured_wrk, require_tool, run_wrk, start_gunicorn

ENCODER_TOLERANCE = 0.9  # rounds of one run differ by more than 10 % on this machine (docs/benchmarks.md)
QUERIES = [
    "thieves plan one last job", "astronauts lost in space", "a courtroom drama", "a haunted house", "a chef and her kitchen",
    "a boxer's comeback", "a royal succession", "survivors on an island", "a detective and a killer", "a time loop",
]  # fmt: skip


def main() -> int:
    wrk = require_tool("wrk", "wrk")
    print(f"machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M %Z')}")
    data = demo_data(5000, 2000, 300_000, 42)
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp_name, RedisServer(Path(tmp_name)) as server:
        tmp = Path(tmp_name)
        env = dict(os.environ, REDIS_URL=server.url, REDIS_PREFIX="recs", PYTHONPATH=str(Path(__file__).resolve().parents[1]),
                   TEXT_CACHE=str(tmp / "text-cache"))  # fmt: skip
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "jobs.nightly", "--events", str(data["events"]), "--catalog",
                              str(data["catalog"]), "--quiet", "--no-eval"], env=env, capture_output=True, text=True)  # fmt: skip
        if out.returncode != 0:
            sys.exit(f"nightly job failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        import redis as redis_lib

        from models.store import ModelStore

        store = ModelStore(redis_lib.Redis.from_url(server.url), "recs")
        meta = store.meta(store.live_version())
        text = meta["text"]
        print(f"model: nightly job {time.perf_counter() - started:.0f}s; text: {text['encoded']} synopses encoded at "
              f"{text['titles_per_second']} titles/s -> 30,000 titles ~{30000 / text['titles_per_second']:.0f} s on a first run")  # fmt: skip
        users = json.loads(store.fetch_part(meta["model_version"], "users.json", meta["parts"]["users.json"]))
        users_file = tmp / "users.txt"
        users_file.write_text("\n".join(users) + "\n")
        queries_file = tmp / "queries.txt"
        queries_file.write_text("\n".join(urllib.parse.quote(f"{q} {n}") for n in range(20) for q in QUERIES) + "\n")
        # Both services run side by side and the rounds alternate between them, so the encoder's effect
        # on /recommend is not confounded with the machine's load drifting between two sequential runs.
        (tmp / "h.lua").write_text(WRK_DONE)
        (tmp / "r.lua").write_text(
            WRK_SCRIPT % {"users": users_file, "done": WRK_DONE, "path": "/recommend", "suffix": ""}
        )
        fixed = WRK_SCRIPT.replace(
            '"%(path)s?user=" .. ids[math.random(#ids)] .. "%(suffix)s"', '"/search?q=heist%%20in%%20space"'
        )
        (tmp / "s.lua").write_text(fixed % {"users": users_file, "done": WRK_DONE})
        many = WRK_SCRIPT.replace(
            '"%(path)s?user=" .. ids[math.random(#ids)] .. "%(suffix)s"', '"/search?q=" .. ids[math.random(#ids)]'
        )
        (tmp / "q.lua").write_text(many % {"users": queries_file, "done": WRK_DONE})
        servers, scripts = {}, {}
        try:
            for mode in ("preload", "off"):
                process, base = start_gunicorn(
                    server.url, tmp / f"models-{mode}", {"name": mode, "env": {"SEARCH_ENCODER": mode}}
                )
                servers[mode] = (process, base, children_of(process.pid))
                if mode == "preload":  # every worker's encoder is loaded
                    deadline = time.monotonic() + 120
                    while subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{base}/search?q=warm"],
                                         capture_output=True, text=True).stdout != "200":  # fmt: skip
                        if time.monotonic() > deadline:
                            sys.exit("the search encoder did not load in 120 s")
                        time.sleep(0.5)
                scripts[mode] = {
                    "health": (tmp / "h.lua", "/healthz", WRK_DONE),
                    "recommend": (tmp / "r.lua", "/recommend", None),
                }
                if mode == "preload":
                    scripts[mode]["search"] = (tmp / "s.lua", "/search", None)
                    scripts[mode]["search_many"] = (tmp / "q.lua", "/search", None)
            args = type("A", (), {"seconds": 5.0, "connections": 8, "wrk_threads": 2})()
            for mode, (_, base, _) in servers.items():
                for script, path, _ in scripts[mode].values():
                    run_wrk(wrk, f"{base}{path}", script, 3, 8, 2)  # warm-up
            rounds = {mode: {name: [] for name in scripts[mode]} for mode in servers}
            for _ in range(3):
                for mode, (_, base, workers) in servers.items():
                    for name, (script, path, _) in scripts[mode].items():
                        rounds[mode][name].append(measured_wrk(wrk, f"{base}{path}", script, args, workers))
            results = {mode: {name: combine(r) for name, r in rounds[mode].items()} for mode in servers}
            for mode, (_, _, workers) in servers.items():
                results[mode]["memory"] = {pid: memory_of(pid) for pid in workers}
        finally:
            for process, _, _ in servers.values():
                process.terminate()
                process.wait(30)
        ok = True
        for mode, result in results.items():
            h = result["health"]
            print(f"\n== SEARCH_ENCODER={mode} ==")
            for name, m in result.items():
                if name == "memory":
                    continue
                print(f"  {name:<12} {m['rps']:>7.0f} req/s  p50 {m['p50_ms']:6.2f} ms  p99 {m['p99_ms']:6.2f} ms  "
                      f"errors {m['errors']}  ratio to /healthz {m['rps'] / h['rps']:.2f}  worker CPU/req {m['cpu_us']:.0f} us  "
                      f"connections per worker {' '.join(m['spreads'])}")  # fmt: skip
                ok &= m["errors"] == 0
            for pid, mem in result["memory"].items():
                print(f"  worker {pid}: RSS {mb(mem.get('rss', 0))}, PSS {mb(mem.get('pss', 0))}")
        search = results["preload"]["search"]
        ratio = {mode: results[mode]["recommend"]["rps"] / results[mode]["health"]["rps"] for mode in results}
        cpu = {mode: results[mode]["recommend"]["cpu_us"] for mode in results}
        # Issue 14: the encoder must not push /recommend below 0.6 x /healthz. Whether /recommend reaches
        # 0.6 at all is the serving benchmark's (bench/serve.py) concern; here, what the encoder changes.
        encoder_ok = ratio["preload"] >= 0.6 or ratio["preload"] >= ENCODER_TOLERANCE * ratio["off"]
        ok &= search["p99_ms"] <= 30 and encoder_ok
        print(f"\n/search p99 {search['p99_ms']:.1f} ms (target <= 30); /recommend {ratio['preload']:.2f} x /healthz with the "
              f"encoder, {ratio['off']:.2f} without (worker CPU per request {cpu['preload']:.0f} / {cpu['off']:.0f} us): "
              f"the encoder {'keeps' if encoder_ok else 'drops'} it (target: >= 0.6, or >= {ENCODER_TOLERANCE:.0%} of the "
              f"ratio without the encoder when that is below 0.6) -> {'MEETS' if ok else 'MISSES'}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
