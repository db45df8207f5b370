"""What both benchmarks need: a private redis-server, cached demo data, tools, memory readings.

Nothing here is timed; it sets the stage. Data and published models are cached
under ``var/bench/<name>-<parameters>`` (gitignored) so a rerun skips the
minutes of generation and training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_ROOT = REPO_ROOT / "var" / "bench"
sys.path.insert(0, str(REPO_ROOT))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_tool(name: str, package: str) -> str:
    """Path of ``name``; installs the Debian ``package`` if missing and we may, else a clear error."""
    path = shutil.which(name)
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"{name} is missing; installing the Debian package {package}", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", package], check=False, env=env)
        path = shutil.which(name)
    if not path:
        sys.exit(f"error: {name} is required; install it with: sudo apt-get install -y {package}")
    return path


class RedisServer:
    """A redis-server on a free port in ``directory``; loads ``dump.rdb`` from there if present."""

    def __init__(self, directory: Path):
        self.binary = require_tool("redis-server", "redis-server")
        self.directory = Path(directory)
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> RedisServer:
        import redis

        self.process = subprocess.Popen(
            [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                "--dbfilename", "dump.rdb", "--appendonly", "no", "--save", "", "--protected-mode", "no",
                "--maxmemory", "12gb", "--maxmemory-policy", "noeviction",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 600  # loading a cached dump: seconds, a minute or more for GBs
        while True:
            try:
                if client.ping():
                    break
            except (redis.ConnectionError, redis.BusyLoadingError):
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.1)
        client.close()
        return self

    def save_to(self, target: Path) -> None:
        """Snapshot the dataset (SAVE) and copy the RDB file to ``target``."""
        import redis

        redis.Redis(port=self.port, socket_timeout=1800, socket_connect_timeout=60).save()  # GBs: minutes
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.directory / "dump.rdb", str(target) + ".partial")
        os.replace(str(target) + ".partial", target)

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)


def source_digest(paths: list[str]) -> str:
    """Short hash of the code that shapes a cached model, so a recipe change rebuilds it."""
    digest = hashlib.sha256()
    for rel in sorted(paths):
        for path in sorted((REPO_ROOT / rel).rglob("*.py")) if (REPO_ROOT / rel).is_dir() else [REPO_ROOT / rel]:
            digest.update(str(path.relative_to(REPO_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def demo_data(users: int, items: int, events: int, seed: int, fmt: str = "parquet") -> dict[str, Path]:
    """Generated demo data, cached by its parameters and the generator's code."""
    from jobs.make_demo_data import write_demo_data

    generator = source_digest(["jobs/make_demo_data.py"])
    folder = CACHE_ROOT / f"data-u{users}-i{items}-e{events}-s{seed}-{fmt}-{generator}"
    paths = {"events": folder / f"events.{fmt}", "catalog": folder / f"catalog.{fmt}"}
    if all(p.is_file() for p in paths.values()):
        print(f"data: cached in {folder.relative_to(REPO_ROOT)}", flush=True)
        return paths
    started = time.perf_counter()
    print(f"data: generating {events:,} events ({users:,} users, {items:,} titles) ...", flush=True)
    written = write_demo_data(folder, users, items, events, seed, fmt, progress=False)
    print(f"data: generated in {time.perf_counter() - started:.1f}s", flush=True)
    return {name: Path(p) for name, p in written.items()}


def run_measured(cmd: list[str], env: dict | None = None, cwd: Path = REPO_ROOT) -> tuple[int, float, int, str]:
    """Run ``cmd``; return (exit code, wall seconds, peak RSS bytes of that process, stdout)."""
    started = time.perf_counter()
    process = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, text=True)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, wall, usage.ru_maxrss * 1024, out


def memory_of(pid: int) -> dict[str, int]:
    """RSS, PSS and private memory (bytes) of a process; PSS splits shared pages between their users."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Shared_Clean", "Private_Clean", "Private_Dirty"):
                out[key.lower()] = int(rest.split()[0]) * 1024
        out["private"] = out.get("private_clean", 0) + out.get("private_dirty", 0)  # this process's alone
    except OSError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss"] = int(line.split()[1]) * 1024
    return out


def children_of(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        kids.extend(int(t) for t in text)
    return kids


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return f"{os.cpu_count()} cores ({cpu}), {mem_kb / 1024**2:.0f} GB RAM, Python {platform.python_version()}"


def mb(n: float) -> str:
    return f"{n / 1024**2:.0f} MB"


def http_json(url: str, timeout: float = 10.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@contextlib.contextmanager
def gunicorn(redis_url: str, extra_env: dict | None = None) -> Iterator[str]:
    """The production gunicorn.conf.py on a free port; yields the base URL once ready."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-models-") as cache:
        env = dict(os.environ, REDIS_URL=redis_url, PORT=str(port), HOST="127.0.0.1", MODEL_CACHE_DIR=cache)
        env.update(extra_env or {})
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:create_app()"],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if http_json(f"{base}/readyz")[0] == 200:
                        break
                except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("gunicorn did not become ready")
                time.sleep(0.2)
            yield base
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
