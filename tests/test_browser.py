"""An operator in a real browser: Playwright drives Debian's chromium against gunicorn and a real scheduler.

Sign in, see the live version, press "Retrain now" and watch the run finish,
roll back to the previous version and see ``/version`` change. Screenshots of
each step go to ``test-artifacts/browser/``.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobs.scheduler import scheduler_status
from tests.conftest import REPO_ROOT
from tests.helpers import get, start_gunicorn, stop
from tests.test_scheduler import start_scheduler, stop_scheduler, wait_for

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(
        f"chromium not found (looked for $CHROMIUM, chromium on PATH and {CHROMIUM}); "
        "install it with `apt-get install chromium` (.ci/run does)",
        allow_module_level=True,
    )

from playwright.sync_api import expect, sync_playwright  # noqa: E402

TOKEN = "browser-test-admin-token-0123456789"
ARTIFACTS = REPO_ROOT / "test-artifacts" / "browser"
# Playwright cannot download its own browser here: it drives the system's chromium, headless.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def wait_for_version(base: str, version: str, timeout: float = 30) -> int:
    """Every worker serves ``version`` (several answers in a row, so both gunicorn workers are asked).

    Returns how many requests it made.
    """
    deadline = time.monotonic() + timeout
    in_a_row = calls = 0
    while time.monotonic() < deadline:
        status, body = get(f"{base}/version")
        calls += 1
        in_a_row = in_a_row + 1 if status == 200 and body.get("model_version") == version else 0
        if in_a_row >= 10:
            return calls
        time.sleep(0.05)
    raise AssertionError(f"/version did not become {version}; last answer {status} {body}")


def test_operator_retrains_and_rolls_back_in_a_browser(redis_server, store, trained_demo, demo_files, tmp_path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    first = store.publish(trained_demo.parts, trained_demo.meta)
    gunicorn, base = start_gunicorn(redis_server.url, store.keys.prefix, tmp_path / "cache", ADMIN_TOKEN=TOKEN)
    # The gate is tested in test_runs; here a retrain of the same data must go live whatever its score.
    scheduler = start_scheduler(redis_server, store, demo_files, "0 3 1 1 *", tmp_path, GATE_TOLERANCE="1")
    try:
        wait_for(lambda: scheduler_status(store), 30, "the scheduler's heartbeat", scheduler)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)

            page.goto(f"{base}/admin/")
            expect(page).to_have_url(f"{base}/admin/login?next=/admin/")
            page.fill("#token", TOKEN)
            page.click("button[type=submit]")
            expect(page.locator("#live-version")).to_have_text(first)
            expect(page.locator("svg.chart").first).to_be_visible()
            page.screenshot(path=ARTIFACTS / "1-overview.png", full_page=True)

            page.click("nav >> text=Runs")
            page.click("#retrain-now")
            page.wait_for_url(re.compile(r".*/admin/runs/\d{8}T\d{6}Z-[0-9a-f]+$"))  # the queued run's page
            run_id = page.url.rsplit("/", 1)[1]
            status = page.locator("#run-status")
            expect(status).to_have_text("queued", timeout=5_000)
            page.screenshot(path=ARTIFACTS / "2-run-queued.png", full_page=True)
            # The page polls every 1.5 s; a run of the demo data may go from running to succeeded in between.
            expect(status).to_have_text(re.compile(r"^\s*(running|succeeded)\s*$"), timeout=60_000)
            page.screenshot(path=ARTIFACTS / "3-run-running.png", full_page=True)
            expect(status).to_have_text("succeeded", timeout=180_000)
            expect(page.locator("#run-log")).to_contain_text("is live")
            page.screenshot(path=ARTIFACTS / "4-run-finished.png", full_page=True)

            second = store.live_version()
            assert second not in (None, first)
            assert store.meta(second)["run_id"] == run_id
            version_calls = wait_for_version(base, second)

            page.click("nav >> text=Models")
            expect(page.locator(f'tr[data-version="{second}"]')).to_contain_text("live")
            page.once("dialog", lambda dialog: dialog.accept())  # "Make ... the live version?"
            page.locator(f'tr[data-version="{first}"] button').click()
            expect(page.locator(".flash.ok")).to_contain_text(f"Version {first} is live")
            page.screenshot(path=ARTIFACTS / "5-rolled-back.png", full_page=True)
            version_calls += wait_for_version(base, first)

            page.click("nav >> text=Overview")
            expect(page.locator("#live-version")).to_have_text(first)
            page.screenshot(path=ARTIFACTS / "6-overview-after-rollback.png", full_page=True)
            browser.close()

        # /metrics adds up both workers (prometheus-client multiprocess mode set up by gunicorn.conf.py).
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
            text = response.read().decode()
        counted = sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "recs_http_requests_total" and sample.labels["endpoint"] == "/version"
        )
        assert counted == version_calls
    finally:
        scheduler_output = stop_scheduler(scheduler)
        gunicorn_output = stop(gunicorn)
    assert scheduler.returncode == 0, scheduler_output[-3000:]
    assert "Traceback" not in gunicorn_output, gunicorn_output[-3000:]


def test_embedding_map_and_search_by_meaning_in_a_browser(redis_server, store, trained_demo, tmp_path):
    """Issue 14: the explorer draws the catalogue from map.json, highlights a user's history and
    recommendations and a title's neighbours, shows a title on hover, and searches by meaning."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    store.publish(trained_demo.parts, trained_demo.meta)
    gunicorn, base = start_gunicorn(redis_server.url, store.keys.prefix, tmp_path / "cache", ADMIN_TOKEN=TOKEN)
    try:
        user = get(f"{base}/page?user=u000001")[1]["user"]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(30_000)
            page.goto(f"{base}/admin/login?next=/admin/explore")
            page.fill("#token", TOKEN)
            page.click("button[type=submit]")
            canvas = page.locator("canvas#embedding-map")
            expect(canvas).to_have_attribute("data-drawn", "300")  # every title of the demo catalogue
            page.screenshot(path=ARTIFACTS / "7-embedding-map.png", full_page=True)

            page.goto(f"{base}/admin/explore/user?user={user}")
            expect(canvas).to_have_attribute("data-drawn", "300")
            marked = int(canvas.get_attribute("data-marked"))
            assert marked >= 10  # the history and the ten recommendations
            canvas.scroll_into_view_if_needed()
            box = canvas.bounding_box()
            scale = box["width"] / int(canvas.get_attribute("width"))
            x, y = (float(canvas.get_attribute(name)) * scale for name in ("data-first-x", "data-first-y"))
            page.mouse.move(box["x"] + x, box["y"] + y)  # onto a highlighted title
            tip = page.locator("#map-tip")
            expect(tip).to_be_visible()
            assert tip.inner_text().strip()
            page.screenshot(path=ARTIFACTS / "8-user-on-the-map.png", full_page=True)

            page.goto(f"{base}/admin/explore/title?item=t00007")
            expect(canvas).to_have_attribute("data-marked", "13")  # the title and its 12 neighbours
            page.screenshot(path=ARTIFACTS / "9-title-neighbours.png", full_page=True)

            deadline = time.monotonic() + 60  # each worker loads the encoder in the background
            while True:
                page.goto(f"{base}/admin/explore?q=astronauts+lost+in+space")
                if page.locator("#meaning li").count() > 0 or time.monotonic() > deadline:
                    break
                time.sleep(1)
            expect(page.locator("#meaning li").first).to_be_visible()
            page.screenshot(path=ARTIFACTS / "10-search-by-meaning.png", full_page=True)
            browser.close()
    finally:
        output = stop(gunicorn)
    assert "Traceback" not in output, output[-3000:]
