"""The Redis key layout and the published model format. Nothing else names a key.

A model *version* is a set of named binary parts plus a JSON metadata record::

    {prefix}:live                       -> version id being served (the pointer)
    {prefix}:versions                   -> sorted set of kept version ids, by creation time
    {prefix}:version:{id}:meta          -> JSON: created_at, counts, params, metrics,
                                           parts {name: {size, sha256, chunks}}, checksum
    {prefix}:version:{id}:part:{name}:{n} -> bytes of part ``name``, chunk ``n``
    {prefix}:version:{id}:users:{b}     -> hash: keyed user hash -> that user's record (history, candidates,
                                           "because"; :func:`pack_user`), bucket ``b`` of ``user_store.buckets``
    {prefix}:channel:live               -> pub/sub: a version id, sent after each switch

Batch runs (written by :mod:`jobs.runs`, read by the dashboard)::

    {prefix}:runs                       -> sorted set of kept run ids, by start time
    {prefix}:run:{id}                   -> hash: the run record (JSON-encoded fields)
    {prefix}:run:{id}:log               -> list: the tail of the run's log
    {prefix}:runs:queue                 -> list: JSON run requests for the scheduler
    {prefix}:runs:stats                 -> hash: outcome and duration counters (/metrics)
    {prefix}:lock:nightly               -> the id of the run holding the job lock (expires)
    {prefix}:scheduler                  -> JSON heartbeat of the scheduler process (expires)
    {prefix}:trending                   -> JSON: trending titles (models.trending), refreshed hourly
    {prefix}:promotions                 -> JSON: titles pinned into page rows by operators (app.pages)
    {prefix}:admin:session:{sha256}     -> a signed-in dashboard session (expires with it)
    {prefix}:admin:signin:{who}:{minute} -> failed sign-ins in that minute, per address hash or "all"

Live events (written by ``POST /events``, read by the service and the job; see
:mod:`models.live_events`)::

    {prefix}:events                     -> stream: accepted events (u, i, t, w); trimmed once archived (live_events.compact)
    {prefix}:fresh                      -> hash: user id -> that user's newest stream entries
    {prefix}:events:layout              -> the number of event shards the stored events use (EVENT_SHARDS)
    {prefix}:shard:{n}:events, …:fresh  -> with EVENT_SHARDS > 1, the stream and overlay of user shard n instead
                                           (and its :impressions, :shown:…, :online:…, :experiment:… keys below)

Online results and experiments (see :mod:`models.attribution` and :mod:`models.experiments`)::

    {prefix}:online:secret              -> random key: signs recommendation ids, hashes user ids in key names
    {prefix}:impressions                -> stream: accepted impressions (u, r, i, row, t); trimmed by compaction
    {prefix}:shown:{user hash}          -> hash: title -> the latest impression that showed it (expires after the window)
    {prefix}:online:hour:{hour}         -> hash: "version|arm|metric" -> count, for that UTC hour (kept 35 days)
    {prefix}:online:users:{hour}:{version}|{arm} -> HyperLogLog of the users shown something that hour
    {prefix}:online:totals              -> hash: "version|arm|metric" -> count since the start (/metrics counters)
    {prefix}:experiment                 -> JSON: the running experiment (arms, shares, salt); absent when none runs
    {prefix}:experiments                -> hash: experiment id -> JSON record (running and ended ones, newest 50 kept)
    {prefix}:experiment:{id}:{arm}:users -> hash: user hash -> "impressions clicks completion viewings"
    {prefix}:experiment:{id}:{arm}:sums -> hash: users and the sums, squares and products of those four (the test)

On a Redis Cluster (``REDIS_CLUSTER=1``) ``{prefix}`` above is written in
braces, ``{recs}:live``: one hash tag, so every script, transaction and
multi-key command finds its keys in one slot. The user buckets are the
exception (``recs:version:{id}:users:{b}``, no tag: they spread over every
slot), and so are the user shards (``{recs:shard:N}``: live events and online counts, see :class:`Keys`).

Publishing writes every part, then the metadata, and only then moves the
pointer (one SET, atomic). A reader verifies the checksum of what it fetched
before using it, so a half-written or corrupted version is refused and the
previous one keeps serving. User-supplied ids never appear in key names:
per-user data lives inside parts or as hash fields, so input cannot reach or
collide with internal keys.
"""

from __future__ import annotations

import calendar
import hashlib
import io
import os
import secrets
import shutil
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import orjson
import redis
import redis.cluster

