"""Online experiments between model versions: arms, assignment, and the statistics that name a winner.

An experiment splits users between *arms*, each serving one kept model
version for a share of users. Its record (JSON under ``Keys.experiment`` while
it runs, and kept under ``Keys.experiments`` after)::

    {"id", "name", "started_at", "salt", "mde", "status": "running" | "stopped" | "promoted",
     "arms": {arm: {"version", "share"}}, "control": arm, "ended_at"?, "promoted"?}

Assignment is a salted hash of the user id (:meth:`Experiment.assign`): the
same user always lands in the same arm, no per-user state is kept, and a new
experiment (new salt) reshuffles everyone. One experiment runs at a time.

The statistics work on *users*, the unit that is randomised: per user the
counters in ``Keys.experiment_users`` (impressions, clicks, completion,
viewings; :mod:`models.attribution` keeps them and their sums of squares and
products incrementally). CTR is clicks over impressions and watch-through
is completion over attributed viewings, both ratios of per-user sums, with
delta-method variances. The difference between an arm and the control is
judged by a mixture sequential probability ratio test (mSPRT, Johari et al.
2017, normal mixture with scale ``tau = mde x control rate``): its confidence
sequence holds at every moment at once, so an operator may look every hour
and stop when it says "significant" without inflating the false-positive rate.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import time
from dataclasses import dataclass, field

import orjson

from models.store import ModelStore, new_version_id

ARM_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}")
ALPHA = 0.05
POWER = 0.8
DEFAULT_MDE = 0.05  # the smallest relative lift worth detecting (5 %)
HISTORY_KEPT = 50
RESULTS_DAYS = 35  # an ended experiment's per-user counts are kept this long
METRICS = {"ctr": ("c", "n"), "watch_through": ("w", "v")}  # numerator, denominator of each ratio metric


class ExperimentError(ValueError):
    """A request the experiments cannot take; the message says why."""


@dataclass(frozen=True)
class Experiment:
    id: str
    name: str
    started_at: float
    salt: str
    arms: dict[str, dict]
    control: str
    mde: float = DEFAULT_MDE
    record: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_record(cls, record: dict) -> Experiment:
        arms = {str(name): {"version": str(arm["version"]), "share": float(arm["share"])} for name, arm in record["arms"].items()}
        return cls(
            str(record["id"]), str(record["name"]), float(record["started_at"]), str(record["salt"]), arms,
            str(record.get("control") or sorted(arms)[0]), float(record.get("mde", DEFAULT_MDE)), record,
        )  # fmt: skip

    def assign(self, user_id: str) -> str:
        """The user's arm: a uniform number from a salted SHA-256 of the id, cut by the arms' shares (in name order)."""
        digest = hashlib.sha256(f"{self.salt}\0{user_id}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") / 2**64
        total = 0.0
        names = sorted(self.arms)
        for name in names:
            total += self.arms[name]["share"]
            if point < total:
                return name
        return names[-1]  # rounding: shares sum to 1 within 1e-9

    @property
    def versions(self) -> set[str]:
        return {arm["version"] for arm in self.arms.values()}


def current(store: ModelStore) -> Experiment | None:
    """The running experiment, or None (also when its record cannot be read: nothing is split then)."""
    raw = store.redis.get(store.keys.experiment)
    if not raw:
        return None
    try:
        return Experiment.from_record(orjson.loads(raw))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None


def parse_arm(text: str) -> tuple[str, str, float]:
    """``control=VERSION:0.5`` -> ("control", "VERSION", 0.5)."""
    name, sep, rest = text.partition("=")
    version, sep2, share = rest.rpartition(":")
    if not sep or not sep2 or not version:
        raise ExperimentError(f"arm {text!r}: write NAME=VERSION:SHARE, e.g. control=20261201T020000Z-ab12:0.5")
    try:
        value = float(share)
    except ValueError:
        raise ExperimentError(f"arm {text!r}: the share {share!r} is not a number") from None
    return name.strip(), version.strip(), value


def start(
    store: ModelStore, name: str, arms: list[tuple[str, str, float]], mde: float = DEFAULT_MDE, now: float | None = None
) -> Experiment:
    """Start an experiment; ``arms`` = [(arm, version, share)], the first is the control unless one is named "control"."""
    if not EXPERIMENT_NAME.fullmatch(name or ""):
        raise ExperimentError("the name must be 1-64 letters, digits, spaces, '_', '.' or '-'")
    running = current(store)
    if running is not None:
        raise ExperimentError(f"experiment {running.name!r} is running; stop or promote it first (one at a time)")
    if store.redis.exists(store.keys.experiment):
        raise ExperimentError("the running experiment's record in Redis is unreadable; 'stop' removes it")
    if len(arms) < 2:
        raise ExperimentError("an experiment needs at least two arms")
    if not 0 < mde < 10:
        raise ExperimentError("--mde (the smallest relative lift worth detecting) must be above 0, e.g. 0.05")
    table: dict[str, dict] = {}
    for arm, version, share in arms:
        if not ARM_NAME.fullmatch(arm):
            raise ExperimentError(f"arm name {arm!r}: use 1-32 lower-case letters, digits, '_' or '-'")
        if arm in table:
            raise ExperimentError(f"arm {arm!r} is given twice")
        if not (0 < share <= 1) or not math.isfinite(share):
            raise ExperimentError(f"arm {arm!r}: the share must be above 0 and at most 1, not {share}")
        meta = store.meta_or_none(version)
        if meta is None:
            raise ExperimentError(f"arm {arm!r}: version {version!r} is not a kept version (the dashboard's Models page lists them)")
        store.verify(version, meta)  # a version whose parts do not verify cannot be served
        table[arm] = {"version": version, "share": share}
    total = sum(arm["share"] for arm in table.values())
    if abs(total - 1.0) > 1e-6:
        raise ExperimentError(f"the arms' shares sum to {total:g}; they must sum to 1")
    control = "control" if "control" in table else arms[0][0]
    now = time.time() if now is None else now
    record = {
        "id": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + secrets.token_hex(2),
        "name": name, "started_at": now, "salt": secrets.token_hex(16), "mde": mde,
        "status": "running", "arms": table, "control": control,
    }  # fmt: skip
    blob = orjson.dumps(record)
    pipe = store.redis.pipeline(transaction=True)
    pipe.set(store.keys.experiment, blob, nx=True)
    pipe.hset(store.keys.experiments, record["id"], blob)
    created, _ = pipe.execute()
    if not created:  # another operator started one in between
        store.redis.hdel(store.keys.experiments, record["id"])
        raise ExperimentError("another experiment was started at the same moment; stop it first")
    store.redis.publish(store.keys.live_channel, "experiment")  # workers pick it up at once (else within a poll)
    _trim_history(store)
    return Experiment.from_record(record)


def stop(store: ModelStore, status: str = "stopped", promoted: str | None = None, now: float | None = None) -> dict:
    """End the running experiment (every user gets the live version again); its record and counts stay readable."""
    running = current(store)
    if running is None:
        if store.redis.delete(store.keys.experiment):  # a record nobody can read: nothing is being split
            store.redis.publish(store.keys.live_channel, "experiment")
            return {"status": "removed", "reason": "the experiment record was unreadable"}
        raise ExperimentError("no experiment is running")
    record = {**running.record, "status": status, "ended_at": time.time() if now is None else now}
    if promoted:
        record["promoted"] = promoted
    pipe = store.redis.pipeline(transaction=True)
    pipe.delete(store.keys.experiment)
    pipe.hset(store.keys.experiments, running.id, orjson.dumps(record))
    pipe.execute()
    pipe = store.redis.pipeline(transaction=False)  # per user shard: on a cluster, in other slots
    for arm in running.arms:  # the results stay readable for RESULTS_DAYS after the end, then go
        for shard in range(store.keys.shards):
            pipe.expire(store.keys.experiment_users(running.id, arm, shard), RESULTS_DAYS * 86400)
            pipe.expire(store.keys.experiment_sums(running.id, arm, shard), RESULTS_DAYS * 86400)
    pipe.execute()
    store.redis.publish(store.keys.live_channel, "experiment")  # after: a cluster transaction cannot hold a PUBLISH
    return record


def promote(store: ModelStore, arm: str) -> dict:
    """Make ``arm``'s version live (the same atomic switch as any activation), then end the experiment."""
    running = current(store)
    if running is None:
        raise ExperimentError("no experiment is running")
    if arm not in running.arms:
        raise ExperimentError(f"no arm {arm!r}; the arms are: {', '.join(sorted(running.arms))}")
    store.activate(running.arms[arm]["version"])
    return stop(store, status="promoted", promoted=arm)


