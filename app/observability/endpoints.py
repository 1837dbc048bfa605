"""``GET /metrics``: the registry's exposition, behind an optional bearer token."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Response
from prometheus_client.exposition import choose_encoder

from app.errors import problem_responses
from core.config import Settings, get_settings
from core.errors import Unauthorized


def _check_token(settings: Settings, authorization: str | None) -> None:
    if not settings.metrics_token:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.metrics_token.encode()):
        raise Unauthorized("GET /metrics needs Authorization: Bearer <MODELPRESS_METRICS_TOKEN>")


router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {
                "text/plain": {"schema": {"type": "string"}},
                "application/openmetrics-text": {"schema": {"type": "string"}},
            },
            "description": "Prometheus text (or OpenMetrics, when Accept asks for it) exposition",
        },
        **problem_responses(401),
    },
)
def metrics(request: Request) -> Response:
    """Prometheus metrics; needs ``Authorization: Bearer <token>`` only when MODELPRESS_METRICS_TOKEN is set.
    ``Accept: application/openmetrics-text`` gets the OpenMetrics format."""
    # Both headers are read here, not declared as parameters: OpenAPI ignores header parameters
    # named Authorization or Accept, and declared ones would give the route a 422 it never answers.
    _check_token(get_settings(), request.headers.get("authorization"))
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(request.app.state.metrics.registry), media_type=content_type)
