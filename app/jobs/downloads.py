"""Serving a job's artifact: the whole of it, or one file inside it (docs/API_DOWNLOADS.md).

Both answer ``GET`` and ``HEAD`` with the same headers, a single ``Range`` (``bytes=a-b``,
``bytes=a-``, ``bytes=-n``), ``If-None-Match`` (304; ``*`` too; compared as every read's is, by
app/conditional.py) and ``If-Range`` (a range is honoured only when the tag given is the
representation's strong ETag; anything else, a date included, gets the whole 200).

The whole artifact: ``ETag`` is its sha256, quoted, and ``Repr-Digest`` (RFC 9530) carries the
same sha-256. One file of a zip artifact (a Hugging Face folder): the zip's central directory is
read from storage (a seekable handle, a few small reads on S3); a *stored* entry (every weight
file, see worker/sinks.py) is served as a byte range of the zip itself, a *deflated* one (small
text files) by decompressing on the way out (a range of it decompresses and skips). No sha-256 of
an entry exists without reading it, so an entry gets no ``Repr-Digest``; its CRC-32 from the zip
goes in ``Modelpress-CRC32`` (not an RFC 9530 digest; the client checks it if it wants).
"""

from __future__ import annotations

import base64
import hashlib
import mimetypes
import re
import struct
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import quote

from fastapi import Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from app.conditional import none_match
from core.errors import ModelpressError, NotFound, Unprocessable
from core.storage import Storage
from core.tables import Job

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
_CHUNK = 1 << 20


class RangeNotSatisfiable(ModelpressError):
    status, code, title = 416, "range_not_satisfiable", "Range not satisfiable"


class BadFileName(Unprocessable):
    code = "bad_file_name"


@dataclass(frozen=True)
class Representation:
    """What one download route serves: its bytes as ``body(start, end)`` (inclusive)."""

    size: int
    etag: str  # quoted, strong
    media_type: str
    filename: str
    body: Callable[[int, int], Iterator[bytes]]
    sha256: str | None = None  # hex: gives Repr-Digest
    crc32: int | None = None  # a zip entry's: gives Modelpress-CRC32


class ArtifactFile(BaseModel):
    name: str
    size_bytes: int
    etag: str
    crc32: str | None = None  # 8 hex digits: a zip entry's CRC-32 (IEEE), as the zip records it
    sha256: str | None = None  # only for a single-file artifact (its sha256)


class ArtifactFiles(BaseModel):
    format: str = Field(
        default="safetensors", description="the job's output format: safetensors, gguf or onnx (docs/EXPORTS.md)"
    )
    files: list[ArtifactFile]


def repr_digest(sha256_hex: str) -> str:
    """RFC 9530 ``Repr-Digest`` value: ``sha-256=:<base64 of the 32 bytes>:``."""
    return f"sha-256=:{base64.b64encode(bytes.fromhex(sha256_hex)).decode()}:"


def _disposition(name: str) -> str:
    """``attachment; filename="..."``; a name that is not plain ASCII also as RFC 6266 ``filename*``."""
    plain = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name)
    if plain == name:
        return f'attachment; filename="{name}"'
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(name, safe='')}"


def serve(
    rep: Representation,
    *,
    method: str,
    range_: str | None,
    if_none_match: str | None,
    if_range: str | None,
    redirect: str | None = None,
) -> Response:
    """The response to a GET or HEAD of ``rep``: 304, 307 (``redirect``, GET only), 200 or 206."""
    headers = {
        "ETag": rep.etag,
        "Accept-Ranges": "bytes",
        "Content-Disposition": _disposition(rep.filename),
    }
    if rep.sha256:
        headers["Repr-Digest"] = repr_digest(rep.sha256)
    if rep.crc32 is not None:
        headers["Modelpress-CRC32"] = f"{rep.crc32:08x}"
    if if_none_match and none_match(if_none_match, rep.etag):
        return Response(status_code=304, headers=headers)
    if redirect is not None and method == "GET":
        return Response(status_code=307, headers={**headers, "Location": redirect})
    size = rep.size
    start, end, status = 0, size - 1, 200
    # If-Range: strong comparison with the ETag; a date (we send no Last-Modified) never matches.
    if range_ and (not if_range or if_range.strip() == rep.etag):
        m = _RANGE_RE.match(range_.strip())
        if not m or (m.group(1) == "" and m.group(2) == ""):
            raise RangeNotSatisfiable(
                "only a single 'bytes=start-end' range is supported", headers={"Content-Range": f"bytes */{size}"}
            )
        if m.group(1) == "":  # suffix range: the last N bytes
            start = max(0, size - int(m.group(2)))
        else:
            start = int(m.group(1))
            if m.group(2):
                end = min(int(m.group(2)), size - 1)
        if start > end or start >= size:
            raise RangeNotSatisfiable(f"range outside 0-{size - 1}", headers={"Content-Range": f"bytes */{size}"})
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    if method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=rep.media_type)
    return StreamingResponse(
        rep.body(start, end) if size else iter(()), status_code=status, headers=headers, media_type=rep.media_type
    )


