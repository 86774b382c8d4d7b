"""The routes, one module per resource, each a Blueprint; :func:`register` adds them to an app.

Every ``/api/X`` is also served at ``/api/v1/X``: the /api blueprint is registered under both prefixes.
"""

from __future__ import annotations

from quart import Blueprint
from quart_trio import QuartTrio

from . import admin, auth_tokens, devices, files, health, metrics, presence, removed, user

api = Blueprint("api", __name__)
for resource in (auth_tokens, devices, presence, user, files, removed):
    api.register_blueprint(resource.bp)

API_PREFIXES = {"api": "/api", "api_v1": "/api/v1"}


def register(app: QuartTrio) -> None:
    """The API listener's routes."""
    app.register_blueprint(health.bp)
    app.register_blueprint(metrics.bp)
    for name, prefix in API_PREFIXES.items():
        app.register_blueprint(api, url_prefix=prefix, name=name)
    app.register_blueprint(admin.bp, url_prefix="/admin")


def register_metrics(app: QuartTrio) -> None:
    """The routes of a separate ``[listen] metrics`` listener: /metrics only."""
    app.register_blueprint(metrics.open_bp)
