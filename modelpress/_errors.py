"""Exceptions raised by the modelpress SDK.

Every error the API answers is an RFC 9457 ``application/problem+json`` body
(``{"type", "title", "status", "detail", "code", "errors"?}``); the client raises it as the
:class:`APIError` subclass of its status, with those fields as attributes. Failures below HTTP
(cannot connect, connection lost, timeouts) are :class:`TransportError`, with the httpx exception
as ``__cause__``. Exception tree::

    ModelpressError
    ├── APIError (status, code, title, detail, errors, headers) -- any 4xx/5xx answer
    │   ├── BadRequest (400)
    │   ├── Unauthorized (401) -- missing or invalid API key
    │   ├── Forbidden (403) -- a valid key without the scope the call needs (``admin_required``)
    │   ├── NotFound (404) -- a missing id, or another tenant's
    │   ├── Conflict (409) -- e.g. cancel a finished job, artifact or report not ready
    │   ├── Gone (410) -- an expired signed link
    │   ├── PayloadTooLarge (413)
    │   ├── UnsupportedMediaType (415)
    │   ├── RangeNotSatisfiable (416)
    │   ├── Unprocessable (422) -- validation; refused uploads (``code`` says why)
    │   ├── RateLimited (429) -- retried first, raised when retries run out
    │   └── ServiceUnavailable (503) -- retried first, raised when retries run out
    ├── TransportError -- the request did not complete (wraps httpx.TransportError)
    ├── ChecksumMismatch -- a download's bytes do not hash to the artifact's sha256
    ├── JobError (job) -- raised by ``wait()``; ``job`` is the final :class:`~modelpress.Job`
    │   ├── JobFailed -- the job failed: ``job.error.code`` / ``job.error.message``
    │   ├── JobCanceled -- the job was canceled
    │   └── WaitTimeout -- ``wait(timeout=...)`` ran out; the job goes on (also a TimeoutError)
    └── ModelImportError (model) -- raised by ``wait_model()``; ``model`` is the model as last read
        ├── ImportFailed -- the import failed: ``model.error`` is the problem body
        └── ImportTimeout -- ``wait_model(timeout=...)`` ran out; the import goes on (a TimeoutError)

A resumable upload that gives up (``upload_model``, ``upload_file``: connections failing
``max_retries`` times in a row without progress) raises ``TransportError``; what was sent stays on
the server, and the same call again resumes from there.

Another 4xx/5xx status (500, 405, ...) raises a plain :class:`APIError`. Errors made before any
request (a missing file, an empty directory, a bad step) are ``ValueError`` / ``OSError``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

    from modelpress._models import Job, Model

__all__ = [
    "APIError",
    "BadRequest",
    "ChecksumMismatch",
    "Conflict",
    "ImportFailed",
    "ImportTimeout",
    "ModelImportError",
    "Forbidden",
    "Gone",
    "JobCanceled",
    "JobError",
    "JobFailed",
    "ModelpressError",
    "NotFound",
    "PayloadTooLarge",
    "RangeNotSatisfiable",
    "RateLimited",
    "ServiceUnavailable",
    "TransportError",
    "Unauthorized",
    "Unprocessable",
    "UnsupportedMediaType",
    "WaitTimeout",
]


class ModelpressError(Exception):
    """Base class of every exception the SDK raises on purpose."""


class APIError(ModelpressError):
    """The API answered with an error status; the fields are the problem+json body's.

    ``status``: the HTTP status; ``code``: the machine-readable reason (``not_found``,
    ``pickle_refused``, ``artifact_not_ready``, ...); ``title``: one line per kind of error;
    ``detail``: what went wrong this time; ``errors``: ``[{loc, msg, type}]`` on 422, else None;
    ``headers``: the response's headers, names in lower case (``retry-after`` among them);
    ``problem``: the whole problem+json body, its extension members included (e.g. ``required`` and
    ``available`` of a 422 ``job_exceeds_worker_budget``)."""

    status: int = 0

    def __init__(
        self,
        status: int,
        code: str,
        title: str,
        detail: str,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        problem: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{title}: {detail}" if detail and detail != title else title)
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}
        self.problem = problem or {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, code={self.code!r}, detail={self.detail!r})"

    @classmethod
    def from_response(cls, response: httpx.Response) -> APIError:
        """The exception for an error response: its status's class, the body's fields. A body that
        is not problem+json (a proxy's HTML page) still gives a typed error, titled by the status."""
        body: Any = None
        with contextlib.suppress(ValueError):
            body = response.json()
        if not isinstance(body, dict):
            body = {}
        status = response.status_code
        title = str(body.get("title") or response.reason_phrase or f"HTTP {status}")
        detail = str(body.get("detail") or (response.text[:500] if not body and response.text else title))
        code = str(body.get("code") or f"http_{status}")
        errors = body.get("errors") if isinstance(body.get("errors"), list) else None
        exc_cls = _BY_STATUS.get(status, APIError)
        return exc_cls(status, code, title, detail, errors, dict(response.headers), body)


class BadRequest(APIError):
    status = 400


class Unauthorized(APIError):
    status = 401


class Forbidden(APIError):
    status = 403


class NotFound(APIError):
    status = 404


class Conflict(APIError):
    status = 409


class Gone(APIError):
    status = 410


class PayloadTooLarge(APIError):
    status = 413


class UnsupportedMediaType(APIError):
    status = 415


class RangeNotSatisfiable(APIError):
    status = 416


class Unprocessable(APIError):
    status = 422


class RateLimited(APIError):
    status = 429


class ServiceUnavailable(APIError):
    status = 503


_BY_STATUS: dict[int, type[APIError]] = {
    c.status: c
    for c in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        Gone,
        PayloadTooLarge,
        UnsupportedMediaType,
        RangeNotSatisfiable,
        Unprocessable,
        RateLimited,
        ServiceUnavailable,
    )
}


class TransportError(ModelpressError):
    """The request did not complete: the server cannot be reached, the connection broke, or it
    timed out. The httpx exception is ``__cause__``; ``url`` is what was asked."""

    def __init__(self, message: str, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


class ChecksumMismatch(ModelpressError):
    """A downloaded artifact does not hash to its sha256 (the partial file has been deleted)."""

    def __init__(self, message: str, expected: str, actual: str) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class JobError(ModelpressError):
    """``wait()`` ended without success; ``job`` is the job as last read."""

    def __init__(self, message: str, job: Job) -> None:
        super().__init__(message)
        self.job = job


class JobFailed(JobError):
    """The job failed; ``job.error`` has its ``code`` and ``message``."""


class JobCanceled(JobError):
    """The job was canceled."""


class WaitTimeout(JobError, TimeoutError):
    """``wait(timeout=...)`` ran out before the job finished; the job itself goes on."""


class ModelImportError(ModelpressError):
    """``wait_model()`` ended without a ready model; ``model`` is the model as last read."""

    def __init__(self, message: str, model: Model) -> None:
        super().__init__(message)
        self.model = model


class ImportFailed(ModelImportError):
    """The import failed; ``model.error`` is the problem body (``code``, ``detail``) saying why."""


class ImportTimeout(ModelImportError, TimeoutError):
    """``wait_model(timeout=...)`` ran out before the import finished; the import itself goes on."""