CHUNK_BYTES = 64 * 1024 * 1024  # Redis strings max out at 512 MB; keep writes moderate
DEFAULT_PREFIX = "recs"
DEFAULT_KEEP = 5

# Names of the parts every complete version has (see models.recommender for their meaning).
ITEM_PARTS = (
    "recommend.ann",
    "similar.ann",
    "item_vectors.npy",
    "items.json",
    "popular.npy",
    "gram.npy",
    "seq_indptr.npy",
    "seq_indices.npy",
    "seq_weights.npy",
)
# The per-user side as parts: versions without ``user_store`` (published before it, and offline
# experiments). A version with ``user_store`` keeps one record per user in Redis instead.
USER_PARTS = (
    "users.json",
    "history_indptr.npy",
    "history_items.npy",
    "history_weights.npy",
    "candidates.npy",
    "candidate_scores.npy",
)
REQUIRED_PARTS = ITEM_PARTS + USER_PARTS
# What a version with ``user_store`` keeps as records instead of parts (``users.json`` stays a part: the
# ids, for tools and the dashboard; a worker never loads it on the request path).
RECORD_PARTS = (*USER_PARTS[1:], "candidate_because.npy")
USERS_PER_BUCKET = 128  # per-user records per Redis hash: ~16k buckets for 2M users, spread over every slot
USER_WRITE_BATCH = 2_000  # records per pipelined write


# -- per-user records ----------------------------------------------------------------------------
# One user's published data, as stored in a user bucket (``Keys.user_bucket``)::
#
#   b"U1", n_history uint16, n_candidates uint16, reasons uint8     (7-byte header, little-endian)
#   history titles int32[n_history] (newest first), their confidences float32[n_history],
#   candidate titles int32[n_candidates] (best first), their scores float32[n_candidates],
#   "because" uint8[n_candidates, reasons]: positions in the history (NO_REASON = none)
_USER_HEADER = struct.Struct("<2sHHB")
USER_MAGIC = b"U1"
NO_REASON = 255
USER_KEY_BYTES = 12


@dataclass(frozen=True)
class UserRecord:
    """A user's published history, candidates and the candidates' "because" (positions in the history)."""

    items: np.ndarray  # int32, newest first
    weights: np.ndarray  # float32
    candidates: np.ndarray  # int32, best first (-1 = padding, in versions with per-user parts)
    scores: np.ndarray  # float32
    because: np.ndarray | None  # uint8 [candidates, reasons] positions; older versions: int32 titles; None: live


class CorruptUser(ValueError):
    """A per-user record that does not decode into valid titles of its version."""


def pack_user(items, weights, candidates, scores, because) -> bytes:
    keep = np.asarray(candidates) >= 0
    items, weights = np.asarray(items, "<i4"), np.asarray(weights, "<f4")
    candidates, scores = np.asarray(candidates, "<i4")[keep], np.asarray(scores, "<f4")[keep]
    return _record(items, weights, candidates, scores, np.asarray(because, np.uint8)[keep])


def _record(items: np.ndarray, weights: np.ndarray, candidates: np.ndarray, scores: np.ndarray, because: np.ndarray) -> bytes:
    """The record's bytes from arrays already in its dtypes, the candidates' -1 padding left out."""
    return b"".join(
        (_USER_HEADER.pack(USER_MAGIC, len(items), len(candidates), because.shape[1] if because.ndim == 2 else 0),
         items.tobytes(), weights.tobytes(), candidates.tobytes(), scores.tobytes(), because.tobytes())
    )  # fmt: skip


def unpack_user(raw: bytes, n_items: int) -> UserRecord:
    """Decode and check a record: lengths, titles within the catalogue, reasons within the history."""
    if len(raw) < _USER_HEADER.size:
        raise CorruptUser(f"record of {len(raw)} bytes is shorter than its header")
    magic, n_history, n_candidates, reasons = _USER_HEADER.unpack_from(raw)
    if magic != USER_MAGIC:
        raise CorruptUser(f"record starts with {magic!r}, not {USER_MAGIC!r}")
    expected = _USER_HEADER.size + 8 * n_history + (8 + reasons) * n_candidates
    if len(raw) != expected:
        raise CorruptUser(f"record is {len(raw)} bytes, its header says {expected}")
    at = _USER_HEADER.size
    items = np.frombuffer(raw, "<i4", n_history, at)
    weights = np.frombuffer(raw, "<f4", n_history, at + 4 * n_history)
    at += 8 * n_history
    candidates = np.frombuffer(raw, "<i4", n_candidates, at)
    scores = np.frombuffer(raw, "<f4", n_candidates, at + 4 * n_candidates)
    because = np.frombuffer(raw, np.uint8, n_candidates * reasons, at + 8 * n_candidates).reshape(n_candidates, reasons)
    for name, titles in (("history", items), ("candidate", candidates)):
        if len(titles) and titles.view("<u4").max() >= n_items:  # unsigned: a negative title is huge
            raise CorruptUser(f"{name} title outside the catalogue of {n_items}")
    if because.size and n_history < NO_REASON and ((because >= n_history) & (because != NO_REASON)).any():
        raise CorruptUser("a reason points past the history")
    if not (np.isfinite(weights).all() and np.isfinite(scores).all()):
        raise CorruptUser("a weight or score is not finite")
    return UserRecord(items, weights, candidates, scores, because if reasons else None)  # None: explained live