def publish_baseline(store: ModelStore, version: str) -> str:
    """Publish (not live) a popularity-only twin of ``version``: same catalogue and histories, and /recommend
    answers every user with the most popular titles they have not seen. The arm that tells whether
    personalisation pays at all."""
    meta = store.meta(version)
    store.verify(version, meta)
    parts = {name: store.fetch_part(version, name, info) for name, info in meta["parts"].items()}
    keep = {k: v for k, v in meta.items() if k not in ("parts", "checksum", "model_version", "stored_at", "created_at", "status", "activated_at")}
    twin = new_version_id()
    if meta.get("user_store"):  # the same user records, under the twin's own id (pruned with it)
        store.copy_users(version, twin, meta["user_store"])
    return store.write_version(parts, {**keep, "ranking": "popularity", "baseline_of": version}, twin)


def history(store: ModelStore) -> list[dict]:
    """Every kept experiment record, newest first."""
    records = []
    for raw in store.redis.hvals(store.keys.experiments):
        try:
            records.append(orjson.loads(raw))
        except orjson.JSONDecodeError:
            continue
    return sorted(records, key=lambda r: r.get("started_at", 0), reverse=True)


def find(store: ModelStore, experiment_id: str | None = None) -> Experiment | None:
    """The running experiment, or a kept one by id."""
    if experiment_id is None:
        return current(store)
    raw = store.redis.hget(store.keys.experiments, experiment_id)
    return Experiment.from_record(orjson.loads(raw)) if raw else None


