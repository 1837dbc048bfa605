"""Artifact and model storage: a local folder (default) or any fsspec URL (``s3://bucket/prefix``
with the ``s3`` extra installed; endpoint, region, addressing style, credentials, part size and
concurrency are the ``s3_*`` settings, docs/STORAGE.md).

Objects become visible atomically: ``put_file`` writes under a temporary name and renames (local),
or relies on the object store's all-or-nothing PUT (S3), so a reader never sees half a file. A put
to S3 goes in bounded parts (at most part size x concurrency bytes in memory) and aborts its
multipart upload when anything fails, so no unfinished upload is left behind.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import mmap
import os
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import fsspec  # type: ignore[import-untyped]  # fsspec ships no type information
import fsspec.asyn  # type: ignore[import-untyped]

from core.config import Settings, get_settings

log = logging.getLogger(__name__)

MiB = 1 << 20
MAX_PARTS = 10_000  # S3's limit on the parts of one multipart upload


class StorageAccessDenied(PermissionError):
    """The object store refused this service's credentials (or found none)."""


def s3_options(settings: Settings) -> dict[str, Any]:
    """s3fs.S3FileSystem's arguments from the ``s3_*`` settings. Whatever is empty is left to
    botocore: its endpoint (AWS, or AWS_ENDPOINT_URL_S3), its region, its default credential
    chain (AWS_* variables, profiles and shared files, SSO, container and instance roles)."""
    client_kwargs: dict[str, str] = {}
    if settings.s3_endpoint_url:
        client_kwargs["endpoint_url"] = settings.s3_endpoint_url
    if settings.s3_region:
        client_kwargs["region_name"] = settings.s3_region
    options: dict[str, Any] = {
        "client_kwargs": client_kwargs,
        "config_kwargs": {"s3": {"addressing_style": settings.s3_addressing_style}},
        # open(..., "wb") (open_write) sends one part per filled block; get_file and cat fetch
        # ranges of this size, max_concurrency at a time.
        "default_block_size": settings.s3_part_size_mb * MiB,
        "max_concurrency": settings.s3_max_concurrency,
    }
    if settings.s3_access_key_id:
        options["key"] = settings.s3_access_key_id
        options["secret"] = settings.s3_secret_access_key.get_secret_value()
        options["token"] = settings.s3_session_token.get_secret_value() or None
    return options


# S3 error codes of a refused identity (s3fs turns some into PermissionError, the rest into OSError).
DENIAL_CODES = (
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
    "AuthorizationHeaderMalformed",
    "Forbidden",
)


