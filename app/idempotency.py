"""``Idempotency-Key`` on the create routes (POST /v1/models, /v1/datasets, /v1/jobs, /v1/sweeps).

A request sent with a key does its normal work and, in the same transaction as the object it
created, inserts an ``idempotency_keys`` row holding its response (status code and JSON body) under
the unique (tenant, route, key). So:

- a later request with the same key and the same request (same digest) gets the stored response
  at once, with ``Idempotency-Replayed: true``; with a different request, a 422
  ``idempotency_key_reused``;
- concurrent duplicates all do the work, but only one commits: the others collide on the unique
  constraint when they flush, roll back (the rollback hooks of the unit of work delete the files
  they stored, and their after-commit hooks, e.g. enqueueing a job, are dropped), then read the
  winner's row and answer with its stored response.

The digest of a JSON request is the sha256 of the canonical JSON of the validated body; of an upload,
the sha256 of the canonical JSON of the uploaded files' part names, file names, sizes and sha256s
(computed while streaming) and the form fields. Only successful creations are stored: a refused
request (4xx) leaves no row, so the same key can be retried with a corrected request.

Keys are per tenant and per route, at most ``MAX_KEY_LENGTH`` characters, and expire ``TTL`` after
they were stored: an expired row is ignored and replaced.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any

from fastapi import Header
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.uploads import StagedFile
from core.db import UnitOfWork
from core.errors import Unprocessable
from core.tables import IdempotencyKey, utcnow

TTL = timedelta(hours=24)
MAX_KEY_LENGTH = 200
REPLAYED_HEADER = "Idempotency-Replayed"
# A losing duplicate reads the winner's row after its rollback; the winner has committed by then
# (its insert is what made ours fail), but give a slow replica of that moment a few tries.
_READ_TRIES = 10
_READ_PAUSE_S = 0.05

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description=(
            f"Makes the request safe to retry: the same key with the same request returns the first "
            f"response (with `{REPLAYED_HEADER}: true`) instead of creating another object; with a "
            f"different request, 422 `idempotency_key_reused`. 1-{MAX_KEY_LENGTH} characters, per "
            f"tenant and route, kept {int(TTL.total_seconds() // 3600)} h."
        ),
    ),
]


def _header_error(code: str, detail: str) -> Unprocessable:
    return Unprocessable(
        detail, code=code, errors=[{"loc": ["header", "Idempotency-Key"], "msg": detail, "type": code}]
    )


def check_key(key: str | None) -> str | None:
    """The key, or None when the request has none; 422 ``invalid_idempotency_key`` if unusable."""
    if key is None:
        return None
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise _header_error(
            "invalid_idempotency_key",
            f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable characters (got {len(key)})",
        )
    return key


def _canonical_sha256(obj: Any) -> str:
    # app/http_limits.py refuses JSON bodies too deep or with lone surrogates before they get here;
    # should one arrive all the same, it is the client's to fix: a 422, never a 500 from inside the
    # digest (RecursionError from json.dumps, UnicodeEncodeError from encode). Same text as ever:
    # stored digests stay valid.
    try:
        raw = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    except (RecursionError, ValueError, TypeError) as e:
        raise Unprocessable(
            f"the request cannot be made idempotent: its body is not plain JSON ({e.__class__.__name__})",
            code="invalid_json",
            errors=[{"loc": ["body"], "msg": "not plain JSON", "type": "invalid_json"}],
        ) from None
    return hashlib.sha256(raw).hexdigest()


def json_digest(body: Any) -> str:
    """Digest of a JSON request: the canonical JSON of its parsed body."""
    return _canonical_sha256(body)


def upload_digest(files: list[StagedFile], fields: Mapping[str, str]) -> str:
    """Digest of a multipart upload: its files (part, name, size, sha256; in any order) and fields."""
    listing = sorted([f.field, f.filename, f.size_bytes, f.sha256] for f in files)
    return _canonical_sha256({"files": listing, "fields": dict(fields)})


@dataclass(frozen=True)
class Scope:
    """One idempotent request: who, which route, which key, what request."""

    tenant_id: str
    route: str  # e.g. "POST /v1/jobs"
    key: str
    digest: str
    location: str | None = None  # e.g. "/v1/jobs/{id}": the Location header of a replay


def _replay(scope: Scope, row: IdempotencyKey) -> JSONResponse:
    headers = {REPLAYED_HEADER: "true"}
    if scope.location and row.resource_id:
        headers["Location"] = scope.location.format(id=row.resource_id)
    return JSONResponse(row.response_body, status_code=row.status_code, headers=headers)


def _find(uow: UnitOfWork, scope: Scope) -> IdempotencyKey | None:
    return uow.session.scalars(
        select(IdempotencyKey).where(
            IdempotencyKey.tenant_id == scope.tenant_id,
            IdempotencyKey.route == scope.route,
            IdempotencyKey.key == scope.key,
        )
    ).one_or_none()


def _check_same(scope: Scope, row: IdempotencyKey) -> None:
    if row.request_sha256 != scope.digest:
        raise _header_error(
            "idempotency_key_reused",
            f"Idempotency-Key {scope.key!r} was already used with a different request on {scope.route}; "
            "use a new key for a new request",
        )


def stored_response(uow: UnitOfWork, scope: Scope) -> JSONResponse | None:
    """Before the work: the stored response to replay, or None to go on (an expired row is deleted
    in this transaction, so the new one can take its place). 422 if the key was used with another
    request."""
    row = _find(uow, scope)
    if row is None:
        return None
    if row.created_at < utcnow() - TTL:
        uow.session.delete(row)
        uow.session.flush()
        return None
    _check_same(scope, row)
    return _replay(scope, row)


def record(
    uow: UnitOfWork, scope: Scope, status_code: int, resource_id: str | None, body: dict[str, Any]
) -> JSONResponse | None:
    """After the work, in its transaction: store the response. None when this request won (answer
    with its own response); when a concurrent duplicate committed first, this request's transaction
    is rolled back (its files deleted, its enqueue dropped) and the winner's response is returned."""
    uow.session.add(
        IdempotencyKey(
            tenant_id=scope.tenant_id,
            route=scope.route,
            key=scope.key,
            request_sha256=scope.digest,
            status_code=status_code,
            response_body=body,
            resource_id=resource_id,
        )
    )
    try:
        uow.session.flush()
    except IntegrityError:
        uow.rollback()
        for attempt in range(_READ_TRIES):
            row = _find(uow, scope)
            if row is not None:
                _check_same(scope, row)
                return _replay(scope, row)
            uow.session.rollback()
            time.sleep(_READ_PAUSE_S * (attempt + 1))
        raise
    return None


def run(
    uow: UnitOfWork,
    scope: Scope | None,
    status_code: int,
    create: Callable[[], tuple[str, Any]],
) -> Any:
    """Do ``create`` (returning the new object's id and its response model) once per key: the
    response model on a first request, else the stored response as a JSONResponse. Without a
    scope (no key) this is just ``create``."""
    if scope is not None and (replay := stored_response(uow, scope)) is not None:
        return replay
    resource_id, out = create()
    if scope is None:
        return out
    body = out.model_dump(mode="json", by_alias=True)
    replay = record(uow, scope, status_code, resource_id, body)
    return out if replay is None else replay
