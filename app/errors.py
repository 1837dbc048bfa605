"""The one handler that renders the typed errors of core/errors.py, and their OpenAPI declarations.

Every 4xx/5xx leaves the API as RFC 9457 ``application/problem+json``::

    {"type": "/problems/<code>", "title": ..., "status": ..., "detail": ..., "code": ...,
     "errors": [{"loc": [...], "msg": ..., "type": ...}]}   # "errors": every 422, some others

The error tree (each class with its status and code) is in core/errors.py's docstring; the one
app-only error, ``Forbidden`` (403), is here. A status's code and title are written once, on its
class: the handlers below and ``_STATUS_CODES`` (Starlette's own HTTPExceptions) read them from
there. ``_ERROR_DESCRIPTIONS`` is something else: what a status means on this API, for the
OpenAPI spec.

No stack trace ever reaches a client: unexpected exceptions are logged and answered with a bare 500.

The OpenAPI spec declares these errors on every route that can answer them (``problem_responses``,
``API_ERRORS``, ``BODY_ERRORS``), each as a ``$ref`` to the one ``Problem`` schema (the model
below), so a generated client has one problem class: tests/test_fuzz.py checks with schemathesis
that the running service answers nothing it does not declare, tests/test_openapi.py that no
problem schema is inlined. Every 429 and 503 carries ``Retry-After`` (:func:`problem`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema
from sqlalchemy.exc import DataError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from core.errors import (
    PROBLEM_JSON,
    BadRequest,
    Conflict,
    ModelpressError,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    ServiceUnavailable,
    Unauthorized,
    Unprocessable,
    UnsupportedMediaType,
)

log = logging.getLogger("modelpress.errors")


class ProblemFieldError(BaseModel):
    """One invalid field, header or file of the request; some carry more (``file``, ``line``)."""

    model_config = ConfigDict(extra="allow")

    loc: list[str | int] = Field(
        description='where the value is: `["body", "steps", 0, "method"]`, `["query", "limit"]`'
    )
    msg: str
    type: str = Field(description="pydantic's error type, e.g. `missing`, `string_too_long`")
    # A method's refusal (docs/METHODS.md): which of its constraints, and the figures.
    constraint: str | None = Field(None, description="the method constraint refused (GET /v1/methods)")
    group_size: int | None = Field(None, description="the refused group size")
    blocking_layers: list[dict[str, Any]] | None = Field(
        None, description="the layers whose input width the group size does not divide (`name`, `in_features`)"
    )
    blocking_count: int | None = Field(None, description="how many layers block it in all")
    valid_group_sizes: list[int | None] | None = Field(
        None, description="the accepted group sizes that divide every input width (null: per channel)"
    )
    blocking_config: dict[str, int] | None = Field(
        None, description="the config widths checked when the headers could not be read"
    )


class Problem(BaseModel):
    """An RFC 9457 problem (``application/problem+json``): every 4xx and 5xx of the API. Some
    carry more members (RFC 9457 extensions) with the figures of a refusal."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(description="`/problems/<code>`", examples=["/problems/not_found"])
    title: str = Field(description="the status's title", examples=["Not found"])
    status: int = Field(description="the HTTP status", examples=[404])
    detail: str = Field(description="what went wrong, for a person", examples=["no job 0c4a1b2e-..."])
    code: str = Field(description="what went wrong, for a program (stable)", examples=["not_found"])
    errors: list[ProblemFieldError] | None = Field(
        default=None, description="what of the request is wrong, where it says (every 422, some 400, 404, 409 and 413)"
    )


# The one schema every problem response refers to (declare_problem_errors adds it to the spec).
PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


# Every 429 and 503 says when to retry (:func:`problem` adds it where the error did not say).
DEFAULT_RETRY_AFTER_S = 5
RETRY_AFTER_HEADER: dict[str, Any] = {
    "description": "seconds to wait before retrying",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9]+$", "examples": ["5"]},
}

# Headers some errors carry, declared with them in the spec.
_ERROR_HEADERS: dict[int, dict[str, dict[str, Any]]] = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    416: {"Content-Range": {"description": "`bytes */<size>`", "schema": {"type": "string"}}},
    429: {"Retry-After": RETRY_AFTER_HEADER},
    503: {"Retry-After": RETRY_AFTER_HEADER},
}