def _is_denial(e: BaseException) -> bool:
    if isinstance(e, PermissionError) or type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return True
    for err in (e, e.__cause__, e.__context__):
        response = getattr(err, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") in (*DENIAL_CODES, "403"):
            return True
    return any(code in str(e) for code in DENIAL_CODES)


class _PartStream(io.RawIOBase):
    """A read-only, seekable stream over one part's bytes that never copies them whole. Given
    bytes, aiohttp hands the whole part to asyncio's transport, which (Python 3.11) copies what
    the socket does not take at once; given an io.BytesIO, aiohttp's getbuffer() copies it. Either
    way one more part-sized buffer per part in flight (measured: 2 x part x concurrency). A
    stream goes out in 64 KiB reads."""

    def __init__(self, data: memoryview) -> None:
        super().__init__()
        self._view = data
        self._pos = 0

    def __len__(self) -> int:  # botocore's Content-Length
        return len(self._view)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        out = self._view[self._pos : end].tobytes() if end > self._pos else b""
        self._pos = max(self._pos, end)
        return out

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), len(self._view) - self._pos))
        buffer[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n


def _read_part(f: BinaryIO, n: int) -> memoryview:
    """Up to ``n`` bytes of ``f`` (fewer only at its end: a pipe or socket reads short), in an
    anonymous mapping of their own: unmapped as soon as the last reference goes, whereas freed
    part-sized heap blocks are kept by the allocator and grow the resident memory."""
    mm = mmap.mmap(-1, max(n, 1))
    view = memoryview(mm)
    got = 0
    readinto = getattr(f, "readinto", None)
    while got < n:
        if readinto is not None:
            k = readinto(view[got:n])
        else:
            data = f.read(n - got)
            k = len(data)
            view[got : got + k] = data
        if not k:
            break
        got += k
    return view[:got]


class Storage:
    def __init__(self, url: str, *, settings: Settings | None = None) -> None:
        """``settings`` (default: the process's) configure an ``s3://`` store; other URLs ignore them."""
        self.url = url.rstrip("/")
        options: dict[str, Any] = {}
        self.part_size, self.max_concurrency = 16 * MiB, 4
        self._credentials = self._endpoint = ""
        if fsspec.utils.get_protocol(self.url) in ("s3", "s3a"):
            settings = settings or get_settings()
            options = s3_options(settings)
            self.part_size = settings.s3_part_size_mb * MiB
            self.max_concurrency = settings.s3_max_concurrency
            self._credentials = (
                "MODELPRESS_S3_ACCESS_KEY_ID" if settings.s3_access_key_id else "the AWS default credential chain"
            )
            self._endpoint = settings.s3_endpoint_url or "the AWS endpoint botocore picks"
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        self.is_local = self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol
        if self.is_local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad storage key {key!r}")
        return f"{self.root}/{key}"

    def local_path(self, key: str) -> Path | None:
        return Path(self._path(key)) if self.is_local else None

    def put_file(self, src: Path, key: str, *, move: bool = False) -> None:
        """Store ``src`` under ``key``; with ``move`` the source may be consumed (a rename on
        the same local filesystem instead of a copy of a multi-GB file)."""
        dest = self._path(key)
        if self.is_local:
            Path(dest).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
            try:
                if move:
                    shutil.move(src, tmp)
                else:
                    shutil.copyfile(src, tmp)
                os.replace(tmp, dest)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        elif self.is_s3:
            with open(src, "rb") as f:
                self._put_s3(f, dest, os.fstat(f.fileno()).st_size)
        else:
            self.fs.put_file(str(src), dest)

    def put_stream(self, f: BinaryIO, key: str, size: int | None = None) -> None:
        """Store what ``f`` reads until its end under ``key`` (``size``, when known, lets a
        very large object pick parts that fit S3's 10,000). The object appears only complete;
        when reading ``f`` or sending fails, nothing is stored and no upload is left open."""
        if self.is_s3:
            self._put_s3(f, self._path(key), size)
            return
        pending = self.open_write(key)  # local: a temporary name; other fsspec stores: their streaming write
        try:
            shutil.copyfileobj(f, pending.file, 8 * MiB)
        except BaseException:
            pending.abort()
            raise
        pending.commit()

    @contextlib.contextmanager
    def _explained(self) -> Iterator[None]:
        """A refusal of the credentials says which store and which credentials."""
        try:
            yield
        except StorageAccessDenied:
            raise
        except Exception as e:
            if not (self.is_s3 and _is_denial(e)):
                raise
            raise StorageAccessDenied(
                f"S3 storage {self.url} at {self._endpoint} refused access with credentials from "
                f"{self._credentials}: {e}"
            ) from e

    def _put_s3(self, f: BinaryIO, dest: str, size: int | None) -> None:
        """One PUT for an object of one part; otherwise a multipart upload of parts read one at
        a time, at most ``max_concurrency`` in flight, so at most part size x concurrency bytes
        are held. Any failure (the source, the network, the store, an interrupt) aborts it."""
        bucket, _, obj = dest.partition("/")
        part = self.part_size
        if size is not None and size > part * MAX_PARTS:
            part = math.ceil(size / MAX_PARTS / MiB) * MiB
        with self._explained():
            chunk = _read_part(f, part)
            if len(chunk) < part:
                self.fs.call_s3("put_object", Bucket=bucket, Key=obj, Body=chunk.tobytes())
                self.fs.invalidate_cache(dest)
                return
            upload_id = self.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=obj)["UploadId"]
        pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="s3-put")
        try:
            etags: dict[int, str] = {}
            in_flight: set[Future[tuple[int, str]]] = set()

            def send(number: int, body: memoryview) -> tuple[int, str]:
                etag: str = fsspec.asyn.sync(self.fs.loop, self._upload_part, bucket, obj, upload_id, number, body)
                return number, etag

            number = 1
            with self._explained():
                while True:
                    in_flight.add(pool.submit(send, number, chunk))
                    del chunk  # the pool holds the only reference until the part is sent
                    number += 1
                    while len(in_flight) >= self.max_concurrency:
                        done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                        etags.update(d.result() for d in done)
                    chunk = _read_part(f, part)
                    if not chunk:
                        break
                    if number > MAX_PARTS:  # a stream longer than its declared size, or of none
                        raise ValueError(f"over {MAX_PARTS} parts of {part} bytes: raise MODELPRESS_S3_PART_SIZE_MB")
                etags.update(d.result() for d in in_flight)
                parts = [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
                self.fs.call_s3(
                    "complete_multipart_upload",
                    Bucket=bucket,
                    Key=obj,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # no part may land after the abort
            try:
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=obj, UploadId=upload_id)
            except Exception:  # the sweeper aborts it later (multipart_upload_max_age_s)
                log.warning("could not abort the multipart upload of %s (%s)", dest, upload_id, exc_info=True)
            raise
        finally:
            pool.shutdown(wait=True)
        self.fs.invalidate_cache(dest)

    async def _upload_part(self, bucket: str, obj: str, upload_id: str, number: int, body: memoryview) -> str:
        """One part, sent from a stream over ``body`` (``_PartStream``). botocore's own retries
        rewind the stream (s3fs's retries would resend it from where it stopped: not used)."""
        try:
            await self.fs.set_session()
            s3 = await self.fs.get_s3(bucket)
            out = await s3.upload_part(
                Bucket=bucket, Key=obj, UploadId=upload_id, PartNumber=number, Body=_PartStream(body)
            )
        except Exception as e:
            from s3fs.errors import translate_boto_error  # type: ignore[import-untyped]  # the s3 extra

            raise translate_boto_error(e) from e
        return str(out["ETag"])

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        """A URL that GETs the object under ``key`` without credentials for ``expires_s``
        seconds (S3 only; None for any other storage, which has no such URLs)."""
        if not self.is_s3:
            return None
        url: str = self.fs.url(self._path(key), expires=expires_s)
        return url

    def open_write(self, key: str) -> PendingObject:
        """A writable object under ``key`` that becomes visible only at ``commit()`` and is gone
        after ``abort()``, so an artifact can be streamed into storage as it is produced (written
        once, not staged and copied). Local: a temporary name in the destination folder, renamed
        on commit. Remote (fsspec): the store's streaming write (S3: a multipart upload, one part
        per filled block, completed on commit and aborted on abort)."""
        dest = self._path(key)
        if self.is_local:
            Path(dest).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
            return PendingObject(open(tmp, "wb"), dest, tmp, None)  # noqa: SIM115 - closed by commit/abort
        return PendingObject(self.fs.open(dest, "wb"), dest, None, self.fs)

    def get_file(self, key: str, dest: Path) -> None:
        with self._explained():
            self.fs.get_file(self._path(key), str(dest))

    def open(self, key: str) -> BinaryIO:
        f: BinaryIO = self.fs.open(self._path(key), "rb")
        return f

    def size(self, key: str) -> int:
        return int(self.fs.size(self._path(key)))

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._path(key)))

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix.rstrip("/"))
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def delete(self, key: str) -> None:
        path = self._path(key)
        if self.fs.exists(path):
            self.fs.rm(path)

    @property
    def is_s3(self) -> bool:
        protocol = self.fs.protocol
        return bool({"s3", "s3a"} & set(protocol if isinstance(protocol, (tuple, list)) else (protocol,)))

    def multipart_uploads(self) -> list[MultipartUpload]:
        """The unfinished S3 multipart uploads under this storage's prefix (a writer killed
        mid-upload leaves one; its parts are billed until it is aborted). [] when not on S3."""
        if not self.is_s3:
            return []
        bucket, _, prefix = self.root.partition("/")
        prefix = f"{prefix}/" if prefix else ""
        found: list[MultipartUpload] = []
        markers: dict[str, str] = {}
        while True:
            page = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **markers)
            for u in page.get("Uploads") or []:
                if u["Key"].startswith(prefix):
                    found.append(MultipartUpload(u["Key"][len(prefix) :], u["UploadId"], u["Initiated"]))
            if not page.get("IsTruncated"):
                return found
            markers = {"KeyMarker": page.get("NextKeyMarker", ""), "UploadIdMarker": page.get("NextUploadIdMarker", "")}

    def abort_multipart(self, upload: MultipartUpload) -> None:
        """Abort an unfinished multipart upload (its parts are deleted); one that was completed or
        aborted meanwhile is left as it is."""
        bucket, _, _ = self.root.partition("/")
        with contextlib.suppress(FileNotFoundError):  # s3fs's NoSuchUpload: completed or aborted by someone else
            self.fs.call_s3(
                "abort_multipart_upload", Bucket=bucket, Key=self._s3_key(upload.key), UploadId=upload.upload_id
            )

    def _s3_key(self, key: str) -> str:
        return self._path(key).partition("/")[2]

    def iter_range(self, key: str, start: int, end: int, chunk: int = 1 << 20) -> Iterator[bytes]:
        """Bytes [start, end] inclusive."""
        with self.open(key) as f:
            f.seek(start)
            left = end - start + 1
            while left > 0:
                data = f.read(min(chunk, left))
                if not data:
                    break
                left -= len(data)
                yield data


