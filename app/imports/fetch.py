"""Where an import's bytes come from: a source parsed and checked (at request time), then listed and
fetched to a staging folder (in the import's thread), each file hashed and its first bytes kept on
the way, exactly as an upload's parts are (app/uploads.py's ``StagedFile``).

Sources::

    s3://bucket/prefix/           a Hugging Face directory: the objects directly under the prefix
    s3://bucket                   (the same, at the bucket's top)
    s3://bucket/key               one object (a bare ``*.safetensors`` state dict)
    https://host/path/name        one file, named by the URL's last path segment (http:// too)

S3 is read with the server's own S3 settings (``s3_options``): a request never carries credentials.
An http(s) URL passes the webhooks' SSRF guard (core/webhooks/ssrf.py) before every connection,
redirects included, and the connection goes to the address the guard checked (DNS pinning).

Errors (raised as the typed errors of core/errors.py; a failed import keeps the problem body)::

    Unprocessable  invalid_import_source, import_url_refused, import_url_unresolvable,
                   import_source_not_found, import_source_changed, import_source_empty
    Forbidden      import_source_denied (the store or server refused the service's request)
    PayloadTooLarge payload_too_large, too_many_files (the upload's limits)
    SourceUnavailable (502) import_source_unavailable: the network, a timeout, a 5xx
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from app.errors import Forbidden
from app.uploads import HEAD_BYTES, StagedFile
from core.config import Settings
from core.errors import ModelpressError, PayloadTooLarge, Unprocessable
from core.jsonsafe import safe_text
from core.storage import MiB, _is_denial, s3_options
from core.webhooks import ssrf

# S3's bucket naming rules (lower case letters, digits, '.', '-'), plus '_' of older buckets.
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9._-]{1,62}")
MAX_REDIRECTS = 5
HTTP_TIMEOUT_S = 30.0  # per network operation (connect, each read)
USER_AGENT = "modelpress-import"


class _NoQueryInLogs(logging.Filter):
    """httpx logs each request's URL (INFO "HTTP Request: GET <url>"); an import's URL may be a
    presigned one whose query string is a credential: it is logged without it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                a.copy_with(query=None) if isinstance(a, httpx.URL) and a.query else a for a in record.args
            )
        return True


logging.getLogger("httpx").addFilter(_NoQueryInLogs())


class SourceUnavailable(ModelpressError):
    status, code, title = 502, "import_source_unavailable", "The import's source could not be read"


class Abandoned(Exception):  # noqa: N818 - not an error: the import stops (shutdown, lease lost)
    """The import was told to stop: its process is shutting down or it lost its lease."""


def _bad(code: str, detail: str) -> Unprocessable:
    return Unprocessable(detail, code=code, errors=[{"loc": ["body", "source"], "msg": detail, "type": code}])


def shown(url: str) -> str:
    """A URL for messages and logs: no user info, query or fragment (a presigned URL's signature)."""
    p = urlsplit(url)
    host = p.hostname or ""
    if p.port:
        host = f"{host}:{p.port}"
    return safe_text(f"{p.scheme}://{host}{p.path}", 300)


@dataclass(frozen=True)
class Source:
    url: str
    scheme: str  # "s3", "https" or "http"
    bucket: str = ""
    key: str = ""  # s3: the object's key, or the prefix ("" or ending in "/")

    @property
    def is_folder(self) -> bool:
        return self.scheme == "s3" and (not self.key or self.key.endswith("/"))

    @property
    def leaf(self) -> str:
        """The last path segment: the file's name, or the folder's."""
        if self.scheme == "s3":
            return self.key.rstrip("/").rsplit("/", 1)[-1] or self.bucket
        return unquote(urlsplit(self.url).path.rsplit("/", 1)[-1])


