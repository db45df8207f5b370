"""Live events: the durable stream of accepted viewings and each user's fresh-history overlay.

Shared by the service (``POST /events`` appends, ``/recommend`` reads one
user's overlay) and the nightly job (takes the stream into its input). Key
names come from :class:`models.store.Keys`; user ids only ever appear inside
stream entries and as hash *fields*, never in a key name::

    {prefix}:events   stream; one entry per accepted event: u, i, t (unix s), w ('' if unknown)
    {prefix}:fresh    hash; field = user id, value = that user's newest entries,
                      "stream-id<TAB>item<TAB>t<TAB>w" lines, oldest first, capped in bytes

Exactly once into the model: the job snapshots the stream's last id before it
loads anything, trains on the files plus every stream entry up to and
including that id, and records the id in the published version's metadata
(``live_events.consumed_through``), which becomes live in the same atomic
pointer switch as the model. Nothing is consumed before the switch, so a
crash anywhere before it leaves nothing half-done: the next run reads the same
entries again (plus newer ones). Only after a switch does :func:`compact`
archive (to Parquet, ``EVENTS_ARCHIVE``) and trim the entries every kept
version has; from then on the job reads the archive plus the stream after it. Each entry has a unique id,
so it is in a model at most once; the overlay shows only entries newer than
the serving version's ``consumed_through``, so an event is either in the
model's history or in the overlay, never in both. Events that arrive while
the job runs get ids above the snapshot and wait for the next night.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import redis

from models.data import LiveEvent
from models.store import Keys

STREAM_START = "0-0"  # "nothing consumed yet"
FRESH_MAX_BYTES = 16 * 1024  # per user: the newest ~400 events with short ids (~40 bytes a line); bounds the read
READ_BATCH = 10_000

# One atomic step per batch: append every event to the stream and to its user's overlay.
# A Lua script runs alone in Redis and is written to the AOF as one unit.
_APPEND = """
local max_bytes = tonumber(ARGV[1])
local ids = {}
local users = {}
for n = 2, #ARGV, 4 do
  local user, item, ts, ws = ARGV[n], ARGV[n + 1], ARGV[n + 2], ARGV[n + 3]
  users[#users + 1] = user
  local id = redis.call('XADD', KEYS[1], '*', 'u', user, 'i', item, 't', ts, 'w', ws)
  local entry = id .. '\\t' .. item .. '\\t' .. ts .. '\\t' .. ws
  local old = redis.call('HGET', KEYS[2], user)
  local value = entry
  if old then value = old .. '\\n' .. entry end
  if #value > max_bytes then
    local cut = string.find(value, '\\n', #value - max_bytes, true)
    if cut then value = string.sub(value, cut + 1) end
  end
  redis.call('HSET', KEYS[2], user, value)
  ids[#ids + 1] = id
end
-- Tell every serving worker which users now have fresh history (see app.live_model).
redis.call('PUBLISH', KEYS[3], table.concat(users, '\\n'))
return ids
"""

# Drop overlay lines a live model already contains (ids <= the consumed id); empty users go.
_PRUNE = """
local cms, cseq = tonumber(ARGV[1]), tonumber(ARGV[2])
local removed = 0
for n = 3, #ARGV do
  local value = redis.call('HGET', KEYS[1], ARGV[n])
  if value then
    local kept = {}
    for line in string.gmatch(value, '[^\\n]+') do
      local ms, seq = string.match(line, '^(%d+)-(%d+)\\t')
      ms, seq = tonumber(ms), tonumber(seq)
      if ms > cms or (ms == cms and seq > cseq) then kept[#kept + 1] = line else removed = removed + 1 end
    end
    if #kept == 0 then
      redis.call('HDEL', KEYS[1], ARGV[n])
    else
      redis.call('HSET', KEYS[1], ARGV[n], table.concat(kept, '\\n'))
    end
  end
end
return removed
"""


def parse_stream_id(stream_id: str | bytes) -> tuple[int, int]:
    """``"1700000000000-3"`` -> (1700000000000, 3), comparable as a tuple."""
    if isinstance(stream_id, bytes):
        stream_id = stream_id.decode()
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def consumed_through(meta: dict | None) -> str:
    """The last stream id a version's training included (``0-0`` for versions without any)."""
    info = (meta or {}).get("live_events") or {}
    return info.get("consumed_through") or STREAM_START


class EventLog:
    """The stream and the overlay for one key prefix."""

    def __init__(self, client: redis.Redis, keys: Keys):
        self.redis = client
        self.keys = keys
        self._append = client.register_script(_APPEND)
        self._prune = client.register_script(_PRUNE)

    # -- the service -------------------------------------------------------------------
    def append(self, events: list[LiveEvent]) -> list[str]:
        """Store ``events`` durably (stream) and in their users' overlays, atomically. Their stream ids."""
        args: list = [FRESH_MAX_BYTES]
        for event in events:
            seconds = "" if event.watch_seconds is None else repr(float(event.watch_seconds))
            args += [event.user_id, event.item_id, str(int(event.timestamp)), seconds]
        ids = self._append(keys=[self.keys.events_stream, self.keys.fresh_history, self.keys.fresh_channel], args=args)
        return [i.decode() if isinstance(i, bytes) else i for i in ids]

    def fresh_raw(self, user_id: str) -> bytes | None:
        """The user's overlay as stored: one HGET (the request path pipelines the same HGET with the
        user's record, app.live_model)."""
        return self.redis.hget(self.keys.fresh_history, user_id)

    # -- the nightly job -----------------------------------------------------------------
    def snapshot(self) -> str:
        """Id of the newest stream entry now (``0-0`` if the stream is empty): the job's upper bound."""
        last = self.redis.xrevrange(self.keys.events_stream, "+", "-", count=1)
        return last[0][0].decode() if last else STREAM_START

    def read(self, upto: str, after: str = STREAM_START) -> Iterator[tuple[str, LiveEvent]]:
        """Every stream entry with ``after`` < id <= ``upto``, oldest first, in batches."""
        if parse_stream_id(upto) <= parse_stream_id(after):
            return
        start = "-" if parse_stream_id(after) == (0, 0) else "(" + after
        while True:
            batch = self.redis.xrange(self.keys.events_stream, start, upto, count=READ_BATCH)
            for entry_id, fields in batch:
                seconds = fields.get(b"w", b"")
                yield (
                    entry_id.decode(),
                    LiveEvent(
                        fields[b"u"].decode(),
                        fields[b"i"].decode(),
                        int(fields[b"t"]),
                        float(seconds) if seconds else None,
                    ),
                )
            if len(batch) < READ_BATCH:
                return
            start = "(" + batch[-1][0].decode()

    def export(self, path: str | Path, upto: str, after: str = STREAM_START) -> int:
        """Write the entries in (``after``, ``upto``] as an events Parquet file for :func:`models.data.load_events`."""
        events = [event for _, event in self.read(upto, after)]
        write_events_parquet(path, events)
        return len(events)

    def prune_fresh(self, upto: str, batch: int = 500) -> int:
        """Remove overlay entries with ids <= ``upto`` (already in the live model). Lines removed."""
        ms, seq = parse_stream_id(upto)
        removed = 0
        cursor = 0
        while True:
            cursor, fields = self.redis.hscan(self.keys.fresh_history, cursor, count=batch)
            if fields:
                removed += int(self._prune(keys=[self.keys.fresh_history], args=[ms, seq, *fields.keys()]))
            if cursor == 0:
                return removed


def write_events_parquet(path: str | Path, events: list[LiveEvent]) -> None:
    """Events in the data contract's columns (user_id, item_id, timestamp, watch_seconds)."""
    table = pa.table(
        {
            "user_id": pa.array([e.user_id for e in events], pa.string()),
            "item_id": pa.array([e.item_id for e in events], pa.string()),
            "timestamp": pa.array([e.timestamp for e in events], pa.int64()),
            "watch_seconds": pa.array([e.watch_seconds for e in events], pa.float64()),
        }
    )
    pq.write_table(table, path)


def fresh_overlay(model, raw: bytes | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(item rows, confidences) of the overlay entries ``model`` has not been trained on.

    Entries at or below the model's ``consumed_through`` are already in its
    history and are skipped; titles the model does not know yet are skipped
    too (the nightly job will place them). Confidence follows the training
    rule (:func:`models.embeddings.event_weights` then
    :func:`models.embeddings.confidence_matrix`) for a viewing made now:
    completion = watch time / episode length (unknown -> 1; unknown length ->
    30 minutes is a full viewing), clipped to [0.05, 1], recency 1, summed per
    title, then ``1 + alpha * log1p(sum / eps)``.
    """
    if not raw:
        return None, None
    floor = parse_stream_id(consumed_through(model.meta))
    params = model.meta.get("params", {})
    alpha, eps = float(params.get("alpha", 2.0)), float(params.get("eps", 1.0))
    minutes = model.items.get("episode_minutes")
    totals: dict[int, float] = {}
    order: list[int] = []
    for line in reversed(raw.decode().split("\n")):  # newest first
        fields = line.split("\t")
        if len(fields) != 4 or parse_stream_id(fields[0]) <= floor:
            continue
        row = model.item_index.get(fields[1])
        if row is None:
            continue
        completion = 1.0
        if fields[3]:
            length = minutes[row] if minutes is not None else None
            full = length * 60.0 if length else 1800.0
            completion = min(max(float(fields[3]) / full, 0.05), 1.0)
        if row not in totals:
            order.append(row)
            totals[row] = 0.0
        totals[row] += completion
    if not order:
        return None, None
    weights = np.array([1.0 + alpha * math.log1p(totals[row] / eps) for row in order], dtype=np.float32)
    return np.array(order, dtype=np.int32), weights


ARCHIVE_GLOB = "stream-*.parquet"


def stream_id_after(stream_id: str) -> str:
    """The smallest stream id greater than ``stream_id`` (``XTRIM MINID`` keeps ids >= it)."""
    ms, seq = parse_stream_id(stream_id)
    return f"{ms}-{seq + 1}"


def archive_files(archive_dir: str | Path | None) -> list[Path]:
    """The archive's event files, oldest first (names sort by their stream ids' numbers)."""
    if not archive_dir or not Path(archive_dir).is_dir():
        return []
    return sorted(Path(archive_dir).glob(ARCHIVE_GLOB), key=lambda p: _archive_range(p)[1])


def _archive_range(path: Path) -> tuple[tuple[int, int], tuple[int, int]]:
    """``stream-<first>_<last>.parquet`` -> (first, last) stream ids as tuples."""
    first, _, last = path.name[len("stream-") : -len(".parquet")].partition("_")
    return parse_stream_id(first), parse_stream_id(last)


def archived_through(archive_dir: str | Path | None) -> str:
    """The newest stream id already in the archive (``0-0`` if none): the stream is read after it."""
    files = archive_files(archive_dir)
    if not files:
        return STREAM_START
    ms, seq = _archive_range(files[-1])[1]
    return f"{ms}-{seq}"


def take_for_job(store, folder: str | Path, archive_dir: str | Path | None = None) -> tuple[dict, list[Path]]:
    """The job's share of the live events: the archive's files plus the stream after them, up to now.

    Returns the ``live_events`` record for the new version's metadata and the
    files to add to the job's input: every archive file and one Parquet file
    of the stream entries after ``archived_through`` up to the snapshot (none
    when there are no such entries). An entry is either in the archive or read
    from the stream, never both, even if a compaction stopped between writing
    its archive file and trimming the stream.
    """
    log = EventLog(store.redis, store.keys)
    upto = log.snapshot()
    after = archived_through(archive_dir)
    info = {"stream": store.keys.events_stream, "consumed_through": upto, "events": 0, "archived_through": after}
    files = archive_files(archive_dir)
    if parse_stream_id(upto) > parse_stream_id(after):
        path = Path(folder) / f"stream-after-{after}-upto-{upto}.parquet"
        info["events"] = log.export(path, upto, after=after)
        if info["events"]:
            files.append(path)
    if parse_stream_id(upto) < parse_stream_id(after):  # the archive is ahead of the stream's newest entry
        info["consumed_through"] = after
    return info, files


def kept_floor(store) -> tuple[str, list[str]]:
    """The oldest ``consumed_through`` among kept versions (unreadable ones cannot be served: skipped).

    Entries at or below it are in every version that can be made live, so no
    overlay or stream needs them any more. Returns it and the versions that hold it there.
    """
    floor, holders = None, []
    for meta in store.versions():
        if meta.get("status") == "corrupt":
            continue
        through = consumed_through(meta)
        if floor is None or parse_stream_id(through) < parse_stream_id(floor):
            floor, holders = through, [meta["model_version"]]
        elif through == floor:
            holders.append(meta["model_version"])
    return floor or STREAM_START, holders


def compact(store, archive_dir: str | Path | None) -> dict:
    """After a new version is live: archive and trim what every kept version has consumed.

    1. ``floor`` = the oldest ``consumed_through`` among kept versions.
    2. With an archive folder: the stream entries after ``archived_through``
       up to ``floor`` are written to ``stream-<first>_<last>.parquet`` (a temp
       file, fsynced, renamed, folder fsynced), and only then trimmed from the
       stream (``XTRIM MINID``). Without one the stream is not trimmed.
    3. Overlay lines at or below ``floor`` are removed (users left empty go).
    4. Impressions older than the attribution window are archived and trimmed
       (:func:`models.attribution.compact_impressions`).

    A crash at any point loses nothing and doubles nothing: the archive's
    newest id says where the stream starts (:func:`take_for_job`).
    """
    log = EventLog(store.redis, store.keys)
    floor, holders = kept_floor(store)
    result = {"floor": floor, "held_by": holders, "archived": 0, "trimmed": 0, "archive_file": None}
    if archive_dir:
        archive = Path(archive_dir)
        archive.mkdir(parents=True, exist_ok=True)
        for stale in archive.glob(".stream-*.tmp"):  # a compaction that died while writing
            stale.unlink(missing_ok=True)
        after = archived_through(archive)
        if parse_stream_id(floor) > parse_stream_id(after):
            entries = list(log.read(floor, after=after))
            if entries:
                first, last = entries[0][0], entries[-1][0]
                final = archive / f"stream-{first}_{last}.parquet"
                temp = archive / f".{final.name}.tmp"
                write_events_parquet(temp, [event for _, event in entries])
                with open(temp, "rb+") as handle:
                    os.fsync(handle.fileno())
                os.rename(temp, final)
                directory = os.open(archive, os.O_RDONLY)
                try:
                    os.fsync(directory)
                finally:
                    os.close(directory)
                result.update(archived=len(entries), archive_file=str(final))
        through = archived_through(archive)
        if parse_stream_id(through) > (0, 0):
            # Only what the archive holds: never past it, even if the floor is further on.
            bound = min(parse_stream_id(through), parse_stream_id(floor))
            result["trimmed"] = int(store.redis.xtrim(store.keys.events_stream, minid=stream_id_after(f"{bound[0]}-{bound[1]}"), approximate=False))
    result["overlay_lines_removed"] = log.prune_fresh(floor)
    result["stream_length"] = int(store.redis.xlen(store.keys.events_stream))
    # Impressions: counted when they arrived; trimmed (archived first) once no viewing can be credited to them.
    from models.attribution import compact_impressions, forget_versions

    result["impressions"] = compact_impressions(store.redis, store.keys, archive_dir)
    forget_versions(store.redis, store.keys, {meta["model_version"] for meta in store.versions()})
    return result
