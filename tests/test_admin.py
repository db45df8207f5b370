"""The admin dashboard and /metrics through the Flask test client, against a real Redis."""

from __future__ import annotations

import re
import time

import pytest
from markupsafe import escape
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from app.admin.charts import Series, line_chart, nice_ticks
from app.metrics import figures, quantile
from jobs.runs import RunRecord, get_run, queued_requests, record_outcome
from jobs.scheduler import Schedule, Scheduler

TOKEN = "correct-horse-battery-staple-42"
HTML = {"Accept": "text/html"}


def redis_url(store) -> str:
    kwargs = store.redis.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


@pytest.fixture
def make_app(store, tmp_path, monkeypatch):
    monkeypatch.delenv("SECRET_KEY", raising=False)
    monkeypatch.delenv("ADMIN_TOKEN", raising=False)

    def make(**config):
        app = create_app(
            {
                "REDIS_URL": redis_url(store),
                "REDIS_PREFIX": store.keys.prefix,
                "MODEL_CACHE_DIR": str(tmp_path / "cache"),
                "MODEL_WATCHER": False,
                "TESTING": True,
                "ADMIN_TOKEN": TOKEN,
                **config,
            }
        )
        app.extensions["live_model"].refresh()
        return app

    return make


@pytest.fixture
def versions(store, trained_demo):
    """Two kept versions; the newer one is live."""
    older = store.publish(trained_demo.parts, trained_demo.meta)
    newer = store.publish(trained_demo.parts, trained_demo.meta)
    return older, newer


def esc(text: str) -> str:
    """As the page shows it (HTML-escaped)."""
    return str(escape(text))


