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
        response = error_response(503, "the store is full and refuses writes; nothing was stored: retry later")
        response.headers["Retry-After"] = "30"
        return response

    @app.errorhandler(redis.ConnectionError)
    @app.errorhandler(redis.TimeoutError)
    def redis_down(exc: redis.RedisError):
        log.warning("redis unavailable: %s", exc)
        response = error_response(503, "the store (Redis) is unavailable: retry later")
        response.headers["Retry-After"] = "1"
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return error_response(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal error")
