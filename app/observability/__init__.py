"""What operators see: Prometheus metrics (``GET /metrics``) and the request id of each HTTP request.

Metrics live in a registry of the app's own (never prometheus_client's global one), in two kinds:

* **HTTP**, counted in this process by :class:`ObservabilityMiddleware`, a pure ASGI middleware
  (``BaseHTTPMiddleware`` would buffer streaming responses: server-sent events and artifact
  downloads): ``modelpress_http_requests_total{method,route,status}`` and
  ``modelpress_http_request_duration_seconds{method,route}``. ``route`` is the route's template
  (``/v1/jobs/{job_id}``), never the raw path, so label values stay bounded; a path no route
  matches is ``unmatched``. ``/metrics`` is counted like any route: a scraper with a wrong token
  shows up as 401s.
* **Jobs and workers**, read from the database at scrape time by :class:`DatabaseCollector` (the
  database, not the broker, is the truth for both brokers): jobs by state, queued jobs per queue,
  job durations by first step method, live workers per queue. A database error leaves these out of
  that scrape, counts ``modelpress_scrape_errors_total`` and logs a warning: never a 500.

Modules: ``middleware.py`` (the ASGI middleware), ``collector.py`` (the database collector),
``metrics.py`` (the registry), ``endpoints.py`` (``GET /metrics`` and its token check).

Logs: core/logs.py (the format, and the request id carried from the API into the worker); the
middleware here binds the request id of each HTTP request.
"""

from __future__ import annotations

from fastapi import FastAPI

from app.observability.collector import DatabaseCollector
from app.observability.endpoints import router
from app.observability.metrics import Metrics
from app.observability.middleware import ObservabilityMiddleware
from core.config import Settings, get_settings

__all__ = ["DatabaseCollector", "Metrics", "ObservabilityMiddleware", "install_observability", "router"]


def install_observability(app: FastAPI, settings: Settings | None = None) -> None:
    """Add the request-id/metrics middleware, the app's metrics registry and ``GET /metrics``."""
    s = settings or get_settings()
    app.state.metrics = Metrics(s)
    app.add_middleware(ObservabilityMiddleware, metrics=app.state.metrics, access_log_enabled=s.access_log)
    app.include_router(router)
