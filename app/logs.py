"""One log format for the service: JSON lines, each request's lines tied together by its request id.

* Every request has an id: the caller's ``X-Request-ID`` if it is a sane token
  (1-128 of ``A-Z a-z 0-9 . _ : -``), else a new random one. It is echoed in the
  response's ``X-Request-ID`` and added to every log line written while the
  request runs (``request_id``), whatever logger wrote it.
* App lines: ``{"time", "level", "logger", "message", "request_id"?, "exception"?}``.
* gunicorn uses :class:`GunicornLogger` (``gunicorn.conf.py``): its own lines in
  the same shape, and one access line per request:
  ``{"time", "level": "INFO", "logger": "access", "request_id", "method", "path",
  "status", "latency_ms", "bytes", "remote"}``.
* User ids in logged query strings (``user=``) are replaced by a keyed hash,
  ``h:<12 hex>``, the same for the same id, so one user's requests can still be
  followed (``LOG_HASH_KEY`` fixes the key across processes and restarts; by
  default each process draws its own). ``LOG_USER_IDS=1`` logs them as sent.
"""

from __future__ import annotations

import contextvars
import hmac
import logging
import os
import re
import secrets
import sys
import time
from urllib.parse import unquote_plus

import orjson
from flask import Flask, request
from gunicorn.glogging import Logger

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_USER_IN_QUERY = re.compile(r"(^|&)(user|user_id)=([^&]*)")
_HASH_KEY = (os.environ.get("LOG_HASH_KEY") or secrets.token_hex(16)).encode()

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def hashed_user(user_id: str) -> str:
    return "h:" + hmac.digest(_HASH_KEY, user_id.encode(), "sha256").hex()[:12]


def loggable_query(query: str) -> str:
    """The query string with user ids replaced by their keyed hash (unless ``LOG_USER_IDS=1``)."""
    if "user" not in query or os.environ.get("LOG_USER_IDS") == "1":
        return query
    return _USER_IN_QUERY.sub(lambda m: f"{m[1]}{m[2]}={hashed_user(unquote_plus(m[3]))}", query)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id.get()
        if rid:
            line["request_id"] = rid
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def configure_logging(level: str | None = None) -> None:
    """JSON lines on stderr for the root logger (once per process; later calls change nothing)."""
    root = logging.getLogger()
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.handlers = [h for h in root.handlers if not isinstance(h, logging.StreamHandler)] + [handler]
    root.setLevel(level or os.environ.get("LOG_LEVEL", "INFO").upper())


def init_request_ids(app: Flask) -> None:
    @app.before_request
    def take_request_id():
        given = request.headers.get(REQUEST_ID_HEADER, "")
        request_id.set(given if _VALID_ID.fullmatch(given) else secrets.token_hex(12))

    @app.after_request
    def echo_request_id(response):
        rid = request_id.get()
        if rid:
            response.headers[REQUEST_ID_HEADER] = rid
        return response

    @app.teardown_request
    def forget_request_id(_exc):
        request_id.set(None)


class GunicornLogger(Logger):
    """gunicorn's logger writing JSON lines: its own messages, and one access line per request."""

    def setup(self, cfg):
        super().setup(cfg)
        for handler in self.error_log.handlers:
            handler.setFormatter(JsonFormatter())
        for handler in self.access_log.handlers:
            handler.setFormatter(logging.Formatter("%(message)s"))

    def access(self, resp, req, environ, request_time):
        if not self.access_log_enabled:
            return
        pairs = resp.headers.items() if hasattr(resp.headers, "items") else (resp.headers or [])
        headers = {name.lower(): value for name, value in pairs}
        status = resp.status.split(None, 1)[0] if isinstance(resp.status, str) else resp.status
        query = loggable_query(environ.get("QUERY_STRING", ""))
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
            "level": "INFO",
            "logger": "access",
            "request_id": headers.get(REQUEST_ID_HEADER.lower()),
            "method": environ.get("REQUEST_METHOD"),
            "path": environ.get("PATH_INFO", "") + (f"?{query}" if query else ""),
            "status": int(status) if status else None,
            "latency_ms": round(request_time.total_seconds() * 1000, 3),
            "bytes": getattr(resp, "sent", None),
            "remote": environ.get("REMOTE_ADDR"),
        }
        try:
            self.access_log.info(orjson.dumps(line).decode())
        except Exception:
            self.error("failed to write an access log line")
