"""Production gunicorn settings for ``gunicorn 'app:create_app()'``. Override with env vars."""

import os

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
# Requests are CPU-light lookups; one sync worker per core keeps latency flat.
workers = int(os.environ.get("WEB_CONCURRENCY", str(os.cpu_count() or 2)))
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "sync")
threads = int(os.environ.get("GUNICORN_THREADS", "1"))
timeout = 30
graceful_timeout = 20
keepalive = 5
# No preload: each worker opens the memory-mapped model itself (shared via the page cache)
# and runs its own watcher thread, which must start after the fork.
preload_app = False
accesslog = os.environ.get("GUNICORN_ACCESSLOG") or None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190
