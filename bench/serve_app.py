"""The production app plus one route, for ``bench/serve.py``: the floor of a per-user request.

``GET /_bench/read?user=ID`` does the Redis part of ``/recommend`` and
nothing else: :meth:`LiveModel.fresh_history` (the one round trip issue 16
allows: the user's record, and the fresh overlay when the worker knows of
fresh events, decoded as ``/recommend`` decodes them), then answers like
``/healthz``. Its rate next to ``/healthz``'s is the most any endpoint that
reads a user's data from Redis can reach on the machine, so the benchmark
prints each endpoint's ratio to it too.

Only the benchmark serves this app (``bench.serve_app:create_app()``); the
service itself has no such route.
"""

from __future__ import annotations

from flask import Flask

from app import create_app as create_service
from app.api import Query, serving_for
from app.errors import json_response

FLOOR_PATH = "/_bench/read"


def create_app(config: dict | None = None) -> Flask:
    app = create_service(config)
    live = app.extensions["live_model"]

    @app.get(FLOOR_PATH)
    def bench_read():
        user = Query.from_args().id("user")
        model, _, _ = serving_for(user)
        live.fresh_history(model, user)
        return json_response({"status": "ok"})

    return app
