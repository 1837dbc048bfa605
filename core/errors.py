"""Typed errors that carry their HTTP status and problem code. Services and repositories raise
them; the API renders them as RFC 9457 problems (app/errors.py, the one handler).

Error tree::

    ModelpressError (500 internal_error)
    ├── BadRequest (400 bad_request)
    ├── Unauthorized (401 unauthorized)
    ├── NotFound (404 not_found)
    ├── RequestTimeout (408 request_timeout) -- a request body stalled (app/http_limits.py)
    ├── Conflict (409 conflict)
    ├── Gone (410 gone) -- e.g. an expired signed link
    ├── PreconditionFailed (412 precondition_failed) -- e.g. a tus request of another protocol version
    ├── PayloadTooLarge (413 payload_too_large)
    ├── UnsupportedMediaType (415 unsupported_media_type)
    ├── Unprocessable (422 validation_error) -- also refused uploads (``code`` says why)
    │   └── JobExceedsWorkerBudget (422 job_exceeds_worker_budget) -- no live worker can take the job
    ├── ChecksumMismatch (460 checksum_mismatch) -- a tus PATCH body whose Upload-Checksum differs
    └── ServiceUnavailable (503 service_unavailable)
"""

from __future__ import annotations

from typing import Any

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
        extensions: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        if code:
            self.code = code
        self.errors = errors
        self.headers = headers or {}
        # More members of the problem object (RFC 9457 extensions), e.g. the figures of a refusal.
        self.extensions = extensions or {}


class BadRequest(ModelpressError):
    status, code, title = 400, "bad_request", "Bad request"


class Unauthorized(ModelpressError):
    status, code, title = 401, "unauthorized", "Missing or invalid API key"

    def __init__(self, detail: str | None = None, **kw: Any) -> None:
        kw.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(detail, **kw)


class NotFound(ModelpressError):
    status, code, title = 404, "not_found", "Not found"


class RequestTimeout(ModelpressError):
    status, code, title = 408, "request_timeout", "Request timeout"


class Conflict(ModelpressError):
    status, code, title = 409, "conflict", "Conflict"


class Gone(ModelpressError):
    status, code, title = 410, "gone", "Gone"


class PreconditionFailed(ModelpressError):
    status, code, title = 412, "precondition_failed", "Precondition failed"


class PayloadTooLarge(ModelpressError):
    status, code, title = 413, "payload_too_large", "Payload too large"


class UnsupportedMediaType(ModelpressError):
    status, code, title = 415, "unsupported_media_type", "Unsupported media type"


class Unprocessable(ModelpressError):
    status, code, title = 422, "validation_error", "Request could not be processed"


class JobExceedsWorkerBudget(Unprocessable):
    """A job whose plan (peak memory, scratch disk) is over the budget of every live worker of its
    queue. The problem names the figures: ``required`` {``memory_bytes``, ``scratch_bytes``} and
    ``available`` (the largest budgets of the fleet), besides ``detail``."""

    code, title = "job_exceeds_worker_budget", "The job exceeds every worker's budget"


class ChecksumMismatch(ModelpressError):
    """The tus checksum extension's own status (not an IANA one): the body of a PATCH does not
    match its ``Upload-Checksum``; the chunk was discarded."""

    status, code, title = 460, "checksum_mismatch", "Checksum mismatch"


class ServiceUnavailable(ModelpressError):
    status, code, title = 503, "service_unavailable", "Service temporarily unavailable"