def csrf_from(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def sign_in(client, token: str = TOKEN):
    page = client.get("/admin/login", headers=HTML)
    return client.post("/admin/login", data={"csrf_token": csrf_from(page.text), "token": token, "next": "/admin/"})


@pytest.fixture
def admin(make_app, versions):
    """A signed-in test client and its CSRF token."""
    client = make_app().test_client()
    assert sign_in(client).status_code == 303
    return client, csrf_from(client.get("/admin/runs", headers=HTML).text)


# -- sign-in, sessions, CSRF ----------------------------------------------------------------------------
def test_without_a_token_the_dashboard_is_off_and_says_how_to_turn_it_on(make_app):
    client = make_app(ADMIN_TOKEN=None).test_client()
    page = client.get("/admin/", headers=HTML)
    assert page.status_code == 503 and "ADMIN_TOKEN" in page.text and page.mimetype == "text/html"
    for response in (client.get("/admin/runs"), client.post("/admin/login", data={"token": ""})):
        assert response.status_code == 503 and "ADMIN_TOKEN" in response.get_json()["error"]


def test_sign_in(make_app, versions):
    client = make_app().test_client()
    to_login = client.get("/admin/models", headers=HTML)
    assert to_login.status_code == 302 and to_login.headers["Location"] == "/admin/login?next=/admin/models"

    wrong = sign_in(client, "not-the-token")
    assert wrong.status_code == 401 and "not right" in wrong.text
    assert client.get("/admin/models", headers=HTML).status_code == 302

    no_csrf = client.post("/admin/login", data={"token": TOKEN})
    assert no_csrf.status_code == 400 and "CSRF" in no_csrf.get_json()["error"]

    page = client.get("/admin/login?next=https://evil.example/", headers=HTML)
    response = client.post(
        "/admin/login", data={"csrf_token": csrf_from(page.text), "token": TOKEN, "next": "https://evil.example/"}
    )
    assert response.status_code == 303 and response.headers["Location"] == "/admin/"  # never off-site
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/admin" in cookie
    overview = client.get("/admin/", headers=HTML)
    assert overview.status_code == 200 and versions[1] in overview.text

    signed_in_csrf = csrf_from(overview.text)
    assert client.post("/admin/logout", data={"csrf_token": signed_in_csrf}).status_code == 303
    assert client.get("/admin/", headers=HTML).status_code == 302


def test_every_post_needs_the_csrf_token(admin, store):
    client, csrf = admin
    missing = client.post("/admin/runs")
    wrong = client.post("/admin/runs", data={"csrf_token": "x" * len(csrf)})
    for response in (missing, wrong):
        assert response.status_code == 400 and "CSRF" in response.get_json()["error"]
    assert queued_requests(store) == []
    assert client.post("/admin/runs", headers={"X-CSRF-Token": csrf}).status_code == 303
    assert len(queued_requests(store)) == 1


def test_signed_out_requests_get_401(make_app, versions, store):
    client = make_app().test_client()
    assert client.get("/admin/runs").status_code == 401
    csrf = csrf_from(client.get("/admin/login", headers=HTML).text)  # a session, but not signed in
    response = client.post("/admin/models/activate", data={"csrf_token": csrf, "version": versions[0]})
    assert response.status_code == 401 and "sign in" in response.get_json()["error"]
    assert store.live_version() == versions[1]


def test_one_cookie_serves_every_worker_and_a_new_token_signs_everyone_out(make_app, versions):
    first = make_app().test_client()
    sign_in(first)
    cookie = first.get_cookie("recs_admin", path="/admin").value

    other_worker = make_app().test_client()  # same ADMIN_TOKEN, no SECRET_KEY: same derived key
    other_worker.set_cookie("recs_admin", cookie, path="/admin")
    assert other_worker.get("/admin/", headers=HTML).status_code == 200

    rotated = make_app(ADMIN_TOKEN="a-brand-new-token-after-rotation").test_client()
    rotated.set_cookie("recs_admin", cookie, path="/admin")
    assert rotated.get("/admin/", headers=HTML).status_code == 302


def test_dashboard_pages_carry_strict_security_headers(admin):
    client, _ = admin
    response = client.get("/admin/", headers=HTML)
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Frame-Options"] == "DENY" and response.headers["Cache-Control"] == "no-store"
    assert client.get("/admin/static/admin.js").status_code == 200


def test_sign_in_attempts_are_rate_limited_per_address_and_overall(make_app, versions):
    app = make_app()
    from app.admin.auth import SIGNIN_WINDOW_SECONDS

    left = SIGNIN_WINDOW_SECONDS - time.time() % SIGNIN_WINDOW_SECONDS
    if left < 15:  # the limits count in fixed windows: start in a fresh one, not at its very end
        time.sleep(left + 0.1)
    attacker = app.test_client()
    statuses = [sign_in(attacker, f"guess-{n}").status_code for n in range(8)]
    assert statuses == [401] * 5 + [429] * 3
    refused = sign_in(attacker)  # even the right token, while this address is locked out
    assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 60
    # Another address is not locked out by one guesser...
    operator = app.test_client()
    operator.environ_base["REMOTE_ADDR"] = "10.0.0.99"
    assert sign_in(operator).status_code == 303
    # ...but many addresses guessing together reach the overall limit (30 a minute).
    failures = 5
    for n in range(40):
        client = app.test_client()
        client.environ_base["REMOTE_ADDR"] = f"10.1.{n // 250}.{n % 250}"
        for _ in range(2):
            if sign_in(client, "guess").status_code == 401:
                failures += 1
    assert failures == 30
    late = app.test_client()
    late.environ_base["REMOTE_ADDR"] = "10.2.0.1"
    assert sign_in(late, "guess").status_code == 429


def test_signing_out_invalidates_the_session_server_side(make_app, versions):
    client = make_app().test_client()
    sign_in(client)
    saved = client.get_cookie("recs_admin", path="/admin").value  # e.g. stolen, or a second tab
    csrf = csrf_from(client.get("/admin/", headers=HTML).text)
    assert client.post("/admin/logout", data={"csrf_token": csrf}).status_code == 303
    replay = make_app().test_client()
    replay.set_cookie("recs_admin", saved, path="/admin")
    assert replay.get("/admin/", headers=HTML).status_code == 302
    assert replay.get("/admin/runs").status_code == 401


def test_control_characters_in_next_are_a_400_and_every_admin_answer_has_the_headers(make_app, versions):
    client = make_app().test_client()
    response = client.get("/admin/login?next=/admin/%0d%0aSet-Cookie:%20x=1", headers=HTML)
    assert response.status_code == 400
    page = client.get("/admin/login", headers=HTML)
    response = client.post(
        "/admin/login", data={"csrf_token": csrf_from(page.text), "token": TOKEN, "next": "/admin/\r\nX-Injected: 1"}
    )
    assert response.status_code == 400 and "X-Injected" not in response.headers
    for answer in (response, client.get("/admin/no-such-page"), client.get("/admin/static/missing.js"), client.get("/admin")):
        assert answer.headers["X-Frame-Options"] == "DENY", answer.status_code
        assert "frame-ancestors 'none'" in answer.headers["Content-Security-Policy"]
        assert answer.headers["X-Content-Type-Options"] == "nosniff"


def test_a_corrupt_live_version_is_shown_as_such_and_a_good_one_can_be_activated(admin, versions, store):
    client, csrf = admin
    older, newer = versions
    store.redis.set(store.keys.meta(newer), b"{not json")
    overview = client.get("/admin/", headers=HTML)
    assert overview.status_code == 200 and 'id="live-corrupt"' in overview.text
    models = client.get("/admin/models", headers=HTML)
    assert models.status_code == 200 and "unreadable metadata" in models.text
    refused = client.post("/admin/models/activate", data={"csrf_token": csrf, "version": newer})
    assert refused.status_code == 409 and store.live_version() == newer
    response = client.post("/admin/models/activate", data={"csrf_token": csrf, "version": older})
    assert response.status_code == 303 and store.live_version() == older
    assert store.meta(older)["status"] == "live"


# -- overview, health, /metrics --------------------------------------------------------------------------
def metric_values(client) -> dict[tuple, float]:
    text = client.get("/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_health_figures_and_metrics_count_real_traffic(make_app, versions, store):
    app = make_app()
    app.add_url_rule("/boom", "boom", lambda: 1 / 0)  # a server error to count
    client = app.test_client()
    sign_in(client)
    model = app.extensions["live_model"].current
    history = app.extensions["health_history"]
    history.every = 0.0
    history.sample()
    before = metric_values(client)
    time.sleep(1.1)  # the window's start must be older than a second

    for user in (model.user_ids[0], model.user_ids[1], "someone-new"):
        assert client.get(f"/recommend?user={user}").status_code == 200
    assert client.get("/similar?item=no-such-title").status_code == 404
    assert client.get("/boom").status_code == 500
    record_outcome(store, "succeeded", 42.0)
    record_outcome(store, "rejected", 5.0)

    now = history.current()
    assert now["requests"] == 5 and now["rate"] > 0 and not now["since_start"]
    assert now["fallback_share"] == pytest.approx(1 / 3)  # the unknown user got the popular list
    assert now["error_rate"] == pytest.approx(1 / 5)
    assert now["p50_ms"] is not None and now["p50_ms"] <= now["p99_ms"]

    fragment = client.get("/admin/fragments/health", headers=HTML).text
    assert "33.3%" in fragment and "20.0%" in fragment

    after = metric_values(client)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("recs_http_requests_total", endpoint="/recommend", method="GET", status="200") == 3
    assert delta("recs_http_requests_total", endpoint="/similar", method="GET", status="404") == 1
    assert delta("recs_http_request_duration_seconds_count", endpoint="/recommend") == 3
    assert delta("recs_recommendations_total", strategy="popular") == 1
    assert delta("recs_recommendations_total", strategy="personalized") == 2
    assert delta("recs_http_errors_total", endpoint="/boom") == 1
    assert after[("recs_job_runs_total", (("status", "succeeded"),))] == 1
    assert after[("recs_job_runs_total", (("status", "rejected"),))] == 1
    assert after[("recs_job_duration_seconds_bucket", (("le", "10.0"),))] == 1
    assert after[("recs_job_duration_seconds_bucket", (("le", "60.0"),))] == 2
    assert after[("recs_job_duration_seconds_sum", ())] == 47.0
    assert after[("recs_job_last_success_timestamp_seconds", ())] == pytest.approx(time.time(), abs=60)


def test_latency_quantiles_follow_prometheus_rules():
    buckets = {0.01: 50.0, 0.1: 90.0, 1.0: 100.0, float("inf"): 100.0}
    assert quantile(0.5, buckets) == pytest.approx(0.01)
    assert quantile(0.9, buckets) == pytest.approx(0.1)
    assert quantile(0.95, buckets) == pytest.approx(0.1 + 0.9 * 0.5)
    assert quantile(0.5, {float("inf"): 0.0}) is None
    older = {"time": 0.0, "requests": 10.0, "errors": 1.0, "buckets": {1.0: 10.0}, "strategies": {"popular": 2.0}}
    newer = {"time": 10.0, "requests": 30.0, "errors": 1.0, "buckets": {1.0: 30.0}, "strategies": {"popular": 7.0}}
    result = figures(older, newer)
    assert result["rate"] == 2.0 and result["error_rate"] == 0.0 and result["fallback_share"] == 1.0


def test_overview_shows_the_live_version_how_it_was_trained_and_a_chart(admin, versions, store):
    client, _ = admin
    page = client.get("/admin/", headers=HTML).text
    assert versions[1] in page
    assert "600" in page and "30,000" in page  # users, events
    assert "Annoy indexes" in page and "Holdout metrics of the live version" in page
    assert page.count("<svg") >= 1 and "<rect" in page
    assert "Scheduler: <strong>not running</strong>" in page


def test_charts_are_svg_with_gaps_and_tooltips():
    svg = line_chart("t", ["a", "b", "c", "d"], [Series("s", [1.0, None, 3.0, 4.0])])
    assert svg.startswith("<svg") and svg.count("<polyline") == 2 and svg.count("<circle") == 3
    assert "<title>s at d: 4</title>" in svg
    assert "no data yet" in line_chart("empty", [], [])
    assert nice_ticks(0, 0.93) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


# -- models ---------------------------------------------------------------------------------------------
def test_models_page_and_rolling_back(admin, versions, store):
    client, csrf = admin
    older, newer = versions
    page = client.get("/admin/models", headers=HTML).text
    assert older in page and newer in page and "<svg" in page and "Holdout metrics across versions" in page
    assert page.count("Activate</button>") == 1  # every kept version but the live one

    response = client.post("/admin/models/activate", data={"csrf_token": csrf, "version": older})
    assert response.status_code == 303
    assert store.live_version() == older
    client.application.extensions["live_model"].refresh()  # what the watcher thread does in production
    assert client.get("/version").get_json()["model_version"] == older
    assert f"Version {older} is live" in client.get("/admin/models", headers=HTML).text

    for bad in ("no-such-version", "../../etc/passwd"):
        response = client.post("/admin/models/activate", data={"csrf_token": csrf, "version": bad})
        assert response.status_code == 404 and "not among the kept versions" in response.get_json()["error"]
    assert store.live_version() == older


# -- runs -----------------------------------------------------------------------------------------------
def test_retrain_now_only_queues_a_run(admin, store, versions):
    client, csrf = admin
    response = client.post("/admin/runs", data={"csrf_token": csrf, "force": "on", "reselect": "on"})
    assert response.status_code == 303
    run_id = response.headers["Location"].rsplit("/", 1)[1]
    assert queued_requests(store) == [
        {"run_id": run_id, "force": True, "reselect": True, "requested_at": pytest.approx(time.time(), abs=60)}
    ]
    assert get_run(store, run_id)["status"] == "queued"
    assert store.redis.get(store.keys.job_lock) is None and len(store.versions()) == 2  # nothing trained
    page = client.get(f"/admin/runs/{run_id}", headers=HTML).text
    assert "no scheduler is running" in page and "queued" in page and "with a new parameter search" in page

    again = client.post("/admin/runs", data={"csrf_token": csrf})  # a double click queues nothing more
    assert again.status_code == 303 and again.headers["Location"].endswith(run_id)
    assert len(queued_requests(store)) == 1

    store.redis.delete(store.keys.run_queue)  # the scheduler took it
    Scheduler(store, Schedule("0 3 * * *"), []).beat()  # a scheduler announces itself
    response = client.post("/admin/runs", data={"csrf_token": csrf}, follow_redirects=True, headers=HTML)
    assert "the scheduler starts it within seconds" in response.text
    runs_page = client.get("/admin/runs", headers=HTML).text
    assert "cron <code>0 3 * * *</code>" in runs_page and "Queue: 1 waiting" in runs_page


def test_a_run_page_shows_live_progress_then_the_outcome(admin, store):
    client, _ = admin
    run_id = "20260101T000000Z-abcd"
    record = RunRecord(store, run_id)
    record.save(
        trigger="scheduled",
        status="running",
        started_at=time.time() - 30,
        progress=40.0,
        step="evaluate · candidates 40%",
    )
    record.append_log("12:00:00 INFO jobs.nightly: loaded 300 titles")
    page = client.get(f"/admin/runs/{run_id}", headers=HTML).text
    assert f'data-poll="/admin/fragments/runs/{run_id}"' in page
    assert "40%" in page and "evaluate · candidates 40%" in page and "loaded 300 titles" in page
    assert "data-final" not in page

    record.update(status="succeeded", ended_at=time.time(), progress=100.0, step="done", version="v-new")
    fragment = client.get(f"/admin/fragments/runs/{run_id}", headers=HTML).text
    assert "data-final" in fragment and "succeeded" in fragment and "v-new" in fragment

    table = client.get("/admin/fragments/runs", headers=HTML).text
    assert run_id in table and "Run durations" in table and "<rect" in table
    # A 'running' run whose process died (no heartbeat for longer than the lock lives) says so.
    RunRecord(store, "20260101T000000Z-dead").save(trigger="cli", status="running", started_at=time.time() - 3600)
    assert "probably died" in client.get("/admin/runs/20260101T000000Z-dead", headers=HTML).text
    assert client.get("/admin/runs/20990101T000000Z-0000").status_code == 404
    assert client.get("/admin/runs/not-a-run-id").status_code == 404


# -- explorer -------------------------------------------------------------------------------------------
def test_explorer_search_title_and_user_pages(admin):
    client, _ = admin
    model = client.application.extensions["live_model"].current
    title = model.titles[0]
    word = title.split()[-1]
    results = client.get(f"/admin/explore?q={word.lower()}", headers=HTML).text
    assert esc(title) in results and f"/admin/explore/title?item={model.item_ids[0]}" in results

    page = client.get(f"/admin/explore/title?item={model.item_ids[0]}", headers=HTML).text
    assert esc(title) in page and "genres" in page
    for similar, _ in model.similar(0, 3):
        assert esc(model.titles[similar]) in page

    user = model.user_ids[0]
    page = client.get(f"/admin/explore/user?user={user}", headers=HTML).text
    strategy, recs = model.recommend(user, 10)
    assert f"({strategy})" in page and "because:" in page
    for rec in recs:
        assert esc(model.titles[rec.item]) in page
    history, _ = model.history(user)
    assert f"{len(history)} titles" in page and esc(model.titles[int(history[0])]) in page

    # The user's home page, as GET /page builds it, with the region and maturity selectors applied.
    from app.pages import build_page
    from models.rules import Filters

    app = client.application
    trending = app.extensions["trending"].get()
    rows = build_page(model, user, Filters(max_maturity=7, region="GB"), set(), (None, None), app.config["PAGE"], trending)
    kids = client.get(f"/admin/explore/user?user={user}&max_maturity=7&region=GB", headers=HTML).text
    assert 'id="home-page"' in kids and kids.count('class="page-row"') == len(rows) > 0
    assert '<option value="7" selected>' in kids
    for row in rows:
        assert esc(row["title"]) in kids

    stranger = client.get("/admin/explore/user?user=nobody-at-all", headers=HTML).text
    assert "not in the model" in stranger and "(popular)" in stranger
    assert client.get("/admin/explore/title?item=nope").status_code == 404


def test_promotions_from_the_dashboard_lead_their_row_at_once_under_the_filters(admin, store):
    client, csrf = admin
    app = client.application
    model = app.extensions["live_model"].current
    user = next(u for u in model.user_ids if len(model.history(u)[0]) >= 5)
    seen = set(model.history(user)[0].tolist())
    maturity = model.items["maturity"]
    unseen = [i for i in range(model.n_items) if i not in seen and app.extensions["live_model"].current.rules.eligible(None)[i]]
    kids = [model.item_ids[i] for i in unseen if maturity[i] is not None and maturity[i] <= 7][:2]
    adult = next(model.item_ids[i] for i in unseen if maturity[i] == 18)
    response = client.post("/admin/promotions", data={"csrf_token": csrf, "kind": "top_picks", "share": "0.3", "items": "\n".join([adult, *kids])})
    assert response.status_code == 303
    assert adult in client.get("/admin/promotions", headers=HTML).text
    rows = client.get(f"/page?user={user}").get_json()["rows"]
    top = rows[0]
    assert top["kind"] == "top_picks"
    assert [i["item_id"] for i in top["items"][:3]] == [adult, *kids]
    assert all(i.get("reason") == "promoted" for i in top["items"][:3]) and "reason" not in top["items"][3]
    # A kids' profile: the 18-rated promotion is filtered out, the others still lead.
    top = client.get(f"/page?user={user}&max_maturity=7").get_json()["rows"][0]
    assert [i["item_id"] for i in top["items"] if i.get("reason") == "promoted"] == kids
    ids = [i["item_id"] for row in client.get(f"/page?user={user}").get_json()["rows"] for i in row["items"]]
    assert len(ids) == len(set(ids))
    bad = client.post("/admin/promotions", data={"csrf_token": csrf, "kind": "spotlight", "share": "0.3", "items": "x"})
    assert bad.status_code == 400
    assert client.post("/admin/promotions", data={"csrf_token": csrf, "kind": "top_picks", "items": ""}).status_code == 303
    assert all("reason" not in i for i in client.get(f"/page?user={user}").get_json()["rows"][0]["items"])


# -- experiments (issue 13) --------------------------------------------------------------------------------
def test_experiment_page_starts_shows_charts_and_promotes(admin, store, versions):
    client, csrf = admin
    older, newer = versions
    # The charts bucket by the hour: keep the events and the render in one hour (a run at hh:59:5x flaked).
    if time.time() % 3600 > 3540:
        time.sleep(3601 - time.time() % 3600)
    page = client.get("/admin/experiments", headers=HTML)
    assert page.status_code == 200 and "No experiment is running" in page.text and 'id="start-experiment"' in page.text
    bad = client.post("/admin/experiments", data={"csrf_token": csrf, "action": "start", "name": "x", "control": newer, "treatment": "nope", "share": "0.5"})
    assert bad.status_code == 400 and "not a kept version" in bad.get_json()["error"]
    started = client.post(
        "/admin/experiments",
        data={"csrf_token": csrf, "action": "start", "name": "dash test", "control": newer, "treatment": older, "share": "0.5", "mde": "0.05"},
    )
    assert started.status_code == 303
    live = client.application.extensions["live_model"]
    live.refresh_experiment()
    now = int(time.time())
    for user in live.current.user_ids[:30]:
        answer = client.get(f"/recommend?user={user}").get_json()
        shown = [i["item_id"] for i in answer["items"]]
        assert client.post("/impressions", json={"user_id": user, "recommendation_id": answer["recommendation_id"], "items": shown, "timestamp": now}).status_code == 200
        client.post("/events", json={"user_id": user, "item_id": shown[0], "timestamp": now + 5})
    page = client.get("/admin/experiments?mde=0.1", headers=HTML)
    assert page.status_code == 200
    assert "dash test" in page.text and page.text.count("<svg") == 2  # CTR and watch-through over time
    impressions = re.findall(r'<tr data-arm="(\w+)"><td>\w+</td><td><code>[^<]+</code></td><td>[^<]+</td>\s*<td>(\d+)</td><td>(\d+)</td>', page.text)
    assert sum(int(n) for _, _, n in impressions) == 30
    assert "10.0%" in page.text or "10 %" in page.text or "10%" in page.text  # the chosen minimum effect
    assert client.get("/admin/experiments?mde=abc", headers=HTML).status_code == 400
    promoted = client.post("/admin/experiments", data={"csrf_token": csrf, "action": "promote", "arm": "treatment"})
    assert promoted.status_code == 303 and store.live_version() == older
    page = client.get("/admin/experiments", headers=HTML)
    assert "No experiment is running" in page.text and "promoted" in page.text
    assert client.post("/admin/experiments", data={"csrf_token": csrf, "action": "stop"}).status_code == 400


def test_models_page_shows_the_cold_start_text_lift(admin, versions, trained_demo):
    client, _ = admin
    page = client.get("/admin/models", headers=HTML)
    cold = trained_demo.meta["metrics"]["cold_start"]
    cells = re.findall(r'<td class="text-lift">([^<]+)</td>', page.text)
    assert len(cells) == 2 and cells[0].strip() not in ("", "—")
    assert abs(float(cells[0]) - cold["text_lift"]) < 0.01


def test_overview_names_the_search_a_version_reused(make_app, store, trained_demo):
    meta = {**trained_demo.meta, "selection": []}
    meta["metrics"] = {**meta["metrics"], "tuning": {**meta["metrics"]["tuning"], "reused_from": "20261201T000000Z-abcd"}}
    store.publish(trained_demo.parts, meta)
    client = make_app().test_client()
    assert sign_in(client).status_code == 303
    page = client.get("/admin/", headers=HTML).text
    trials = meta["metrics"]["tuning"]["trials"]
    assert f"parameters from the search of version 20261201T000000Z-abcd ({trials} trials)" in page
