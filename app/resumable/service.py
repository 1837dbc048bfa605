"""Resumable uploads (tus 1.0): create, receive chunks, terminate, expire; and hand finished
uploads to ``POST /v1/models`` / ``POST /v1/datasets`` as the same ``StagedFile``s a multipart
upload gives, so the same validation runs.

The bytes of an upload go to ``<data_dir>/uploads/<upload id>`` (shared by the API processes of
one data folder, kept across restarts). The row's ``offset`` is the truth: a PATCH holds an
exclusive ``flock`` on the staging file while it runs, cuts the file back to the row's offset
(bytes past it are from a PATCH whose commit did not happen), appends, fsyncs, and only then
moves the offset by compare-and-set, committing before it lets the lock go. So the offset never
counts a byte that is not on disk, and two PATCHes of one upload never write at once (the second
gets 409 ``upload_busy``; one whose ``Upload-Offset`` is stale gets 409 ``offset_mismatch``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from app import idempotency, quotas
from app.auth import Caller
from app.resumable import repository
from app.resumable.schemas import FromUploads
from app.uploads import HEAD_BYTES, MAX_FILE_PARTS, StagedFile, StagingArea
from core import jsonsafe
from core.config import Settings
from core.datasets.parsing import DatasetInvalid, dataset_format
from core.db import UnitOfWork, get_sessionmaker, read_uow
from core.errors import (
    BadRequest,
    ChecksumMismatch,
    Conflict,
    Gone,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    Unprocessable,
)
from core.jsonsafe import safe_text
from core.models.validation import FileRejected, check_filename
from core.tables import Upload, new_id, utcnow

log = logging.getLogger("modelpress.uploads")

TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = "creation,checksum,expiration,termination"
# The checksum extension's algorithms: sha1 because the protocol requires every server to take it
# (tuspy's checksums are sha1), sha256 because it is the one this service's own SDK sends.
CHECKSUM_ALGORITHMS = "sha1,sha256"
_CHECKSUM_NAMES = tuple(CHECKSUM_ALGORITHMS.split(","))
# Upload-Metadata: a few keys of short values (the row keeps them as JSON).
MAX_METADATA_KEYS = 32
MAX_METADATA_BYTES = 8 * 1024
# Upload ids are the service's own uuid4s: anything else is no upload (404 without a query).
_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_KEY_RE = re.compile(r"[!-+\--~]{1,100}")  # printable ASCII without space or comma
# A staging file without a row this old is a leftover (a creation that rolled back after a
# crash, a consumed upload whose removal failed): the sweep removes it.
ORPHAN_AFTER_S = 3600.0
SWEEP_BATCH = 500
# Uploads of a tenant not used yet: each is a row and a staging file, so without a cap a client
# could create them by the million (empty ones cost nothing against the storage quota). Eight
# checkpoints of the largest sharded models fit.
MAX_OPEN_UPLOADS = 4096
_CLOSE = {"Connection": "close"}


def staging_dir(settings: Settings) -> Path:
    return settings.data_dir / "uploads"


def staging_path(settings: Settings, upload_id: str) -> Path:
    """The staging file of an upload: named by its id only (never by a client's file name)."""
    return staging_dir(settings) / upload_id


def _meta_error(detail: str, code: str = "invalid_metadata") -> BadRequest:
    return BadRequest(detail, code=code, errors=[{"loc": ["header", "Upload-Metadata"], "msg": detail, "type": code}])


def parse_metadata(header: str | None) -> dict[str, str | None]:
    """``Upload-Metadata``: comma-separated ``key base64(value)`` pairs (a key alone has no value);
    values must be UTF-8 text."""
    out: dict[str, str | None] = {}
    if header is None or not header.strip():
        return out
    if len(header) > MAX_METADATA_BYTES:
        raise _meta_error(f"Upload-Metadata is over {MAX_METADATA_BYTES} bytes")
    pairs = header.split(",")
    if len(pairs) > MAX_METADATA_KEYS:
        raise _meta_error(f"Upload-Metadata has more than {MAX_METADATA_KEYS} keys")
    for pair in pairs:
        parts = pair.strip().split(" ")
        key = parts[0]
        if len(parts) > 2 or not _KEY_RE.fullmatch(key):
            raise _meta_error("Upload-Metadata must be comma-separated 'key base64value' pairs")
        if key in out:
            raise _meta_error(f"Upload-Metadata names {key!r} twice")
        if len(parts) == 1:
            out[key] = None
            continue
        try:
            value = base64.b64decode(parts[1], validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise _meta_error(f"Upload-Metadata {key!r}: the value must be base64 of UTF-8 text") from None
        if "\x00" in value:
            raise _meta_error(f"Upload-Metadata {key!r}: the value has a NUL character")
        out[key] = value
    return out


def encode_metadata(meta: dict[str, str | None]) -> str:
    """The ``Upload-Metadata`` header of ``meta``, as the client sent it (up to spacing)."""
    return ",".join(k if v is None else f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in meta.items())


def check_upload_filename(name: str | None) -> None:
    """The rules of a multipart upload's file names: a model file (``*.safetensors``, JSON, text)
    or a dataset file (``.txt``, ``.jsonl``); pickles and archives refused."""
    loc: list[str | int] = ["header", "Upload-Metadata", "filename"]
    if not name:
        detail = "Upload-Metadata needs a 'filename' (base64 of the file's name)"
        raise BadRequest(detail, code="missing_filename", errors=[{"loc": loc, "msg": detail, "type": "missing"}])
    try:
        check_filename(name)
    except FileRejected as e:
        if e.code == "unsupported_file_type":
            with contextlib.suppress(DatasetInvalid):
                dataset_format(name)
                return
        err = {"loc": loc, "msg": str(e), "type": e.code, "file": safe_text(name, 200)}
        raise Unprocessable(str(e), code=e.code, errors=[err]) from None


def parse_length(header: str | None, settings: Settings) -> int:
    if header is None:
        raise BadRequest("Upload-Length is required (deferred lengths are not supported)", code="missing_upload_length")
    if not header.isascii() or not header.isdigit() or len(header) > 19:
        raise BadRequest("Upload-Length must be a non-negative integer", code="invalid_upload_length")
    length = int(header)
    if length > settings.max_upload_bytes:
        raise PayloadTooLarge(
            f"Upload-Length {length} is over the limit of {settings.max_upload_bytes} bytes (Tus-Max-Size)"
        )
    return length


def create(uow: UnitOfWork, caller: Caller, settings: Settings, length: int, meta: dict[str, str | None]) -> Upload:
    """A new upload of ``length`` bytes and its empty staging file."""
    check_upload_filename(meta.get("filename"))
    if repository.open_count(uow.session, caller.tenant_id) >= MAX_OPEN_UPLOADS:
        raise quotas.QuotaExceeded(
            f"this tenant has {MAX_OPEN_UPLOADS} uploads not used by a model or dataset yet; "
            "use or DELETE some (unused ones expire on their own)",
            code="quota_uploads",
            headers={"Retry-After": str(settings.quota_storage_retry_after_s)},
        )
    # Bytes already promised to other uploads count: they will be stored once consumed.
    if settings.quota_storage_bytes:
        pending = repository.pending_bytes(uow.session, caller.tenant_id)
        quotas.check_storage(uow.session, caller.tenant_id, length + pending)
    now = utcnow()
    upload = Upload(
        id=new_id(),
        tenant_id=caller.tenant_id,
        length=length,
        offset=0,
        meta=meta,
        sha256=hashlib.sha256().hexdigest() if length == 0 else None,
        created_at=now,
        expires_at=now + timedelta(seconds=settings.upload_expiry_s),
    )
    repository.add(uow.session, upload)
    path = staging_path(settings, upload.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    uow.on_rollback(lambda: path.unlink(missing_ok=True))
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    return upload


def get(uow: UnitOfWork, caller: Caller, upload_id: str) -> Upload:
    """The caller's upload (404 for a missing id and for another tenant's alike)."""
    upload = None
    if _ID_RE.fullmatch(upload_id):
        upload = repository.get(uow.session, caller.tenant_id, upload_id)
    if upload is None:
        raise NotFound(f"no upload {safe_text(upload_id, 60)}")
    return upload


def snapshot(caller: Caller, upload_id: str) -> Upload:
    """The caller's upload as of now, read outside any transaction: a PATCH holds none (nor a
    connection) while its body streams, which may take hours."""
    with read_uow() as reader:
        return get(reader, caller, upload_id)


def check_open(upload: Upload) -> None:
    """410 for an upload whose bytes are gone or going: consumed by a model/dataset, or expired."""
    if upload.consumed_at is not None:
        raise Gone(f"upload {upload.id} was consumed by a model or dataset", code="upload_consumed")
    if upload.expires_at <= utcnow():
        raise Gone(f"upload {upload.id} expired at {upload.expires_at.isoformat()}", code="upload_expired")


def check_offset(upload: Upload, offset: int) -> None:
    if upload.offset != offset:
        raise Conflict(
            f"Upload-Offset {offset} is not the upload's offset {upload.offset}; HEAD, then resume there",
            code="offset_mismatch",
            headers=_CLOSE,
        )


def parse_offset(header: str | None) -> int:
    if header is None or not header.isascii() or not header.isdigit() or len(header) > 19:
        raise BadRequest("Upload-Offset must be a non-negative integer", code="invalid_upload_offset", headers=_CLOSE)
    return int(header)


@dataclass(frozen=True)
class Checksum:
    """A PATCH's ``Upload-Checksum``: the algorithm (one of ``CHECKSUM_ALGORITHMS``) and the digest."""

    algorithm: str
    digest: bytes

    def hasher(self) -> Any:
        return hashlib.new(self.algorithm)


def parse_checksum(header: str | None) -> Checksum | None:
    """``Upload-Checksum: <algorithm> <base64 digest>``; 400 for another algorithm or a bad value."""
    if header is None:
        return None
    algo, _, value = header.strip().partition(" ")
    algo = algo.lower()
    if algo not in _CHECKSUM_NAMES:
        raise BadRequest(
            f"Upload-Checksum: unsupported algorithm {safe_text(algo, 20)!r} "
            f"(Tus-Checksum-Algorithm: {CHECKSUM_ALGORITHMS})",
            code="unsupported_checksum_algorithm",
            headers=_CLOSE,
        )
    try:
        digest = base64.b64decode(value.strip(), validate=True)
    except binascii.Error:
        digest = b""
    size = hashlib.new(algo).digest_size
    if len(digest) != size:
        raise BadRequest(
            f"Upload-Checksum: the value must be the base64 of a {size}-byte {algo} digest",
            code="invalid_checksum",
            headers=_CLOSE,
        )
    return Checksum(algo, digest)


@contextlib.contextmanager
def locked_staging(settings: Settings, upload: Upload) -> Iterator[BinaryIO]:
    """The upload's staging file opened for writing under an exclusive ``flock``; 409
    ``upload_busy`` while another PATCH of the upload holds it."""
    try:
        fh = staging_path(settings, upload.id).open("r+b")
    except FileNotFoundError:
        raise NotFound(f"no upload {upload.id}") from None
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Conflict(
                "another PATCH of this upload is in progress; retry with HEAD once it has ended",
                code="upload_busy",
                headers=_CLOSE,
            ) from None
        yield fh  # closing the file releases the lock


@dataclass
class Received:
    offset: int  # the offset once the caller commits
    cut: bool = False  # the client left (or stalled) before the end of its body
    stalled: bool = False


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


# The whole file's sha256 so far, per upload, between its PATCHes: {upload id: (offset, hash of
# the bytes before it)}. Without it the last PATCH of a file sent in chunks read the whole file
# back to hash it (10.5 s of a 5 GB upload's 98 s: docs/BENCHMARKS.md). Bytes below a committed
# offset never change, so a hash kept at that offset stays right; one of another offset (a PATCH
# of this upload served by another API process) is not used, and the file is read back as before.
# Bounded: a sha256 state is ~200 bytes, and the oldest are dropped past _HASHES_MAX.
_HASHES: OrderedDict[str, tuple[int, Any]] = OrderedDict()
_HASHES_MAX = 1024
_hashes_lock = threading.Lock()


def _take_hash(upload_id: str, offset: int) -> Any:
    if offset == 0:
        return hashlib.sha256()
    with _hashes_lock:
        held = _HASHES.pop(upload_id, None)
    return held[1] if held is not None and held[0] == offset else None


def _keep_hash(upload_id: str, offset: int, file_hash: Any) -> None:
    if file_hash is None:
        return
    with _hashes_lock:
        _HASHES[upload_id] = (offset, file_hash)
        _HASHES.move_to_end(upload_id)
        while len(_HASHES) > _HASHES_MAX:
            _HASHES.popitem(last=False)


# Bytes gathered from the body before they are written and hashed in a thread: the write and the
# two sha256 passes (hashlib lets the GIL go for such buffers) run on the second core while the
# event loop receives the next batch. At most two batches of a PATCH are in memory.
_BATCH_BYTES = 4 * 1024 * 1024


class _Sink:
    """Writes and hashes a PATCH body's batches in a worker thread, one batch at a time, while the
    caller gathers the next."""

    def __init__(self, fh: BinaryIO, hashes: list[Any]) -> None:
        self.fh, self.hashes = fh, hashes
        self.parts: list[bytes] = []
        self.gathered = 0
        self.pending: asyncio.Future[None] | None = None

    def _sink(self, parts: list[bytes]) -> None:
        # Part by part, not joined: a join copies the batch once more, and its fresh multi-MB
        # buffer page-faults on every batch (profiled: a third of the event loop's time).
        for data in parts:
            self.fh.write(data)
        for h in self.hashes:
            for data in parts:
                h.update(data)

    def _sink_some(self, parts: list[bytes], hashes: list[Any]) -> None:
        for data in parts:
            self.fh.write(data)
        for h in hashes:
            for data in parts:
                h.update(data)

    @staticmethod
    def _hash_only(parts: list[bytes], hashes: list[Any]) -> None:
        for h in hashes:
            for data in parts:
                h.update(data)

    async def add(self, chunk: bytes) -> None:
        self.parts.append(chunk)
        self.gathered += len(chunk)
        if self.gathered >= _BATCH_BYTES:
            await self.flush(wait=False)

    async def flush(self, wait: bool = True) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            await pending
        if self.parts:
            parts, self.parts, self.gathered = self.parts, [], 0
            if len(self.hashes) > 1:
                # The chunk's checksum and the file's sha256 on two threads at once: each is a
                # full pass over the batch, and hashlib lets the GIL go while it runs.
                self.pending = asyncio.ensure_future(
                    asyncio.gather(
                        run_in_threadpool(self._sink_some, parts, self.hashes[:1]),
                        run_in_threadpool(self._hash_only, parts, self.hashes[1:]),
                    )
                )
            else:
                self.pending = asyncio.ensure_future(run_in_threadpool(self._sink, parts))
        if wait and self.pending is not None:
            pending, self.pending = self.pending, None
            await pending

    async def settle(self) -> None:
        """Wait for a batch in flight, whatever it raised: before the file is cut back."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            with contextlib.suppress(BaseException):
                await pending


async def receive(
    uow: UnitOfWork,
    caller: Caller,
    settings: Settings,
    upload: Upload,
    fh: BinaryIO,
    offset: int,
    checksum: Checksum | None,
    body: AsyncIterator[bytes],
) -> Received:
    """Append a PATCH body at ``offset`` (under ``locked_staging``'s lock) and move the row's offset
    past the bytes that are on disk. Bytes of a body cut off are kept (unless the request carried
    a checksum, which they cannot match); a refused body (413, 460) leaves the file and offset as
    they were. The caller commits while it still holds the lock."""
    # The row as of now, under the lock: a PATCH that held it before us may have moved it.
    upload = await run_in_threadpool(snapshot, caller, upload.id)
    check_open(upload)
    check_offset(upload, offset)
    room = upload.length - offset
    fh.truncate(offset)  # bytes past the committed offset are from a PATCH that did not commit
    fh.seek(offset)
    chunk_hash = checksum.hasher() if checksum is not None else None
    file_hash = _take_hash(upload.id, offset)  # the whole file's so far, if this process has it
    base = file_hash.copy() if file_hash is not None else None  # kept again if nothing is kept
    sink = _Sink(fh, [h for h in (chunk_hash, file_hash) if h is not None])

    def undo() -> None:  # nothing of this PATCH is kept
        fh.truncate(offset)
        _keep_hash(upload.id, offset, base)

    received, cut, stalled = 0, False, False
    try:
        async for chunk in body:
            if received + len(chunk) > room:
                raise PayloadTooLarge(
                    f"the body goes past the declared Upload-Length of {upload.length} bytes", headers=_CLOSE
                )
            received += len(chunk)
            await sink.add(chunk)
    except ClientDisconnect:
        cut = True
    except RequestTimeout:  # app/http_limits.py: no byte for body_read_timeout_s
        cut = stalled = True
    except BaseException:
        await sink.settle()
        undo()
        raise
    try:
        await sink.flush()
    except BaseException:
        undo()
        raise
    written = received
    if checksum is not None and (cut or chunk_hash is None or chunk_hash.digest() != checksum.digest):
        undo()
        if cut:  # a partial body cannot match its checksum: nothing of it is kept
            return Received(offset, cut=True, stalled=stalled)
        raise ChecksumMismatch("the body does not match Upload-Checksum; the chunk was discarded")
    if written == 0:
        _keep_hash(upload.id, offset, base)
        return Received(offset, cut=cut, stalled=stalled)
    new_offset = offset + written
    await _advance(uow, settings, upload, fh, offset, new_offset, file_hash)
    return Received(new_offset, cut=cut, stalled=stalled)


async def _advance(
    uow: UnitOfWork, settings: Settings, upload: Upload, fh: BinaryIO, offset: int, new_offset: int, file_hash: Any
) -> None:
    """The bytes up to ``new_offset`` made durable, then the row's offset moved (compare-and-set
    from ``offset``) with the file's sha256 once it is complete."""
    fh.flush()
    await run_in_threadpool(os.fsync, fh.fileno())
    sha256 = None
    if new_offset == upload.length:
        path = staging_path(settings, upload.id)
        sha256 = file_hash.hexdigest() if file_hash is not None else await run_in_threadpool(_file_sha256, path)
    if not await run_in_threadpool(repository.advance, uow.session, upload.id, offset, new_offset, sha256):
        # Removed (DELETE, expiry) or consumed meanwhile: another process's doing, not ours to undo.
        raise NotFound(f"no upload {upload.id}")
    if new_offset < upload.length:
        # Kept before the caller commits: if that commit fails, the next PATCH comes at the old
        # offset, which this entry does not match (the file is read back instead).
        _keep_hash(upload.id, new_offset, file_hash)


def terminate(uow: UnitOfWork, caller: Caller, settings: Settings, upload_id: str) -> None:
    """Remove an upload: its row now, its staging file once that is committed."""
    upload = get(uow, caller, upload_id)
    repository.remove(uow.session, upload.id)
    path = staging_path(settings, upload.id)
    uow.after_commit(lambda: path.unlink(missing_ok=True))


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` with ``src``'s bytes: a hard link (no copy of a multi-GB file) where the two folders
    share a file system, else a copy. The staging file itself stays until the commit."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _unusable(name: str, upload_id: str, upload: Upload | None, now: datetime) -> NotFound | Conflict | None:
    shown = safe_text(name, 200)
    loc = ["body", "files", shown]
    if upload is None:
        detail = f"{shown}: no upload {safe_text(upload_id, 60)} (unknown, another tenant's, or removed)"
        return NotFound(detail, code="unknown_upload", errors=[{"loc": loc, "msg": detail, "type": "unknown_upload"}])
    if upload.consumed_at is not None:
        code, detail = "upload_consumed", f"{shown}: upload {upload_id} was already used by a model or dataset"
    elif upload.expires_at <= now:
        code, detail = "upload_expired", f"{shown}: upload {upload_id} expired at {upload.expires_at.isoformat()}"
    elif upload.offset != upload.length or upload.sha256 is None:
        code = "upload_incomplete"
        detail = f"{shown}: upload {upload_id} has {upload.offset} of its {upload.length} bytes; finish it first"
    else:
        return None
    return Conflict(detail, code=code, errors=[{"loc": loc, "msg": detail, "type": code}])


def take(
    uow: UnitOfWork, caller: Caller, settings: Settings, staging: StagingArea, files: dict[str, str], field: str
) -> list[StagedFile]:
    """The finished uploads named by ``files`` (file name -> upload id) as ``StagedFile``s of the
    multipart part ``field``, marked consumed in the request's transaction; their staging files
    are removed once it commits (on a rollback, the uploads are as they were)."""
    if len(files) > MAX_FILE_PARTS:
        raise PayloadTooLarge(f"more than {MAX_FILE_PARTS} files in one upload", code="too_many_files")
    ids = list(files.values())
    if len(set(ids)) != len(ids):
        detail = "an upload id is named for two files; each upload is one file"
        raise Unprocessable(
            detail, code="duplicate_upload", errors=[{"loc": ["body", "files"], "msg": detail, "type": "duplicate"}]
        )
    found = repository.get_many(uow.session, caller.tenant_id, [i for i in ids if _ID_RE.fullmatch(i)])
    now = utcnow()
    for name, upload_id in files.items():
        if (err := _unusable(name, upload_id, found.get(upload_id), now)) is not None:
            raise err
    total = sum(found[i].length for i in ids)
    if total > settings.max_upload_bytes:
        raise PayloadTooLarge(f"the files total {total} bytes, over the limit of {settings.max_upload_bytes} bytes")
    if repository.consume(uow.session, ids, now) != len(ids):
        raise Conflict("an upload was used by a concurrent request", code="upload_consumed")
    staged: list[StagedFile] = []
    for i, (name, upload_id) in enumerate(files.items(), 1):
        upload, src = found[upload_id], staging_path(settings, upload_id)
        dst = staging.dir / f"part-{i:04d}"
        try:
            _link_or_copy(src, dst)
        except FileNotFoundError:
            raise NotFound(
                f"{safe_text(name, 200)}: the bytes of upload {upload_id} are gone", code="unknown_upload"
            ) from None
        with dst.open("rb") as f:
            head = f.read(HEAD_BYTES)
        assert upload.sha256 is not None  # checked by _unusable
        staged.append(StagedFile(field, name, dst, upload.length, upload.sha256, head))
    sources = [staging_path(settings, i) for i in ids]

    def remove_sources() -> None:
        for p in sources:
            p.unlink(missing_ok=True)

    uow.after_commit(remove_sources)
    return staged


def create_once(uow: UnitOfWork, scope: idempotency.Scope | None, create: Callable[[], tuple[str, Any]]) -> Any:
    """``idempotency.run`` for a create from uploads. Concurrent duplicates (same key, same body)
    do not all get as far as the key's row: the first to mark the uploads consumed holds them (on
    PostgreSQL the others wait for its commit, then find them consumed), so a duplicate refused
    with ``upload_consumed`` looks for the winner's stored response and answers with it."""
    try:
        return idempotency.run(uow, scope, 201, create)
    except Conflict as e:
        if scope is None or e.code != "upload_consumed":
            raise
        uow.rollback()
        replay = idempotency.stored_response(uow, scope)
        if replay is None:
            raise
        return replay


def sweep_expired(settings: Settings) -> tuple[int, int]:
    """Remove expired uploads (rows and staging files) and staging files without a row; returns
    (rows, files) removed. Safe to run in several API processes at once."""
    rows = files = 0
    now = utcnow()
    with get_sessionmaker()() as session:
        for upload_id in repository.expired_ids(session, now, SWEEP_BATCH):
            removed = repository.remove_expired(session, upload_id, now)
            session.commit()
            if removed:
                rows += 1
                with contextlib.suppress(FileNotFoundError):
                    staging_path(settings, upload_id).unlink()
                    files += 1
        folder = staging_dir(settings)
        names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
        for start in range(0, len(names), SWEEP_BATCH):
            batch = names[start : start + SWEEP_BATCH]
            known = repository.existing_ids(session, [n for n in batch if _ID_RE.fullmatch(n)])
            session.commit()
            for name in batch:
                path = folder / name
                with contextlib.suppress(OSError):
                    if name not in known and time.time() - path.stat().st_mtime > ORPHAN_AFTER_S:
                        path.unlink()
                        files += 1
    if rows or files:
        log.info("swept %d expired upload(s), %d staging file(s)", rows, files)
    return rows, files


def is_json(request: Request) -> bool:
    """Whether a create route's body is the JSON of :class:`FromUploads` (``application/json`` or
    ``application/*+json``, as app/http_limits.py decides); else it is multipart (or a 415)."""
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return ctype == "application/json" or (ctype.startswith("application/") and ctype.endswith("+json"))


async def read_from_uploads(request: Request, settings: Settings) -> FromUploads:
    """The JSON body of a create route that names finished uploads: at most
    ``max_json_body_bytes``, through the strict loader, then checked. (app/http_limits.py has
    bounded and checked it already; this route does not count on it.)"""
    limit = settings.max_json_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"request body of {int(declared)} bytes is over the limit of {limit} bytes", headers=_CLOSE
        )
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes", headers=_CLOSE)
    try:
        doc = jsonsafe.loads(bytes(raw).removeprefix(b"\xef\xbb\xbf"))
    except jsonsafe.JSONRejected as e:
        err = [{"loc": ["body", *e.path], "msg": e.reason, "type": e.code}]
        cls = BadRequest if e.code == "json_not_utf8" else Unprocessable
        raise cls(f"request body: {e}", code=e.code, errors=err) from None
    try:
        return FromUploads.model_validate(doc)
    except ValidationError as e:
        errors = [{"loc": ["body", *x["loc"]], "msg": x["msg"], "type": x["type"]} for x in e.errors()]
        fields = ", ".join(".".join(str(p) for p in x["loc"]) for x in errors)
        raise Unprocessable(f"invalid fields: {fields}", errors=errors) from None