def _trim_history(store: ModelStore) -> None:
    records = history(store)
    for old in records[HISTORY_KEPT:]:
        pipe = store.redis.pipeline(transaction=False)
        pipe.hdel(store.keys.experiments, old["id"])
        for arm in old.get("arms", {}):
            for shard in range(store.keys.shards):
                pipe.delete(store.keys.experiment_users(old["id"], arm, shard))
                pipe.delete(store.keys.experiment_sums(old["id"], arm, shard))
        pipe.execute()


# -- statistics ------------------------------------------------------------------------------------------------
SUM_FIELDS = ("users", "n", "c", "w", "v", "nn", "cc", "cn", "ww", "vv", "wv")


def arm_sums(store: ModelStore, experiment: Experiment) -> dict[str, dict[str, float]]:
    """Each arm's users and per-user sums (see :mod:`models.attribution`)."""
    shards = range(store.keys.shards)  # each user's counters live in their shard: the shards' sums add up
    pipe = store.redis.pipeline(transaction=False)
    for arm in experiment.arms:
        for shard in shards:
            pipe.hgetall(store.keys.experiment_sums(experiment.id, arm, shard))
    answers = iter(pipe.execute())
    out = {}
    for arm in experiment.arms:
        values: dict[str, float] = {}
        for _ in shards:
            for k, v in next(answers).items():
                values[k.decode()] = values.get(k.decode(), 0.0) + float(v)
        out[arm] = {name: values.get(name, 0.0) for name in SUM_FIELDS}
    return out


def ratio(sums: dict[str, float], metric: str) -> tuple[float | None, float | None]:
    """A ratio metric over users (sum of numerators / sum of denominators) and its delta-method variance."""
    num, den = METRICS[metric]
    users = sums["users"]
    if users < 2 or sums[den] <= 0:
        return None, None
    mean_x, mean_y = sums[num] / users, sums[den] / users
    estimate = sums[num] / sums[den]
    var_x = max(sums[num * 2] / users - mean_x**2, 0.0)
    var_y = max(sums[den * 2] / users - mean_y**2, 0.0)
    cov = sums[num + den] / users - mean_x * mean_y
    per_user = max(var_x - 2 * estimate * cov + estimate**2 * var_y, 0.0) / mean_y**2
    return estimate, per_user / users


def confidence_sequence(variance: float, tau2: float, alpha: float = ALPHA) -> float:
    """Half-width of the mSPRT's (1 - alpha) confidence sequence for a difference with this variance.

    The mixture likelihood ratio exceeds 1/alpha exactly when the estimate lies
    further than this from 0: d² >= V (V + tau²) / tau² x (2 log(1/alpha) + log((V + tau²) / V)).
    """
    if variance <= 0:
        return 0.0
    return math.sqrt(variance * (variance + tau2) / tau2 * (2 * math.log(1 / alpha) + math.log((variance + tau2) / variance)))


def always_valid_p(difference: float, variance: float, tau2: float) -> float:
    """1 / (the mixture likelihood ratio), capped at 1: below alpha exactly when the sequence excludes 0."""
    if variance <= 0:
        return 1.0
    log_ratio = 0.5 * math.log(variance / (variance + tau2)) + difference**2 * tau2 / (2 * variance * (variance + tau2))
    return float(min(1.0, math.exp(-log_ratio)))


