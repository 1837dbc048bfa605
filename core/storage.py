"""Artifact and model storage: a local folder (default) or any fsspec URL (``s3://bucket/prefix``
with the ``s3`` extra installed).

Objects become visible atomically: ``put_file`` writes under a temporary name and renames (local),
or relies on the object store's all-or-nothing PUT (S3), so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import fsspec  # type: ignore[import-untyped]  # fsspec ships no type information

from core.config import get_settings


class Storage:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
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
        else:
            self.fs.put_file(str(src), dest)

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