@dataclass(frozen=True)
class MultipartUpload:
    key: str  # relative to the storage's root, like every key of this module
    upload_id: str
    initiated: datetime


class PendingObject:
    """See ``Storage.open_write``: write to ``file``, then ``commit()`` or ``abort()``."""

    def __init__(self, file: BinaryIO, dest: str, tmp: str | None, fs: fsspec.AbstractFileSystem | None) -> None:
        self.file = file
        self._dest, self._tmp, self._fs = dest, tmp, fs

    def commit(self) -> None:
        self.file.close()
        if self._tmp is not None:
            os.replace(self._tmp, self._dest)

    def abort(self) -> None:
        """Drop what was written; never raises (it runs while another error is handled)."""
        try:
            discard = getattr(self.file, "discard", None)
            if discard is not None and self._fs is not None:
                discard()  # fsspec buffered files: drop the buffer (s3fs aborts the multipart upload)
            self.file.close()
        except Exception:  # noqa: BLE001 - a full disk fails the close again; the file goes anyway
            pass
        try:
            if self._tmp is not None:
                os.unlink(self._tmp)
            elif self._fs is not None and self._fs.exists(self._dest):
                self._fs.rm(self._dest)
        except OSError:
            pass


@lru_cache
def get_storage() -> Storage:
    return Storage(get_settings().storage_url)
