"""/metrics: the Prometheus exposition of the daemon's registry."""

from __future__ import annotations

from prometheus_client import generate_latest
from quart import Blueprint, Response, g

from ...errors import ApiError
from ..guards import is_loopback
from ..services import services

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the exposition format generate_latest writes

bp = Blueprint("metrics", __name__)  # on the API listener: loopback peers only, and only without [listen] metrics
open_bp = Blueprint("open_metrics", __name__)  # on the [listen] metrics listener: any peer there


def _exposition() -> Response:
    return Response(generate_latest(services().metrics.registry), content_type=METRICS_CONTENT_TYPE)


@bp.get("/metrics")
async def metrics() -> Response:
    if services().config.listen.metrics or not is_loopback(g.peer):
        raise ApiError("NOT_FOUND")
    return _exposition()


@open_bp.get("/metrics")
async def open_metrics() -> Response:
    return _exposition()
