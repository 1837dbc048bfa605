"""The pure ASGI middleware: the request id of each HTTP request, its HTTP metrics and its access log line.

Pure ASGI, not ``BaseHTTPMiddleware``: that one would buffer streaming responses (server-sent events
and artifact downloads).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.logs import bind, new_request_id, sane_request_id, unbind

if TYPE_CHECKING:
    from app.observability.metrics import Metrics

access_log = logging.getLogger("modelpress.access")

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
