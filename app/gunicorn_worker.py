"""gunicorn's threaded worker with a deadline on every socket read and write of a request.

gunicorn's ``gthread`` worker keeps idle keep-alive connections in a poller
(no thread each) and waits at most a few seconds for the first byte of a new
connection before parking it there too. But once a request has started, a
thread reads its headers and body with a blocking socket that has no
timeout: a client that sends a request line and stops holds that thread
forever. This worker gives every read and write of a request
``REQUEST_IO_TIMEOUT`` seconds (default 5); a client slower than that is
disconnected and its thread goes back to the pool. ``gunicorn.conf.py``
selects it; behind a buffering proxy (nginx, see ``deploy/nginx.conf``) slow
clients never reach gunicorn at all, but the service does not rely on it.

It also spreads connections evenly over the workers. Every worker polls the
one listening socket, and whichever wakes first takes the new connection: 8
kept-alive connections opened at once were measured landing 0/8, 1/7 and 2/6
as often as 4/4, and with all of them on one worker the service ran on one
core at a third of its throughput, for as long as the connections lived (a
proxy's or a page server's keep-alive pool lives for hours). Like nginx's
``accept_disabled``, a worker that holds more connections than the least
loaded live worker leaves a new connection to the others for up to
``ACCEPT_YIELD_SECONDS`` (then takes it anyway: a busy neighbour must not
leave it waiting). The workers' counts sit in a small shared memory map that
the master creates when it imports this module, before it forks them.
"""

from __future__ import annotations

import logging
import mmap
import multiprocessing
import os
import struct
import sys
import time

from gunicorn.workers import gthread

REQUEST_IO_TIMEOUT = float(os.environ.get("REQUEST_IO_TIMEOUT", "5"))
# How long a thread holding the GIL runs before a waiting one may take it (CPython's default is
# 5 ms). A request that is ready to answer otherwise waits behind another thread's numpy loop
# for up to that long, once per hand-over: the tail latency of every endpoint.
GIL_SWITCH_INTERVAL = float(os.environ.get("GIL_SWITCH_INTERVAL", "0.001"))


# How long a worker holding more connections than another leaves a new one to it; then it takes it itself.
ACCEPT_YIELD_SECONDS = float(os.environ.get("ACCEPT_YIELD_SECONDS", "0.02"))
_RETRY_ACCEPT = 0.002  # while yielding, look at the listener again this often
_SLOT = struct.Struct("qq")  # (worker pid, open connections)
_COUNT = struct.Struct("q")
_SLOTS = 64  # workers per master that balance (more than that take connections as gunicorn does)
_ALL = struct.Struct(f"{2 * _SLOTS}q")


class ConnectionBoard:
    """Each live worker's count of open connections, in memory shared by all workers of one master.

    Created at import in the master (gunicorn imports the worker class before it forks), so every
    worker maps the same pages. A slot belongs to a pid; a dead worker's slot is taken over.
    """

    def __init__(self):
        self.map = mmap.mmap(-1, _SLOT.size * _SLOTS)
        self.slot = -1
        try:
            self.lock = multiprocessing.Lock()  # a POSIX semaphore: needs /dev/shm
        except OSError as exc:  # e.g. a container without /dev/shm: serve as stock gthread does
            self.lock = None
            logging.getLogger("gunicorn.error").warning("connections are not balanced over the workers: %s", exc)

    def join(self, pid: int) -> None:
        if self.lock is None:
            return
        with self.lock:
            for n in range(_SLOTS):
                owner, _ = _SLOT.unpack_from(self.map, n * _SLOT.size)
                if owner in (0, pid) or not _alive(owner):
                    _SLOT.pack_into(self.map, n * _SLOT.size, pid, 0)
                    self.slot = n
                    return
        self.slot = -1  # more workers than slots: this one takes connections as gunicorn does

    def leave(self) -> None:
        if self.slot >= 0:
            _SLOT.pack_into(self.map, self.slot * _SLOT.size, 0, 0)
            self.slot = -1

    def publish(self, connections: int) -> None:
        if self.slot >= 0:
            _COUNT.pack_into(self.map, self.slot * _SLOT.size + _COUNT.size, connections)

    def least_of_others(self) -> int | None:
        """The fewest connections any other live worker holds (None: no other worker)."""
        least = None
        values = _ALL.unpack_from(self.map)
        for n in range(_SLOTS):
            owner, connections = values[2 * n], values[2 * n + 1]
            if owner and n != self.slot and (least is None or connections < least) and _alive(owner):
                least = connections
        return least


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


