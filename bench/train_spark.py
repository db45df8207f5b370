"""Training at scale with both engines: the nightly job on Spark (local[2]) next to the implicit engine.

    .venv/bin/python bench/train_spark.py                       # 5M, 10M and 20M events
    .venv/bin/python bench/train_spark.py --events 5000000 --no-eval

For each size, demo data (users and titles grown with the events as
bench/train_scale.py grows them: 150k users and 30k titles at 20M) is
trained by ``python -m jobs.nightly --dry-run`` once per engine, in the same
run, one after the other. Printed per engine: the wall time, the job's own
step timings, the peak RSS of the Python driver (ru_maxrss), and for Spark
the peak RSS of its JVM (in local mode the JVM is the driver and the
executors in one process, sampled every 0.5 s). The engines' ratio is the
comparison: both run the same steps on the same 2 cores.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from harness import REPO_ROOT, demo_data, machine, mb

SIZES = (5_000_000, 10_000_000, 20_000_000)


def tree_rss(pid: int) -> dict[str, int]:
    """RSS of ``pid``'s descendants by command name (java, python)."""
    out: dict[str, int] = {}
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
            if current == pid:
                continue
            name = Path(f"/proc/{current}/comm").read_text().strip()
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[name] = out.get(name, 0) + int(line.split()[1]) * 1024
        except (OSError, ValueError):
            continue
    return out


def run_job(engine: str, data: dict, evaluate: bool, redis_url: str | None = None) -> dict:
    """One job; ``redis_url``: publish there (per-user records: Spark's executors write them), else ``--dry-run``."""
    cmd = [sys.executable, "-m", "jobs.nightly", "--events", str(data["events"]), "--catalog", str(data["catalog"]),
           "--quiet", "--engine", engine]  # fmt: skip
    cmd += ["--prefix", f"bench-{engine}"] if redis_url else ["--dry-run"]
    if not evaluate:
        cmd.append("--no-eval")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TEXT_EMBEDDINGS="0", SPARK_MASTER="local[2]",
               SPARK_DRIVER_MEMORY=os.environ.get("SPARK_DRIVER_MEMORY", "8g"))  # fmt: skip
    if redis_url:
        env["REDIS_URL"] = redis_url
    started = time.perf_counter()
    process = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    peaks: dict[str, int] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for name, rss in tree_rss(process.pid).items():
                peaks[name] = max(peaks.get(name, 0), rss)
            done.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    done.set()
    sampler.join()
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"error: the {engine} job failed with exit code {code}:\n{out}")
    timings = dict(re.findall(r"(\w+) ([\d.]+)s", out.split("timings:", 1)[1].splitlines()[0])) if "timings:" in out else {}
    return {"wall": wall, "driver_rss": usage.ru_maxrss * 1024, "jvm_rss": peaks.get("java", 0), "timings": timings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", default=",".join(map(str, SIZES)), help="comma-separated event counts")
    parser.add_argument("--no-eval", action="store_true", help="train and rank only (no selection or holdout)")
    parser.add_argument("--engines", default="implicit,spark")
    parser.add_argument("--publish", action="store_true", help="publish to a redis-server started here (the executors "
                        "write the per-user records) instead of --dry-run (the driver collects the per-user parts)")
    args = parser.parse_args(argv)
    if args.publish:
        import tempfile

        from harness import RedisServer

        with tempfile.TemporaryDirectory(prefix="bench-train-spark-") as tmp, RedisServer(Path(tmp)) as server:
            return run_all(args, server.url)
    return run_all(args, None)


def run_all(args, redis_url: str | None) -> int:
    print(f"machine: {machine()}", flush=True)
    engines = args.engines.split(",")
    rows = []
    for events in (int(e) for e in args.events.split(",")):
        users, items = max(1000, int(150_000 * events / 20e6)), max(500, int(30_000 * (events / 20e6) ** 0.5))
        data = demo_data(users, items, events, 11)
        for engine in engines:
            print(f"{events:,} events ({users:,} users, {items:,} titles): {engine} ...", flush=True)
            result = run_job(engine, data, not args.no_eval, redis_url)
            rows.append((events, engine, result))
            steps = ", ".join(f"{k} {float(v):.1f}s" for k, v in result["timings"].items())
            print(
                f"  {engine:<8} wall {result['wall']:7.1f}s   driver RSS {mb(result['driver_rss'])}"
                + (f"   JVM RSS {mb(result['jvm_rss'])}" if result["jvm_rss"] else "")
                + f"\n    steps: {steps}",
                flush=True,
            )
    print("\nevents       engine    wall s   driver RSS   JVM RSS    spark / implicit")
    walls = {(e, g): r["wall"] for e, g, r in rows}
    for events, engine, result in rows:
        ratio = walls[(events, engine)] / walls[(events, "implicit")] if (events, "implicit") in walls else float("nan")
        print(
            f"{events:>11,}  {engine:<8} {result['wall']:7.1f}   {mb(result['driver_rss']):>10}   "
            f"{mb(result['jvm_rss']) if result['jvm_rss'] else '-':>8}    {ratio:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
