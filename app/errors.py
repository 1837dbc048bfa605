"""Typed errors that carry their HTTP status, and the one handler that renders them.

Every 4xx/5xx leaves the API as RFC 9457 ``application/problem+json``::

    {"type": "/problems/<code>", "title": ..., "status": ..., "detail": ..., "code": ...,
     "errors": [{"loc": [...], "msg": ..., "type": ...}]}   # "errors" on 422 only

Error tree::

    ModelpressError (500 internal_error)
    ├── BadRequest (400 bad_request)
    ├── Unauthorized (401 unauthorized)
    ├── NotFound (404 not_found)
    ├── Conflict (409 conflict)
    ├── Gone (410 gone) -- e.g. an expired signed link
    ├── PayloadTooLarge (413 payload_too_large)
    ├── UnsupportedMediaType (415 unsupported_media_type)
    ├── Unprocessable (422 validation_error) -- also refused uploads (``code`` says why)
    └── ServiceUnavailable (503 service_unavailable)

No stack trace ever reaches a client: unexpected exceptions are logged and answered with a bare 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("modelpress.errors")

PROBLEM_JSON = "application/problem+json"


class ModelpressError(Exception):
    status = 500
    code = "internal_error"
    title = "Internal server error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        code: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        if code:
            self.code = code
        self.errors = errors
        self.headers = headers or {}


class BadRequest(ModelpressError):
    status, code, title = 400, "bad_request", "Bad request"


class Unauthorized(ModelpressError):
    status, code, title = 401, "unauthorized", "Missing or invalid API key"

    def __init__(self, detail: str | None = None, **kw: Any) -> None:
        kw.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(detail, **kw)


class NotFound(ModelpressError):
    status, code, title = 404, "not_found", "Not found"


class Conflict(ModelpressError):
    status, code, title = 409, "conflict", "Conflict"


class Gone(ModelpressError):
    status, code, title = 410, "gone", "Gone"


class PayloadTooLarge(ModelpressError):
    status, code, title = 413, "payload_too_large", "Payload too large"


class UnsupportedMediaType(ModelpressError):
    status, code, title = 415, "unsupported_media_type", "Unsupported media type"


class Unprocessable(ModelpressError):
    status, code, title = 422, "validation_error", "Request could not be processed"


class ServiceUnavailable(ModelpressError):
    status, code, title = 503, "service_unavailable", "Service temporarily unavailable"


PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "object"}},
    },
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entry so the OpenAPI spec shows the problem+json errors of a route."""
    return {
        s: {"description": "Error (RFC 9457 problem)", "content": {PROBLEM_JSON: {"schema": PROBLEM_SCHEMA}}}
        for s in statuses
    }


def problem(
    status: int,
    code: str,
    title: str,
    detail: str,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"/problems/{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


_STATUS_CODES = {
    400: ("bad_request", "Bad request"),
    401: ("unauthorized", "Missing or invalid API key"),
    403: ("forbidden", "Forbidden"),
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    406: ("not_acceptable", "Not acceptable"),
    409: ("conflict", "Conflict"),
    413: ("payload_too_large", "Payload too large"),
    415: ("unsupported_media_type", "Unsupported media type"),
    416: ("range_not_satisfiable", "Range not satisfiable"),
    422: ("validation_error", "Request could not be processed"),
}


def _clean_validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for e in exc.errors():
        # "input" may echo large or binary request content; "ctx" may hold exception objects.
        out.append({"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))})
    return out


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ModelpressError)
    async def _modelpress(_req: Request, exc: ModelpressError) -> JSONResponse:
        if exc.status >= 500:
            log.error("server error %s: %s", exc.code, exc.detail)
        return problem(exc.status, exc.code, exc.title, exc.detail, exc.errors, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _clean_validation_errors(exc)
        fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in errors)
        return problem(422, "validation_error", "Request could not be processed", f"invalid fields: {fields}", errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        code, title = _STATUS_CODES.get(exc.status_code, ("http_error", "HTTP error"))
        detail = exc.detail if isinstance(exc.detail, str) else title
        return problem(exc.status_code, code, title, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(OperationalError)
    async def _db_down(_req: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", type(exc.orig).__name__ if exc.orig else exc)
        return problem(503, "database_unavailable", "Service temporarily unavailable",
                       "the database is unreachable; retry later", headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return problem(500, "internal_error", "Internal server error", "an unexpected error occurred")