def parse(url: str) -> Source:
    """The source of ``url``, or a 422 ``invalid_import_source`` saying what is wrong with it."""
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise _bad("invalid_import_source", "the source may not contain whitespace or control characters")
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme == "s3":
        bucket, _, key = url[len("s3://") :].partition("/")
        if not BUCKET_RE.fullmatch(bucket):
            raise _bad("invalid_import_source", f"{safe_text(bucket, 80)!r} is not an S3 bucket name")
        if "//" in key or key.startswith("/"):
            raise _bad("invalid_import_source", "an S3 key may not contain empty segments ('//')")
        return Source(url=f"s3://{bucket}/{key}", scheme="s3", bucket=bucket, key=key)
    if scheme in ("https", "http"):
        try:
            parts = ssrf.parse(url)
        except ValueError as e:
            raise _bad("invalid_import_source", str(e).replace("webhook URL", "source URL")) from None
        if parts.username is not None or parts.password is not None:
            raise _bad("invalid_import_source", "a source URL may not carry credentials (user:password@)")
        src = Source(url=url, scheme=scheme)
        if not src.leaf:
            raise _bad(
                "invalid_import_source",
                "an http(s) source names one file (e.g. https://host/path/model.safetensors); "
                "import a Hugging Face directory from S3 (s3://bucket/prefix/)",
            )
        return src
    raise _bad("invalid_import_source", "the source must be an s3://, https:// or http:// URL")


def check_url(url: str, settings: Settings) -> ssrf.Target:
    """The checked target of an http(s) URL (core/webhooks/ssrf.py, the webhooks' rule and
    ``webhook_allow_networks``): 422 ``import_url_refused`` or ``import_url_unresolvable``."""
    try:
        return ssrf.check(url, settings.webhook_allow_networks)
    except ssrf.TargetRefused as e:
        reason = e.reason.replace("may receive webhooks", "may be imported from")
        raise _bad("import_url_refused", f"{shown(url)} refused: {reason}") from None
    except ssrf.TargetUnresolvable as e:
        raise _bad("import_url_unresolvable", str(e)) from None
    except ValueError as e:
        raise _bad("import_url_refused", str(e).replace("webhook URL", "source URL")) from None


# --- listing and fetching -------------------------------------------------------------------------


@dataclass
class Progress:
    """Bytes and files fetched so far, shared between the fetching thread and the lease keeper."""

    bytes_done: int = 0
    bytes_total: int | None = None
    files_done: int = 0
    files_total: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def snapshot(self) -> dict[str, int | None]:
        with self.lock:
            return {
                "bytes_done": self.bytes_done,
                "bytes_total": self.bytes_total,
                "files_done": self.files_done,
                "files_total": self.files_total,
            }

    def add(self, n: int) -> None:
        with self.lock:
            self.bytes_done += n


@dataclass(frozen=True)
class Remote:
    name: str  # the file's name in the model (checked like an upload's file name before any fetch)
    size: int | None  # announced (S3 listing, Content-Length); None if unknown
    locator: str  # s3: "bucket/key"; http(s): the URL


def check_s3_available() -> None:
    """422 ``s3_unavailable`` unless the s3 extra is installed (found, not imported: cheap)."""
    import importlib.util

    if importlib.util.find_spec("s3fs") is None:
        raise Unprocessable(
            "S3 imports need the s3 extra on the API (pip install 'modelpress[s3]')", code="s3_unavailable"
        )


def require_s3() -> Any:
    """The s3fs module (the s3 extra), or 422 ``s3_unavailable``."""
    try:
        import s3fs  # type: ignore[import-untyped]  # the s3 extra
    except ImportError:
        raise Unprocessable(
            "S3 imports need the s3 extra on the API (pip install 'modelpress[s3]')", code="s3_unavailable"
        ) from None
    return s3fs


_local = threading.local()


