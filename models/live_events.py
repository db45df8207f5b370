"""Live events: the durable stream of accepted viewings and each user's fresh-history overlay.

Shared by the service (``POST /events`` appends, ``/recommend`` reads one
user's overlay) and the nightly job (takes the stream into its input). Key
names come from :class:`models.store.Keys`; user ids only ever appear inside
stream entries and as hash *fields*, never in a key name::

    {prefix}:events   stream; one entry per accepted event: u, i, t (unix s), w ('' if unknown)
    {prefix}:fresh    hash; field = user id, value = that user's newest entries,
                      "stream-id<TAB>item<TAB>t<TAB>w" lines, oldest first, capped in bytes

With ``EVENT_SHARDS`` > 1 (the default on a Redis Cluster) there is one such
stream and overlay per shard, and a user's events always go to the same
shard (:meth:`models.store.Keys.event_shard`). Everything below then holds per
shard: each shard's ids are its own, and a version records
``consumed_through`` for each (``live_events.shards``).

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

import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import redis

from models.data import LiveEvent
from models.store import Keys

log = logging.getLogger(__name__)

STREAM_START = "0-0"  # "nothing consumed yet"
FRESH_MAX_BYTES = 16 * 1024  # per user: the newest ~400 events with short ids (~40 bytes a line); bounds the read
READ_BATCH = 10_000

# One atomic step per batch: append every event to the stream and to its user's overlay.
# A Lua script runs alone in Redis and is written to the AOF as one unit.
_APPEND = """
local max_bytes = tonumber(ARGV[1])
local ids = {}
local users = {}
for n = 3, #ARGV, 4 do
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
-- (the channel is an argument, not a key: on a cluster it need not share the shard's slot)
redis.call('PUBLISH', ARGV[2], table.concat(users, '\\n'))
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


def consumed_through(meta: dict | None, shard: int = 0) -> str:
    """The last stream id of ``shard`` a version's training included (``0-0`` for versions without any)."""
    info = (meta or {}).get("live_events") or {}
    if "shards" in info:
        return (info["shards"].get(str(shard)) or {}).get("consumed_through") or STREAM_START
    return (info.get("consumed_through") or STREAM_START) if shard == 0 else STREAM_START


# On a cluster, an append is confirmed only once this many replicas have it (WAIT): a master that
# dies right after answering cannot take an accepted event with it when its replica takes over.
WAIT_MS = int(os.environ.get("EVENTS_WAIT_MS", "1000"))


def wait_replicas(cluster: bool) -> int:
    raw = os.environ.get("EVENTS_WAIT_REPLICAS", "").strip()
    return int(raw) if raw else int(cluster)  # default: one replica on a cluster, none on one node


LONELY_RECHECK_SECONDS = 5.0


def replicas_online(client: redis.Redis) -> int:
    """Replicas connected to the master ``client`` talks to (from ROLE)."""
    role = client.execute_command("ROLE")
    return len(role[2]) if role and role[0] in (b"master", "master") else 0


class NotReplicated(redis.TimeoutError):
    """The shard's master stored the events but no replica confirmed them in time (they may be lost)."""


class EventLayoutError(RuntimeError):
    """``EVENT_SHARDS`` differs from the shard count the stored events were written with."""


class EventLog:
    """The streams and the overlays for one key prefix (``keys.shards`` of each; one unless sharded)."""

    def __init__(self, client: redis.Redis, keys: Keys):
        self.redis = client
        self.keys = keys
        self.cluster = isinstance(client, redis.RedisCluster)
        self.replicas = wait_replicas(self.cluster)
        self._lonely: dict[str, float] = {}  # master -> until when it is taken to have no replica
        self._layout_checked = False
        self._append = client.register_script(_APPEND)
        self._prune = client.register_script(_PRUNE)

    @property
    def shards(self) -> range:
        return range(self.keys.shards)

    def check_layout(self) -> None:
        """Refuse to write or read events under a shard count other than the stored one: events
        in streams nobody reads any more would never reach a model. The first writer records it."""
        if self._layout_checked:
            return
        shards = self.keys.shards
        stored = self.redis.get(self.keys.events_layout)
        if stored is None:
            if shards > 1 and self.redis.xlen(f"{self.keys.tag}:events"):
                stored = b"1"  # events from before the layout was recorded: one stream
            else:
                self.redis.set(self.keys.events_layout, shards, nx=True)
                stored = self.redis.get(self.keys.events_layout)
        if int(stored) != shards:
            raise EventLayoutError(
                f"EVENT_SHARDS is {shards}, but the events in Redis are spread over {int(stored)} shard(s): "
                f"set EVENT_SHARDS={int(stored)} (changing it needs the job to consume and compact every stream first)"
            )
        self._layout_checked = True

    # -- the service -------------------------------------------------------------------
    def append(self, events: list[LiveEvent]) -> list[str]:
        """Store ``events`` durably (stream) and in their users' overlays. Their stream ids, in order.

        One atomic script per shard: on one stream (the default) the batch is all or
        nothing; spread over shards, each shard's part is, and an error part-way
        leaves the earlier shards' events stored (a retried batch may repeat them).
        """
        self.check_layout()
        groups: dict[int, list[int]] = {}
        for n, event in enumerate(events):
            groups.setdefault(self.keys.user_shard(event.user_id), []).append(n)
        pending = {}
        for shard, members in groups.items():
            args: list = [FRESH_MAX_BYTES, self.keys.fresh_channel]
            for n in members:
                event = events[n]
                seconds = "" if event.watch_seconds is None else repr(float(event.watch_seconds))
                args += [event.user_id, event.item_id, str(int(event.timestamp)), seconds]
            pending[shard] = ([self.keys.events_stream_of(shard), self.keys.fresh_of(shard)], args)
        if self.cluster:
            stored = self._append_cluster(pending)
        else:
            stored = {shard: self._append(keys=keys, args=args) for shard, (keys, args) in pending.items()}
        ids: list[str] = [""] * len(events)
        for shard, members in groups.items():
            for n, stream_id in zip(members, stored[shard]):
                ids[n] = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
        return ids

    # Answers that mean the script did not run: MOVED and ASK (a slot moved or moving; ASK is MOVED's base),
    # CLUSTERDOWN, TRYAGAIN (a multi-key script during a slot migration).
    _REFUSED = (redis.exceptions.AskError, redis.exceptions.ClusterDownError, redis.exceptions.TryAgainError)

    def _append_cluster(self, pending: dict[int, tuple[list[str], list]]) -> dict[int, list]:
        """Each shard's script on the master of its slot: one pipeline per master holding every shard it
        serves, then one WAIT on the same connection (the only way WAIT covers those writes).

        A shard whose slot is refused (MOVED, ASK, CLUSTERDOWN, TRYAGAIN: its script did not run) or whose
        master lacks the script (NOSCRIPT, after a failover) is tried once more after refreshing the
        slot map; a lost connection is not retried (the scripts may have run). A master left without
        any replica (its own died, or it was just promoted by a failover) cannot be waited for: its
        writes are accepted on its AOF alone, logged, and it is asked again after
        ``LONELY_RECHECK_SECONDS`` (no WAIT stalls every write in the meantime).
        """
        done: dict[int, list] = {}
        for attempt in (1, 2):
            nodes: dict[str, tuple] = {}
            for shard, (keys, _) in pending.items():
                node = self.redis.get_node_from_key(keys[0])
                nodes.setdefault(node.name, (node, []))[1].append(shard)
            retry: dict[int, tuple[list[str], list]] = {}
            last_refusal: Exception | None = None
            for node, shards in nodes.values():
                conn = self.redis.get_redis_connection(node)
                pipe = conn.pipeline(transaction=False)
                for shard in shards:
                    keys, args = pending[shard]
                    pipe.evalsha(self._append.sha, len(keys), *keys, *args)
                wait = self.replicas > 0 and self._lonely.get(node.name, 0.0) <= time.monotonic()
                if wait:
                    pipe.execute_command("WAIT", self.replicas, WAIT_MS)
                try:
                    found = pipe.execute(raise_on_error=False)
                except (redis.ConnectionError, redis.TimeoutError):
                    self.redis.nodes_manager.initialize()  # a failover: the next request finds the new master
                    raise
                for shard, answer in zip(shards, found):
                    if isinstance(answer, redis.exceptions.NoScriptError):
                        conn.script_load(_APPEND)
                        retry[shard] = pending[shard]
                    elif isinstance(answer, self._REFUSED):
                        retry[shard], last_refusal = pending[shard], answer
                    elif isinstance(answer, Exception):
                        raise answer
                    else:
                        done[shard] = answer
                if wait:
                    acked = found[-1]
                    if isinstance(acked, Exception):
                        raise acked
                    if int(acked) < self.replicas:
                        if replicas_online(conn):
                            raise NotReplicated(f"{acked} of {self.replicas} replica(s) confirmed the events within {WAIT_MS} ms")
                        self._lonely[node.name] = time.monotonic() + LONELY_RECHECK_SECONDS
                        log.warning("Redis master %s has no replica: events are accepted on its AOF alone", node.name)
            if not retry:
                return done
            if last_refusal is not None:
                self.redis.nodes_manager.initialize()
                if attempt == 2:
                    raise last_refusal
            pending = retry
        raise redis.exceptions.ClusterDownError("the event shards' slots kept moving")

    def fresh_raw(self, user_id: str) -> bytes | None:
        """The user's overlay as stored: one HGET (the request path pipelines the same HGET with the
        user's record, app.live_model)."""
        return self.redis.hget(self.keys.fresh_of(self.keys.user_shard(user_id)), user_id)

    def fresh_users(self) -> set[str]:
        """Every user with an overlay (HKEYS of each shard's overlay)."""
        return {name.decode() for shard in self.shards for name in self.redis.hkeys(self.keys.fresh_of(shard))}

    # -- the nightly job -----------------------------------------------------------------
    def snapshot(self, shard: int = 0) -> str:
        """Id of the newest entry of ``shard``'s stream now (``0-0`` if it is empty): the job's upper bound."""
        last = self.redis.xrevrange(self.keys.events_stream_of(shard), "+", "-", count=1)
        return last[0][0].decode() if last else STREAM_START

    def read(self, upto: str, after: str = STREAM_START, shard: int = 0) -> Iterator[tuple[str, LiveEvent]]:
        """Every entry of ``shard``'s stream with ``after`` < id <= ``upto``, oldest first, in batches."""
        if parse_stream_id(upto) <= parse_stream_id(after):
            return
        stream = self.keys.events_stream_of(shard)
        start = "-" if parse_stream_id(after) == (0, 0) else "(" + after
        while True:
            batch = self.redis.xrange(stream, start, upto, count=READ_BATCH)
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

    def export(self, path: str | Path, upto: str, after: str = STREAM_START, shard: int = 0) -> int:
        """Write the entries in (``after``, ``upto``] as an events Parquet file for :func:`models.data.load_events`."""
        events = [event for _, event in self.read(upto, after, shard)]
        write_events_parquet(path, events)
        return len(events)

    def prune_fresh(self, upto: str, batch: int = 500, shard: int = 0) -> int:
        """Remove ``shard``'s overlay entries with ids <= ``upto`` (already in the live model). Lines removed."""
        ms, seq = parse_stream_id(upto)
        fresh = self.keys.fresh_of(shard)
        removed = 0
        cursor = 0
        while True:
            cursor, fields = self.redis.hscan(fresh, cursor, count=batch)
            if fields:
                removed += int(self._prune(keys=[fresh], args=[ms, seq, *fields.keys()]))
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


def fresh_overlay(model, raw: bytes | None, shard: int = 0) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(item rows, confidences) of the overlay entries ``model`` has not been trained on.

    Entries at or below the model's ``consumed_through`` (of the user's ``shard``) are already in its
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
    floor = parse_stream_id(consumed_through(model.meta, shard))
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