# -- the whole artifact ---------------------------------------------------------------------------


def whole(job: Job, storage: Storage) -> Representation:
    key, filename = job.artifact_key, job.artifact_filename
    assert key is not None and filename is not None and job.artifact_sha256 is not None
    return Representation(
        size=int(job.artifact_size_bytes or 0),
        etag=f'"{job.artifact_sha256}"',
        media_type="application/zip" if filename.endswith(".zip") else "application/octet-stream",
        filename=filename,
        body=lambda start, end: storage.iter_range(key, start, end),
        sha256=job.artifact_sha256,
    )


# -- one file of the artifact ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    name: str
    size: int
    crc: int
    stored: bool
    header_offset: int
    compress_size: int


@lru_cache(maxsize=64)
def _entries(storage: Storage, key: str, sha256: str) -> dict[str, _Entry]:
    """The zip's central directory (cached by artifact: an artifact never changes under its sha256)."""
    with storage.open(key) as f, zipfile.ZipFile(f) as z:
        return {
            i.filename: _Entry(
                i.filename,
                i.file_size,
                i.CRC,
                i.compress_type == zipfile.ZIP_STORED,
                i.header_offset,
                i.compress_size,
            )
            for i in z.infolist()
            if not i.is_dir()
        }


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise BadFileName(f"{name!r} is not a file name: an artifact's files are flat, one path segment each")


def _file_etag(artifact_sha256: str, name: str) -> str:
    return '"' + hashlib.sha256(f"{artifact_sha256}/{name}".encode()).hexdigest() + '"'


def _is_zip(job: Job) -> bool:
    return bool(job.artifact_filename and job.artifact_filename.endswith(".zip"))


def list_files(job: Job, storage: Storage) -> ArtifactFiles:
    assert job.artifact_key is not None and job.artifact_sha256 is not None and job.artifact_filename is not None
    fmt = str((job.output or {}).get("format") or "safetensors")
    if not _is_zip(job):
        return ArtifactFiles(
            format=fmt,
            files=[
                ArtifactFile(
                    name=job.artifact_filename,
                    size_bytes=int(job.artifact_size_bytes or 0),
                    etag=f'"{job.artifact_sha256}"',
                    sha256=job.artifact_sha256,
                )
            ],
        )
    entries = _entries(storage, job.artifact_key, job.artifact_sha256)
    return ArtifactFiles(
        format=fmt,
        files=[
            ArtifactFile(
                name=e.name, size_bytes=e.size, etag=_file_etag(job.artifact_sha256, e.name), crc32=f"{e.crc:08x}"
            )
            for e in sorted(entries.values(), key=lambda e: e.name)
        ],
    )


def one_file(job: Job, storage: Storage, name: str) -> Representation:
    _check_name(name)
    key, sha = job.artifact_key, job.artifact_sha256
    assert key is not None and sha is not None and job.artifact_filename is not None
    if not _is_zip(job):
        if name != job.artifact_filename:
            raise NotFound(f"the artifact has no file {name!r}; it is the one file {job.artifact_filename!r}")
        return whole(job, storage)
    entry = _entries(storage, key, sha).get(name)
    if entry is None:
        raise NotFound(f"the artifact has no file {name!r} (GET .../artifact/files lists them)")
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if entry.stored:
        data_at = _data_offset(storage, key, entry)

        def body(start: int, end: int) -> Iterator[bytes]:
            return storage.iter_range(key, data_at + start, data_at + end)

    else:

        def body(start: int, end: int) -> Iterator[bytes]:
            return _inflate(storage, key, name, start, end)

    return Representation(
        size=entry.size,
        etag=_file_etag(sha, name),
        media_type=media_type,
        filename=name,
        body=body,
        crc32=entry.crc,
    )


def _data_offset(storage: Storage, key: str, entry: _Entry) -> int:
    """Where a stored entry's bytes start: after its local header, whose name and extra field
    lengths may differ from the central directory's (zip64 extras)."""
    with storage.open(key) as f:
        f.seek(entry.header_offset)
        head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise ModelpressError(f"artifact {key}: bad local header for {entry.name!r}")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return entry.header_offset + 30 + name_len + extra_len


def _inflate(storage: Storage, key: str, name: str, start: int, end: int) -> Iterator[bytes]:
    """Bytes [start, end] of a deflated entry: decompressed from the start, the first ``start``
    skipped (deflated entries are the small text files)."""
    with storage.open(key) as f, zipfile.ZipFile(f) as z, z.open(name) as src:
        skip, left = start, end - start + 1
        while left > 0:
            data = src.read(_CHUNK)
            if not data:
                break
            if skip:
                if skip >= len(data):
                    skip -= len(data)
                    continue
                data, skip = data[skip:], 0
            data = data[:left]
            left -= len(data)
            yield data