_ERROR_DESCRIPTIONS = {
    400: "Malformed request body (e.g. not UTF-8, a multipart body cut off)",
    401: "Missing or invalid API key",
    404: "No such object (or not the caller's)",
    408: "The request body stopped arriving (``body_read_timeout_s``)",
    409: "Conflict with the object's state",
    410: "Gone (an expired link, an expired or consumed upload)",
    412: "Precondition failed (a tus request without `Tus-Resumable: 1.0.0`)",
    413: "Payload too large",
    415: "Unsupported media type",
    416: "Range not satisfiable",
    422: "Invalid request (``errors`` lists the fields)",
    429: "Over a quota of the tenant (``Retry-After`` says when to retry)",
    460: "Checksum mismatch (tus checksum extension): the chunk was discarded",
    503: "A dependency (the database) is unavailable; retry later",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entry so the OpenAPI spec shows the problem+json errors of a route."""
    out: dict[int | str, dict[str, Any]] = {}
    for s in statuses:
        entry: dict[str, Any] = {
            "description": _ERROR_DESCRIPTIONS.get(s, "Error (RFC 9457 problem)"),
            "content": {PROBLEM_JSON: {"schema": PROBLEM_REF}},
        }
        if s in _ERROR_HEADERS:
            entry["headers"] = _ERROR_HEADERS[s]
        out[s] = entry
    return out


# What any /v1 route can answer: a missing or wrong key (401), an invalid parameter or a value the
# database cannot store (422), the database down (503). FastAPI would otherwise declare its own 422
# (``HTTPValidationError`` as application/json), which is not what the handler below sends.
API_ERRORS = (401, 422, 503)
# And a route that reads a request body: one that cannot be parsed (e.g. not UTF-8) is a 400.
BODY_ERRORS = (400, *API_ERRORS)


def problem(
    status: int,
    code: str,
    title: str,
    detail: str,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    extensions: dict[str, Any] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        **(extensions or {}),
        "type": f"/problems/{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if errors is not None:
        body["errors"] = errors
    if status in (429, 503) and not any(k.lower() == "retry-after" for k in headers or {}):
        headers = {**(headers or {}), "Retry-After": str(DEFAULT_RETRY_AFTER_S)}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


class Forbidden(ModelpressError):
    """A valid key without the scope the route needs (403): only key management needs it so far
    (app/auth.py re-exports it)."""

    status, code, title = 403, "forbidden", "Forbidden"


# The code and title of an HTTPException that Starlette or FastAPI raised (a 404 of no route, a 405,
# a body FastAPI could not parse), taken from the typed error of the same status: one source.
# 405, 406 and 416 have no typed error (nothing of ours raises them), hence their own line.
_STATUS_CODES: dict[int, tuple[str, str]] = {
    **{
        cls.status: (cls.code, cls.title)
        for cls in (
            BadRequest,
            Unauthorized,
            Forbidden,
            NotFound,
            RequestTimeout,
            Conflict,
            PayloadTooLarge,
            UnsupportedMediaType,
            Unprocessable,
        )
    },
    405: ("method_not_allowed", "Method not allowed"),
    406: ("not_acceptable", "Not acceptable"),
    416: ("range_not_satisfiable", "Range not satisfiable"),
}


def _clean_validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for e in exc.errors():
        # "input" may echo large or binary request content; "ctx" may hold exception objects.
        out.append({"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))})
    return out


_HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def _allowed_methods(req: Request) -> list[str]:
    """Every method the spec declares on the request's path (HEAD with GET, as Starlette serves it)."""
    path = req.scope.get("path", "")
    root = req.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    methods: set[str] = set()
    paths = req.app.openapi().get("paths", {})
    # A path the spec names literally (POST /v1/jobs/estimate) is that operation's, although a
    # template (GET /v1/jobs/{job_id}) matches it too.
    matched = (
        [paths[path]]
        if path in paths
        else [item for template, item in paths.items() if compile_path(template)[0].match(path)]
    )
    for item in matched:
        methods |= {m.upper() for m in item if m in _HTTP_METHODS}
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def declare_problem_errors(spec: dict[str, Any]) -> dict[str, Any]:
    """Make the spec say what the handlers below answer, on every operation (whoever wrote its
    route): FastAPI's own 422 (``HTTPValidationError`` as application/json) becomes the problem
    this module sends; an operation that needs an API key (it declares security) also answers 401
    (no or a bad key) and 503 (the key is looked up in the database); one that reads a JSON body
    answers 400 when the body cannot be parsed (e.g. not UTF-8), 408 when it stops arriving and 413
    when it is too large (app/http_limits.py). Every one of them refers to the one ``Problem``
    schema, added to the components here."""
    for path_item in spec.get("paths", {}).values():
        for method in _HTTP_METHODS:
            op = path_item.get(method)
            if op is None:
                continue
            responses = op.setdefault("responses", {})
            declared = responses.get("422", {}).get("content", {})
            if "application/json" in declared and PROBLEM_JSON not in declared:
                responses["422"] = problem_responses(422)[422]
            needed = []
            if op.get("security"):
                needed += [401, 503]
            if "requestBody" in op:
                # app/http_limits.py: a body too large, stalled, or JSON the strict loader refuses.
                needed += [400, 408, 413]
            for status, entry in problem_responses(*needed).items():
                responses.setdefault(str(status), entry)
    _, defs = models_json_schema([(Problem, "serialization")], ref_template="#/components/schemas/{model}")
    spec.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
    schemas = spec["components"]["schemas"]
    if schemas and "HTTPValidationError" in schemas:
        text = json.dumps(spec.get("paths", {}))
        if "#/components/schemas/HTTPValidationError" not in text:
            schemas.pop("HTTPValidationError", None)
            if "#/components/schemas/ValidationError" not in json.dumps(schemas):
                schemas.pop("ValidationError", None)
    return spec


def _honest_openapi(app: FastAPI) -> None:
    """``app.openapi()`` with :func:`declare_problem_errors` applied once to each spec FastAPI
    generates (it regenerates when routes are added)."""
    generate = app.openapi
    done: list[int] = []

    def openapi() -> dict[str, Any]:
        spec = generate()
        if done != [id(spec)]:
            declare_problem_errors(spec)
            done[:] = [id(spec)]
        return spec

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    _honest_openapi(app)

    @app.exception_handler(ModelpressError)
    async def _modelpress(_req: Request, exc: ModelpressError) -> JSONResponse:
        if exc.status >= 500:
            log.error("server error %s: %s", exc.code, exc.detail)
        return problem(exc.status, exc.code, exc.title, exc.detail, exc.errors, exc.headers, exc.extensions)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _clean_validation_errors(exc)
        fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in errors)
        return problem(
            Unprocessable.status, Unprocessable.code, Unprocessable.title, f"invalid fields: {fields}", errors
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, exc: StarletteHTTPException) -> JSONResponse:
        code, title = _STATUS_CODES.get(exc.status_code, ("http_error", "HTTP error"))
        detail = exc.detail if isinstance(exc.detail, str) else title
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette's 405 names only the methods of the first route whose path matched; a path
            # served by several routes (GET and POST /v1/jobs) supports all of theirs.
            headers["Allow"] = ", ".join(_allowed_methods(req)) or headers.get("Allow", "")
        return problem(exc.status_code, code, title, detail, headers=headers or None)

    @app.exception_handler(DataError)
    async def _unstorable(_req: Request, exc: DataError) -> JSONResponse:
        # A value the database refuses (PostgreSQL text cannot hold NUL characters, nor jsonb
        # \u0000) is the client's to fix, whichever field it was in.
        log.warning("database refused a value: %s", type(exc.orig).__name__ if exc.orig else exc)
        return problem(
            Unprocessable.status,
            "invalid_value",
            Unprocessable.title,
            "a value of the request cannot be stored (e.g. it contains a NUL character)",
        )

    @app.exception_handler(OperationalError)
    async def _db_down(_req: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", type(exc.orig).__name__ if exc.orig else exc)
        return problem(
            ServiceUnavailable.status,
            "database_unavailable",
            ServiceUnavailable.title,
            "the database is unreachable; retry later",
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return problem(
            ModelpressError.status, ModelpressError.code, ModelpressError.title, "an unexpected error occurred"
        )