def _s3fs(settings: Settings) -> Any:
    """The S3 filesystem of this thread's current import (``fresh_s3()`` starts a new one)."""
    fs = getattr(_local, "fs", None)
    if fs is None:
        # An instance of its own (no instance cache): no listing cached from an earlier import.
        fs = _local.fs = require_s3().S3FileSystem(**s3_options(settings), skip_instance_cache=True)
    return fs


def fresh_s3() -> None:
    """Forget this thread's S3 filesystem: the next import lists and reads with a new one."""
    _local.fs = None


@contextmanager
def _s3_errors(src: Source) -> Iterator[None]:
    try:
        yield
    except (ModelpressError, Abandoned):
        raise
    except FileNotFoundError:
        raise _bad("import_source_not_found", f"{shown(src.url)}: no such object or prefix") from None
    except Exception as e:
        if _is_denial(e):
            raise Forbidden(
                f"{shown(src.url)}: the object store refused the service's credentials ({type(e).__name__})",
                code="import_source_denied",
            ) from None
        raise SourceUnavailable(f"{shown(src.url)}: {type(e).__name__}: {safe_text(str(e), 300)}") from None


def list_files(src: Source, settings: Settings) -> list[Remote]:
    """The files of the source with their announced sizes (S3: listed; http(s): one file whose
    size is known only once its answer comes)."""
    if src.scheme != "s3":
        return [Remote(src.leaf, None, src.url)]
    fs = _s3fs(settings)
    path = f"{src.bucket}/{src.key}".rstrip("/")
    with _s3_errors(src):
        if not src.is_folder:
            info = fs.info(path)
            if info.get("type") != "file":
                raise _bad(
                    "import_source_not_found",
                    f"{shown(src.url)} is not an object; end the source with '/' to import the objects under a prefix",
                )
            return [Remote(src.leaf, int(info["size"]), path)]
        entries = fs.ls(path, detail=True, refresh=True)
    out = [
        Remote(e["name"].rsplit("/", 1)[-1], int(e["size"]), e["name"])
        for e in entries
        if e.get("type") == "file" and not e["name"].endswith("/")
    ]
    if not out:
        raise _bad("import_source_empty", f"{shown(src.url)}: no objects directly under the prefix")
    return sorted(out, key=lambda r: r.name)


class _Sink:
    """A staging file being written: hashed, its first bytes kept, its size bounded."""

    def __init__(self, remote: Remote, path: Path, limit: int, progress: Progress, abandon: Callable[[], bool]):
        self.remote, self.path, self.limit = remote, path, limit
        self.progress, self.abandon = progress, abandon
        self.hasher = hashlib.sha256()
        self.head = b""
        self.size = 0
        self.fh = path.open("wb")

    def write(self, chunk: bytes) -> None:
        if self.abandon():
            raise Abandoned
        self.size += len(chunk)
        if self.remote.size is not None and self.size > self.remote.size:
            raise _bad(
                "import_source_changed",
                f"{self.remote.name}: more bytes than the {self.remote.size} announced (the source changed?)",
            )
        if self.size > self.limit:
            raise PayloadTooLarge(f"{self.remote.name} is over the limit of {self.limit} bytes")
        if len(self.head) < HEAD_BYTES:
            self.head += chunk[: HEAD_BYTES - len(self.head)]
        self.fh.write(chunk)
        self.hasher.update(chunk)
        self.progress.add(len(chunk))

    def done(self) -> StagedFile:
        self.fh.close()
        if self.remote.size is not None and self.size != self.remote.size:
            raise _bad(
                "import_source_changed",
                f"{self.remote.name}: {self.size} bytes where {self.remote.size} were announced (the source changed?)",
            )
        return StagedFile("files", self.remote.name, self.path, self.size, self.hasher.hexdigest(), self.head)


