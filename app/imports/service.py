"""Imports by reference (POST /v1/models/import, docs/IMPORTS.md): the request-time checks and the
model row in status "importing". The fetching, validation and storing run in the API process's
import threads (app/imports/runner.py), queued once the row is committed.

Checked at request time, so a refused source records nothing:

* the source's shape (``invalid_import_source``, 422);
* S3: the bucket is in ``import_s3_buckets`` for the caller's tenant (by id or name) or for
  ``"*"``, and is not the service's own storage (``import_bucket_forbidden``, 403);
* http(s): ``import_https`` is on (``import_https_disabled``, 403) and the host resolves only to
  addresses the SSRF guard allows (``import_url_refused`` / ``import_url_unresolvable``, 422);
* the tenant is not over its storage quota already (429, as an upload).
"""

from __future__ import annotations

from pathlib import PurePosixPath

from app import quotas
from app.auth import Caller
from app.errors import Forbidden
from app.imports import fetch, runner
from app.imports.schemas import ImportIn
from app.models import service as models_service
from app.models.schemas import ImportProgress
from core.config import Settings
from core.db import UnitOfWork
from core.tables import Model, new_id


def allowed_buckets(caller: Caller, settings: Settings) -> set[str]:
    """The buckets the caller's tenant may import from (``import_s3_buckets``)."""
    rules = settings.import_s3_buckets
    return {b for who in (caller.tenant_id, caller.tenant_name, "*") for b in rules.get(who, ())}


def _storage_overlap(src: fetch.Source, settings: Settings) -> bool:
    """Whether the source reaches into the service's own S3 storage (every tenant's models and
    artifacts): never importable, whatever the allow-list says."""
    url = settings.storage_url or ""
    if not url.startswith(("s3://", "s3a://")):
        return False
    bucket, _, root = url.split("://", 1)[1].partition("/")
    if bucket != src.bucket:
        return False
    root = root.strip("/")
    key = src.key.strip("/")
    return not root or not key or key == root or key.startswith(root + "/") or root.startswith(key + "/")


def check_source(body: ImportIn, caller: Caller, settings: Settings) -> fetch.Source:
    """The source, if this caller may import from it (see the module docstring)."""
    src = fetch.parse(body.source)
    if src.scheme == "s3":
        if src.bucket not in allowed_buckets(caller, settings) or _storage_overlap(src, settings):
            raise Forbidden(
                f"this tenant may not import from the S3 bucket {src.bucket!r} "
                "(the buckets allowed are the server's import_s3_buckets setting)",
                code="import_bucket_forbidden",
            )
        fetch.check_s3_available()
    else:
        if not settings.import_https:
            raise Forbidden("http(s) imports are disabled on this server (import_https)", code="import_https_disabled")
        fetch.check_url(src.url, settings)
    return src


def default_name(src: fetch.Source) -> str:
    """An import's name when none is given: the folder's name, or the file's stem."""
    leaf = src.leaf if src.is_folder else PurePosixPath(src.leaf).stem
    return leaf if models_service.NAME_RE.fullmatch(leaf) else "model"


def start(uow: UnitOfWork, caller: Caller, settings: Settings, body: ImportIn) -> Model:
    """Record the model in status "importing"; its import is queued once the row is committed."""
    models_service.check_name(body.name)
    src = check_source(body, caller, settings)
    quotas.check_storage(uow.session, caller.tenant_id, 0)
    model_id = new_id()
    model = Model(
        id=model_id,
        tenant_id=caller.tenant_id,
        name=body.name or default_name(src),
        # Placeholders until ready: the format the source's shape implies, nothing else known.
        format="hf" if src.is_folder else "safetensors",
        architecture=None,
        parameters=0,
        size_bytes=0,
        sha256="",
        config=None,
        files=[],
        storage_prefix=f"models/{model_id}",
        status="importing",
        source=src.url,
        progress=ImportProgress().model_dump(),
        error=None,
        lease_expires_at=None,  # unclaimed: this process's import threads (or another's) take it
    )
    uow.session.add(model)
    uow.session.flush()
    uow.after_commit(lambda: runner.enqueue(model_id))
    return model
