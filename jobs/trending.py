"""Refresh the trending titles without retraining: ``python -m jobs.trending``.

Reads the same input as the nightly job (``--events``/``EVENTS_PATH``,
``--catalog``/``CATALOG_PATH``, the ``EVENTS_ARCHIVE`` files) plus every entry
of the live events stream, through the data contract's loader, and writes the
record of :mod:`models.trending` to Redis. The scheduler runs it every
``TRENDING_SECONDS`` (3600); with system cron use the hourly line in
``deploy/crontab``. Exit codes: 0 written, 1 failed, 2 bad input data.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

import orjson

from models.data import DataError, load_catalog, load_events
from models.live_events import take_for_job
from models.store import ModelStore, redis_from_url
from models.trending import trending_record

log = logging.getLogger("jobs.trending")


def refresh(store: ModelStore, events: str, catalog: str, archive: str | None = None) -> int:
    """Compute and store the trending record; returns how many titles trend."""
    with tempfile.TemporaryDirectory(prefix="trending-") as tmp:
        _, live_files = take_for_job(store, tmp, archive)
        spec = ",".join([events, *map(str, live_files)])
        loaded_catalog, _ = load_catalog(catalog)
        loaded, _ = load_events(spec, loaded_catalog)
    record = trending_record(list(loaded_catalog.item_ids), loaded.item, loaded.timestamp)
    store.redis.set(store.keys.trending, record)
    count = len(orjson.loads(record)["items"])
    log.info("trending: %d titles from %d events", count, len(loaded))
    return count


def main(argv: list[str] | None = None) -> int:
    from app.logs import configure_logging

    configure_logging()
    parser = argparse.ArgumentParser(prog="python -m jobs.trending", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", default=os.environ.get("EVENTS_PATH"))
    parser.add_argument("--catalog", default=os.environ.get("CATALOG_PATH"))
    parser.add_argument("--events-archive", default=os.environ.get("EVENTS_ARCHIVE") or None)
    parser.add_argument("--prefix", default=os.environ.get("REDIS_PREFIX", "recs"))
    args = parser.parse_args(argv)
    if not args.events or not args.catalog:
        parser.error("--events and --catalog are required (or set EVENTS_PATH and CATALOG_PATH)")
    store = ModelStore(redis_from_url(), args.prefix)
    try:
        refresh(store, args.events, args.catalog, args.events_archive)
    except DataError as exc:
        print(f"error: bad input data: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        log.error("trending refresh failed: %r", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