def fetch(
    src: Source,
    remote: Remote,
    dest: Path,
    settings: Settings,
    progress: Progress,
    abandon: Callable[[], bool],
) -> StagedFile:
    """One file of the source to ``dest`` (a staging file of the service's own name)."""
    sink = _Sink(remote, dest, settings.max_upload_bytes, progress, abandon)
    try:
        if src.scheme == "s3":
            _fetch_s3(src, remote, sink, settings)
        else:
            _fetch_http(remote, sink, settings, progress)
        return sink.done()
    finally:
        sink.fh.close()


def _fetch_s3(src: Source, remote: Remote, sink: _Sink, settings: Settings) -> None:
    fs = _s3fs(settings)
    part = settings.s3_part_size_mb * MiB
    with _s3_errors(src), fs.open(remote.locator, "rb", block_size=part, cache_type="none") as f:
        while chunk := f.read(part):
            sink.write(chunk)


def _pinned(client: httpx.Client, target: ssrf.Target) -> httpx.Request:
    """A GET to the address the guard checked, still naming the URL's host (Host header, TLS SNI and
    certificate check), as the webhook dispatcher sends (worker/webhooks.py)."""
    url = httpx.URL(target.url)
    extensions = {}
    if target.scheme == "https" and target.host != target.address:
        extensions["sni_hostname"] = target.host
    return client.build_request(
        "GET",
        url.copy_with(host=target.address),
        headers={"Host": url.netloc.decode("ascii"), "User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        extensions=extensions,
    )


def _open_http(client: httpx.Client, url: str, settings: Settings) -> httpx.Response:
    """The answer to a GET of ``url``, redirects followed by hand: each target is checked by the
    SSRF guard again (and an https URL never redirects to http)."""
    for _hop in range(MAX_REDIRECTS + 1):
        target = check_url(url, settings)
        response = client.send(_pinned(client, target), stream=True)
        if not response.is_redirect:
            return response
        location = response.headers.get("location", "")
        response.close()
        nxt = str(httpx.URL(url).join(location))
        if urlsplit(url).scheme == "https" and urlsplit(nxt).scheme != "https":
            raise _bad("import_url_refused", f"{shown(url)} redirects to {shown(nxt)}: from https to another scheme")
        url = nxt
    raise SourceUnavailable(f"more than {MAX_REDIRECTS} redirects")


def _fetch_http(remote: Remote, sink: _Sink, settings: Settings, progress: Progress) -> None:
    timeout = httpx.Timeout(HTTP_TIMEOUT_S)
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
            response = _open_http(client, remote.locator, settings)
            try:
                _check_answer(response, remote)
                length = response.headers.get("content-length")
                identity = response.headers.get("content-encoding", "identity").lower() == "identity"
                if length is not None and length.isdigit() and identity:
                    size = int(length)
                    if size > settings.max_upload_bytes:
                        raise PayloadTooLarge(
                            f"{remote.name} is {size} bytes, over the limit of {settings.max_upload_bytes} bytes"
                        )
                    sink.remote = Remote(remote.name, size, remote.locator)
                    with progress.lock:
                        progress.bytes_total = size
                for chunk in response.iter_bytes():  # as they arrive (a chunk size would buffer)
                    sink.write(chunk)
            finally:
                response.close()
    except httpx.TimeoutException as e:
        raise SourceUnavailable(f"{shown(remote.locator)}: timed out ({type(e).__name__})") from None
    except httpx.HTTPError as e:
        raise SourceUnavailable(f"{shown(remote.locator)}: {type(e).__name__}: {safe_text(str(e), 300)}") from None


def _check_answer(response: httpx.Response, remote: Remote) -> None:
    status = response.status_code
    if status == 200:
        return
    where = shown(remote.locator)
    if status in (404, 410):
        raise _bad("import_source_not_found", f"{where}: HTTP {status}")
    if status in (401, 403):
        raise Forbidden(f"{where}: HTTP {status}", code="import_source_denied")
    if response.is_redirect:
        raise SourceUnavailable(f"{where}: a redirect without a usable Location (HTTP {status})")
    raise SourceUnavailable(f"{where}: HTTP {status}")
