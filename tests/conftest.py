"""Shared fixtures: a real redis-server on a free port, small demo data, a published model."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

from models.store import ModelStore

REPO_ROOT = Path(__file__).resolve().parents[1]
MOVIELENS_SMALL = REPO_ROOT.parent / "shared" / "datasets" / "ml-latest-small"

# Small enough to train in seconds, big enough for the model to learn genre structure.
DEMO_SIZE = {"users": 600, "items": 300, "events": 30000, "seed": 3}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_answering(port: int, timeout: float = 10.0) -> None:
    """Until the redis-server on ``port`` answers PING (ConnectionError after ``timeout`` seconds)."""
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        client.close()


class RedisServer:
    """A redis-server process owned by the test session (AOF on, like the demo)."""

    def __init__(self, directory: Path):
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed; .ci/run installs it (apt-get install redis-server)")
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--protected-mode", "no",
                # As the demo runs it: a memory limit, and refusing writes (never evicting) when it is reached.
                "--maxmemory", "2gb", "--maxmemory-policy", "noeviction",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until_answering(self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def store(redis_client) -> ModelStore:
    return ModelStore(redis_client, "test")


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory) -> dict[str, Path]:
    from jobs.make_demo_data import write_demo_data

    out = tmp_path_factory.mktemp("demo")
    paths = write_demo_data(out, DEMO_SIZE["users"], DEMO_SIZE["items"], DEMO_SIZE["events"], DEMO_SIZE["seed"], "csv")
    return {"events": Path(paths["events"]), "catalog": Path(paths["catalog"])}


@pytest.fixture(scope="session")
def trained_demo(demo_files):
    """One nightly run on the demo data, not published: parts and meta reused by many tests."""
    from jobs.nightly import NightlyConfig, run_nightly
    from models.embeddings import ModelParams

    config = NightlyConfig(
        events=str(demo_files["events"]), catalog=str(demo_files["catalog"]),
        publish=False, show_progress=False, params=ModelParams(n_trees=10),
    )
    return run_nightly(config)


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text.lstrip("\n"), encoding="utf-8")
    return path


@pytest.fixture
def tiny_catalog(tmp_path) -> Path:
    return write_csv(
        tmp_path / "catalog.csv",
        """
item_id,title,genres,year,episode_minutes,seasons,episodes
a,Alpha,Comedy|Drama,2001,30,2,20
b,Beta,Drama,,45,1,8
c,Gamma,Horror,1999,110,,
""",
    )


os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
