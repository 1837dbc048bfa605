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

Logs: core/logs.py (the format, and the request id carried from the API into the worker); the
middleware here binds the request id of each HTTP request.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import problem_responses
from core.config import Settings, get_settings
from core.errors import Unauthorized
from core.logs import bind, new_request_id, sane_request_id, unbind

log = logging.getLogger("modelpress.observability")
access_log = logging.getLogger("modelpress.access")

# --- HTTP metrics and the request id -------------------------------------------------------------

_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_JOB_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Probes and scrapes: logged at DEBUG, not INFO, so they do not drown the access log.
_QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class ObservabilityMiddleware:
    """Per HTTP request: a request id (a sane incoming ``X-Request-ID``, else a new one) bound in
    the log context and echoed in the response's ``X-Request-ID``; the request counted and timed
    (until its last body byte is sent: a server-sent event stream's duration is its lifetime);
    one access log line."""

    def __init__(self, app: ASGIApp, metrics: Metrics, access_log_enabled: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log_enabled = access_log_enabled
        # (method, route, status) -> (its counter, its histogram): labels() validates and locks on
        # every call. Bounded: methods, route templates and statuses are.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = sane_request_id(incoming.decode("latin-1") if incoming is not None else None) or new_request_id()
        token = bind(request_id=rid)
        status = 500  # when the app raises before it starts a response
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            # The error handler outside (Starlette's ServerErrorMiddleware) logs the exception and
            # answers 500: the request id stays bound so that line carries it. (That 500 does not
            # pass through here, so it has no X-Request-ID header.)
            self._observe(scope, status, started)
            raise
        self._observe(scope, status, started)
        unbind(token)

    def _observe(self, scope: Scope, status: int, started: float) -> None:
        elapsed = time.perf_counter() - started
        method = scope["method"] if scope["method"] in _METHODS else "other"
        route = _route_template(scope)
        children = self._children.get((method, route, status))
        if children is None:
            children = self._children[(method, route, status)] = (
                self.metrics.http_requests.labels(method, route, str(status)),
                self.metrics.http_duration.labels(method, route),
            )
        children[0].inc()
        children[1].observe(elapsed)
        if self.access_log_enabled:
            access_log.log(
                logging.DEBUG if route in _QUIET_ROUTES else logging.INFO,
                "%s %s %d %.1f ms",
                scope["method"],
                scope["path"],
                status,
                elapsed * 1000,
                extra={
                    "method": scope["method"],
                    "route": route,
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                },
            )


# --- jobs and workers, read at scrape time -------------------------------------------------------


class DatabaseCollector:
    """Families read from the database at each scrape: three short queries (jobs by state and
    queue; start and finish times of jobs finished in the window; live workers), all or nothing."""

    def __init__(self, scrape_errors: Counter, window_s: int) -> None:
        self.scrape_errors = scrape_errors
        self.window_s = window_s

    def _families(self) -> dict[str, GaugeMetricFamily | GaugeHistogramMetricFamily]:
        hours = f"{self.window_s / 3600:g} h"
        return {
            "jobs": GaugeMetricFamily(
                "modelpress_jobs", "Jobs in the database by state (every state, 0 included).", labels=["state"]
            ),
            "queue": GaugeMetricFamily(
                "modelpress_queue_depth",
                "Jobs queued (waiting for a worker) per queue, from the database.",
                labels=["queue"],
            ),
            "duration": GaugeHistogramMetricFamily(
                "modelpress_job_duration_seconds",
                f"Run time (finished_at - started_at of the last attempt) of the jobs that finished in the last {hours}, "
                "by the job's first step method and its final state. A sliding window, not a counter: "
                "use histogram_quantile on the buckets directly, without rate().",
                labels=["method", "state"],
            ),
            "workers": GaugeMetricFamily(
                "modelpress_workers",
                "Live workers (registry rows renewed in the last three reconcile intervals) per queue they consume.",
                labels=["queue"],
            ),
        }

    def describe(self) -> Iterator[GaugeMetricFamily | GaugeHistogramMetricFamily]:
        yield from self._families().values()

    def collect(self) -> Iterator[GaugeMetricFamily | GaugeHistogramMetricFamily]:
        try:
            families = self._read()
        except Exception as e:  # the database is down or not migrated: the rest of the scrape still answers
            self.scrape_errors.inc()
            log.warning(
                "metrics: could not read the database (%s); job and worker metrics left out of this scrape",
                e.__class__.__name__,
            )
            return
        yield from families.values()

    def _read(self) -> dict[str, GaugeMetricFamily | GaugeHistogramMetricFamily]:
        from core import workers as registry
        from core.db import get_sessionmaker
        from core.jobs.schemas import JobStatus
        from core.queue import QUEUES
        from core.tables import Job, Worker

        since = datetime.now(UTC) - timedelta(seconds=self.window_s)
        with get_sessionmaker()() as s:
            counts = s.execute(select(Job.status, Job.queue, func.count()).group_by(Job.status, Job.queue)).all()
            finished = s.execute(
                select(Job.steps, Job.status, Job.started_at, Job.finished_at).where(
                    Job.finished_at >= since, Job.started_at.is_not(None)
                )
            ).all()
            worker_queues = s.scalars(select(Worker.queues).where(Worker.last_seen_at >= registry.live_since())).all()

        fam = self._families()
        by_state = dict.fromkeys(get_args(JobStatus), 0)
        depth = dict.fromkeys(QUEUES, 0)
        for status, queue, n in counts:
            by_state[status] = by_state.get(status, 0) + n
            if status == "queued":
                depth[queue] = depth.get(queue, 0) + n
        for state, n in sorted(by_state.items()):
            fam["jobs"].add_metric([state], n)
        for queue, n in sorted(depth.items()):
            fam["queue"].add_metric([queue], n)

        durations: dict[tuple[str, str], list[float]] = {}
        for steps, status, started_at, finished_at in finished:
            method = steps[0].get("method", "unknown") if steps and isinstance(steps[0], dict) else "unknown"
            durations.setdefault((method, status), []).append(max(0.0, (finished_at - started_at).total_seconds()))
        for (method, state), values in sorted(durations.items()):
            buckets = [(f"{b:g}", sum(v <= b for v in values)) for b in _JOB_BUCKETS] + [("+Inf", len(values))]
            fam["duration"].add_metric([method, state], buckets, sum(values))

        live = dict.fromkeys(QUEUES, 0)
        for queues in worker_queues:
            for q in queues:
                live[q] = live.get(q, 0) + 1
        for queue, n in sorted(live.items()):
            fam["workers"].add_metric([queue], n)
        return fam


class Metrics:
    """The app's registry: HTTP metrics, the database collector, and the process's own
    (``process_*``, ``python_*``)."""

    def __init__(self, settings: Settings) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "modelpress_http_requests",
            "HTTP requests answered by this API process, by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "modelpress_http_request_duration_seconds",
            "Time from a request's arrival until its response's last byte was sent (for a server-sent event stream: its lifetime).",
            ["method", "route"],
            buckets=_HTTP_BUCKETS,
            registry=self.registry,
        )
        self.scrape_errors = Counter(
            "modelpress_scrape_errors",
            "Scrapes whose database read failed (their job and worker metrics were left out).",
            registry=None,
        )
        # Collected in registration order: the database first, so a failed scrape already counts itself.
        self.registry.register(DatabaseCollector(self.scrape_errors, settings.metrics_job_window_s))
        self.registry.register(self.scrape_errors)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)


# --- wiring --------------------------------------------------------------------------------------


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


def install_observability(app: FastAPI, settings: Settings | None = None) -> None:
    """Add the request-id/metrics middleware, the app's metrics registry and ``GET /metrics``."""
    s = settings or get_settings()
    app.state.metrics = Metrics(s)
    app.add_middleware(ObservabilityMiddleware, metrics=app.state.metrics, access_log_enabled=s.access_log)
    app.include_router(router)
