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
"""

from __future__ import annotations

import logging
import os
import sys

from gunicorn.workers import gthread

REQUEST_IO_TIMEOUT = float(os.environ.get("REQUEST_IO_TIMEOUT", "5"))
# How long a thread holding the GIL runs before a waiting one may take it (CPython's default is
# 5 ms). A request that is ready to answer otherwise waits behind another thread's numpy loop
# for up to that long, once per hand-over: the tail latency of every endpoint.
GIL_SWITCH_INTERVAL = float(os.environ.get("GIL_SWITCH_INTERVAL", "0.001"))


class ThreadWorker(gthread.ThreadWorker):
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
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        logging.getLogger("gunicorn.error").addFilter(_quiet_slow_clients)
        super().init_process()


def _quiet_slow_clients(record: logging.LogRecord) -> bool:
    """gthread logs a dropped slow client as a socket error with a traceback; it is routine."""
    if record.exc_info and isinstance(record.exc_info[1], TimeoutError):
        record.msg, record.args, record.exc_info = (
            "closed a connection: no data for %.0f s (REQUEST_IO_TIMEOUT)", (REQUEST_IO_TIMEOUT,), None
        )
        record.levelno, record.levelname = logging.INFO, "INFO"
    return True
