"""Helpers for tests that drive real processes: gunicorn over HTTP, and plain HTTP calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import REPO_ROOT, free_port


def http(
    method: str, url: str, body: bytes | None = None, timeout: float = 5.0, headers: dict | None = None
) -> tuple[int, dict]:
    """(status, JSON body) of one request; HTTP errors are answers too, not exceptions."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raw = exc.read() or b"{}"
        try:
            return exc.code, json.loads(raw)
        except json.JSONDecodeError:
            return exc.code, {"raw": raw.decode(errors="replace")}


def get(url: str, timeout: float = 5.0) -> tuple[int, dict]:
    return http("GET", url, timeout=timeout)


def post_json(url: str, payload, timeout: float = 5.0) -> tuple[int, dict]:
    return http("POST", url, json.dumps(payload).encode(), timeout, {"Content-Type": "application/json"})


def start_gunicorn(
    redis_url: str, prefix: str, cache: Path, workers: int = 2, **env_extra: str
) -> tuple[subprocess.Popen, str]:
    """Start ``gunicorn 'app:create_app()'`` as production does; wait until /readyz says 200."""
    port = free_port()
    env = dict(
        os.environ,
        REDIS_URL=redis_url,
        REDIS_PREFIX=prefix,
        MODEL_CACHE_DIR=str(cache),
        MODEL_POLL_SECONDS="0.5",
        PORT=str(port),
        HOST="127.0.0.1",
        WEB_CONCURRENCY=str(workers),
        **env_extra,
    )
    cache.mkdir(parents=True, exist_ok=True)
    # A file, not a pipe: a full pipe would block gunicorn's logging and fail requests.
    log_file = open(cache.parent / f"gunicorn-{port}.log", "w+b")  # noqa: SIM115 (closed in stop)
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:create_app()"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log_file,
    )
    process.log_file = log_file
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if get(f"{base}/readyz")[0] == 200:
                return process, base
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            pass
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited: {stop(process)[-2000:]}")
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("gunicorn did not become ready in 60 s")


def stop(process: subprocess.Popen) -> str:
    """Stop gunicorn; return what it wrote to stderr (to look for tracebacks)."""
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    log_file = process.log_file
    log_file.seek(0)
    text = log_file.read().decode(errors="replace")
    log_file.close()
    return text


def nightly_command(events, catalog, *extra: str) -> list[str]:
    """``python -m jobs.nightly --events EVENTS --catalog CATALOG *extra``, as cron would run it."""
    return [sys.executable, "-m", "jobs.nightly", "--events", str(events), "--catalog", str(catalog), *extra]