def user_key(secret: bytes, user_id: str) -> bytes:
    """The keyed hash naming a user's record (the version's own random ``user_store.key``)."""
    return hashlib.blake2b(user_id.encode(), key=secret, digest_size=USER_KEY_BYTES).digest()


def user_bucket(field: bytes, buckets: int) -> int:
    return int.from_bytes(field[:8], "little") % buckets


def new_user_store(users: int) -> dict:
    """The ``user_store`` metadata of a version about to write ``users`` records (a fresh random key)."""
    return {"key": secrets.token_hex(16), "buckets": max(1, -(-users // USERS_PER_BUCKET)), "users": users}


def user_records(parts: dict[str, bytes]):
    """(user id, record) of every user in a version's per-user parts, in user order."""
    ids = orjson.loads(parts["users.json"])
    arrays = {name: np.load(io.BytesIO(parts[name])) for name in RECORD_PARTS if name in parts}
    indptr, items, weights = arrays["history_indptr.npy"], arrays["history_items.npy"], arrays["history_weights.npy"]
    candidates, scores = arrays["candidates.npy"], arrays["candidate_scores.npy"]
    because = arrays.get("candidate_because.npy")
    if because is None or because.dtype != np.uint8:  # no positions to store: the service explains live
        because = np.zeros((*candidates.shape, 0), np.uint8)
    counts = (candidates >= 0).sum(axis=1)
    if not np.array_equal(candidates >= 0, np.arange(candidates.shape[1]) < counts[:, None]):  # -1 not only at the end
        for row, user_id in enumerate(ids):
            start, end = indptr[row], indptr[row + 1]
            yield str(user_id), pack_user(items[start:end], weights[start:end], candidates[row], scores[row], because[row])
        return
    # As the job writes them (each list -1 padded at its end): pack_user's bytes from slices, ~3x faster.
    items, weights = np.ascontiguousarray(items, "<i4"), np.ascontiguousarray(weights, "<f4")
    candidates, scores = np.ascontiguousarray(candidates, "<i4"), np.ascontiguousarray(scores, "<f4")
    because = np.ascontiguousarray(because, np.uint8)
    for row, (user_id, start, end, n) in enumerate(zip(ids, indptr[:-1].tolist(), indptr[1:].tolist(), counts.tolist())):
        yield str(user_id), _record(
            items[start:end], weights[start:end], candidates[row, :n], scores[row, :n], because[row, :n]
        )


def required_parts(meta: dict) -> tuple[str, ...]:
    return (*ITEM_PARTS, "users.json") if meta.get("user_store") else REQUIRED_PARTS


class ModelError(RuntimeError):
    """A version that is missing, incomplete or fails its checksum."""


class CorruptMeta(ModelError):
    """A version whose metadata record is not readable (not JSON, or not a version record)."""


def decode_meta(version: str, raw: bytes) -> dict:
    try:
        meta = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CorruptMeta(f"version {version}: metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("parts"), dict):
        raise CorruptMeta(f"version {version}: metadata is not a version record")
    return meta


def redis_from_url(url: str | None = None, cluster: bool | None = None, **kwargs) -> redis.Redis:
    """The one way to connect: ``REDIS_URL`` (``redis://``, ``rediss://`` with password) or localhost.

    With ``REDIS_CLUSTER=1`` (or ``cluster``) the URL names any node of a Redis
    Cluster, or several, comma-separated (``redis://a:6379,redis://b:6379``:
    start-up works while one is down), and the client is a
    :class:`redis.RedisCluster`, which finds the others and follows failovers.
    """
    url = url or os.environ.get("REDIS_URL", "redis://localhost:6379/0")
    kwargs.setdefault("socket_connect_timeout", 2.0)
    kwargs.setdefault("socket_timeout", 10.0)
    kwargs.setdefault("health_check_interval", 15)
    if cluster_enabled() if cluster is None else cluster:
        # Several nodes, comma-separated: the client starts from whichever answers (one may be down).
        first, *others = [part.strip() for part in url.split(",") if part.strip()]
        nodes = [redis.cluster.ClusterNode(u.hostname, u.port or 6379) for u in map(urlparse, others)]
        return redis.RedisCluster.from_url(first, startup_nodes=nodes or None, **kwargs)
    return redis.Redis.from_url(url, **kwargs)


def new_version_id(now: float | None = None) -> str:
    """Sortable and readable: UTC time of creation plus a short random tail."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now or time.time()))
    return f"{stamp}-{secrets.token_hex(2)}"


def checksum(parts_meta: dict[str, dict]) -> str:
    """Checksum of a version: sha256 over the sorted (name, part sha256) pairs."""
    digest = hashlib.sha256()
    for name in sorted(parts_meta):
        digest.update(name.encode())
        digest.update(parts_meta[name]["sha256"].encode())
    return digest.hexdigest()


def cluster_enabled() -> bool:
    """``REDIS_CLUSTER=1``: ``REDIS_URL`` names nodes of a Redis Cluster (one or several, comma-separated)."""
    return os.environ.get("REDIS_CLUSTER", "").strip().lower() in ("1", "true", "yes", "on")


def is_cluster(client) -> bool:
    return isinstance(client, redis.RedisCluster)


def event_shards(cluster: bool) -> int:
    """``EVENT_SHARDS``: how many streams the live events are spread over (default 1; 16 on a cluster)."""
    raw = os.environ.get("EVENT_SHARDS", "").strip()
    if not raw:
        return 16 if cluster else 1
    if not raw.isdigit() or not 1 <= int(raw) <= 1024:
        raise ValueError(f"EVENT_SHARDS={raw!r}: use a whole number from 1 to 1024")
    return int(raw)


@dataclass
class Keys:
    """Key names for one prefix; the only place that formats them.

    On a Redis Cluster (``cluster``) every key a script, transaction or
    multi-key command touches together carries one hash tag: ``{prefix}``
    (the pointer, versions, parts, runs, the experiment's record). Two kinds of
    keys are spread over all slots instead: the per-user record buckets (no
    tag, so each bucket hashes on its whole name) and the user shards, one tag
    per shard (``{prefix:shard:N}``: the events stream, overlay, impressions and
    online counts of its users, each written by one script). On one node with
    one shard the names are as they always were.
    """

    prefix: str = DEFAULT_PREFIX
    cluster: bool = False
    shards: int = 1

    @property
    def tag(self) -> str:
        """What every grouped key starts with: the prefix, in braces on a cluster (one slot)."""
        return f"{{{self.prefix}}}" if self.cluster else self.prefix

    # -- user shards: the live events and the online counts of a share of the users ------------------
    def user_shard(self, user_id: str) -> int:
        """The shard of a user's events, overlay, impressions and online counts: stable, spread evenly."""
        return 0 if self.shards == 1 else zlib.crc32(user_id.encode()) % self.shards

    def shard_head(self, shard: int) -> str:
        """What a shard's keys start with: the tag itself with one shard, ``{prefix:shard:N}`` on a cluster."""
        if self.shards == 1:
            return self.tag
        return f"{{{self.prefix}:shard:{shard}}}" if self.cluster else f"{self.prefix}:shard:{shard}"

    def events_stream_of(self, shard: int) -> str:
        return f"{self.shard_head(shard)}:events"

    def fresh_of(self, shard: int) -> str:
        """hash: user id -> that user's newest entries of ``shard``."""
        return f"{self.shard_head(shard)}:fresh"

    def impressions_of(self, shard: int) -> str:
        return f"{self.shard_head(shard)}:impressions"

    def online_totals_of(self, shard: int) -> str:
        return f"{self.shard_head(shard)}:online:totals"

    @property
    def events_layout(self) -> str:
        """The shard count the stored events were written with (set by the first writer or job)."""
        return f"{self.tag}:events:layout"

    @property
    def version_patterns(self) -> list[str]:
        """SCAN patterns for every key of every version (parts under the tag, user buckets without)."""
        return sorted({f"{self.tag}:version:*", f"{self.prefix}:version:*"})

    @property
    def live(self) -> str:
        return f"{self.tag}:live"

    @property
    def versions(self) -> str:
        return f"{self.tag}:versions"

    @property
    def live_channel(self) -> str:
        return f"{self.tag}:channel:live"

    @property
    def fresh_channel(self) -> str:
        """pub/sub: user ids (newline-separated) that just got fresh events."""
        return f"{self.tag}:channel:fresh"

    def meta(self, version: str) -> str:
        return f"{self.tag}:version:{version}:meta"

    def part(self, version: str, name: str, chunk: int) -> str:
        return f"{self.tag}:version:{version}:part:{name}:{chunk}"

    def user_bucket(self, version: str, bucket: int) -> str:
        return f"{self.prefix}:version:{version}:users:{bucket}"  # never tagged: buckets spread over all slots

    # Keys used by later features (runs, lock, live events) are defined here too.
    @property
    def events_stream(self) -> str:
        """The stream of shard 0 (the only one unless ``EVENT_SHARDS`` > 1)."""
        return self.events_stream_of(0)

    @property
    def fresh_history(self) -> str:
        return self.fresh_of(0)

    @property
    def runs(self) -> str:
        return f"{self.tag}:runs"

    def run(self, run_id: str) -> str:
        return f"{self.tag}:run:{run_id}"

    @property
    def run_queue(self) -> str:
        return f"{self.tag}:runs:queue"

    @property
    def job_lock(self) -> str:
        return f"{self.tag}:lock:nightly"

    @property
    def consumed_events(self) -> str:
        return f"{self.tag}:events:consumed"

    # Batch runs (jobs.runs, jobs.scheduler) and their outcome counters (app.metrics).
    def run_log(self, run_id: str) -> str:
        return f"{self.tag}:run:{run_id}:log"

    @property
    def job_stats(self) -> str:
        return f"{self.tag}:runs:stats"

    @property
    def scheduler(self) -> str:
        return f"{self.tag}:scheduler"

    @property
    def trending(self) -> str:
        """JSON: the trending titles (models.trending), refreshed hourly and by each nightly run."""
        return f"{self.tag}:trending"

    @property
    def promotions(self) -> str:
        """JSON: titles operators pin into page rows, {row kind: {"items": [ids], "share"}} (app.pages)."""
        return f"{self.tag}:promotions"

    # -- online results and experiments (models.attribution, models.experiments) ---------
    @property
    def online_secret(self) -> str:
        return f"{self.tag}:online:secret"

    @property
    def impressions_stream(self) -> str:
        return self.impressions_of(0)

    # (these five and the experiment's two per-user keys below exist once per user shard: the Lua
    # scripts of models.attribution build the same names from ``shard_head``)
    def shown(self, user_digest: str, shard: int = 0) -> str:
        return f"{self.shard_head(shard)}:shown:{user_digest}"

    def online_hour(self, hour: int, shard: int = 0) -> str:
        return f"{self.shard_head(shard)}:online:hour:{hour}"

    def online_users(self, hour: int, version: str, arm: str, shard: int = 0) -> str:
        return f"{self.shard_head(shard)}:online:users:{hour}:{version}|{arm}"

    @property
    def online_totals(self) -> str:
        return self.online_totals_of(0)

    @property
    def experiment(self) -> str:
        return f"{self.tag}:experiment"

    @property
    def experiments(self) -> str:
        return f"{self.tag}:experiments"

    def experiment_users(self, experiment_id: str, arm: str, shard: int = 0) -> str:
        return f"{self.shard_head(shard)}:experiment:{experiment_id}:{arm}:users"

    def experiment_sums(self, experiment_id: str, arm: str, shard: int = 0) -> str:
        return f"{self.shard_head(shard)}:experiment:{experiment_id}:{arm}:sums"

    # The dashboard's server-side sessions and sign-in limits (app.admin.auth); names are hashes.
    def admin_session(self, digest: str) -> str:
        return f"{self.tag}:admin:session:{digest}"

    def admin_signin_failures(self, who: str, window: int) -> str:
        return f"{self.tag}:admin:signin:{who}:{window}"


class ModelStore:
    """Publish, list, activate and fetch model versions in Redis."""

    def __init__(self, client: redis.Redis, prefix: str = DEFAULT_PREFIX, shards: int | None = None):
        self.redis = client
        cluster = is_cluster(client)
        self.keys = Keys(prefix, cluster, shards or event_shards(cluster))

    # -- writing -----------------------------------------------------------------
    def write_version(self, parts: dict[str, bytes], meta: dict, version: str | None = None) -> str:
        """Store every part and then the metadata; does not touch the live pointer."""
        missing = [name for name in required_parts(meta) if name not in parts]
        if missing:
            raise ModelError(f"refusing to write an incomplete version: missing {', '.join(missing)}")
        version = version or new_version_id()
        parts_meta = {}
        for name, blob in parts.items():
            chunks = max(1, -(-len(blob) // CHUNK_BYTES))
            pipe = self.redis.pipeline(transaction=False)
            for n in range(chunks):
                pipe.set(self.keys.part(version, name, n), blob[n * CHUNK_BYTES : (n + 1) * CHUNK_BYTES])
            pipe.execute()
            parts_meta[name] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest(), "chunks": chunks}
        record = dict(meta)
        record.update(
            model_version=version,
            parts=parts_meta,
            checksum=checksum(parts_meta),
            stored_at=time.time(),
        )
        record.setdefault("created_at", record["stored_at"])
        record.setdefault("status", "ready")
        # Metadata last: a version without it is invisible, so a crash mid-write leaves no half version.
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.keys.meta(version), orjson.dumps(record))
        pipe.zadd(self.keys.versions, {version: record["created_at"]})
        pipe.execute()
        return version

    def write_users(self, version: str, store: dict, records) -> dict:
        """Write per-user records (``(user_id, pack_user bytes)`` pairs) of ``version``, pipelined; returns
        {"users", "bytes", "seconds"}. Idempotent: a record written twice (a retried task) is the same field."""
        started = time.perf_counter()
        secret, buckets = bytes.fromhex(store["key"]), int(store["buckets"])
        written = size = 0
        batch: dict[int, dict[bytes, bytes]] = {}
        pending = 0

        def flush() -> None:
            pipe = self.redis.pipeline(transaction=False)
            for bucket, fields in batch.items():
                pipe.hset(self.keys.user_bucket(version, bucket), mapping=fields)
            pipe.execute()
            batch.clear()

        for user_id, record in records:
            field = user_key(secret, user_id)
            batch.setdefault(user_bucket(field, buckets), {})[field] = record
            written, size, pending = written + 1, size + len(record), pending + 1
            if pending >= USER_WRITE_BATCH:
                flush()
                pending = 0
        if batch:
            flush()
        return {"users": written, "bytes": size, "seconds": time.perf_counter() - started}

    def read_user(self, version: str, store: dict, user_id: str) -> bytes | None:
        """One user's stored record (None: not in this version); one HGET."""
        return self.redis.hget(*self.user_address(version, store, user_id))

    def user_address(self, version: str, store: dict, user_id: str) -> tuple[str, bytes]:
        """(bucket key, field) of a user's record: for callers that pipeline the read with others."""
        field = user_key(bytes.fromhex(store["key"]), user_id)
        return self.keys.user_bucket(version, user_bucket(field, int(store["buckets"]))), field

    def copy_users(self, source: str, target: str, store: dict) -> None:
        """Every user record of ``source`` under ``target`` too (bucket by bucket: works across cluster slots)."""
        buckets = range(int(store["buckets"]))
        for start in range(0, len(buckets), 64):
            pipe = self.redis.pipeline(transaction=False)
            for b in buckets[start : start + 64]:
                pipe.hgetall(self.keys.user_bucket(source, b))
            found = pipe.execute()
            pipe = self.redis.pipeline(transaction=False)
            for b, fields in zip(buckets[start : start + 64], found):
                if fields:
                    pipe.hset(self.keys.user_bucket(target, b), mapping=fields)
            pipe.execute()

    def user_buckets(self, version: str, store: dict) -> list[str]:
        return [self.keys.user_bucket(version, b) for b in range(int(store["buckets"]))]

    def count_users(self, version: str, store: dict) -> int:
        """Records stored for ``version`` (HLEN of every bucket, pipelined)."""
        total = 0
        keys = self.user_buckets(version, store)
        for start in range(0, len(keys), 10_000):
            pipe = self.redis.pipeline(transaction=False)
            for key in keys[start : start + 10_000]:
                pipe.hlen(key)
            total += sum(pipe.execute())
        return total

    def publish(
        self, parts: dict[str, bytes], meta: dict, activate: bool = True, keep: int = DEFAULT_KEEP,
        version: str | None = None, per_user: bool = True,
    ) -> str:
        """Write a complete version, then (optionally) switch the live pointer to it.

        Per-user parts are stored as one record per user (``per_user``; False keeps them as parts, as
        versions before records were): written first, under the version's id, so the switch stays
        one pointer move. An engine that wrote the records itself (``meta["user_store"]``, the
        Spark executors) passes only the item side. :meth:`verify` counts the records before a switch.
        """
        if per_user and not meta.get("user_store") and all(name in parts for name in USER_PARTS):
            version = version or new_version_id()
            info = new_user_store(len(orjson.loads(parts["users.json"])))
            info.update(self.write_users(version, info, user_records(parts)))
            meta = {**meta, "user_store": info}
            parts = {name: blob for name, blob in parts.items() if name not in RECORD_PARTS}
        version = self.write_version(parts, meta, version)
        if activate:
            self.activate(version)
        self.prune(keep)
        self.drop_orphan_parts()
        return version

    def activate(self, version: str) -> None:
        """Point ``live`` at a kept, complete version (roll back or forward). Atomic."""
        meta = self.meta(version)
        self.verify(version, meta)
        previous = self.live_version()
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.keys.live, version)
        pipe.set(self.keys.meta(version), orjson.dumps({**meta, "status": "live", "activated_at": time.time()}))
        if previous and previous != version:
            try:
                old = self.meta_or_none(previous)
            except CorruptMeta:
                old = None  # nothing to mark; the operator is moving away from it
            if old is not None:
                pipe.set(self.keys.meta(previous), orjson.dumps({**old, "status": "ready"}))
        pipe.execute()
        self.redis.publish(self.keys.live_channel, version)  # after: a cluster transaction cannot hold a PUBLISH

    def set_status(self, version: str, status: str, **extra) -> None:
        meta = self.meta(version)
        meta.update(status=status, **extra)
        self.redis.set(self.keys.meta(version), orjson.dumps(meta))

    def prune(self, keep: int = DEFAULT_KEEP) -> list[str]:
        """Drop the oldest versions beyond ``keep``; never the live one, nor one a running experiment serves."""
        live = self.live_version()
        serving = self.experiment_versions()
        ids = [v.decode() for v in self.redis.zrevrange(self.keys.versions, 0, -1)]
        dropped = []
        for version in ids[keep:]:
            if version == live or version in serving:
                continue
            self.delete(version)
            dropped.append(version)
        return dropped

    def drop_orphan_parts(self, older_than: float = 3600.0) -> list[str]:
        """Delete the parts and user records of versions that never got metadata (a publish killed half-way).

        Only versions whose id says they were created more than ``older_than``
        seconds ago: a younger one may be a publish still in progress.
        """
        found: dict[str, list[bytes]] = {}
        for pattern in self.keys.version_patterns:
            head = pattern[:-1]
            for key in self.redis.scan_iter(match=pattern, count=1000):
                version, _, rest = key.decode()[len(head) :].partition(":")
                if rest.startswith(("part:", "users:")):
                    found.setdefault(version, []).append(key)
        dropped = []
        for version, keys in found.items():
            try:
                created = calendar.timegm(time.strptime(version.split("-")[0], "%Y%m%dT%H%M%SZ"))
            except ValueError:
                continue
            if time.time() - created < older_than or self.redis.exists(self.keys.meta(version)):
                continue
            for start in range(0, len(keys), 1000):
                self.redis.unlink(*keys[start : start + 1000])
            dropped.append(version)
        return dropped

    def delete(self, version: str) -> None:
        try:
            meta = self.meta_or_none(version)
        except CorruptMeta:  # the parts cannot be listed from it: find them by name
            meta = None
        keys = [self.keys.meta(version)]
        if meta:
            for name, info in meta.get("parts", {}).items():
                keys.extend(self.keys.part(version, name, n) for n in range(info["chunks"]))
            if meta.get("user_store"):
                keys.extend(self.user_buckets(version, meta["user_store"]))
        else:
            for pattern in self.keys.version_patterns:
                keys.extend(self.redis.scan_iter(match=f"{pattern[:-1]}{version}:*", count=1000))
        self.redis.zrem(self.keys.versions, version)  # first: a version being deleted is no longer listed
        for start in range(0, len(keys), 1000):
            self.redis.unlink(*keys[start : start + 1000])

    def experiment_versions(self) -> set[str]:
        """Versions the running experiment's arms serve (none when no experiment runs or its record is unreadable)."""
        raw = self.redis.get(self.keys.experiment)
        try:
            record = orjson.loads(raw) if raw else {}
            return {arm["version"] for arm in record.get("arms", {}).values()}
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
            return set()

    # -- reading -----------------------------------------------------------------
    def live_version(self) -> str | None:
        value = self.redis.get(self.keys.live)
        return value.decode() if value else None

    def meta_or_none(self, version: str) -> dict | None:
        """The version's metadata, None if it has none; :class:`CorruptMeta` if it is unreadable."""
        raw = self.redis.get(self.keys.meta(version))
        return decode_meta(version, raw) if raw else None

    def meta(self, version: str) -> dict:
        meta = self.meta_or_none(version)
        if meta is None:
            raise ModelError(f"model version {version!r} does not exist")
        return meta

    def versions(self) -> list[dict]:
        """Metadata of every kept version, newest first.

        A version whose metadata is unreadable is listed as
        ``{"model_version", "created_at", "status": "corrupt", "error"}``, so a
        damaged record never hides the good ones (nor breaks a page listing them).
        """
        ids = [(v.decode(), score) for v, score in self.redis.zrevrange(self.keys.versions, 0, -1, withscores=True)]
        metas = self.redis.mget([self.keys.meta(v) for v, _ in ids]) if ids else []
        out = []
        for (version, created), raw in zip(ids, metas):
            if not raw:
                continue
            try:
                out.append(decode_meta(version, raw))
            except CorruptMeta as exc:
                out.append({"model_version": version, "created_at": created, "status": "corrupt", "error": str(exc)})
        return out

    def verify(self, version: str, meta: dict) -> None:
        """Cheap completeness check (every chunk present) before activating."""
        parts = meta.get("parts", {})
        missing = [n for n in required_parts(meta) if n not in parts]
        if missing:
            raise ModelError(f"version {version} lacks part(s) {', '.join(missing)}")
        keys = [self.keys.part(version, name, n) for name, info in parts.items() for n in range(info["chunks"])]
        present = sum(self.redis.exists(k) for k in keys)
        if present != len(keys):
            raise ModelError(f"version {version} is incomplete: {len(keys) - present} part chunk(s) missing")
        if checksum(parts) != meta.get("checksum"):
            raise ModelError(f"version {version} has a wrong checksum")
        store = meta.get("user_store")
        if store:
            found = self.count_users(version, store)
            if found != store["users"]:
                raise ModelError(f"version {version} is incomplete: {found} of {store['users']} user records stored")

    def fetch_part(self, version: str, name: str, info: dict) -> bytes:
        chunks = self.redis.mget([self.keys.part(version, name, n) for n in range(info["chunks"])])
        if any(chunk is None for chunk in chunks):
            raise ModelError(f"version {version}: part {name} is missing")
        blob = b"".join(chunks)
        if len(blob) != info["size"] or hashlib.sha256(blob).hexdigest() != info["sha256"]:
            raise ModelError(f"version {version}: part {name} fails its checksum")
        return blob

    def materialize(self, version: str, cache_dir: str | os.PathLike) -> Path:
        """Write a verified copy of ``version`` to ``cache_dir/version`` and return that folder.

        Workers on one host share the folder (and so the page cache of the
        memory-mapped files); it is filled in a temp folder and renamed into
        place, so a reader never sees a partial copy.
        """
        cache_dir = Path(cache_dir)
        target = cache_dir / version
        meta = self.meta(version)
        if (target / "meta.json").is_file():
            on_disk = orjson.loads((target / "meta.json").read_bytes())
            if on_disk.get("checksum") == meta.get("checksum"):
                return target
            shutil.rmtree(target, ignore_errors=True)
        if checksum(meta.get("parts", {})) != meta.get("checksum"):
            raise ModelError(f"version {version} has a wrong checksum")
        missing = [n for n in required_parts(meta) if n not in meta.get("parts", {})]
        if missing:
            raise ModelError(f"version {version} lacks part(s) {', '.join(missing)}")
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=cache_dir))
        try:
            for name, info in meta["parts"].items():
                (staging / name).write_bytes(self.fetch_part(version, name, info))
            (staging / "meta.json").write_bytes(orjson.dumps(meta))
            try:
                os.rename(staging, target)
            except OSError:
                # Another worker won the race and put a complete copy in place.
                if not (target / "meta.json").is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def prune_cache(self, cache_dir: str | os.PathLike, keep: set[str]) -> None:
        """Remove local copies of versions no longer kept (open mmaps stay valid on POSIX)."""
        cache_dir = Path(cache_dir)
        if not cache_dir.is_dir():
            return
        for child in cache_dir.iterdir():
            if child.is_dir() and not child.name.startswith(".") and child.name not in keep:
                shutil.rmtree(child, ignore_errors=True)
