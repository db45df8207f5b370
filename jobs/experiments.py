"""Run an online experiment between kept model versions: ``python -m jobs.experiments``.

    python -m jobs.experiments start "ranker v2" --arm control=VERSION_A:0.5 --arm treatment=VERSION_B:0.5 [--mde 0.05]
    python -m jobs.experiments status [--id ID]     # JSON on stdout (the running one, or a kept one)
    python -m jobs.experiments stop                 # everyone gets the live version again; results stay
    python -m jobs.experiments promote treatment    # that arm's version goes live (atomic switch), experiment ends
    python -m jobs.experiments list                 # kept experiments, newest first (JSON)
    python -m jobs.experiments baseline VERSION     # publish a popularity-only twin of VERSION (not live), for an arm

Every serving worker picks a start, stop or promote up within
``MODEL_POLL_SECONDS`` (at once by pub/sub), without a restart. Exit codes:
0 done, 2 refused (the message says why), 1 Redis unreachable.
"""

from __future__ import annotations

import argparse
import os
import sys

import orjson
import redis

from models import experiments
from models.store import ModelError, ModelStore, redis_from_url


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.experiments", description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--prefix", default=os.environ.get("REDIS_PREFIX", "recs"))
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start an experiment")
    start.add_argument("name")
    start.add_argument("--arm", action="append", required=True, metavar="NAME=VERSION:SHARE",
                       help="an arm: its name, a kept version and its share of users (shares sum to 1)")  # fmt: skip
    start.add_argument("--mde", type=float, default=experiments.DEFAULT_MDE,
                       help="smallest relative lift worth detecting (default 0.05): sets the test's scale and the users needed")  # fmt: skip
    status = commands.add_parser("status", help="the experiment's arms, counts and comparison, as JSON")
    status.add_argument("--id", help="a kept experiment's id (default: the running one)")
    commands.add_parser("stop", help="end the running experiment")
    promote = commands.add_parser("promote", help="make an arm's version live and end the experiment")
    promote.add_argument("arm")
    commands.add_parser("list", help="kept experiments, newest first")
    baseline = commands.add_parser("baseline", help="publish a popularity-only twin of a version (not live)")
    baseline.add_argument("version")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    store = ModelStore(redis_from_url(args.redis_url), args.prefix)
    try:
        if args.command == "start":
            arms = [experiments.parse_arm(text) for text in args.arm]
            started = experiments.start(store, args.name, arms, mde=args.mde)
            _print(experiments.status(store, started))
        elif args.command == "status":
            found = experiments.find(store, args.id)
            if found is None:
                raise experiments.ExperimentError("no experiment is running" if args.id is None else f"no kept experiment {args.id!r}")
            _print(experiments.status(store, found))
        elif args.command == "stop":
            _print(experiments.stop(store))
        elif args.command == "promote":
            _print(experiments.promote(store, args.arm))
        elif args.command == "baseline":
            _print({"version": experiments.publish_baseline(store, args.version), "baseline_of": args.version})
        else:
            _print(experiments.history(store))
    except (experiments.ExperimentError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except redis.RedisError as exc:
        print(f"error: Redis is unreachable: {exc}", file=sys.stderr)
        return 1
    return 0


def _print(document) -> None:
    sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")


if __name__ == "__main__":
    sys.exit(main())
