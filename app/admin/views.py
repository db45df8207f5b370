"""The dashboard's pages: overview, models, runs, explorer; and its two actions.

Pages that change while you look at them (service health, the runs table, a
running job) are split into HTML fragments that ``static/admin.js`` re-fetches
every few seconds; the same fragment template renders the first view.
"""

from __future__ import annotations

import math
import time
from datetime import datetime

import numpy as np
import orjson
from flask import current_app, flash, redirect, render_template, request, url_for
from jinja2 import Undefined

from app.admin import admin
from app.admin.auth import admin_error
from app.admin.charts import STATUS_COLOURS, Series, bar_chart, line_chart
from app.pages import ROW_KINDS, build_page, check_promotions
from jobs.runs import ACTIVE, get_run, list_runs, lock_ttl, queue_run, queued_requests, run_log
from jobs.scheduler import scheduler_status
from models import experiments as exp
from models.attribution import hourly
from models.data import MATURITY_AGES
from models.recommender import merge_history
from models.rules import ISO_REGIONS, Filters
from models.store import CorruptMeta, ModelError

METRIC_NAMES = ("ndcg@10", "precision@10", "recall@10", "map@10", "coverage")
SEARCH_LIMIT = 50
MAX_QUERY = 128


def live_model():
    return current_app.extensions["live_model"]


def store():
    return live_model().store


# -- template helpers ---------------------------------------------------------------------------------
@admin.app_template_filter("when")
def when(epoch: float | None) -> str:
    if not epoch:
        return "—"
    return datetime.fromtimestamp(float(epoch)).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


@admin.app_template_filter("duration")
def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} min"


