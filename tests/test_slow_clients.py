"""Slow and idle clients against real gunicorn with the production configuration.

32 half-open connections (a request line sent, the headers never finished)
and 16 idle ones (connected, nothing sent) are held open, and re-opened
whenever the server closes them, while a client asks ``/recommend`` as fast
as it gets answers. Every answer must be a 200 and p99 must stay under 1 s.
With gunicorn's sync workers two such connections stopped the service.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from tests.helpers import get, start_gunicorn, stop

pytestmark = pytest.mark.slow

HALF_OPEN = 32
IDLE = 16


class SlowClients:
    """Hold ``half_open`` + ``idle`` connections; re-open each one the server drops."""

    def __init__(self, port: int, half_open: int, idle: int):
        self.port = port
        self.kinds = ["half"] * half_open + ["idle"] * idle
        self.stop_flag = threading.Event()
        self.reopened = 0
        self.threads = [threading.Thread(target=self._hold, args=(kind,), daemon=True) for kind in self.kinds]

    def _open(self, kind: str) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        if kind == "half":
            sock.sendall(b"GET /recommend?user=slow HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        sock.settimeout(0.2)
        return sock

    def _hold(self, kind: str) -> None:
        sock = self._open(kind)
        while not self.stop_flag.is_set():
            try:
                if sock.recv(4096) == b"":  # the server closed it: come back, as an attacker would
                    sock.close()
                    sock = self._open(kind)
                    self.reopened += 1
            except TimeoutError:
                continue
            except OSError:
                sock.close()
                sock = self._open(kind)
                self.reopened += 1
        sock.close()

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_flag.set()
        for thread in self.threads:
            thread.join(5)


def test_half_open_and_idle_connections_do_not_stop_the_service(redis_server, store, trained_demo, tmp_path):
    store.publish(trained_demo.parts, trained_demo.meta)
    users = json.loads(trained_demo.parts["users.json"])[:50]
    process, base = start_gunicorn(redis_server.url, store.keys.prefix, tmp_path / "cache")
    port = int(base.rsplit(":", 1)[1])
    latencies, statuses = [], []
    try:
        with SlowClients(port, HALF_OPEN, IDLE) as slow:
            time.sleep(1.0)  # every slow connection is open before the first measured request
            deadline = time.monotonic() + 12  # longer than any read timeout: closed clients come back
            n = 0
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    status, _ = get(f"{base}/recommend?user={users[n % len(users)]}&k=10", timeout=10)
                except OSError as exc:  # a timeout or a reset is a failure to answer
                    status = repr(exc)
                latencies.append(time.perf_counter() - started)
                statuses.append(status)
                n += 1
            reopened = slow.reopened
    finally:
        log = stop(process)
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    print(
        f"\nslow clients: {HALF_OPEN} half-open + {IDLE} idle held; {len(statuses)} requests, "
        f"{statuses.count(200)} x 200, p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
        f"p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.0f} ms; slow connections re-opened {reopened}"
    )
    assert len(statuses) > 100
    assert statuses.count(200) == len(statuses), {str(s): statuses.count(s) for s in set(map(str, statuses))}
    assert p99 < 1.0
    assert "WORKER TIMEOUT" not in log
