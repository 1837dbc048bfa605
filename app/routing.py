"""Route classes: ETagRoute, a GET whose 200 carries an ETag and answers 304 (app/conditional.py),
and DirectRoute, such a GET served without FastAPI's per-request dependency solving.

ETagRoute wraps whatever handler serves the route: the body is hashed after it is serialized, so
the tag is that of the bytes sent, whichever path built them. It declares its ``If-None-Match``
parameter, the 200's ``ETag`` and the 304 in the operation itself, so a route gets all of it by
naming the class (:func:`etag_get`, or ``route_class_override=``).

DirectRoute is for the few routes clients poll in a loop (``GET /v1/jobs/{job_id}``). FastAPI
resolves an endpoint's parameters on every request by walking its dependency graph (here:
HTTPBearer, then ``current_caller``, then the path parameter), which cost a job poll about as much
CPU as its database read (bench/bench_load.py, docs/BENCHMARKS.md). A DirectRoute is declared like
any route, so its OpenAPI operation (parameters, security, responses) is FastAPI's own; only the
handler differs: it passes the path parameters as the strings they are and the caller from
:func:`app.auth.caller_from_header`, the code ``CurrentCaller`` runs, and sends the
:class:`~starlette.responses.Response` the endpoint returns as it is, with its ETag: a DirectRoute
is an ETagRoute (what is polled is what a 304 saves most on). Errors raised on the way (401, 404,
503) reach the app's exception handlers as from any route.

What it accepts is checked when the route is built, so a parameter it would not fill is an error
at start-up, not a request that skips it: an ``async`` endpoint that returns a Response, whose
parameters are ``str`` path parameters and at most one ``CurrentCaller``; no query, header,
cookie or body parameters and no other dependencies. (``app.dependency_overrides`` is not
applied to it; nothing here uses overrides.)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute

from app import conditional
from app.auth import caller_from_header, current_caller

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class ETagRoute(APIRoute):
    """A GET route whose 200 carries the ETag of its body, and that answers a matching
    ``If-None-Match`` with 304 (see the module docstring)."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        responses = dict(kwargs.pop("responses", None) or {})
        ok = dict(responses.get(200, {}))
        ok["headers"] = {**conditional.ETAG_HEADERS, **ok.get("headers", {})}
        responses[200] = ok
        responses.setdefault(304, conditional.NOT_MODIFIED)
        extra = dict(kwargs.pop("openapi_extra", None) or {})
        extra["parameters"] = [*extra.get("parameters", []), conditional.IF_NONE_MATCH_PARAMETER]
        super().__init__(path, endpoint, responses=responses, openapi_extra=extra, **kwargs)
        if set(self.methods or ()) != {"GET"}:
            raise TypeError(f"ETagRoute {path}: GET only (a 304 answers a read)")

    def get_route_handler(self) -> Handler:
        serve = self.untagged_handler()

        async def handler(request: Request) -> Response:
            return conditional.tagged(request.headers.get("if-none-match"), await serve(request))

        return handler

    def untagged_handler(self) -> Handler:
        """What serves the route before the ETag: FastAPI's own handler."""
        return super().get_route_handler()


def etag_get(router: APIRouter, path: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``@router.get(path, **kwargs)`` as an :class:`ETagRoute` (``router.get`` takes no route class)."""

    def register(endpoint: Callable[..., Any]) -> Callable[..., Any]:
        router.add_api_route(path, endpoint, methods=["GET"], route_class_override=ETagRoute, **kwargs)
        return endpoint

    return register


class DirectRoute(ETagRoute):
    """A polled GET served without dependency solving (see the module docstring)."""

    def untagged_handler(self) -> Handler:
        dependant = self.dependant
        where = f"DirectRoute {self.path}"
        if not inspect.iscoroutinefunction(self.endpoint):
            raise TypeError(f"{where}: the endpoint must be async")
        if dependant.query_params or dependant.header_params or dependant.cookie_params or dependant.body_params:
            raise TypeError(f"{where}: only path parameters and the caller can be passed directly")
        if any(f.field_info.annotation is not str for f in dependant.path_params):
            raise TypeError(f"{where}: path parameters must be plain str")
        callers = [d.name for d in dependant.dependencies if d.call is current_caller and d.name]
        if len(callers) != len(dependant.dependencies) or len(callers) > 1:
            raise TypeError(f"{where}: the only dependency allowed is one CurrentCaller parameter")
        if (
            dependant.request_param_name
            or dependant.websocket_param_name
            or dependant.http_connection_param_name
            or dependant.response_param_name
            or dependant.background_tasks_param_name
            or dependant.security_scopes_param_name
        ):
            raise TypeError(f"{where}: no Request, Response, BackgroundTasks or SecurityScopes parameters")

        endpoint = self.endpoint
        path_names = [f.name for f in dependant.path_params]
        caller_name = callers[0] if callers else None

        async def handler(request: Request) -> Response:
            kwargs: dict[str, Any] = {name: request.path_params[name] for name in path_names}
            if caller_name is not None:
                kwargs[caller_name] = await caller_from_header(request.headers.get("authorization"))
            response = await endpoint(**kwargs)
            if not isinstance(response, Response):
                raise TypeError(f"{where}: the endpoint returned {type(response).__name__}, not a Response")
            return response

        return handler
