"""Every error the service returns is JSON: ``{"error": "..."}`` with the right status."""

from __future__ import annotations

import logging

import orjson
import redis
from flask import Flask, Response
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.extra = extra


def json_response(payload, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status=status, mimetype="application/json")


def error_response(status: int, message: str, **extra) -> Response:
    return json_response({"error": message, **extra}, status)


def retry_later(message: str, seconds: int) -> Response:
    """503 with ``Retry-After``: the request was fine, a dependency is not (nothing was stored)."""
    response = error_response(503, message)
    response.headers["Retry-After"] = str(seconds)
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        response = error_response(exc.status, exc.message, **exc.extra)
        response.headers.update(exc.headers)
        return response

    @app.errorhandler(redis.OutOfMemoryError)
    def redis_full(exc: redis.OutOfMemoryError):
        # maxmemory with noeviction: Redis refuses writes rather than dropping data. Not our bug: retry later.
        log.error("redis is full (maxmemory reached; nothing is evicted): %s", exc)
        return retry_later("the store is full and refuses writes; nothing was stored: retry later", 30)

    @app.errorhandler(redis.ConnectionError)
    @app.errorhandler(redis.TimeoutError)
    def redis_down(exc: redis.RedisError):
        log.warning("redis unavailable: %s", exc)
        return retry_later("the store (Redis) is unavailable: retry later", 1)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return error_response(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal error")
