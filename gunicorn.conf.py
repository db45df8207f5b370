"""Production gunicorn settings for ``gunicorn 'app:create_app()'``. Override with env vars."""

import os

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
# One process per core, each with a pool of threads: requests are short CPU-light lookups, and a
# thread blocked on a slow or stalled client must not stop the others (sync workers serve one
# connection at a time: two half-open connections took the whole service down). The worker is
# gunicorn's gthread with a deadline on every socket read and write (app/gunicorn_worker.py);
# idle keep-alive connections wait in a poller without a thread.
workers = int(os.environ.get("WEB_CONCURRENCY", str(os.cpu_count() or 2)))
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "app.gunicorn_worker.ThreadWorker")
threads = int(os.environ.get("GUNICORN_THREADS", "32"))
# Connections a worker holds at once (in threads or idle in its poller). Beyond it the worker stops
# accepting and the kernel queue hands new connections to a worker that has room.
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "256"))
timeout = 30
graceful_timeout = 20
keepalive = 2  # seconds an idle keep-alive connection is kept (in the poller, no thread)
# No preload: each worker opens the memory-mapped model itself (shared via the page cache)
# and runs its own watcher thread, which must start after the fork.
preload_app = False
# Each worker loads the query encoder of GET /search in the background as it starts (app/search.py).
os.environ.setdefault("SEARCH_ENCODER", "preload")
os.environ.setdefault("GC_FREEZE", "1")  # long-lived objects out of the collector's walks (app.heap)
# JSON lines (app/logs.py): one access line per request (status, latency, request id; user ids hashed)
# on stdout, gunicorn's and the app's own lines on stderr. GUNICORN_ACCESSLOG=off turns access lines off.
accesslog = None if os.environ.get("GUNICORN_ACCESSLOG") == "off" else os.environ.get("GUNICORN_ACCESSLOG", "-")
errorlog = "-"
logger_class = "app.logs.GunicornLogger"
loglevel = os.environ.get("LOG_LEVEL", "info")
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190

# -- metrics from every worker, pooled (prometheus-client multiprocess mode; see app/metrics.py) --
# Set here, in the master, so every worker inherits it before it imports prometheus_client.
import shutil  # noqa: E402
import tempfile  # noqa: E402

_own_metrics_dir = None
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _own_metrics_dir = tempfile.mkdtemp(prefix="recs-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _own_metrics_dir


def on_starting(server):
    # Values left by a previous server in a folder you gave would be added to this one's.
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name.endswith(".db"):
            os.remove(os.path.join(folder, name))


def post_fork(server, worker):
    # glibc gives each thread that allocates its own malloc arena (up to 8 per core, 64 MB each):
    # with 32 request threads doing numpy work, a worker's RSS would grow by hundreds of MB of
    # arenas. Two are plenty for requests this short. (MALLOC_ARENA_MAX in the environment also works.)
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-8, int(os.environ.get("MALLOC_ARENA_MAX", "2")))
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _own_metrics_dir:
        shutil.rmtree(_own_metrics_dir, ignore_errors=True)
