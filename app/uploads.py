"""Streaming multipart parsing: file parts go straight to disk in a staging folder, hashed on the
way, never held whole in memory. The limits are enforced while bytes arrive: the upload's size,
the number of form fields (non-file parts) and of file parts, each form field's size. A body that
ends before its closing boundary (cut off, or a Content-Length shorter than what was sent) is
refused, not taken for a complete upload.

Staging files have names of the service's own (``part-0001``): no message of this module names
one, and the checks of the parts name the client's file name instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from core.errors import BadRequest, ModelpressError, PayloadTooLarge, UnsupportedMediaType
from core.jsonsafe import safe_text

if TYPE_CHECKING:
    from core.config import Settings

# Bytes kept from the start of each file for sniffing its real format: a tar archive's magic
# ("ustar") sits at offset 257.
HEAD_BYTES = 512
# File parts of one upload. Not a setting: a model directory of the largest published checkpoints
# (191 shards and a dozen other files) fits; every part is a staging file, and without a cap a
# body of tiny parts within the size limit would create millions of them.
MAX_FILE_PARTS = 512


# A 413 closes the connection: the client may have gigabytes left to send, which the server
# would otherwise read (and discard) to keep the connection alive.
_CLOSE = {"Connection": "close"}


def _form_error(
    detail: str, code: str, status: type[ModelpressError] = PayloadTooLarge, field: str | None = None
) -> ModelpressError:
    err = {"loc": ["body", field] if field else ["body"], "msg": detail, "type": code}
    return status(detail, code=code, errors=[err], headers=_CLOSE if status is PayloadTooLarge else None)


@dataclass
class StagedFile:
    field: str
    filename: str
    path: Path
    size_bytes: int
    sha256: str
    head: bytes  # first bytes, for format sniffing


@dataclass
class _Part:
    headers: dict[bytes, bytes] = dataclasses.field(default_factory=dict)
    name: str = ""
    filename: str | None = None
    fh: BinaryIO | None = None
    hasher: hashlib._Hash | None = None
    size: int = 0
    head: bytes = b""
    path: Path | None = None
    value: bytearray = dataclasses.field(default_factory=bytearray)


class StagingArea:
    """A private temporary folder; removed on exit unless its files were taken."""

    def __init__(self, tmp_root: Path) -> None:
        self.dir = tmp_root / f"upload-{uuid.uuid4().hex}"

    def __enter__(self) -> StagingArea:
        self.dir.mkdir(parents=True, exist_ok=False)
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class _Collector:
    """The parser's callbacks for one multipart body: stages file parts, collects form fields and
    enforces the limits as bytes arrive (see :func:`parse_multipart`)."""

    def __init__(
        self,
        staging: StagingArea,
        max_bytes: int,
        max_fields: int,
        max_field_bytes: int,
        read_fields: tuple[str, ...],
    ) -> None:
        self.staging = staging
        self.max_bytes = max_bytes
        self.max_fields = max_fields
        self.max_field_bytes = max_field_bytes
        self.read_fields = read_fields
        self.files: list[StagedFile] = []
        self.fields: dict[str, str] = {}
        self.cur = _Part()
        self.hname = b""
        self.hval = b""
        self.total = 0  # bytes of every part so far
        self.n_files = 0
        self.n_fields = 0
        self.ended = False  # the closing boundary came

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self.cur = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.hname += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.hval += data[start:end]

    def on_header_end(self) -> None:
        self.cur.headers[self.hname.lower()] = self.hval
        self.hname, self.hval = b"", b""

    def on_headers_finished(self) -> None:
        part = self.cur
        _, opts = parse_options_header(part.headers.get(b"content-disposition", b""))
        if b"name" not in opts:
            raise BadRequest("a multipart part has no Content-Disposition name")
        part.name = opts[b"name"].decode("utf-8", "replace")
        if b"filename" in opts:
            self._begin_file(part, opts[b"filename"])
        else:
            self._begin_field(part)

    def _begin_field(self, part: _Part) -> None:
        self.n_fields += 1
        if self.n_fields > self.max_fields:
            raise _form_error(f"more than {self.max_fields} form fields", "too_many_fields")
        if part.name in self.fields and part.name in self.read_fields:
            raise _form_error(
                f"form field {safe_text(part.name)!r} is sent twice",
                "duplicate_field",
                BadRequest,
                safe_text(part.name),
            )

    def _begin_file(self, part: _Part, filename: bytes) -> None:
        # Only the base name is kept; validation refuses anything that is not a plain name.
        part.filename = filename.decode("utf-8", "replace")
        self.n_files += 1
        if self.n_files > MAX_FILE_PARTS:
            raise _form_error(f"more than {MAX_FILE_PARTS} files in one upload", "too_many_files")
        part.path = self.staging.dir / f"part-{self.n_files:04d}"
        part.fh = part.path.open("wb")
        part.hasher = hashlib.sha256()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.cur
        chunk = data[start:end]
        self.total += len(chunk)
        if self.total > self.max_bytes:
            raise PayloadTooLarge(f"upload is over the limit of {self.max_bytes} bytes", headers=_CLOSE)
        if part.fh is None:
            if len(part.value) + len(chunk) > self.max_field_bytes:
                name = safe_text(part.name)
                raise _form_error(
                    f"form field {name!r} is over {self.max_field_bytes} bytes", "form_field_too_large", field=name
                )
            part.value.extend(chunk)
            return
        if len(part.head) < HEAD_BYTES:
            part.head += chunk[: HEAD_BYTES - len(part.head)]
        part.fh.write(chunk)
        part.hasher.update(chunk)
        part.size += len(chunk)

    def on_end(self) -> None:
        self.ended = True

    def on_part_end(self) -> None:
        part = self.cur
        if part.fh is None:
            self.fields[part.name] = part.value.decode("utf-8", "replace")
            return
        part.fh.close()
        self.files.append(
            StagedFile(part.name, part.filename or "", part.path, part.size, part.hasher.hexdigest(), part.head)
        )

    def close_current(self) -> None:
        if self.cur.fh is not None and not self.cur.fh.closed:
            self.cur.fh.close()


async def parse_multipart(
    request: Request,
    staging: StagingArea,
    max_bytes: int,
    *,
    max_fields: int = 64,
    max_field_bytes: int = 64 * 1024,
    read_fields: tuple[str, ...] = (),
) -> tuple[list[StagedFile], dict[str, str]]:
    """The file parts (staged on disk) and the form fields of a multipart body. Raises 413
    (``payload_too_large``, ``too_many_fields``, ``form_field_too_large``, ``too_many_files``),
    415, or 400 (``malformed_multipart``, ``truncated_multipart``, and ``duplicate_field`` for a
    field of ``read_fields``, the ones the route reads: two values of it would be ambiguous;
    other fields are ignored by the route and may repeat, as a form's list values do)."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise UnsupportedMediaType("send multipart/form-data")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"upload of {declared} bytes is over the limit of {max_bytes} bytes", headers=_CLOSE)

    body = _Collector(staging, max_bytes, max_fields, max_field_bytes, read_fields)
    parser = MultipartParser(params[b"boundary"], body.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except ModelpressError:  # ours, and app.http_limits' (a stalled or oversized body)
        raise
    except Exception as e:  # the parser raises its own errors on malformed bodies
        raise _form_error(
            f"malformed multipart body ({e.__class__.__name__})", "malformed_multipart", BadRequest
        ) from None
    finally:
        body.close_current()
    if not body.ended:
        # python-multipart's finalize() does not check that the closing boundary came: without
        # this, a body cut short would be taken for a complete upload of its first bytes.
        raise _form_error(
            "the multipart body ends before its closing boundary (cut off, or a Content-Length shorter than the body)",
            "truncated_multipart",
            BadRequest,
        )
    return body.files, body.fields


async def parse_upload_form(
    request: Request, staging: StagingArea, settings: Settings
) -> tuple[list[StagedFile], dict[str, str]]:
    """An upload form (``POST /v1/models``, ``/v1/datasets``, the dashboard's ``/ui/models``):
    its files staged and its ``name`` field, under the settings' upload and form limits."""
    return await parse_multipart(
        request,
        staging,
        settings.max_upload_bytes,
        max_fields=settings.max_form_fields,
        max_field_bytes=settings.max_form_field_bytes,
        read_fields=("name",),
    )