@admin.app_template_filter("size")
def size(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@admin.app_template_filter("num")
def num(value, digits: int = 4) -> str:
    if value is None or isinstance(value, Undefined):  # a field a record does not have (yet)
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


@admin.app_template_filter("percent")
def percent(value) -> str:
    return "—" if value is None or isinstance(value, Undefined) else f"{100 * value:.1f}%"


def run_duration(run: dict) -> float | None:
    start = run.get("started_at")
    if not start:
        return None
    return (run.get("ended_at") or time.time()) - start


admin.add_app_template_global(run_duration, "run_duration")


def silent_for(run: dict) -> float | None:
    """Seconds since a 'running' run last sent a heartbeat, if that is longer than its lock lives (it died)."""
    if run.get("status") != "running":
        return None
    silence = time.time() - (run.get("heartbeat_at") or run.get("started_at") or time.time())
    return silence if silence > lock_ttl() else None


admin.add_app_template_global(silent_for, "silent_for")
admin.add_app_template_global(STATUS_COLOURS, "status_colours")


def model_metrics(meta: dict | None) -> tuple[dict, dict]:
    metrics = (meta or {}).get("metrics") or {}
    return metrics.get("model") or {}, metrics.get("popularity") or {}


def short_version(version: str) -> str:
    # 20261121T225137Z-908c -> 11-21 22:51 (UTC, from the id itself)
    try:
        return f"{version[4:6]}-{version[6:8]} {version[9:11]}:{version[11:13]}"
    except IndexError:
        return version


# -- overview -----------------------------------------------------------------------------------------
@admin.get("/")
def overview():
    live_version = store().live_version()
    corrupt = None
    try:
        meta = store().meta_or_none(live_version) if live_version else None
    except CorruptMeta as exc:  # shown as such; the operator activates a good version on Models
        meta, corrupt = None, str(exc)
    model, popularity = model_metrics(meta)
    chart = None
    if model:
        chart = bar_chart(
            "Holdout metrics of the live version",
            list(METRIC_NAMES),
            [
                Series("model", [model.get(m) for m in METRIC_NAMES]),
                Series("popularity baseline", [popularity.get(m) for m in METRIC_NAMES]),
            ],
        )
    parts = (meta or {}).get("parts", {})
    run = get_run(store(), meta["run_id"]) if meta and meta.get("run_id") else None
    return render_template(
        "admin/overview.html",
        live_version=live_version,
        serving=live_model().version,
        fallback=live_model().fallback,
        corrupt=corrupt,
        meta=meta,
        model=model,
        popularity=popularity,
        metrics_chart=chart,
        index_size=sum(info["size"] for info in parts.values()),
        ann_size=sum(parts[name]["size"] for name in ("recommend.ann", "similar.ann") if name in parts),
        run=run,
        recent_runs=list_runs(store(), 5),
        scheduler=scheduler_status(store()),
        **health_context(),
    )


def health_context() -> dict:
    history = current_app.extensions["health_history"]
    now = history.current()
    series = history.series()
    labels = [datetime.fromtimestamp(s["time"]).strftime("%H:%M:%S") for s in series]
    return {
        "health": now,
        "rate_chart": line_chart("Requests per second", labels, [Series("requests/s", [s["rate"] for s in series])]),
        "latency_chart": line_chart(
            "Latency (ms)",
            labels,
            [Series("p50", [s["p50_ms"] for s in series]), Series("p99", [s["p99_ms"] for s in series], dashed=True)],
            unit=" ms",
        ),
    }


@admin.get("/fragments/health")
def health_fragment():
    return render_template("admin/_health.html", **health_context())


# -- models -------------------------------------------------------------------------------------------
@admin.get("/models")
def models():
    versions = store().versions()  # newest first
    oldest_first = list(reversed(versions))
    labels = [short_version(v["model_version"]) for v in oldest_first]
    chart = line_chart(
        "Holdout metrics across versions (oldest → newest)",
        labels,
        [
            Series("nDCG@10", [model_metrics(v)[0].get("ndcg@10") for v in oldest_first]),
            Series("recall@10", [model_metrics(v)[0].get("recall@10") for v in oldest_first]),
            Series("coverage", [model_metrics(v)[0].get("coverage") for v in oldest_first]),
            Series("popularity nDCG@10", [model_metrics(v)[1].get("ndcg@10") for v in oldest_first], dashed=True),
        ],
        point_notes=[f"{v['model_version']}, {v.get('status')}" for v in oldest_first],
        width=1100,
    )
    return render_template(
        "admin/models.html",
        versions=versions,
        chart=chart,
        live_version=store().live_version(),
        model_metrics=model_metrics,
    )


@admin.post("/models/activate")
def activate():
    version = request.form.get("version", "")
    kept = {meta["model_version"] for meta in store().versions()}
    if version not in kept:
        return admin_error(404, f"model version {version[:64]!r} is not among the kept versions")
    previous = store().live_version()
    try:
        store().activate(version)
    except ModelError as exc:
        return admin_error(409, f"cannot activate {version}: {exc}")
    current_app.logger.warning(
        "admin activated model version %s (was %s) from %s", version, previous, request.remote_addr
    )
    flash(f"Version {version} is live (was {previous or 'none'}). Workers switch to it within seconds.", "ok")
    return redirect(url_for("admin.models"), 303)


# -- runs ---------------------------------------------------------------------------------------------
def runs_context() -> dict:
    runs = list_runs(store(), 50)
    finished = [r for r in reversed(runs) if r.get("ended_at") and r.get("started_at") and r.get("status") != "skipped"]
    chart = bar_chart(
        "Run durations (oldest → newest; colour = outcome)",
        [short_version(r["id"]) for r in finished],
        [Series("duration", [run_duration(r) for r in finished])],
        unit=" s",
        bar_colours=[STATUS_COLOURS.get(r.get("status"), "#6b7280") for r in finished],
        width=1100,
    )
    return {
        "runs": runs,
        "queue": queued_requests(store()),
        "scheduler": scheduler_status(store()),
        "durations_chart": chart,
    }


@admin.get("/runs")
def runs():
    return render_template("admin/runs.html", **runs_context())


@admin.get("/fragments/runs")
def runs_fragment():
    return render_template("admin/_runs_table.html", **runs_context())


@admin.post("/runs")
def retrain_now():
    waiting = queued_requests(store())
    if waiting:
        # A double click, or two operators at once: one queued run is enough, it trains on the latest data.
        flash("A run is already queued; it starts when the scheduler is free.", "warn")
        return redirect(url_for("admin.run_page", run_id=waiting[0]["run_id"]), 303)
    force, reselect = request.form.get("force") == "on", request.form.get("reselect") == "on"
    run_id = queue_run(store(), force=force, requested_by=f"dashboard ({request.remote_addr})", reselect=reselect)
    current_app.logger.info(
        "admin queued run %s (force=%s, reselect=%s) from %s", run_id, force, reselect, request.remote_addr
    )
    if scheduler_status(store()) is None:
        flash(
            "Queued, but no scheduler is running: start `python -m jobs.scheduler`; the run waits in the queue.", "warn"
        )
    else:
        flash("Queued: the scheduler starts it within seconds.", "ok")
    return redirect(url_for("admin.run_page", run_id=run_id), 303)


def run_context(run_id: str) -> dict | None:
    run = get_run(store(), run_id)
    if run is None:
        return None
    return {"run": run, "log": run_log(store(), run_id), "active": run.get("status") in ACTIVE}


@admin.get("/runs/<run_id>")
def run_page(run_id: str):
    context = run_context(run_id)
    if context is None:
        return admin_error(404, f"no run {run_id[:64]!r} is kept")
    return render_template("admin/run.html", **context)


@admin.get("/fragments/runs/<run_id>")
def run_fragment(run_id: str):
    context = run_context(run_id)
    if context is None:
        return admin_error(404, f"no run {run_id[:64]!r} is kept")
    return render_template("admin/_run_detail.html", **context)


# -- explorer -------------------------------------------------------------------------------------------
def loaded_model():
    return live_model().current


@admin.get("/explore")
def explore():
    query = request.args.get("q", "").strip()[:MAX_QUERY]
    model = loaded_model()
    results = []
    if model is not None and query:
        needle = query.casefold()
        for row, title in enumerate(model.titles):
            if needle in title.casefold() or model.item_ids[row] == query:
                results.append((model.item_ids[row], title))
                if len(results) == SEARCH_LIMIT:
                    break
    meaning, meaning_note = [], None
    if model is not None and query:
        encoder = current_app.extensions["search_encoder"]
        if model.text_index is None:
            meaning_note = "this version has no text index (no synopses in its catalogue)"
        elif encoder.error or encoder.encoder is None:
            encoder.start()
            meaning_note = encoder.error or "the search encoder is loading; search again in a few seconds"
        else:
            from app.search import rank

            found = model.search_text(encoder.vector(query), 30, model.rules.eligible(None), set())
            meaning = [(i["item_id"], i["title"], i["score"]) for i in rank(model, None, found, [], 20)]
    return render_template(
        "admin/explore.html", query=query, results=results, model=model, limit=SEARCH_LIMIT,
        meaning=meaning, meaning_note=meaning_note,
    )  # fmt: skip


def item_row(model, row: int) -> dict:
    return {"item_id": model.item_ids[row], "title": model.titles[row]}


@admin.get("/explore/title")
def title_page():
    model = loaded_model()
    if model is None:
        return admin_error(503, "no model is loaded in this worker yet")
    item_id = request.args.get("item", "")[:MAX_QUERY]
    row = model.item_index.get(item_id)
    if row is None:
        return admin_error(404, f"unknown title {item_id!r}")
    details = {name: values[row] for name, values in model.items.items() if name not in ("item_id", "title")}
    similar = [{**item_row(model, i), "score": score} for i, score in model.similar(row, 12)]
    return render_template("admin/title.html", item=item_row(model, row), details=details, similar=similar, model=model)


@admin.get("/explore/user")
def user_page():
    model = loaded_model()
    if model is None:
        return admin_error(503, "no model is loaded in this worker yet")
    user_id = request.args.get("user", "").strip()[:MAX_QUERY]
    if not user_id:
        return redirect(url_for("admin.explore"))
    fresh_items, fresh_weights = live_model().fresh_history(model, user_id)
    strategy, recs = model.recommend(user_id, 10, fresh_items, fresh_weights)
    items, weights = model.history(user_id)
    if fresh_items is not None and len(fresh_items):
        items, weights = merge_history(fresh_items, fresh_weights, items, weights)  # as /history shows it
    history = [
        {**item_row(model, int(i)), "weight": float(w)}
        for i, w in zip(items.tolist()[:100], weights.tolist()[:100], strict=True)
    ]
    recommendations = [
        {**item_row(model, r.item), "score": r.score, "because": [item_row(model, b) for b in r.because]} for r in recs
    ]
    region = request.args.get("region", "").strip().upper()[:2] or None
    maturity = request.args.get("max_maturity", "").strip()
    filters = Filters(
        region=region if region in ISO_REGIONS else None,
        max_maturity=int(maturity) if maturity.isdigit() and int(maturity) <= 18 else None,
    )
    rows = build_page(
        model, user_id, filters, set(), (fresh_items, fresh_weights), current_app.config["PAGE"],
        current_app.extensions["trending"].get(), current_app.extensions["promotions"].get(),
    )  # fmt: skip
    return render_template(
        "admin/user.html",
        user_id=user_id,
        rows=rows,
        region=filters.region or "",
        max_maturity=filters.max_maturity,
        regions=sorted(model.rules.region_masks),
        maturity_ages=MATURITY_AGES,
        known=model.user(user_id) is not None,
        strategy=strategy,
        history=history,
        history_total=len(items),
        recommendations=recommendations,
        model=model,
        fresh=0 if fresh_items is None else len(fresh_items),
    )


# -- promotions -----------------------------------------------------------------------------------------
@admin.get("/promotions")
def promotions():
    model = loaded_model()
    current = current_app.extensions["promotions"]
    current.forget()
    known = model.item_index if model is not None else {}
    rows = [
        {"kind": kind, "share": spec["share"], "items": [{"item_id": i, "title": model.titles[known[i]] if i in known else None} for i in spec["items"]]}
        for kind, spec in current.get().items()
    ]
    return render_template("admin/promotions.html", rows=rows, kinds=ROW_KINDS)


@admin.post("/promotions")
def save_promotion():
    kind = request.form.get("kind", "")
    ids = [i.strip() for i in request.form.get("items", "").replace(",", "\n").splitlines() if i.strip()]
    try:
        share = float(request.form.get("share", "0.2"))
    except ValueError:
        share = -1.0
    current = dict(current_app.extensions["promotions"].get())
    current.pop(kind, None)
    if ids:
        current[kind] = {"items": ids, "share": share}
    try:
        checked = check_promotions(current)
    except ValueError as exc:
        return admin_error(400, str(exc))
    store().redis.set(store().keys.promotions, orjson.dumps(checked))
    current_app.extensions["promotions"].forget()
    model = loaded_model()
    unknown = [i for i in ids if model is None or i not in model.item_index]
    current_app.logger.warning("admin set promotions for %s: %s (share %s) from %s", kind, ids, share, request.remote_addr)
    message = f"Promotions for {kind} saved: {len(ids)} title(s) at {share:.0%} of the row." if ids else f"Promotions for {kind} removed."
    if unknown:
        message += f" Not in the served model (shown once they are): {', '.join(unknown[:10])}."
    flash(message, "warn" if unknown else "ok")
    return redirect(url_for("admin.promotions"), 303)


# -- experiments ----------------------------------------------------------------------------------------
def experiment_series(found, buckets_of: int) -> dict:
    """Per arm and time bucket: CTR and watch-through with 95 % intervals, from the hourly counts."""
    first = int(found.started_at // 3600)
    last = int((found.record.get("ended_at") or time.time()) // 3600)
    hours = list(range(max(first, last - 24 * 60), last + 1))  # at most 60 days
    tags = [(arm["version"], name) for name, arm in found.arms.items()]
    counts = hourly(store().redis, store().keys, tags, hours)
    labels, series = [], {name: {"ctr": [], "ctr_low": [], "ctr_high": [], "wt": [], "wt_low": [], "wt_high": []} for name in found.arms}
    for start in range(0, len(hours), buckets_of):
        labels.append(datetime.utcfromtimestamp(hours[start] * 3600).strftime("%m-%d %H:00" if buckets_of == 1 else "%m-%d"))
        for version, name in tags:
            rows = counts[(version, name)][start : start + buckets_of]
            n = sum(r["impressions"] for r in rows)
            c = sum(r["clicks"] for r in rows)
            views = sum(r["viewings"] for r in rows)
            done = sum(r["completion"] for r in rows)
            done_sq = sum(r["completion_sq"] for r in rows)
            s = series[name]
            if n > 0:  # Wilson interval, impressions as trials (the decision uses users, see the table)
                p, z = c / n, 1.959964
                centre = (p + z * z / (2 * n)) / (1 + z * z / n)
                half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
                s["ctr"].append(p), s["ctr_low"].append(centre - half), s["ctr_high"].append(centre + half)
            else:
                s["ctr"].append(None), s["ctr_low"].append(None), s["ctr_high"].append(None)
            if views > 1:
                mean = done / views
                sd = math.sqrt(max(done_sq / views - mean * mean, 0.0) * views / (views - 1))
                half = 1.959964 * sd / math.sqrt(views)
                s["wt"].append(mean), s["wt_low"].append(mean - half), s["wt_high"].append(mean + half)
            else:
                s["wt"].append(None), s["wt_low"].append(None), s["wt_high"].append(None)
    return {"labels": labels, "series": series}


@admin.get("/experiments")
def experiments_page():
    try:
        mde = float(request.args.get("mde", "")) if request.args.get("mde") else None
    except ValueError:
        return admin_error(400, "mde must be a number, e.g. 0.05 for a 5 % lift")
    if mde is not None and not 0 < mde < 10:
        return admin_error(400, "mde must be above 0, e.g. 0.05 for a 5 % lift")
    wanted = request.args.get("id") or None
    found = exp.find(store(), wanted)
    if wanted and found is None:
        return admin_error(404, f"no kept experiment {wanted[:64]!r}")
    status, charts = None, []
    if found is not None:
        if mde is not None:
            found = exp.Experiment(found.id, found.name, found.started_at, found.salt, found.arms, found.control, mde, found.record)
        status = exp.status(store(), found)
        span_hours = ((found.record.get("ended_at") or time.time()) - found.started_at) / 3600
        data = experiment_series(found, 1 if span_hours <= 72 else 24)
        for key, label in (("ctr", "CTR (clicks / impressions)"), ("wt", "Watch-through (completion of credited viewings)")):
            lines = []
            for n, name in enumerate(sorted(found.arms)):
                colour = ("#2563eb", "#f97316", "#16a34a", "#9333ea")[n % 4]
                s = data["series"][name]
                lines += [Series(name, s[key], colour), Series(f"{name} 95%", s[f"{key}_low"], colour, dashed=True),
                          Series(f"{name} 95% ", s[f"{key}_high"], colour, dashed=True)]  # fmt: skip
            charts.append(line_chart(f"{label}, per {'hour' if span_hours <= 72 else 'day'}, with 95 % intervals", data["labels"], lines, width=1100))
    kept = [v for v in store().versions() if v.get("status") != "corrupt"]
    return render_template(
        "admin/experiments.html", status=status, charts=charts, past=exp.history(store()), versions=kept,
        running=exp.current(store()), live_version=store().live_version(), default_mde=exp.DEFAULT_MDE,
    )  # fmt: skip


@admin.post("/experiments")
def experiment_action():
    action = request.form.get("action", "")
    try:
        if action == "start":
            share = float(request.form.get("share", "0.5"))
            mde = float(request.form.get("mde", str(exp.DEFAULT_MDE)))
            arms = [("control", request.form.get("control", ""), 1 - share), ("treatment", request.form.get("treatment", ""), share)]
            started = exp.start(store(), request.form.get("name", "").strip(), arms, mde=mde)
            message = f"Experiment {started.name!r} started; workers serve its arms within seconds."
        elif action == "stop":
            exp.stop(store())
            message = "Experiment stopped: everyone gets the live version again. Its results stay below."
        elif action == "promote":
            arm = request.form.get("arm", "")
            record = exp.promote(store(), arm)
            message = f"Arm {arm!r} promoted: version {record['arms'][arm]['version']} is live; the experiment has ended."
        else:
            return admin_error(400, "unknown action; use start, stop or promote")
    except ValueError as exc:  # ExperimentError, and a share or mde that is not a number
        return admin_error(400, str(exc))
    except ModelError as exc:
        return admin_error(409, str(exc))
    current_app.logger.warning("admin experiment %s from %s: %s", action, request.remote_addr, message)
    flash(message, "ok")
    return redirect(url_for("admin.experiments_page"), 303)


# -- the embedding map ----------------------------------------------------------------------------------
MAP_POINTS = 20_000  # titles drawn at most (a random sample beyond it, plus every highlighted one)
MAP_GENRES = 8  # colours: the most common genres, then "other"


@admin.get("/map.json")
def map_json():
    """The version's 2-D projection of the item vectors, for the canvas of the explorer pages.

    ``user``: highlights that user's history and recommendations; ``item``: that title and its neighbours.
    """
    model = loaded_model()
    if model is None or model.map is None:
        return admin_error(404, "the served version has no embedding map (published before it existed)")
    highlight: dict[str, list[int]] = {}
    user = request.args.get("user", "").strip()[:MAX_QUERY]
    if user:
        fresh_items, fresh_weights = live_model().fresh_history(model, user)
        items, _ = model.history(user)
        highlight["history"] = [int(i) for i in items[:200]]
        _, recs = model.recommend(user, 10, fresh_items, fresh_weights)
        highlight["recommended"] = [r.item for r in recs]
    item = request.args.get("item", "").strip()[:MAX_QUERY]
    if item in model.item_index:
        row = model.item_index[item]
        highlight["focus"] = [row]
        highlight["neighbours"] = [i for i, _ in model.similar(row, 12)]
    n = model.n_items
    rows = np.arange(n)
    if n > MAP_POINTS:
        rows = np.random.default_rng(0).choice(n, MAP_POINTS, replace=False)
    rows = np.union1d(rows, np.fromiter((r for group in highlight.values() for r in group), dtype=np.int64))
    genres = model.items.get("genres") or [[] for _ in range(n)]
    counts: dict[str, int] = {}
    for names in genres:
        for g in names:
            counts[g] = counts.get(g, 0) + 1
    top = sorted(counts, key=lambda g: (-counts[g], g))[:MAP_GENRES]
    colour = {g: k for k, g in enumerate(top)}
    position = {int(r): k for k, r in enumerate(rows.tolist())}
    points = [
        [round(float(model.map[r, 0]), 4), round(float(model.map[r, 1]), 4),
         next((colour[g] for g in genres[r] if g in colour), len(top)), model.titles[r]]
        for r in rows.tolist()
    ]  # fmt: skip
    return current_app.response_class(
        orjson.dumps({
            "genres": [*top, "other"], "points": points, "titles": int(n),
            "highlight": {name: [position[r] for r in group if r in position] for name, group in highlight.items()},
        }),  # fmt: skip
        mimetype="application/json",
    )
