"""The recommendation service: ``gunicorn 'app:create_app()'``.

Configuration comes from the environment (defaults work on a laptop):

``REDIS_URL``            Redis holding the published models (redis://localhost:6379/0)
``REDIS_PREFIX``         key prefix (recs)
``MODEL_CACHE_DIR``      local folder for memory-mapped model files, shared by workers
``MODEL_POLL_SECONDS``   how often a worker re-checks the live pointer (2)
``EVENTS_TOKEN``         bearer token(s), comma-separated, that POST /events requires (unset: open)
``MAX_BODY_BYTES``       largest request body accepted (1 MiB); longer ones are 413, nothing stored
``TRUSTED_PROXY_HOPS``   proxies in front that set X-Forwarded-For (0); the client address comes from it
``PAGE_CONFIG``          JSON or YAML file with the rows of GET /page (default: app.pages.DEFAULT_PAGE)
``LOG_USER_IDS``         1: keep user ids in logged query strings (default: replaced by a keyed hash)
``ADMIN_TOKEN``          secret that signs operators in to /admin (unset: the dashboard is off)
``SECRET_KEY``           signs session cookies (default: derived from ADMIN_TOKEN, see app.admin)
``SEARCH_ENCODER``       preload | lazy | off: when a worker loads the query encoder of GET /search (lazy)
``GC_FREEZE``            1: collect and freeze the heap after loading a version or the encoder (app.heap; gunicorn.conf.py: 1)
``ONLINE_SECRET``        signs recommendation ids (default: one random secret kept in Redis)
``ATTRIBUTION_WINDOW``   seconds after an impression in which a viewing is credited to it (86400)
``PROMETHEUS_MULTIPROC_DIR`` where gunicorn workers pool their metrics (see app.metrics)
"""

from __future__ import annotations

import os
import tempfile

from flask import Flask

from app.errors import register_error_handlers
from app.live_model import LiveModel
from app.logs import configure_logging, init_request_ids
from models.store import ModelStore, redis_from_url


def default_config() -> dict:
    return {
        "REDIS_URL": os.environ.get("REDIS_URL", "redis://localhost:6379/0"),
        "REDIS_PREFIX": os.environ.get("REDIS_PREFIX", "recs"),
        "MODEL_CACHE_DIR": os.environ.get("MODEL_CACHE_DIR", os.path.join(tempfile.gettempdir(), "recs-models")),
        "MODEL_POLL_SECONDS": float(os.environ.get("MODEL_POLL_SECONDS", "2")),
        "MODEL_WATCHER": True,  # tests turn the background thread off and call refresh()
        "MAX_CONTENT_LENGTH": int(os.environ.get("MAX_BODY_BYTES", str(1 << 20))),
        "EVENTS_TOKEN": os.environ.get("EVENTS_TOKEN", ""),  # comma-separated bearer tokens for POST /events
        "DEBUG": False,  # Flask would take FLASK_DEBUG from the environment; production never debugs
    }


def create_app(config: dict | None = None) -> Flask:
    app = Flask(__name__)
    app.config.update(default_config())
    app.config.update(config or {})
    app.json.sort_keys = False
    configure_logging()
    init_request_ids(app)
    hops = int(os.environ.get("TRUSTED_PROXY_HOPS", "0"))
    if hops > 0:  # behind that many proxies the client's address is in X-Forwarded-For (sign-in limits use it)
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops)

    store = ModelStore(redis_from_url(app.config["REDIS_URL"], socket_timeout=2.0), app.config["REDIS_PREFIX"])
    live = LiveModel(store, app.config["MODEL_CACHE_DIR"], app.config["MODEL_POLL_SECONDS"])
    app.extensions["live_model"] = live
    live.refresh()  # a worker that can load a model starts ready
    if app.config["MODEL_WATCHER"]:
        live.start()

    from app.api import api
    from app.events import events_api, init_events
    from app.openapi import openapi_api

    init_events(app)
    from app.online import init_online

    init_online(app)  # recommendation ids, POST /impressions, attribution
    live.refresh_experiment()  # a running experiment is served from the first request
    from app.pages import init_pages

    init_pages(app)  # GET /page (PAGE_CONFIG)
    from app.search import init_search

    init_search(app)  # GET /search (SEARCH_ENCODER)
    app.register_blueprint(api)
    app.register_blueprint(events_api)
    app.register_blueprint(openapi_api)
    from app.admin import init_admin
    from app.metrics import init_metrics

    init_metrics(app)  # request counters and /metrics
    init_admin(app)  # /admin (off unless ADMIN_TOKEN is set)
    register_error_handlers(app)
    return app