def shard_archive(archive_dir: str | Path | None, shards: int, shard: int) -> Path | None:
    """A shard's archive folder: the archive itself with one stream, ``shard-N`` in it with several."""
    if not archive_dir:
        return None
    return Path(archive_dir) if shards == 1 else Path(archive_dir) / f"shard-{shard}"


def take_for_job(store, folder: str | Path, archive_dir: str | Path | None = None) -> tuple[dict, list[Path]]:
    """The job's share of the live events: the archive's files plus the streams after them, up to now.

    Returns the ``live_events`` record for the new version's metadata and the
    files to add to the job's input: every archive file and one Parquet file
    of the stream entries after ``archived_through`` up to the snapshot (none
    when there are no such entries), per shard. An entry is either in the archive or read
    from the stream, never both, even if a compaction stopped between writing
    its archive file and trimming the stream. With one stream the record is
    ``{stream, consumed_through, events, archived_through}``; with several, the
    same per shard under ``shards`` (each shard's ids are its own).
    """
    log = EventLog(store.redis, store.keys)
    log.check_layout()
    shards = store.keys.shards
    files: list[Path] = []
    per_shard = {}
    for shard in log.shards:
        archive = shard_archive(archive_dir, shards, shard)
        upto = log.snapshot(shard)
        after = archived_through(archive)
        info = {"stream": store.keys.events_stream_of(shard), "consumed_through": upto, "events": 0, "archived_through": after}
        files += archive_files(archive)
        if parse_stream_id(upto) > parse_stream_id(after):
            path = Path(folder) / f"stream-{shard}-after-{after}-upto-{upto}.parquet"
            info["events"] = log.export(path, upto, after=after, shard=shard)
            if info["events"]:
                files.append(path)
        if parse_stream_id(upto) < parse_stream_id(after):  # the archive is ahead of the stream's newest entry
            info["consumed_through"] = after
        per_shard[str(shard)] = info
    if shards == 1:
        return per_shard["0"], files
    return {"shards": per_shard, "events": sum(i["events"] for i in per_shard.values())}, files


