"""Who may use the dashboard: one shared secret, a session cookie, and a CSRF token on every POST.

``ADMIN_TOKEN`` (environment) is the secret operators type to sign in. With
none configured the dashboard is off and every page says how to turn it on.
The token is compared in constant time (``hmac.compare_digest`` on digests,
so not even its length leaks).

A successful sign-in gets Flask's signed session cookie (``recs_admin``,
HttpOnly, SameSite=Lax, path ``/admin``, valid ``ADMIN_SESSION_HOURS``, 12 by
default; ``ADMIN_COOKIE_SECURE=1`` adds Secure for HTTPS deployments). The
cookie is signed with ``SECRET_KEY`` from the environment; without one, the
key is derived from ``ADMIN_TOKEN`` (an HMAC), so every gunicorn worker and
every host with the same token accepts the same cookie, and changing the
token signs everyone out. Only with neither set is the key random per
process, and then the dashboard is off anyway.

Every state-changing request (POST) must carry the session's CSRF token, as
the form field ``csrf_token`` or the header ``X-CSRF-Token``; sign-in too, so
a foreign page cannot sign a browser in to an attacker's session.

Sessions are also recorded server-side: sign-in stores a random session id
in Redis (``Keys.admin_session``, expiring with the session) and puts it in
the cookie; a request is signed in only while that record exists, so signing
out (which deletes it) invalidates every copy of the cookie at once.

Failed sign-ins are limited per client address (``ADMIN_SIGNIN_PER_ADDRESS``,
5 a minute) and overall (``ADMIN_SIGNIN_OVERALL``, 30 a minute, so many
addresses cannot guess in parallel); past either, sign-in answers 429 with
``Retry-After`` until the minute is over. The counters live in Redis (every
worker and host shares them), or in the process while Redis is unreachable.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from datetime import timedelta

import redis
from flask import Flask, current_app, redirect, render_template, request, session, url_for
from werkzeug.exceptions import BadRequest

from app.admin import admin
from app.errors import error_response

log = logging.getLogger("app.admin")

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def configure(app: Flask) -> None:
    app.config.setdefault("ADMIN_TOKEN", os.environ.get("ADMIN_TOKEN") or None)
    token = app.config["ADMIN_TOKEN"]
    if token and len(token) < 16:
        log.warning("ADMIN_TOKEN is short (%d characters); use a long random one", len(token))
    if not app.config.get("SECRET_KEY"):
        if os.environ.get("SECRET_KEY"):
            app.config["SECRET_KEY"] = os.environ["SECRET_KEY"]
        elif token:
            app.config["SECRET_KEY"] = hmac.new(token.encode(), b"recs admin session key", hashlib.sha256).hexdigest()
        else:
            app.config["SECRET_KEY"] = secrets.token_hex(32)
    hours = float(os.environ.get("ADMIN_SESSION_HOURS", "12"))
    app.config.update(
        SESSION_COOKIE_NAME="recs_admin",
        SESSION_COOKIE_PATH="/admin",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=app.config.get("SESSION_COOKIE_SECURE") or os.environ.get("ADMIN_COOKIE_SECURE") == "1",
        PERMANENT_SESSION_LIFETIME=timedelta(hours=hours),
    )
    app.jinja_env.globals["csrf_token"] = csrf_token
    store = app.extensions["live_model"].store
    app.extensions["admin_sessions"] = Sessions(store.redis, store.keys)
    app.extensions["admin_limiter"] = SignInLimiter(
        store.redis,
        store.keys,
        int(os.environ.get("ADMIN_SIGNIN_PER_ADDRESS", "5")),
        int(os.environ.get("ADMIN_SIGNIN_OVERALL", "30")),
    )

    @app.after_request
    def admin_headers(response):
        # On every /admin answer, 404s and errors included (the blueprint's own hooks miss unknown URLs).
        if request.path == "/admin" or request.path.startswith("/admin/"):
            security_headers(response)
        return response


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def token_matches(given: str, token: str) -> bool:
    return hmac.compare_digest(_digest(given), _digest(token))


SIGNIN_WINDOW_SECONDS = 60


class SignInLimiter:
    """Fixed one-minute windows of failed sign-ins, per address and overall (Redis, else this process)."""

    def __init__(self, client, keys, per_address: int, overall: int):
        self.redis, self.keys = client, keys
        self.per_address, self.overall = per_address, overall
        self._local: dict[str, int] = {}

    def _names(self, address: str) -> tuple[str, str]:
        window = int(time.time() // SIGNIN_WINDOW_SECONDS)
        who = hashlib.sha256(address.encode()).hexdigest()[:24]  # an address never appears in a key name raw
        return self.keys.admin_signin_failures(who, window), self.keys.admin_signin_failures("all", window)

    def retry_after(self, address: str) -> int | None:
        """Seconds until sign-in is allowed again, or None if it is allowed now."""
        mine, everyone = self._names(address)
        try:
            counts = [int(v or 0) for v in self.redis.mget([mine, everyone])]
        except redis.RedisError:
            counts = [self._local.get(mine, 0), self._local.get(everyone, 0)]
        if counts[0] >= self.per_address or counts[1] >= self.overall:
            return max(1, int(SIGNIN_WINDOW_SECONDS - time.time() % SIGNIN_WINDOW_SECONDS))
        return None

    def failed(self, address: str) -> None:
        mine, everyone = self._names(address)
        try:
            pipe = self.redis.pipeline(transaction=False)
            for name in (mine, everyone):
                pipe.incr(name)
                pipe.expire(name, 2 * SIGNIN_WINDOW_SECONDS)
            pipe.execute()
        except redis.RedisError:
            if len(self._local) > 10_000:  # old windows: forget them rather than grow
                self._local.clear()
            for name in (mine, everyone):
                self._local[name] = self._local.get(name, 0) + 1


class Sessions:
    """Server-side records of signed-in sessions: a random id in the cookie, its hash in Redis."""

    def __init__(self, client, keys):
        self.redis, self.keys = client, keys

    def _key(self, session_id: str) -> str:
        return self.keys.admin_session(hashlib.sha256(session_id.encode()).hexdigest())

    def create(self, lifetime: float) -> str:
        session_id = secrets.token_urlsafe(32)
        self.redis.set(self._key(session_id), "1", ex=max(1, int(lifetime)))
        return session_id

    def valid(self, session_id) -> bool:
        if not isinstance(session_id, str) or not session_id:
            return False
        try:
            return bool(self.redis.exists(self._key(session_id)))
        except redis.RedisError:
            log.warning("admin sessions cannot be checked: Redis is unreachable")
            return False

    def end(self, session_id) -> None:
        if isinstance(session_id, str) and session_id:
            self.redis.delete(self._key(session_id))


def _token_check(token: str) -> str:
    # Ties a session to the current token, so rotating ADMIN_TOKEN signs everyone out even with a fixed SECRET_KEY.
    return hmac.new(current_app.secret_key.encode(), token.encode(), hashlib.sha256).hexdigest()[:32]


def csrf_token() -> str:
    if CSRF_FIELD not in session:
        session[CSRF_FIELD] = secrets.token_urlsafe(32)
    return session[CSRF_FIELD]


def signed_in() -> bool:
    token = current_app.config.get("ADMIN_TOKEN")
    if not token or not session.get("admin"):
        return False
    max_age = current_app.permanent_session_lifetime.total_seconds()
    fresh = time.time() - float(session.get("signed_in_at", 0)) < max_age
    return (
        fresh
        and hmac.compare_digest(session.get("token_check", ""), _token_check(token))
        and current_app.extensions["admin_sessions"].valid(session.get("sid"))
    )


def wants_html() -> bool:
    return request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html"


def admin_error(status: int, message: str):
    """Errors are JSON ``{"error": ...}``; a browser gets the same message as a page."""
    if wants_html():
        return render_template("admin/error.html", status=status, message=message), status
    return error_response(status, message)


def safe_next(target: str | None) -> str:
    # Only back into the dashboard: never an open redirect to another site.
    if target and _CONTROL.search(target):
        raise BadRequest("'next' contains control characters")
    if target and target.startswith("/admin") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for("admin.overview")


@admin.before_request
def guard():
    if request.endpoint == "admin.static":
        return None
    if not current_app.config.get("ADMIN_TOKEN"):
        message = (
            "The admin dashboard is off: no ADMIN_TOKEN is configured. Set ADMIN_TOKEN to a long random secret "
            "in the service's environment (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))') "
            "and restart it."
        )
        if wants_html():
            return render_template("admin/off.html", message=message), 503
        return error_response(503, message)
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        given = request.form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER) or ""
        expected = session.get(CSRF_FIELD)
        if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
            return admin_error(400, "missing or wrong CSRF token; reload the page and try again")
    if request.endpoint == "admin.login" or signed_in():
        return None
    if request.method == "GET" and wants_html():
        return redirect(url_for("admin.login", next=request.full_path.rstrip("?")))
    return admin_error(401, "sign in first: POST your ADMIN_TOKEN to /admin/login")


def security_headers(response):
    # Inline SVG charts are markup, not script: the dashboard needs nothing but its own files.
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    )
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    if request.endpoint != "admin.static":
        response.headers["Cache-Control"] = "no-store"
    return response


@admin.route("/login", methods=["GET", "POST"])
def login():
    if request.method == "GET":
        return render_template("admin/login.html", next=safe_next(request.args.get("next")), error=None)
    target = safe_next(request.form.get("next"))
    limiter = current_app.extensions["admin_limiter"]
    address = request.remote_addr or "unknown"
    wait = limiter.retry_after(address)
    if wait is not None:
        log.warning("admin sign-in refused from %s: too many failed attempts", address)
        response = admin_error(429, f"too many failed sign-ins; try again in {wait} s")
        response = current_app.make_response(response)
        response.headers["Retry-After"] = str(wait)
        return response
    if not token_matches(request.form.get("token", ""), current_app.config["ADMIN_TOKEN"]):
        limiter.failed(address)
        log.warning("admin sign-in failed from %s", address)
        return render_template("admin/login.html", next=target, error="That token is not right."), 401
    # A fresh session (and CSRF token) at sign-in: nothing chosen before it carries over.
    session.clear()
    session.permanent = True
    session.update(
        admin=True,
        signed_in_at=time.time(),
        token_check=_token_check(current_app.config["ADMIN_TOKEN"]),
        csrf_token=secrets.token_urlsafe(32),
        sid=current_app.extensions["admin_sessions"].create(current_app.permanent_session_lifetime.total_seconds()),
    )
    log.info("admin signed in from %s", request.remote_addr)
    return redirect(target, 303)


@admin.post("/logout")
def logout():
    current_app.extensions["admin_sessions"].end(session.get("sid"))  # every copy of the cookie is dead now
    session.clear()
    return redirect(url_for("admin.login"), 303)