def _z(p: float) -> float:
    """The standard normal quantile."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(p)


def users_needed(per_user_variance: float, base: float, mde: float, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """Users per arm at which the sequential test finds a true lift of ``mde`` with probability ``power``.

    Solved by bisection on n: the expected difference ``mde x base`` must exceed
    the confidence-sequence half-width plus ``z_power`` standard errors, with
    the variance of the difference = 2 x per-user variance / n.
    """
    if per_user_variance <= 0 or base <= 0:
        return None
    effect = mde * base
    tau2 = effect**2
    z = _z(power)

    def enough(n: float) -> bool:
        v = 2 * per_user_variance / n
        return effect >= confidence_sequence(v, tau2, alpha) + z * math.sqrt(v)

    low, high = 2.0, 2.0
    while not enough(high):
        high *= 2
        if high > 1e12:
            return None
    while high - low > 1:
        mid = (low + high) / 2
        if enough(mid):
            high = mid
        else:
            low = mid
    return int(math.ceil(high))


def compare(control: dict, treatment: dict, metric: str, mde: float, alpha: float = ALPHA) -> dict:
    """Treatment against control on one metric: lift, its always-valid interval, significance, users still needed."""
    base, var_c = ratio(control, metric)
    value, var_t = ratio(treatment, metric)
    out = {"metric": metric, "control": base, "treatment": value, "lift": None, "lift_interval": None,
           "difference_interval": None, "always_valid_p": None, "significant": False, "users_needed_per_arm": None,
           "more_users_needed": None}  # fmt: skip
    if base is None or value is None or base <= 0:
        return out
    difference = value - base
    variance = var_c + var_t
    tau2 = (mde * base) ** 2
    half = confidence_sequence(variance, tau2, alpha)
    p = always_valid_p(difference, variance, tau2)
    per_user = max(var_c * control["users"], var_t * treatment["users"])
    needed = users_needed(per_user, base, mde, alpha)
    have = min(control["users"], treatment["users"])
    out.update(
        lift=difference / base,
        difference_interval=[difference - half, difference + half],
        lift_interval=[(difference - half) / base, (difference + half) / base],
        always_valid_p=p,
        significant=p < alpha,
        users_needed_per_arm=needed,
        more_users_needed=None if needed is None else max(0, needed - int(have)),
    )
    return out


def status(store: ModelStore, experiment: Experiment, alpha: float = ALPHA) -> dict:
    """The ``status`` document: per arm its version, share and counts; each arm against the control on both metrics."""
    sums = arm_sums(store, experiment)
    arms = {}
    for name, arm in experiment.arms.items():
        s = sums[name]
        ctr, ctr_var = ratio(s, "ctr")
        through, through_var = ratio(s, "watch_through")
        arms[name] = {
            "version": arm["version"], "share": arm["share"], "users": int(s["users"]),
            "impressions": int(s["n"]), "clicks": int(s["c"]), "viewings": int(s["v"]),
            "ctr": ctr, "ctr_interval": _interval(ctr, ctr_var),
            "watch_through": through, "watch_through_interval": _interval(through, through_var),
        }  # fmt: skip
    others = [a for a in sorted(experiment.arms) if a != experiment.control]
    level = alpha / max(len(others), 1)  # Bonferroni over the arms compared with the control
    comparisons = {
        arm: {m: compare(sums[experiment.control], sums[arm], m, experiment.mde, level) for m in METRICS} for arm in others
    }
    winner = None
    for arm, result in comparisons.items():
        ctr = result["ctr"]
        if ctr["significant"]:
            if ctr["lift"] > 0 and (winner is None or ctr["lift"] > comparisons[winner]["ctr"]["lift"]):
                winner = arm
    if winner is None and comparisons and all(r["ctr"]["significant"] and r["ctr"]["lift"] < 0 for r in comparisons.values()):
        winner = experiment.control
    record = experiment.record
    return {
        "id": experiment.id, "name": experiment.name, "started_at": experiment.started_at,
        "status": record.get("status", "running"), "ended_at": record.get("ended_at"), "promoted": record.get("promoted"),
        "control": experiment.control, "mde": experiment.mde, "alpha": alpha,
        "test": "mSPRT (always valid: look as often as you like)",
        "arms": arms, "comparisons": comparisons, "winner": winner,
    }  # fmt: skip


def _interval(estimate: float | None, variance: float | None) -> list[float] | None:
    """A fixed-sample 95 % interval for one arm's rate (for display; the decision uses the sequence)."""
    if estimate is None or variance is None:
        return None
    half = 1.959964 * math.sqrt(variance)
    return [estimate - half, estimate + half]
