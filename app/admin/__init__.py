"""The operators' dashboard at ``/admin``: models, runs, service health and an explorer.

* :mod:`app.admin.auth`   sign-in with ``ADMIN_TOKEN``, the session cookie and CSRF tokens
* :mod:`app.admin.views`  the pages and the two actions (activate a version, queue a run)
* :mod:`app.admin.charts` the SVG charts

The dashboard only reads Redis and writes two things: the live pointer (via
:meth:`models.store.ModelStore.activate`) and the run queue (via
:func:`jobs.runs.queue_run`). Training never runs in a web request: "Retrain
now" queues a run that ``python -m jobs.scheduler`` executes.
"""

from __future__ import annotations

from flask import Blueprint, Flask

admin = Blueprint("admin", __name__, url_prefix="/admin", template_folder="templates", static_folder="static")


def init_admin(app: Flask) -> None:
    from app.admin import auth, views  # noqa: F401  (they attach their routes to the blueprint)

    auth.configure(app)
    app.register_blueprint(admin)