def kept_floor(store, shard: int = 0) -> tuple[str, list[str]]:
    """The oldest ``consumed_through`` of ``shard`` among kept versions (unreadable ones cannot be served: skipped).

    Entries at or below it are in every version that can be made live, so no
    overlay or stream needs them any more. Returns it and the versions that hold it there.
    """
    floor, holders = None, []
    for meta in store.versions():
        if meta.get("status") == "corrupt":
            continue
        through = consumed_through(meta, shard)
        if floor is None or parse_stream_id(through) < parse_stream_id(floor):
            floor, holders = through, [meta["model_version"]]
        elif through == floor:
            holders.append(meta["model_version"])
    return floor or STREAM_START, holders


def compact(store, archive_dir: str | Path | None) -> dict:
    """After a new version is live: archive and trim what every kept version has consumed.

    Per shard (one unless ``EVENT_SHARDS`` > 1):

    1. ``floor`` = the oldest ``consumed_through`` among kept versions.
    2. With an archive folder: the stream entries after ``archived_through``
       up to ``floor`` are written to ``stream-<first>_<last>.parquet`` (a temp
       file, fsynced, renamed, folder fsynced), and only then trimmed from the
       stream (``XTRIM MINID``). Without one the stream is not trimmed.
    3. Overlay lines at or below ``floor`` are removed (users left empty go).

    Then impressions older than the attribution window are archived and trimmed
    (:func:`models.attribution.compact_impressions`).

    A crash at any point loses nothing and doubles nothing: the archive's
    newest id says where the stream starts (:func:`take_for_job`).
    """
    log = EventLog(store.redis, store.keys)
    shards = store.keys.shards
    results = {str(shard): _compact_shard(store, log, shard_archive(archive_dir, shards, shard), shard) for shard in log.shards}
    if shards == 1:
        result = results["0"]
    else:
        result = {"shards": results, "floor": " ".join(f"{s}:{r['floor']}" for s, r in results.items())}
        for total in ("archived", "trimmed", "overlay_lines_removed", "stream_length"):
            result[total] = sum(r[total] for r in results.values())
    # Impressions: counted when they arrived; trimmed (archived first) once no viewing can be credited to them.
    from models.attribution import compact_impressions, forget_versions

    result["impressions"] = compact_impressions(store.redis, store.keys, archive_dir)
    forget_versions(store.redis, store.keys, {meta["model_version"] for meta in store.versions()})
    return result


def _compact_shard(store, log: EventLog, archive: Path | None, shard: int) -> dict:
    stream = store.keys.events_stream_of(shard)
    floor, holders = kept_floor(store, shard)
    result = {"floor": floor, "held_by": holders, "archived": 0, "trimmed": 0, "archive_file": None}
    if archive:
        archive.mkdir(parents=True, exist_ok=True)
        for stale in archive.glob(".stream-*.tmp"):  # a compaction that died while writing
            stale.unlink(missing_ok=True)
        after = archived_through(archive)
        if parse_stream_id(floor) > parse_stream_id(after):
            entries = list(log.read(floor, after=after, shard=shard))
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
            result["trimmed"] = int(store.redis.xtrim(stream, minid=stream_id_after(f"{bound[0]}-{bound[1]}"), approximate=False))
    result["overlay_lines_removed"] = log.prune_fresh(floor, shard=shard)
    result["stream_length"] = int(store.redis.xlen(stream))
    return result