BOARD = ConnectionBoard()


class ThreadWorker(gthread.ThreadWorker):
    _yield_since = 0.0  # when this worker began leaving waiting connections to the others
    _yielded_at = -1.0  # when it last looked at one it would rather leave
    _resume_at = 0.0  # while yielding: when it listens again (0: not yielding)
    _shown = -1  # the count last set on the metric

    def accept(self, listener):
        if self._should_yield():
            self.set_accept_enabled(False)  # not readable again at once: no busy loop
            self._resume_at = self._yielded_at + _RETRY_ACCEPT
            return
        super().accept(listener)
        BOARD.publish(self.nr_conns)

    def _should_yield(self) -> bool:
        least = BOARD.least_of_others()
        if least is None or self.nr_conns <= least:
            return False
        now = time.monotonic()
        if now - self._yielded_at > 5 * _RETRY_ACCEPT:  # a new burst, not the connections left waiting before
            self._yield_since = now
        self._yielded_at = now
        return now - self._yield_since < ACCEPT_YIELD_SECONDS  # the others have not taken it: take it

    def set_accept_enabled(self, enabled):
        if enabled and self._resume_at:
            return  # still leaving new connections to the others (listening again at _resume_at)
        super().set_accept_enabled(enabled)

    def wait_for_and_dispatch_events(self, timeout):
        if not self.alive:  # stopping (or reloading): no longer takes connections, so no longer counts
            BOARD.leave()
        else:
            BOARD.publish(self.nr_conns)
        if self.nr_conns != self._shown:  # recs_worker_connections on /metrics, per worker
            from app.metrics import WORKER_CONNECTIONS

            WORKER_CONNECTIONS.set(self.nr_conns)
            self._shown = self.nr_conns
        if self._resume_at:
            remaining = self._resume_at - time.monotonic()
            if remaining > 0:
                timeout = min(timeout, remaining)  # wake up to listen again
            else:
                self._resume_at = 0.0
                if self.alive and self.nr_conns < self.worker_connections:
                    self.set_accept_enabled(True)
        super().wait_for_and_dispatch_events(timeout)

    def handle(self, conn):
        # gthread's handle() makes the socket blocking (no timeout) and then calls conn.init();
        # hooking init() is the one point between the two, for new and kept-alive connections alike.
        if not getattr(conn, "_io_deadline", False):
            init = conn.init

            def init_with_deadline():
                init()
                conn.sock.settimeout(REQUEST_IO_TIMEOUT)

            conn.init = init_with_deadline
            conn._io_deadline = True
        return super().handle(conn)

    def init_process(self):
        BOARD.join(os.getpid())
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        logging.getLogger("gunicorn.error").addFilter(_quiet_slow_clients)
        try:
            super().init_process()  # runs the worker until it stops
        finally:
            BOARD.leave()


def _quiet_slow_clients(record: logging.LogRecord) -> bool:
    """gthread logs a dropped slow client as a socket error with a traceback; it is routine."""
    if record.exc_info and isinstance(record.exc_info[1], TimeoutError):
        record.msg, record.args, record.exc_info = (
            "closed a connection: no data for %.0f s (REQUEST_IO_TIMEOUT)", (REQUEST_IO_TIMEOUT,), None
        )
        record.levelno, record.levelname = logging.INFO, "INFO"
    return True


def connections_by_process(port: int, pids: list[int], peer_ports: set[int] | None = None) -> dict[int, int]:
    """Established TCP connections to local ``port`` held by each of ``pids`` (from /proc; Linux),
    only those from ``peer_ports`` when given (a test's own client sockets).

    For the tests and benchmarks: how a server's connections are spread over its workers.
    """
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    counts = dict.fromkeys(pids, 0)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port != port or fields[3] != "01" or fields[9] not in inodes:  # 01: ESTABLISHED
                continue
            if peer_ports is None or int(fields[2].rsplit(":", 1)[1], 16) in peer_ports:
                counts[inodes[fields[9]]] += 1
    return counts
