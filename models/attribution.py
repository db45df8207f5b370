"""Online truth: recommendation ids, impressions, and viewings attributed to what was shown.

* Every answer of ``/recommend``, ``/similar`` and ``/page`` carries a
  ``recommendation_id`` (:class:`RecommendationIds`): the model version, the
  experiment arm and experiment id that produced it and a random nonce,
  signed with HMAC-SHA256 under a secret (``ONLINE_SECRET``, else one random
  secret kept in Redis for every worker). It cannot be guessed or forged, and
  the service learns the version and arm back from it without storing
  anything per answer.
* ``POST /impressions`` stores each shown list durably (the impressions
  stream) and, per user, which answer last showed each title (a hash that
  expires after ``ATTRIBUTION_WINDOW``).
* ``POST /events`` credits a viewing to an answer: the one its
  ``recommendation_id`` names, else the latest impression that showed the
  same user that title within the window before the viewing. A title's first
  credited viewing after an impression is a *click*; every credited viewing
  adds its completion (watch seconds / episode length, at most 1; 1 when the
  watch time is unknown) for watch-through.

Counting is incremental, in one Lua script per request (atomic with nothing
rescanned): per UTC hour and ``version|arm``, impressions, titles shown,
clicks, viewings and completion (hashes kept ``RETENTION_DAYS``), a
HyperLogLog of users; running totals for ``/metrics``; and, for the running
experiment, each user's four counters and the arm's sums of them, their
squares and products, which is all the statistics of
:mod:`models.experiments` need.

Key names hold only hashes of user ids (HMAC with the secret). Versions
and arms are operators' names. All keys are named in :class:`models.store.Keys`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import redis

from models.data import Impression, LiveEvent
from models.store import Keys

ATTRIBUTION_WINDOW = int(os.environ.get("ATTRIBUTION_WINDOW", str(24 * 3600)))  # seconds
RETENTION_DAYS = 35  # hourly counts are kept this long (at least 30 days of results)
FULL_VIEWING_SECONDS = 1800.0  # a title with no episode length: 30 minutes is a full viewing
NO_ARM = "-"  # the arm field of answers served outside any experiment
ID_PREFIX = "r1"
COMPACT_BATCH = 500_000  # impressions archived per compaction at most (the rest next time): bounded memory


@dataclass(frozen=True)
class Origin:
    """What produced an answer: read back from its recommendation id."""

    version: str
    arm: str | None
    experiment: str | None


class RecommendationIds:
    """Issue and verify signed recommendation ids: ``r1.<payload>.<signature>``, URL-safe base64."""

    def __init__(self, secret: bytes):
        self.secret = secret

    def issue(self, version: str, arm: str | None = None, experiment: str | None = None) -> str:
        payload = "\t".join((version, arm or "", experiment or "", secrets.token_urlsafe(9)))
        body = _b64(payload.encode())
        return f"{ID_PREFIX}.{body}.{_b64(self._sign(body))}"

    def verify(self, rid: str) -> Origin | None:
        """The origin of a genuine id; None for anything this service did not issue."""
        parts = rid.split(".") if isinstance(rid, str) else []
        if len(parts) != 3 or parts[0] != ID_PREFIX:
            return None
        body, signature = parts[1], parts[2]
        try:
            given = _unb64(signature)
            fields = _unb64(body).decode().split("\t")
        except (ValueError, UnicodeDecodeError):
            return None
        if not hmac.compare_digest(given, self._sign(body)) or len(fields) != 4 or not fields[0]:
            return None
        return Origin(fields[0], fields[1] or None, fields[2] or None)

    def user_digest(self, user_id: str) -> str:
        """A keyed hash of a user id for key names (nobody without the secret can link it to the id)."""
        return hmac.new(self.secret, b"user\0" + user_id.encode(), hashlib.sha256).hexdigest()[:24]

    def _sign(self, body: str) -> bytes:
        return hmac.digest(self.secret, body.encode(), "sha256")[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if len(text) > 400:
        raise ValueError("too long")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_secret(client: redis.Redis, keys: Keys) -> bytes:
    """``ONLINE_SECRET`` if set, else the one random secret in Redis (created by whichever worker comes first)."""
    configured = os.environ.get("ONLINE_SECRET", "")
    if configured:
        return hashlib.sha256(configured.encode()).digest()
    client.set(keys.online_secret, secrets.token_hex(32), nx=True)
    value = client.get(keys.online_secret)
    return bytes.fromhex(value.decode())


# -- counting: one Lua script for impressions, one for viewings ----------------------------------------------------
_BUMP = """
local function bump(prefix, exp, arm, digest, dn, dc, dw, dv)
  local ukey = prefix .. ':experiment:' .. exp .. ':' .. arm .. ':users'
  local skey = prefix .. ':experiment:' .. exp .. ':' .. arm .. ':sums'
  local old = redis.call('HGET', ukey, digest)
  local n, c, w, v = 0, 0, 0, 0
  if old then
    local f = {}
    for x in string.gmatch(old, '%S+') do f[#f + 1] = tonumber(x) end
    n, c, w, v = f[1], f[2], f[3], f[4]
  else
    redis.call('HINCRBY', skey, 'users', 1)
  end
  local n2, c2, w2, v2 = n + dn, c + dc, w + dw, v + dv
  redis.call('HSET', ukey, digest, string.format('%d %d %.17g %d', n2, c2, w2, v2))
  if dn ~= 0 then redis.call('HINCRBY', skey, 'n', dn); redis.call('HINCRBY', skey, 'nn', n2 * n2 - n * n) end
  if dc ~= 0 then redis.call('HINCRBY', skey, 'c', dc); redis.call('HINCRBY', skey, 'cc', c2 * c2 - c * c) end
  if dv ~= 0 then redis.call('HINCRBY', skey, 'v', dv); redis.call('HINCRBY', skey, 'vv', v2 * v2 - v * v) end
  if dw ~= 0 then
    redis.call('HINCRBYFLOAT', skey, 'w', dw)
    redis.call('HINCRBYFLOAT', skey, 'ww', w2 * w2 - w * w)
  end
  if dn ~= 0 or dc ~= 0 then redis.call('HINCRBY', skey, 'cn', c2 * n2 - c * n) end
  if dw ~= 0 or dv ~= 0 then redis.call('HINCRBYFLOAT', skey, 'wv', w2 * v2 - w * v) end
end
"""

# ARGV: prefix, window, retention, running experiment id ('' if none), then per impression 8 fields + its titles:
# user, digest, rid, version, arm, experiment, timestamp, row, count, title 1 .. title count
_IMPRESS = (
    _BUMP
    + """
local prefix, window, retention, running = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local stream = prefix .. ':impressions'
local totals = prefix .. ':online:totals'
local n = 5
local stored = 0
while n <= #ARGV do
  local user, digest, rid, version, arm, exp, ts, row = ARGV[n], ARGV[n+1], ARGV[n+2], ARGV[n+3], ARGV[n+4], ARGV[n+5], tonumber(ARGV[n+6]), ARGV[n+7]
  local count = tonumber(ARGV[n+8])
  local titles = {}
  for k = 1, count do titles[k] = ARGV[n + 8 + k] end
  n = n + 9 + count
  redis.call('XADD', stream, '*', 'u', user, 'r', rid, 'i', table.concat(titles, '\\n'), 'row', row, 't', ts)
  local shown = prefix .. ':shown:' .. digest
  local entry = rid .. '\\t' .. ts .. '\\t' .. version .. '\\t' .. arm .. '\\t' .. exp .. '\\t0'
  for k = 1, count do
    local old = redis.call('HGET', shown, titles[k])
    local old_ts = old and tonumber(string.match(old, '^[^\\t]*\\t(%d+)')) or nil
    if not old_ts or old_ts <= ts then redis.call('HSET', shown, titles[k], entry) end
  end
  redis.call('EXPIRE', shown, window + 3600)
  local hour = math.floor(ts / 3600)
  local hkey = prefix .. ':online:hour:' .. hour
  local tag = version .. '|' .. arm .. '|'
  redis.call('HINCRBY', hkey, tag .. 'impressions', 1)
  redis.call('HINCRBY', hkey, tag .. 'shown', count)
  redis.call('EXPIRE', hkey, retention)
  local ukey = prefix .. ':online:users:' .. hour .. ':' .. version .. '|' .. arm
  redis.call('PFADD', ukey, digest)
  redis.call('EXPIRE', ukey, retention)
  redis.call('HINCRBY', totals, tag .. 'impressions', 1)
  redis.call('HINCRBY', totals, tag .. 'shown', count)
  if exp ~= '' and exp == running then bump(prefix, exp, arm, digest, 1, 0, 0, 0) end
  stored = stored + 1
end
return stored
"""
)

# ARGV: prefix, window, retention, running experiment id, then per viewing 8 fields:
# digest, title, timestamp, completion, rid ('' if none), version, arm, experiment (from the rid, '' if none)
_ATTRIBUTE = (
    _BUMP
    + """
local prefix, window, retention, running = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local totals = prefix .. ':online:totals'
local credited, clicks = 0, 0
for n = 5, #ARGV, 8 do
  local digest, title, ts, completion = ARGV[n], ARGV[n+1], tonumber(ARGV[n+2]), tonumber(ARGV[n+3])
  local rid, version, arm, exp = ARGV[n+4], ARGV[n+5], ARGV[n+6], ARGV[n+7]
  local shown = prefix .. ':shown:' .. digest
  local old = redis.call('HGET', shown, title)
  local fields = {}  -- rid, timestamp, version, arm, experiment, clicked
  if old then
    local start = 1
    while true do
      local stop = string.find(old, '\\t', start, true)
      if not stop then fields[#fields + 1] = string.sub(old, start); break end
      fields[#fields + 1] = string.sub(old, start, stop - 1)
      start = stop + 1
    end
  end
  local ok = false
  local first = false
  if rid ~= '' then
    ok = true
    first = not (old and fields[1] == rid and fields[6] == '1')
    if not old or fields[1] ~= rid then fields = {rid, tostring(ts), version, arm, exp, '0'} end
  elseif old and #fields == 6 then
    local its = tonumber(fields[2])
    if ts >= its and ts - its <= window then
      ok = true
      rid, version, arm, exp = fields[1], fields[3], fields[4], fields[5]
      first = fields[6] ~= '1'
    end
  end
  if ok then
    credited = credited + 1
    if first then
      clicks = clicks + 1
      fields[6] = '1'
      redis.call('HSET', shown, title, table.concat(fields, '\\t'))
      if redis.call('TTL', shown) < 0 then redis.call('EXPIRE', shown, window + 3600) end
    end
    local hkey = prefix .. ':online:hour:' .. math.floor(ts / 3600)
    local tag = version .. '|' .. arm .. '|'
    local dc = first and 1 or 0
    redis.call('HINCRBY', hkey, tag .. 'clicks', dc)
    redis.call('HINCRBY', hkey, tag .. 'viewings', 1)
    redis.call('HINCRBYFLOAT', hkey, tag .. 'completion', completion)
    redis.call('HINCRBYFLOAT', hkey, tag .. 'completion_sq', completion * completion)
    redis.call('EXPIRE', hkey, retention)
    redis.call('HINCRBY', totals, tag .. 'clicks', dc)
    redis.call('HINCRBY', totals, tag .. 'viewings', 1)
    redis.call('HINCRBYFLOAT', totals, tag .. 'completion', completion)
    if exp ~= '' and exp == running then bump(prefix, exp, arm, digest, 0, dc, completion, 1) end
  end
end
return {credited, clicks}
"""
)


def completion(event: LiveEvent, minutes: float | None) -> float:
    """Watch seconds over the episode length, at most 1; a viewing of unknown length counts as complete."""
    if event.watch_seconds is None:
        return 1.0
    full = minutes * 60.0 if minutes else FULL_VIEWING_SECONDS
    return min(max(event.watch_seconds / full, 0.0), 1.0)


class OnlineLog:
    """Impressions and attribution for one key prefix (the service's write path)."""

    def __init__(self, client: redis.Redis, keys: Keys, ids: RecommendationIds):
        self.redis, self.keys, self.ids = client, keys, ids
        self._impress = client.register_script(_IMPRESS)
        self._attribute = client.register_script(_ATTRIBUTE)

    def _head(self, shard: int, running: str | None) -> list:
        return [self.keys.shard_head(shard), ATTRIBUTION_WINDOW, RETENTION_DAYS * 86400, running or ""]

    def _by_shard(self, rows: list, user_of) -> dict[int, list]:
        groups: dict[int, list] = {}
        for row in rows:
            groups.setdefault(self.keys.user_shard(user_of(row)), []).append(row)
        return groups

    def record(self, impressions: list[tuple[Impression, Origin]], running: str | None) -> int:
        """Store verified impressions (stream, per-user shown titles, counters): one atomic script per user shard."""
        stored = 0
        for shard, rows in self._by_shard(impressions, lambda row: row[0].user_id).items():
            args = self._head(shard, running)
            for shown, origin in rows:
                args += [
                    shown.user_id, self.ids.user_digest(shown.user_id), shown.recommendation_id, origin.version,
                    origin.arm or NO_ARM, origin.experiment or "", shown.timestamp, shown.row or "", len(shown.items),
                    *shown.items,
                ]  # fmt: skip
            keys = [self.keys.impressions_of(shard), self.keys.online_totals_of(shard)]
            stored += int(self._impress(keys=keys, args=args))
        return stored

    def attribute(self, events: list[tuple[LiveEvent, Origin | None, float]], running: str | None) -> tuple[int, int]:
        """Credit viewings (event, origin of its recommendation id or None, completion); (credited, clicks)."""
        credited = clicks = 0
        for shard, rows in self._by_shard(events, lambda row: row[0].user_id).items():
            args = self._head(shard, running)
            for event, origin, done in rows:
                args += [self.ids.user_digest(event.user_id), event.item_id, event.timestamp, repr(float(done))]
                if origin is not None:
                    args += [event.recommendation_id, origin.version, origin.arm or NO_ARM, origin.experiment or ""]
                else:
                    args += ["", "", "", ""]
            got, first = self._attribute(keys=[self.keys.online_totals_of(shard)], args=args)
            credited, clicks = credited + int(got), clicks + int(first)
        return credited, clicks


# -- reading the counts ------------------------------------------------------------------------------------------
HOUR_METRICS = ("impressions", "shown", "clicks", "viewings", "completion", "completion_sq")


def hourly(client: redis.Redis, keys: Keys, tags: list[tuple[str, str]], hours: list[int]) -> dict[tuple[str, str], list[dict]]:
    """For each (version, arm): one record per hour with the counts, users and CTR / watch-through.

    Summed over the user shards: each user counts in one shard only, so the
    shards' HyperLogLogs count disjoint users and their counts add up.
    """
    pipe = client.pipeline(transaction=False)
    for hour in hours:
        for shard in range(keys.shards):
            pipe.hgetall(keys.online_hour(hour, shard))
            for version, arm in tags:
                pipe.execute_command("PFCOUNT", keys.online_users(hour, version, arm, shard))  # (redis-py blocks pipe.pfcount on a cluster)
    answers = iter(pipe.execute())
    out: dict[tuple[str, str], list[dict]] = {tag: [] for tag in tags}
    for hour in hours:
        raw: dict[str, float] = {}
        users = dict.fromkeys(tags, 0)
        for _ in range(keys.shards):
            for k, v in next(answers).items():
                raw[k.decode()] = raw.get(k.decode(), 0.0) + float(v)
            for tag in tags:
                users[tag] += int(next(answers))
        for version, arm in tags:
            prefix = f"{version}|{arm}|"
            row = {"hour": hour, **{m: raw.get(prefix + m, 0.0) for m in HOUR_METRICS}, "users": users[(version, arm)]}
            out[(version, arm)].append(row)
    return out


def totals(client: redis.Redis, keys: Keys) -> dict[tuple[str, str], dict[str, float]]:
    """Counts since the start per (version, arm) (the ``/metrics`` counters), summed over the user shards."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for shard in range(keys.shards):
        for field, value in client.hgetall(keys.online_totals_of(shard)).items():
            version, arm, metric = field.decode().rsplit("|", 2)
            counts = out.setdefault((version, arm), {})
            counts[metric] = counts.get(metric, 0.0) + float(value)
    return out


def forget_versions(client: redis.Redis, keys: Keys, versions: set[str]) -> int:
    """Drop the running totals of versions no longer kept (their hourly counts expire by themselves)."""
    dropped = 0
    for shard in range(keys.shards):
        key = keys.online_totals_of(shard)
        stale = [f for f in client.hkeys(key) if f.decode().split("|", 1)[0] not in versions]
        dropped += int(client.hdel(key, *stale)) if stale else 0
    return dropped


# -- compaction ---------------------------------------------------------------------------------------------------
def compact_impressions(client: redis.Redis, keys: Keys, archive_dir: str | Path | None, now: float | None = None) -> dict:
    """Trim impressions no viewing can be credited to any more (older than the window).

    They were counted when they arrived; the stream only keeps the record. With
    an archive folder (``EVENTS_ARCHIVE``) they go to
    ``impressions-<first>_<last>.parquet`` first (fsynced, renamed; with several
    user shards, in ``shard-N/``) and are trimmed after; without one, entries
    older than ``RETENTION_DAYS`` are dropped.
    """
    result = {"archived": 0, "trimmed": 0, "archive_file": None, "impressions_kept": 0}
    for shard in range(keys.shards):
        folder = None if not archive_dir else Path(archive_dir) if keys.shards == 1 else Path(archive_dir) / f"shard-{shard}"
        part = _compact_impressions_of(client, keys.impressions_of(shard), folder, now)
        for total in ("archived", "trimmed", "impressions_kept"):
            result[total] += part[total]
        result["archive_file"] = part["archive_file"] or result["archive_file"]
    return result


def _compact_impressions_of(client: redis.Redis, stream: str, archive: Path | None, now: float | None) -> dict:
    now = time.time() if now is None else now
    horizon = now - (ATTRIBUTION_WINDOW if archive else RETENTION_DAYS * 86400)
    bound = f"{int(horizon * 1000)}-0"
    result = {"archived": 0, "trimmed": 0, "archive_file": None}
    if archive:
        entries = client.xrange(stream, "-", f"({bound}", count=COMPACT_BATCH)
        if entries:
            archive.mkdir(parents=True, exist_ok=True)
            first, last = entries[0][0].decode(), entries[-1][0].decode()
            final = archive / f"impressions-{first}_{last}.parquet"
            temp = archive / f".{final.name}.tmp"
            table = pa.table({
                "stream_id": [e[0].decode() for e in entries],
                "user_id": [e[1][b"u"].decode() for e in entries],
                "recommendation_id": [e[1][b"r"].decode() for e in entries],
                "items": [e[1][b"i"].decode().split("\n") for e in entries],
                "row": [e[1].get(b"row", b"").decode() or None for e in entries],
                "timestamp": pa.array([int(e[1][b"t"]) for e in entries], pa.int64()),
            })  # fmt: skip
            pq.write_table(table, temp)
            with open(temp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.rename(temp, final)
            result.update(archived=len(entries), archive_file=str(final))
            bound = _after(last)
    result["trimmed"] = int(client.xtrim(stream, minid=bound, approximate=False))
    result["impressions_kept"] = int(client.xlen(stream))
    return result


def _after(stream_id: str) -> str:
    ms, _, seq = stream_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"

