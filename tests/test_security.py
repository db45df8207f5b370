"""Security configuration: secrets from the environment, Redis with a password and over TLS,
debug off, no tracebacks to clients. (User ids vs. internal keys: tests/test_events.py.)"""

from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from app import create_app
from jobs.nightly import run_nightly
from models.store import ModelStore, redis_from_url
from tests.conftest import REPO_ROOT, free_port
from tests.helpers import nightly_command
from tests.test_events import job_config

PASSWORD = "s3cret-Pass_word"


class ProtectedRedis:
    """A redis-server with ``--requirepass`` (and TLS when ``tls_dir`` is given)."""

    def __init__(self, directory: Path, tls_dir: Path | None = None):
        self.port = free_port()
        args = ["redis-server", "--bind", "127.0.0.1", "--dir", str(directory), "--save", "", "--requirepass", PASSWORD]
        if tls_dir is None:
            args += ["--port", str(self.port)]
            self.url = f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"
        else:
            args += [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-auth-clients",
                "no",
                "--tls-cert-file",
                str(tls_dir / "server.crt"),
                "--tls-key-file",
                str(tls_dir / "server.key"),
                "--tls-ca-cert-file",
                str(tls_dir / "ca.crt"),
            ]
            self.url = (
                f"rediss://:{PASSWORD}@127.0.0.1:{self.port}/0?ssl_cert_reqs=required&ssl_ca_certs={tls_dir / 'ca.crt'}"
            )
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis_from_url(self.url, socket_connect_timeout=0.2).ping()
                return
            except redis.ConnectionError:
                if self.process.poll() is not None:
                    raise RuntimeError(self.process.stdout.read().decode()[-2000:]) from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def make_certificates(folder: Path) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (needed to make a test CA for the TLS test)")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    )
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    )
    return folder


def serve_and_use(url: str, trained_demo, demo_files, tmp_path) -> None:
    """Publish, run the job, serve, post an event: everything through ``url``."""
    store = ModelStore(redis_from_url(url), "sec")
    store.publish(trained_demo.parts, trained_demo.meta)
    app = create_app(
        {"REDIS_URL": url, "REDIS_PREFIX": "sec", "MODEL_CACHE_DIR": str(tmp_path / "cache"), "MODEL_WATCHER": False}
    )
    client = app.test_client()
    user = app.extensions["live_model"].current.user_ids[0]
    item = app.extensions["live_model"].current.item_ids[0]
    assert (
        client.post("/events", json={"user_id": user, "item_id": item, "timestamp": 1_700_000_000}).status_code == 200
    )
    body = client.get(f"/recommend?user={user}").get_json()
    assert item not in [i["item_id"] for i in body["items"]]
    assert client.get("/readyz").get_json()["status"] == "ready"
    meta = run_nightly(job_config(demo_files, "sec", redis_url=url)).meta
    assert meta["live_events"]["events"] == 1
    assert app.extensions["live_model"].refresh() is True


def test_redis_with_a_password(tmp_path, trained_demo, demo_files):
    server = ProtectedRedis(tmp_path)
    try:
        serve_and_use(server.url, trained_demo, demo_files, tmp_path)
        # Without the password: refused, reported, and the password never shows.
        wrong = server.url.replace(PASSWORD, "Wr0ngPa55")
        app = create_app(
            {"REDIS_URL": wrong, "REDIS_PREFIX": "sec", "MODEL_CACHE_DIR": str(tmp_path / "c2"), "MODEL_WATCHER": False}
        )
        ready = app.test_client().get("/readyz")
        assert ready.status_code == 503 and ready.get_json()["redis"] == "unreachable"
        response = app.test_client().post("/events", json={"user_id": "u", "item_id": "i", "timestamp": 1})
        assert response.status_code == 503
        done = subprocess.run(
            nightly_command(demo_files["events"], demo_files["catalog"], "--prefix", "sec", "--quiet", "--no-eval"),
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, REDIS_URL=wrong),
        )
        assert done.returncode != 0
        for text in (
            ready.get_data(as_text=True),
            response.get_data(as_text=True),
            done.stdout,
            done.stderr,
            str(app.extensions["live_model"].last_error),
        ):
            assert PASSWORD not in text and "Wr0ngPa55" not in text
    finally:
        server.stop()


def test_redis_over_tls(tmp_path, trained_demo, demo_files):
    certs = make_certificates(tmp_path)
    server = ProtectedRedis(tmp_path, tls_dir=certs)
    try:
        assert server.url.startswith("rediss://")
        serve_and_use(server.url, trained_demo, demo_files, tmp_path)
        plain = redis.Redis(port=server.port, password=PASSWORD, socket_connect_timeout=1, socket_timeout=1)
        with pytest.raises(redis.ConnectionError):
            plain.ping()  # the server speaks only TLS
    finally:
        server.stop()


def test_debug_is_off_even_if_the_environment_asks(monkeypatch, redis_server, tmp_path):
    monkeypatch.setenv("FLASK_DEBUG", "1")
    app = create_app({"REDIS_URL": redis_server.url, "MODEL_CACHE_DIR": str(tmp_path), "MODEL_WATCHER": False})
    assert app.debug is False and app.config["DEBUG"] is False

    def broken():
        raise RuntimeError("secret internals /etc/passwd")

    app.add_url_rule("/broken", view_func=broken)
    response = app.test_client().get("/broken")
    assert response.status_code == 500 and response.get_json() == {"error": "internal error"}
    gunicorn_conf = runpy.run_path(str(REPO_ROOT / "gunicorn.conf.py"))
    assert not gunicorn_conf.get("reload") and gunicorn_conf.get("loglevel") != "debug"


def test_no_secret_is_written_in_the_code():
    credential_url = re.compile(r"rediss?://[^\s/\"'@]*:[^\s/\"'@{]+@")
    offenders = []
    for folder in ("app", "models", "jobs", "scripts"):
        for path in (REPO_ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".sh", ".html", ".js") and credential_url.search(path.read_text(errors="ignore")):
                offenders.append(str(path.relative_to(REPO_ROOT)))
    for name in ("Dockerfile", "gunicorn.conf.py", "Makefile"):
        if credential_url.search((REPO_ROOT / name).read_text()):
            offenders.append(name)
    assert offenders == []
