"""``Client`` and ``AsyncClient``: the modelpress HTTP API in Python, on httpx.

Both classes have the same methods (the async ones are coroutines; ``jobs()``/``models()``/...
are async iterators). What to send and how to read the answer is built once, in ``_BaseClient``,
as a ``_Call``; each class only performs it (``_send``) with its own httpx client and sleep.

Connection: ``base_url`` defaults to ``$MODELPRESS_URL`` (else ``http://127.0.0.1:8000``) and
``api_key`` to ``$MODELPRESS_API_KEY``, sent as ``Authorization: Bearer <key>``.

Errors: an error answer raises the ``APIError`` subclass of its status, with the problem+json
fields (see ``modelpress._errors`` for the tree); httpx failures raise ``TransportError``.

Retries (``max_retries``, default 3, so at most 4 attempts):

* 429 and 503 answers are retried after ``Retry-After`` (seconds or an HTTP date, capped at
  ``RETRY_AFTER_CAP_S``), or else after an exponential backoff with jitter: attempt ``n`` waits a
  random time in ``[d/2, d]`` with ``d = min(backoff_max, backoff_base * 2**n)``.
* Connection failures before the request was sent (connect error or timeout, pool timeout) are
  retried with the same backoff, whatever the method.
* Failures after the request may have reached the server (read timeout, a connection dropped
  mid-answer) are retried for GETs and for the create calls, which carry an ``Idempotency-Key``:
  the server stores the first response with the object it created and answers a repeat with it
  (``Idempotency-Replayed: true``), so a retried create never creates twice. Other POSTs (cancel,
  links) are not retried after they may have arrived. A download that breaks mid-stream resumes
  with a Range request.
* Every POST that creates something (``upload_model``, ``create_dataset``, ``import_model``,
  ``submit``, ``sweep``) sends an ``Idempotency-Key`` header: the caller's ``idempotency_key``, or
  a fresh uuid4, the same on every retry of that call.

Uploads (``upload_model``, ``create_dataset``, ``upload_file``) are resumable: tus 1.0 at
``/v1/uploads``, in chunks of ``chunk_size`` bytes with a sha256 each, remembered in a state file in
the user's cache, so the same call after an interruption sends only what the server lacks; then
``POST /v1/models`` (or ``/v1/datasets``) with ``{"name", "files": {name: upload id}}`` and an
``Idempotency-Key`` derived from the upload ids. ``modelpress/_upload.py`` has the rules (which
files are skipped and why, ``plan_upload``), the state file and the protocol, as steps both clients
perform with ``_drive``. A server without ``/v1/uploads`` gets the older multipart upload (one part
``files`` per file, streamed, never whole in memory). ``on_progress(bytes, total)`` follows the
bytes on the server (resumed ones included).

Downloads (``download(job_id, dest)``) go to ``dest``, or, when ``dest`` is an existing directory,
to the artifact's file name in it (the job's ``artifact.filename``, the name the server also sends
in ``Content-Disposition``; known before the first byte, so a ``.part`` can be found again). They
write ``<dest>.part`` and rename it into place only once its sha256 equals the artifact's (the
``ETag``, which is the job's ``artifact.sha256``). A
``.part`` left by an earlier attempt is resumed only if ``<dest>.part.etag`` (written before the
first byte of the ``.part``) names this artifact's ETag, so a ``.part`` of another artifact is
never appended to (it starts over): its bytes are hashed, then the rest is asked for with
``Range: bytes=<size>-`` and ``If-Range: "<sha256>"``; a 200 answer (the server ignored the range,
or the tag did not match) starts over. A file that does not verify is deleted and
``ChecksumMismatch`` raised. When the server redirects to a presigned object-storage URL (307), the
bytes come from there (``Range`` without the API key or ``If-Range``: the store's ETag is not the
sha256); a failure there asks the API again for a fresh URL.

Links (``report_link``, ``sweep_link``) are absolute: a service without a configured public base
URL (a cluster without ``MODELPRESS_PUBLIC_BASE_URL``) answers a path, which the client completes
with its own ``base_url``.

API keys: ``keys()`` lists the caller's tenant's keys (an admin key: ``tenant=`` or
``all_tenants=True``); ``create_key`` and ``revoke_key`` need an admin key (``Forbidden``, 403,
otherwise). ``revoke_key`` takes an id, a prefix or a whole key, of which only the prefix is sent.

``wait_model(model_id)`` follows an import (``import_model``) the same way: the ready model, or
``ImportFailed`` / ``ImportTimeout``.

``wait(job_id)`` polls ``GET /v1/jobs/{id}`` every ``poll_interval`` seconds, calls
``on_progress(job)`` whenever status, stage or fraction changed, and returns the succeeded job or
raises ``JobFailed`` / ``JobCanceled`` (or ``WaitTimeout`` when ``timeout`` runs out).

Importing this module imports httpx and pydantic, never torch or the server's code (``app``,
``worker``, fastapi, sqlalchemy): tests/test_sdk.py checks it in a fresh interpreter.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import email.utils
import hashlib
import os
import random
import re
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from modelpress._errors import (
    APIError,
    ChecksumMismatch,
    ImportFailed,
    ImportTimeout,
    JobCanceled,
    JobFailed,
    TransportError,
    WaitTimeout,
)
from modelpress._models import (
    ApiKey,
    CreatedApiKey,
    Dataset,
    Download,
    Estimate,
    Job,
    Link,
    Method,
    Model,
    Page,
    Recipe,
    Report,
    Sweep,
    SweepSummary,
    Worker,
)
from modelpress._upload import (
    DEFAULT_CHUNK_SIZE,
    Progress,
    Sleep,
    Steps,
    TusUnsupported,
    UploadPlan,
    UploadState,
    create_key,
    json_req,
    plan_upload,
    request,
    single_file_plan,
    slices,
    upload_all_steps,
)
from modelpress._version import __version__

__all__ = ["AsyncClient", "Client", "DEFAULT_URL"]

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=10.0)
RETRY_STATUSES = frozenset({429, 503})
RETRY_AFTER_CAP_S = 120.0
# Raised before the request left this machine: safe to send again whatever the method.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_CHUNK = 1 << 20

R = TypeVar("R")
M = TypeVar("M", bound=BaseModel)
ProgressFn = Callable[[int, int], Any]
StepLike = Mapping[str, Any] | tuple[str, Mapping[str, Any]] | str | Any


def _id(obj: Any) -> str:
    """A job/model/... id from the id itself or from an object that has ``.id``."""
    if isinstance(obj, str):
        if not obj:
            raise ValueError("empty id")
        return obj
    got = getattr(obj, "id", None)
    if isinstance(got, str):
        return got
    raise TypeError(f"expected an id string or an object with .id, got {type(obj).__name__}")


def normalize_steps(steps: Iterable[StepLike], *, allow_empty: bool = False) -> list[dict[str, Any]]:
    """Steps as the API takes them: ``[{"method", "params"}]``. Each step may be a dict
    ``{"method": ..., "params": {...}}``, a ``("method", {params})`` tuple, a bare method name, or a
    ``Step``. ``allow_empty``: none is fine (a recipe or an export stands for them; the server
    refuses a job with neither)."""
    if isinstance(steps, (str, Mapping)) or (
        isinstance(steps, tuple) and len(steps) == 2 and isinstance(steps[0], str) and isinstance(steps[1], Mapping)
    ):
        steps = [steps]  # one step given alone
    out = []
    method: object
    params: object
    for i, step in enumerate(steps):
        if isinstance(step, str):
            method, params = step, {}
        elif isinstance(step, tuple) and len(step) == 2:
            method, params = step
        elif isinstance(step, Mapping):
            extra = set(step) - {"method", "params"}
            if extra:
                raise ValueError(f"step {i}: unknown keys {sorted(extra)}; a step is {{'method', 'params'}}")
            method, params = step.get("method"), step.get("params") or {}
        elif hasattr(step, "method"):
            method, params = step.method, getattr(step, "params", None) or {}
        else:
            raise ValueError(f"step {i}: expected a dict, a (method, params) tuple or a method name, got {step!r}")
        if not isinstance(method, str) or not method:
            raise ValueError(f"step {i}: 'method' must be a non-empty string")
        if not isinstance(params, Mapping):
            raise ValueError(f"step {i}: 'params' must be a dict")
        out.append({"method": method, "params": dict(params)})
    if not out and not allow_empty:
        raise ValueError("a job needs at least one step")
    return out


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _safe_filename(name: str | None) -> str:
    """A server-given file name reduced to a plain name in the destination folder."""
    base = Path((name or "").replace("\\", "/")).name
    return base if base not in ("", ".", "..") else "artifact"


def _etag_sha(value: str | None) -> str | None:
    if not value:
        return None
    return value.strip().removeprefix("W/").strip('"') or None


def upload_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files an upload of ``path`` sends: the file itself, or every regular, non-hidden file
    directly in the directory, sorted by name."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
        if not files:
            raise ValueError(f"{p}: no files to upload (hidden files and subdirectories are skipped)")
        return files
    if p.is_file():
        return [p]
    raise FileNotFoundError(f"{p}: no such file or directory")


class _Reader:
    """A file that reports how far httpx has read it (httpx seeks to 0 before each attempt)."""

    def __init__(self, f: BinaryIO, upload: _Upload) -> None:
        self._f, self._upload, self.pos = f, upload, 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.pos += len(data)
        self._upload.report()
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = self._f.seek(offset, whence)
        self._upload.report()
        return self.pos

    def tell(self) -> int:
        return self._f.tell()

    def fileno(self) -> int:  # httpx takes the part's length from fstat (a known Content-Length)
        return self._f.fileno()


@dataclass
class _Upload:
    """Multipart parts to stream: ``field`` is the part name of every file."""

    field: str
    paths: list[Path]
    on_progress: ProgressFn | None = None
    readers: list[_Reader] = dataclasses.field(default_factory=list)  # `field` is a part name here

    @property
    def total(self) -> int:
        return sum(p.stat().st_size for p in self.paths)

    def open(self, stack: ExitStack) -> list[tuple[str, tuple[str, Any]]]:
        self._total = self.total
        self.readers = [_Reader(stack.enter_context(p.open("rb")), self) for p in self.paths]
        return [(self.field, (p.name, r)) for p, r in zip(self.paths, self.readers, strict=True)]

    def report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(sum(r.pos for r in self.readers), self._total)


@dataclass
class _Call(Generic[R]):
    """One API request, built once and sent by either client (with its retries); ``parse`` makes
    the result of a 2xx answer (``_no_body``: None)."""

    method: str
    path: str
    parse: Callable[[httpx.Response], R]
    params: dict[str, Any] | None = None
    json: Any = None
    data: dict[str, str] | None = None
    upload: _Upload | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # A POST that changes nothing on the server (an estimate): as safe to resend as a GET.
    safe: bool = False

    @property
    def resendable(self) -> bool:
        """May be sent again after it possibly reached the server: reads, POSTs that change
        nothing (``safe``), and creates that carry an ``Idempotency-Key`` (the server answers a
        repeat with the first response)."""
        return self.method in ("GET", "HEAD") or self.safe or "Idempotency-Key" in self.headers


def _json_of(model: type[M]) -> Callable[[httpx.Response], M]:
    return lambda r: model.model_validate(r.json())


def _list_of(model: type[M]) -> Callable[[httpx.Response], list[M]]:
    return lambda r: [model.model_validate(x) for x in r.json()]


def _no_body(_r: httpx.Response) -> None:
    """The result of a call whose answer is not read (a DELETE, a probe)."""
    return None


def _response(r: httpx.Response) -> httpx.Response:
    """The result of a call whose headers are what is wanted (a HEAD)."""
    return r


async def _aiter(pieces: Iterable[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


@dataclass
class _DownloadState:
    """A download in progress: where it goes, the ETag its ``.part`` is of, what it must hash to
    (``expected``, a sha256; or, for a file inside a zip artifact, ``crc32``), how far it got."""

    target: Path
    part: Path
    expected: str | None
    total: int
    etag: str = ""  # quoted; "" before the server named one
    crc32: int | None = None
    etag_is_sha: bool = True  # the whole artifact: its ETag is its sha256
    hasher: Any = field(default_factory=hashlib.sha256)
    crc: int = 0
    offset: int = 0
    resumed_from: int = 0
    on_progress: ProgressFn | None = None

    @classmethod
    def plan(cls, job: Job, dest: str | os.PathLike[str], on_progress: ProgressFn | None) -> _DownloadState:
        assert job.artifact is not None
        sha = job.artifact.sha256
        return cls.start(
            cls._target(dest, job.artifact.filename), sha, job.artifact.size_bytes, f'"{sha}"', None, True, on_progress
        )

    @staticmethod
    def _target(dest: str | os.PathLike[str], filename: str | None) -> Path:
        target = Path(dest)
        if target.is_dir():
            target = target / _safe_filename(filename)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    @classmethod
    def start(
        cls,
        target: Path,
        expected: str | None,
        total: int,
        etag: str,
        crc32: int | None,
        etag_is_sha: bool,
        on_progress: ProgressFn | None,
    ) -> _DownloadState:
        st = cls(
            target,
            target.with_name(target.name + ".part"),
            expected,
            total,
            etag=etag,
            crc32=crc32,
            etag_is_sha=etag_is_sha,
            on_progress=on_progress,
        )
        if st.part.exists():
            size = st.part.stat().st_size
            # Resumed only when <dest>.part.etag says the bytes are of this very representation: a
            # .part of another job's artifact (or of unknown origin) is never appended to.
            if 0 < size <= st.total and st._recorded_etag() == st.etag:
                with st.part.open("rb") as f:
                    while chunk := f.read(_CHUNK):
                        st._hash(chunk)
                st.offset = st.resumed_from = size
            else:
                st.restart()
        else:
            st.etag_file.unlink(missing_ok=True)
        return st

    @property
    def etag_file(self) -> Path:
        """``<dest>.part.etag``: the ETag of what the ``.part`` holds the first bytes of."""
        return self.part.with_name(self.part.name + ".etag")

    def _recorded_etag(self) -> str | None:
        try:
            return self.etag_file.read_text().strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    def _hash(self, chunk: bytes) -> None:
        self.hasher.update(chunk)
        self.crc = zlib.crc32(chunk, self.crc)

    def restart(self) -> None:
        self.part.unlink(missing_ok=True)
        self.etag_file.unlink(missing_ok=True)
        self.hasher, self.crc, self.offset, self.resumed_from = hashlib.sha256(), 0, 0, 0

    def headers(self, *, conditional: bool = True) -> dict[str, str]:
        """``Range`` from the offset, with ``If-Range`` (the API's ETag); ``conditional=False`` for
        a presigned object-storage URL, whose own ETag is not the artifact's sha256."""
        if not self.offset:
            return {}
        h = {"Range": f"bytes={self.offset}-"}
        if conditional and self.etag:
            h["If-Range"] = self.etag
        return h

    def request(self, http: httpx.Client | httpx.AsyncClient, path: str, location: str | None) -> httpx.Request:
        """The next GET: the API's route, or the presigned URL it redirected to (sent without the
        API key: object storage refuses a second authentication)."""
        if location is None:
            return http.build_request("GET", path, headers=self.headers())
        req = http.build_request("GET", location, headers=self.headers(conditional=False))
        req.headers.pop("Authorization", None)
        return req

    def accept(self, resp: httpx.Response, *, from_api: bool = True) -> str | None:
        """Check a 2xx answer against the plan: the mode to open the .part with, or None to ask
        again from the start (a range that is not the one asked for)."""
        etag = resp.headers.get("etag") if from_api else None
        if etag:
            self.etag = etag.strip()
            if self.etag_is_sha:
                self.expected = _etag_sha(etag)
        if resp.status_code == 206:
            m = re.match(r"bytes (\d+)-", resp.headers.get("content-range", ""))
            if m and int(m.group(1)) == self.offset:
                return "ab"
            self.restart()
            return None
        self.restart()  # the whole file: the server ignored the range (or If-Range did not match)
        if self.etag:
            self.etag_file.write_text(self.etag)  # before the first byte of the .part
        return "wb"

    def wrote(self, chunk: bytes) -> None:
        self._hash(chunk)
        self.offset += len(chunk)
        if self.on_progress is not None:
            self.on_progress(self.offset, self.total)

    def finish(self) -> Download:
        actual = self.hasher.hexdigest()
        if self.expected is not None and actual != self.expected:
            self._mismatch(f"sha256 {actual} does not match the artifact's {self.expected}", self.expected, actual)
        if self.expected is None and self.crc32 is not None and self.crc != self.crc32:
            self._mismatch(
                f"CRC-32 {self.crc:08x} does not match the zip's {self.crc32:08x}",
                f"crc32:{self.crc32:08x}",
                f"crc32:{self.crc:08x}",
            )
        os.replace(self.part, self.target)
        self.etag_file.unlink(missing_ok=True)
        return Download(path=self.target, size_bytes=self.offset, sha256=actual, resumed_from=self.resumed_from)

    def _mismatch(self, what: str, expected: str, actual: str) -> None:
        self.restart()
        raise ChecksumMismatch(
            f"{self.target.name}: {what}; the partial file was deleted, download again", expected, actual
        )


def _file_state(
    head: httpx.Response, name: str, dest: str | os.PathLike[str], on_progress: ProgressFn | None
) -> _DownloadState:
    """The plan of ``download_file`` from the HEAD of the file: its ETag, size and digest (the
    RFC 9530 ``Repr-Digest`` sha-256 of a single-file artifact, else a zip entry's CRC-32)."""
    sha = None
    m = re.search(r"sha-256=:([A-Za-z0-9+/=]+):", head.headers.get("repr-digest", ""))
    if m:
        sha = base64.b64decode(m.group(1)).hex()
    crc = head.headers.get("modelpress-crc32")
    return _DownloadState.start(
        _DownloadState._target(dest, name),
        sha,
        int(head.headers.get("content-length", "0")),
        head.headers.get("etag", "").strip(),
        int(crc, 16) if crc else None,
        False,
        on_progress,
    )


class _BaseClient:
    """Configuration, request building, response parsing and the retry policy of both clients."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = 3,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = (base_url or os.environ.get("MODELPRESS_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else (os.environ.get("MODELPRESS_API_KEY") or None)
        self.timeout = timeout
        self.max_retries = max(0, int(max_retries))
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._headers = {"User-Agent": f"modelpress-python/{__version__}", "Accept": "application/json"}
        if self.api_key:
            self._headers["Authorization"] = f"Bearer {self.api_key}"
        self._headers.update(headers or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    # -- retry policy --------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        d = min(self.backoff_max, self.backoff_base * (2**attempt))
        return random.uniform(d / 2, d)

    def _retry_delay(
        self,
        attempt: int,
        *,
        response: httpx.Response | None = None,
        error: Exception | None = None,
        resendable: bool = False,
    ) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None: do not retry."""
        if attempt >= self.max_retries:
            return None
        if response is not None:
            if response.status_code not in RETRY_STATUSES:
                return None
            after = _parse_retry_after(response.headers.get("retry-after"))
            return min(after, RETRY_AFTER_CAP_S) if after is not None else self._backoff(attempt)
        if isinstance(error, _NOT_SENT) or (resendable and isinstance(error, httpx.TransportError)):
            return self._backoff(attempt)
        return None

    @staticmethod
    def _transport_error(e: httpx.TransportError, call_url: str, attempts: int) -> TransportError:
        what = type(e).__name__
        if isinstance(e, httpx.ConnectError | httpx.ConnectTimeout):
            msg = f"cannot connect to {call_url}: {e or what}"
        elif isinstance(e, httpx.TimeoutException):
            msg = f"{call_url}: timed out ({what})"
        else:
            msg = f"{call_url}: {what}: {e}"
        if attempts > 1:
            msg += f" ({attempts} attempts)"
        return TransportError(msg, call_url)

    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    # -- request building ----------------------------------------------------------------------

    @staticmethod
    def _idem(key: str | None) -> dict[str, str]:
        return {"Idempotency-Key": key or str(uuid.uuid4())}

    def _upload_model_call(
        self,
        path_or_dir: str | os.PathLike[str],
        name: str | None,
        on_progress: ProgressFn | None,
        idempotency_key: str | None,
        files: list[Path] | None = None,
    ) -> _Call[Model]:
        up = _Upload("files", files if files is not None else upload_files(path_or_dir), on_progress)
        return _Call(
            "POST",
            "/v1/models",
            _json_of(Model),
            data=_drop_none({"name": name}) or None,
            upload=up,
            headers=self._idem(idempotency_key),
        )

    def _create_dataset_call(
        self,
        path: str | os.PathLike[str],
        name: str | None,
        on_progress: ProgressFn | None,
        idempotency_key: str | None,
    ) -> _Call[Dataset]:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file")
        up = _Upload("file", [p], on_progress)
        return _Call(
            "POST",
            "/v1/datasets",
            _json_of(Dataset),
            data=_drop_none({"name": name}) or None,
            upload=up,
            headers=self._idem(idempotency_key),
        )

    # -- resumable uploads (modelpress/_upload.py: the protocol, as steps both clients perform) --

    @staticmethod
    def _plan(path: str | os.PathLike[str] | UploadPlan, include: Iterable[str], exclude: Iterable[str]) -> UploadPlan:
        if isinstance(path, UploadPlan):
            return path
        return plan_upload(path, include=include, exclude=exclude)

    def _resumable_create_steps(
        self,
        plan: UploadPlan,
        path: str,
        parse: Callable[[httpx.Response], R],
        name: str | None,
        on_progress: ProgressFn | None,
        on_start: Callable[[int, int], Any] | None,
        idempotency_key: str | None,
        chunk_size: int,
        restart: bool,
    ) -> Steps[R]:
        """Upload every file of ``plan`` (resuming what its state file remembers, unless
        ``restart``), then create the model or dataset from the uploads (``POST path`` with
        ``{"name", "files": {name: upload id}}``); the state file goes once that succeeded."""
        state = UploadState(self.base_url, plan.root)
        if restart:
            state.forget()
        pending = state.pending_create(plan, name)
        if pending is not None:  # a create was sent and its answer never came: ask again, same key
            again = json_req("POST", path, pending["body"], self._idem(pending["key"]))
            resp = yield from request(self, again, resendable=True)
            if resp.is_success:
                state.forget()
                for fn in (on_start, on_progress):
                    if fn is not None:
                        fn(plan.total, plan.total)
                return parse(resp)
            # Not made (the uploads unused, or gone): upload what is missing, then create.
        progress = Progress(plan.total, on_progress)
        ids = yield from upload_all_steps(self, plan, state, progress, chunk_size, on_start)
        key = idempotency_key or create_key(self.base_url, ids, name)
        body = _drop_none({"name": name, "files": ids})
        state.create = {"key": key, "body": body}
        state.save()
        resp = yield from request(self, json_req("POST", path, body, self._idem(key)), resendable=True)
        if not resp.is_success:
            state.create = None
            state.save()
            raise APIError.from_response(resp)
        state.forget()
        return parse(resp)

    def _upload_file_steps(
        self, path: str | os.PathLike[str], on_progress: ProgressFn | None, chunk_size: int, restart: bool
    ) -> Steps[str]:
        plan = single_file_plan(path)
        state = UploadState(self.base_url, plan.root)
        if restart:
            state.forget()
        progress = Progress(plan.total, on_progress)
        ids = yield from upload_all_steps(self, plan, state, progress, chunk_size)
        return ids[plan.files[0].name]

    @staticmethod
    def _tus_refused(e: TusUnsupported, resumable: bool | None) -> None:
        """A server without /v1/uploads: fall back to one multipart request (``resumable=None``),
        else raise its answer."""
        if resumable:
            raise APIError.from_response(e.response) from None

    def _import_call(self, name: str | None, source: str, idempotency_key: str | None) -> _Call[Model]:
        body = _drop_none({"name": name, "source": source})
        return _Call("POST", "/v1/models/import", _json_of(Model), json=body, headers=self._idem(idempotency_key))

    @staticmethod
    def _model_key(model: Model) -> tuple[Any, ...]:
        p = model.progress
        return (model.status, p.bytes_done, p.files_done) if p else (model.status,)

    @staticmethod
    def _model_wait_delay(model: Model, deadline: float | None, timeout: float | None, poll: float) -> float | None:
        """None when ``model`` is ready; raise when it failed or ``timeout`` ran out; else the
        seconds to wait before asking again."""
        if model.status == "failed":
            err = model.error or {}
            why = f"{err.get('code', 'failed')}: {err.get('detail') or err.get('title') or ''}".rstrip(": ")
            raise ImportFailed(f"import of model {model.id} failed: {why}", model)
        if model.done:
            return None
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise ImportTimeout(f"model {model.id} is still {model.status} after {timeout} s", model)
        return poll if left is None else min(poll, left)

    def _spec(
        self,
        model_id: Any,
        steps: Iterable[StepLike],
        name: str | None,
        dataset_id: Any,
        eval_dataset_id: Any,
        evaluation: Mapping[str, Any] | None,
        output: Mapping[str, Any] | None = None,
        recipe: str | None = None,
        steps_optional: bool = False,
    ) -> dict[str, Any]:
        # A recipe stands for the steps: none are sent with it (the server refuses both); so does
        # each point's recipe of a sweep that varies it (``steps_optional``).
        no_steps_ok = recipe is not None or steps_optional
        normalized = normalize_steps(steps, allow_empty=no_steps_ok or output is not None)
        return _drop_none(
            {
                "model_id": _id(model_id),
                "recipe": recipe,
                "steps": None if no_steps_ok and not normalized else normalized,
                "name": name,
                "dataset_id": _id(dataset_id) if dataset_id is not None else None,
                "eval_dataset_id": _id(eval_dataset_id) if eval_dataset_id is not None else None,
                "evaluation": dict(evaluation) if evaluation is not None else None,
                "output": dict(output) if output is not None else None,
            }
        )

    def _submit_call(
        self,
        model_id: Any,
        steps: Iterable[StepLike],
        name: str | None,
        dataset_id: Any,
        eval_dataset_id: Any,
        evaluation: Mapping[str, Any] | None,
        idempotency_key: str | None,
        output: Mapping[str, Any] | None = None,
        recipe: str | None = None,
    ) -> _Call[Job]:
        body = self._spec(model_id, steps, name, dataset_id, eval_dataset_id, evaluation, output, recipe)
        return _Call("POST", "/v1/jobs", _json_of(Job), json=body, headers=self._idem(idempotency_key))

    def _estimate_call(
        self,
        model_id: Any,
        steps: Iterable[StepLike],
        dataset_id: Any,
        eval_dataset_id: Any,
        evaluation: Mapping[str, Any] | None,
        output: Mapping[str, Any] | None = None,
        recipe: str | None = None,
    ) -> _Call[Estimate]:
        body = self._spec(model_id, steps, None, dataset_id, eval_dataset_id, evaluation, output, recipe)
        return _Call("POST", "/v1/jobs/estimate", _json_of(Estimate), json=body, safe=True)

    def _sweep_call(
        self,
        model_id: Any,
        steps: Iterable[StepLike],
        vary: Mapping[str, Iterable[Any]] | None,
        name: str | None,
        dataset_id: Any,
        eval_dataset_id: Any,
        evaluation: Mapping[str, Any] | None,
        idempotency_key: str | None,
        output: Mapping[str, Any] | None = None,
        recipe: str | None = None,
    ) -> _Call[Sweep]:
        if not vary:
            raise ValueError("a sweep needs vary: {'steps[0].params.<name>': [values...]} or {'recipe': [names...]}")
        body = self._spec(
            model_id,
            steps,
            name,
            dataset_id,
            eval_dataset_id,
            evaluation,
            output,
            recipe,
            steps_optional="recipe" in vary,
        )
        body["vary"] = {str(k): list(v) for k, v in vary.items()}
        return _Call("POST", "/v1/sweeps", _json_of(Sweep), json=body, headers=self._idem(idempotency_key))

    @staticmethod
    def _get(path: str, parse: Callable[[httpx.Response], R]) -> _Call[R]:
        return _Call("GET", path, parse)

    @staticmethod
    def _page_call(path: str, item: type[M], params: dict[str, Any]) -> _Call[Page[M]]:
        # Parametrized at run time, so the items are validated as ``item``.
        page: type[Page[M]] = Page[item]  # type: ignore[valid-type]
        return _Call("GET", path, _json_of(page), params=_drop_none(params))

    def _absolute(self, url: str) -> str:
        """A link the server gave as a path (``/v1/...``: a cluster without a configured public
        base URL) made absolute on the address this client reaches the service at."""
        return f"{self.base_url}{url}" if url.startswith("/") else url

    def _link_call(self, path: str, ttl_s: int | None) -> _Call[Link]:
        def parse(r: httpx.Response) -> Link:
            link = Link.model_validate(r.json())
            link.url = self._absolute(link.url)
            return link

        return _Call("POST", path, parse, json=_drop_none({"ttl_s": ttl_s}))

    @staticmethod
    def _keys_params(tenant: str | None, all_tenants: bool) -> dict[str, Any]:
        return {"tenant": tenant, "all_tenants": "true" if all_tenants else None}

    @staticmethod
    def _create_key_call(tenant: str, admin: bool) -> _Call[CreatedApiKey]:
        # No Idempotency-Key and no resend after it may have arrived: the server does not keep a
        # key's secret to answer a repeat with, and a lost answer's key is simply never used.
        return _Call(
            "POST", "/v1/keys", _json_of(CreatedApiKey), json={"tenant": tenant, "scopes": ["admin"] if admin else []}
        )

    @staticmethod
    def _revoke_key_call(key: Any) -> _Call[ApiKey]:
        ident = _id(key)
        parts = ident.split("_", 2)
        if len(parts) == 3 and parts[0] == "mp":
            ident = parts[1]  # a whole key: its prefix names it; the secret never leaves this machine
        # Revoking twice is harmless (the server keeps the first time): safe to resend.
        return _Call("POST", "/v1/keys/revoke", _json_of(ApiKey), json={"id": ident}, safe=True)

    @staticmethod
    def _wait_outcome(job: Job) -> Job:
        """The job if it succeeded; raise if it failed or was canceled."""
        if job.status == "failed":
            err = f"{job.error.code}: {job.error.message}" if job.error else "no error recorded"
            raise JobFailed(f"job {job.id} failed: {err}", job)
        if job.status == "canceled":
            raise JobCanceled(f"job {job.id} was canceled", job)
        return job

    @staticmethod
    def _progress_key(job: Job) -> tuple[Any, ...]:
        return (job.status, job.progress.stage, job.progress.fraction)


class Client(_BaseClient):
    """The modelpress API, synchronously. Use as a context manager, or call ``close()``.

    >>> with Client("http://127.0.0.1:8000", api_key="mp_...") as mp:
    ...     model = mp.upload_model("gpt2/")
    ...     job = mp.wait(mp.submit(model.id, [("prune.magnitude", {"sparsity": 0.5})]))
    ...     mp.download(job.id, "out/")

    ``transport`` and ``event_hooks`` are passed to ``httpx.Client`` (tests, proxies, logging).
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = 3,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        event_hooks: Mapping[str, list[Callable[..., Any]]] | None = None,
    ) -> None:
        super().__init__(
            base_url,
            api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            headers=headers,
        )
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=self._headers,
            timeout=timeout,
            transport=transport,
            event_hooks=dict(event_hooks or {}),
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call[R]) -> R:
        with ExitStack() as stack:
            files = call.upload.open(stack) if call.upload else None
            attempt = 0
            while True:
                try:
                    resp = self._http.request(
                        call.method,
                        call.path,
                        params=call.params,
                        json=call.json,
                        data=call.data,
                        files=files,
                        headers=call.headers,
                    )
                except httpx.TransportError as e:
                    delay = self._retry_delay(attempt, error=e, resendable=call.resendable)
                    if delay is None:
                        raise self._transport_error(e, self._url(call.path), attempt + 1) from e
                else:
                    if resp.is_success:
                        return call.parse(resp)
                    delay = self._retry_delay(attempt, response=resp)
                    if delay is None:
                        raise APIError.from_response(resp)
                attempt += 1
                time.sleep(delay)

    # -- models and datasets ---------------------------------------------------------------------

    def _drive(self, steps: Steps[R]) -> R:
        """Perform the steps of a resumable upload (modelpress/_upload.py) with this client."""
        got: Any = None
        try:
            while True:
                try:
                    op = steps.send(got)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
                if isinstance(op, Sleep):
                    time.sleep(op.seconds)
                    got = None
                    continue
                body = op.body if op.on_sent is None or op.body is None else slices(op.body, op.on_sent)
                try:
                    got = self._http.request(op.method, op.url, headers=op.headers, content=body)
                except httpx.TransportError as e:
                    got = e
        finally:
            steps.close()

    def upload_model(
        self,
        path_or_dir: str | os.PathLike[str] | UploadPlan,
        *,
        name: str | None = None,
        on_progress: ProgressFn | None = None,
        idempotency_key: str | None = None,
        include: Iterable[str] = (),
        exclude: Iterable[str] = (),
        resumable: bool | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        restart: bool = False,
        on_start: Callable[[int, int], Any] | None = None,
    ) -> Model:
        """Upload a Hugging Face model directory or one ``.safetensors`` file, resumably.

        The files are those of ``plan_upload(path_or_dir, include=, exclude=)`` (pass a plan to
        use one already shown to the user): files the server would refuse are left out before any
        byte is sent. Each is sent in ``chunk_size`` chunks to ``/v1/uploads`` (tus), remembered in
        a state file, so calling this again after an interruption sends only what the server does
        not have yet (``restart=True``: start over); ``on_start(bytes already there, total)`` is
        called before the first byte, ``on_progress(bytes on the server, total)`` as they go.
        ``resumable``: None (default) falls back to one multipart request when the server has no
        ``/v1/uploads``; True requires it; False always sends one multipart request."""
        plan = self._plan(path_or_dir, include, exclude)
        if resumable is not False:
            try:
                return self._drive(
                    self._resumable_create_steps(
                        plan,
                        "/v1/models",
                        _json_of(Model),
                        name,
                        on_progress,
                        on_start,
                        idempotency_key,
                        chunk_size,
                        restart,
                    )
                )
            except TusUnsupported as e:
                self._tus_refused(e, resumable)
        files = [f.path for f in plan.files]
        return self._send(self._upload_model_call(plan.root, name, on_progress, idempotency_key, files))

    def upload_file(
        self,
        path: str | os.PathLike[str],
        *,
        on_progress: ProgressFn | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        restart: bool = False,
    ) -> str:
        """Upload one file to ``/v1/uploads`` (tus, resumable as ``upload_model``): its upload id,
        for ``POST /v1/models`` / ``POST /v1/datasets`` with ``{"files": {name: id}}``."""
        return self._drive(self._upload_file_steps(path, on_progress, chunk_size, restart))

    def create_dataset(
        self,
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        on_progress: ProgressFn | None = None,
        idempotency_key: str | None = None,
        resumable: bool | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        restart: bool = False,
    ) -> Dataset:
        """Upload a ``.txt`` (a sample a line) or ``.jsonl`` (``{"text", "label"?}``) dataset
        (resumable, as ``upload_model``)."""
        plan = single_file_plan(path)
        if resumable is not False:
            try:
                return self._drive(
                    self._resumable_create_steps(
                        plan,
                        "/v1/datasets",
                        _json_of(Dataset),
                        name,
                        on_progress,
                        None,
                        idempotency_key,
                        chunk_size,
                        restart,
                    )
                )
            except TusUnsupported as e:
                self._tus_refused(e, resumable)
        return self._send(self._create_dataset_call(path, name, on_progress, idempotency_key))

    def import_model(self, name: str | None, source: str, *, idempotency_key: str | None = None) -> Model:
        """Have the server fetch a model from ``source`` (``s3://bucket/prefix/``, ``s3://bucket/key``
        or an ``https://`` URL of one file; ``name`` None: the source's last path segment): the
        model, ``status="importing"``; ``wait_model`` follows it until it is ready or failed."""
        return self._send(self._import_call(name, source, idempotency_key))

    def wait_model(
        self,
        model_id: str | Model,
        *,
        timeout: float | None = None,
        poll_interval: float = 1.0,
        on_progress: Callable[[Model], Any] | None = None,
    ) -> Model:
        """Poll until an import finishes: the ready model, or ``ImportFailed`` (``ImportTimeout``
        after ``timeout`` seconds; the import goes on). ``on_progress(model)`` sees every change."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last = None
        while True:
            model = self.get_model(model_id)
            if on_progress is not None and self._model_key(model) != last:
                last = self._model_key(model)
                on_progress(model)
            delay = self._model_wait_delay(model, deadline, timeout, poll_interval)
            if delay is None:
                return model
            time.sleep(delay)

    def get_model(self, model_id: str | Model) -> Model:
        return self._send(self._get(f"/v1/models/{_id(model_id)}", _json_of(Model)))

    def get_dataset(self, dataset_id: str | Dataset) -> Dataset:
        return self._send(self._get(f"/v1/datasets/{_id(dataset_id)}", _json_of(Dataset)))

    def delete_model(self, model_id: str | Model) -> None:
        self._send(_Call("DELETE", f"/v1/models/{_id(model_id)}", _no_body))

    def delete_dataset(self, dataset_id: str | Dataset) -> None:
        self._send(_Call("DELETE", f"/v1/datasets/{_id(dataset_id)}", _no_body))

    def delete_job(self, job_id: str | Job) -> None:
        """Delete a finished job and its artifact (409 while it is queued or running, or a sweep's point)."""
        self._send(_Call("DELETE", f"/v1/jobs/{_id(job_id)}", _no_body))

    def delete_sweep(self, sweep_id: str | Sweep) -> None:
        """Delete a sweep and its points' jobs (409 while a point is queued or running)."""
        self._send(_Call("DELETE", f"/v1/sweeps/{_id(sweep_id)}", _no_body))

    def models(self, *, limit: int | None = None, page_size: int = 50) -> Iterator[Model]:
        """Every model, newest first (at most ``limit``), fetched ``page_size`` at a time."""
        return self._paginate("/v1/models", Model, {}, limit, page_size)

    def datasets(self, *, limit: int | None = None, page_size: int = 50) -> Iterator[Dataset]:
        return self._paginate("/v1/datasets", Dataset, {}, limit, page_size)

    # -- jobs ------------------------------------------------------------------------------------

    def submit(
        self,
        model_id: str | Model,
        steps: Iterable[StepLike] = (),
        *,
        recipe: str | None = None,
        name: str | None = None,
        dataset_id: str | Dataset | None = None,
        eval_dataset_id: str | Dataset | None = None,
        evaluation: Mapping[str, Any] | None = None,
        output: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Submit a job; steps are ``{"method", "params"}`` dicts or ``("method", {params})`` tuples,
        or ``recipe`` names a recipe (``recipes()``) that stands for them."""
        return self._send(
            self._submit_call(
                model_id, steps, name, dataset_id, eval_dataset_id, evaluation, idempotency_key, output, recipe
            )
        )

    def estimate(
        self,
        model_id: str | Model,
        steps: Iterable[StepLike] = (),
        *,
        recipe: str | None = None,
        dataset_id: str | Dataset | None = None,
        eval_dataset_id: str | Dataset | None = None,
        evaluation: Mapping[str, Any] | None = None,
        output: Mapping[str, Any] | None = None,
    ) -> Estimate:
        """The plan of a job without submitting it (``POST /v1/jobs/estimate``): peak memory,
        scratch disk, artifact bytes, seconds, and whether a live worker's budget fits it."""
        return self._send(self._estimate_call(model_id, steps, dataset_id, eval_dataset_id, evaluation, output, recipe))

    def get_job(self, job_id: str | Job) -> Job:
        return self._send(self._get(f"/v1/jobs/{_id(job_id)}", _json_of(Job)))

    def jobs(self, *, status: str | None = None, limit: int | None = None, page_size: int = 50) -> Iterator[Job]:
        """The caller's jobs, newest first, optionally of one status; pages are fetched lazily."""
        return self._paginate("/v1/jobs", Job, {"status": status}, limit, page_size)

    def cancel(self, job_id: str | Job) -> Job:
        """Cancel a job (a running one stops at its next step); ``Conflict`` if it has finished."""
        return self._send(_Call("POST", f"/v1/jobs/{_id(job_id)}/cancel", _json_of(Job)))

    def wait(
        self,
        job_id: str | Job,
        *,
        timeout: float | None = None,
        poll_interval: float = 1.0,
        on_progress: Callable[[Job], Any] | None = None,
    ) -> Job:
        """Poll until the job finishes: the succeeded job, or ``JobFailed`` / ``JobCanceled``
        (``WaitTimeout`` after ``timeout`` seconds). ``on_progress(job)`` sees every change."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last = None
        while True:
            job = self.get_job(job_id)
            if on_progress is not None and self._progress_key(job) != last:
                last = self._progress_key(job)
                on_progress(job)
            if job.done:
                return self._wait_outcome(job)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise WaitTimeout(f"job {job.id} is still {job.status} after {timeout} s", job)
            time.sleep(poll_interval if left is None else min(poll_interval, left))

    def download(
        self, job_id: str | Job, dest: str | os.PathLike[str], *, on_progress: ProgressFn | None = None
    ) -> Download:
        """Download a succeeded job's artifact to ``dest`` (a file, or a directory: the artifact's
        file name), resuming ``<dest>.part``, verified against its sha256."""
        jid = _id(job_id)
        job = self.get_job(jid)
        if job.artifact is None:  # the server says why (409 artifact_not_ready), or it just finished
            self._send(_Call("GET", f"/v1/jobs/{jid}/artifact", _no_body, headers={"Range": "bytes=0-0"}))
            job = self.get_job(jid)
            if job.artifact is None:
                raise APIError(409, "artifact_not_ready", "Conflict", f"job {jid} has no artifact")
        st = _DownloadState.plan(job, dest, on_progress)
        return self._fetch(st, f"/v1/jobs/{jid}/artifact")

    def download_file(
        self, job_id: str | Job, name: str, dest: str | os.PathLike[str], *, on_progress: ProgressFn | None = None
    ) -> Download:
        """Download one file of a succeeded job's artifact (``config.json``, a weight file...) to
        ``dest`` (a file, or a directory: ``name`` in it), resuming ``<dest>.part`` when its
        ``.etag`` is the file's, verified against the sha256 the server gives (``Repr-Digest``,
        a single-file artifact) or else the zip entry's CRC-32 (``Modelpress-CRC32``)."""
        path = f"/v1/jobs/{_id(job_id)}/artifact/files/{quote(name, safe='')}"
        head = self._send(_Call("HEAD", path, _response))
        return self._fetch(_file_state(head, name, dest, on_progress), path)

    def _fetch(self, st: _DownloadState, path: str) -> Download:
        """GET ``path`` into ``st``'s .part (resuming, following a redirect to object storage,
        retrying), then verify and rename it."""
        attempt, location = 0, None
        while st.offset < st.total or st.offset == 0:
            try:
                resp = self._http.send(st.request(self._http, path, location), stream=True)
                try:
                    if resp.is_redirect and location is None:  # presigned object-storage URL
                        location = resp.headers["location"]
                        continue
                    if resp.status_code == 416 and st.offset:
                        st.restart()
                        continue
                    if resp.is_success:
                        mode = st.accept(resp, from_api=location is None)
                        if mode is None:
                            continue
                        with st.part.open(mode) as f:
                            for chunk in resp.iter_bytes(_CHUNK):
                                f.write(chunk)
                                st.wrote(chunk)
                        break
                    resp.read()
                    delay = self._retry_delay(attempt, response=resp)
                    if location is not None and attempt < self.max_retries:
                        delay = 0.0  # the presigned URL failed (expired?): ask the API for a fresh one
                    if delay is None:
                        raise APIError.from_response(resp)
                finally:
                    resp.close()
            except httpx.TransportError as e:
                delay = self._retry_delay(attempt, error=e, resendable=True)
                if delay is None:
                    raise self._transport_error(e, self._url(path), attempt + 1) from e
            location = None  # a retry asks the API again (a presigned URL may have expired)
            attempt += 1
            time.sleep(delay)
        return st.finish()

    def report(self, job_id: str | Job) -> Report:
        """The job's report: size, sparsity, speed, quality, fidelity (409 until it succeeded)."""
        return self._send(self._get(f"/v1/jobs/{_id(job_id)}/report", _json_of(Report)))

    def report_link(self, job_id: str | Job, *, ttl_s: int | None = None) -> str:
        """A signed URL of the HTML report that a browser opens with no API key."""
        return self._send(self._link_call(f"/v1/jobs/{_id(job_id)}/report/link", ttl_s)).url

    # -- sweeps ----------------------------------------------------------------------------------

    def sweep(
        self,
        model_id: str | Model,
        steps: Iterable[StepLike] = (),
        vary: Mapping[str, Iterable[Any]] | None = None,
        *,
        recipe: str | None = None,
        name: str | None = None,
        dataset_id: str | Dataset | None = None,
        eval_dataset_id: str | Dataset | None = None,
        evaluation: Mapping[str, Any] | None = None,
        output: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Sweep:
        """One job per combination of ``vary``: ``{"steps[0].params.sparsity": [0.3, 0.5]}`` over
        ``steps`` (or over the steps of ``recipe``), or ``{"recipe": ["w4-best", "w4-fast"]}`` to
        compare recipes (``recipes()``) on the model, with no steps."""
        return self._send(
            self._sweep_call(
                model_id, steps, vary, name, dataset_id, eval_dataset_id, evaluation, idempotency_key, output, recipe
            )
        )

    def get_sweep(self, sweep_id: str | Sweep) -> Sweep:
        return self._send(self._get(f"/v1/sweeps/{_id(sweep_id)}", _json_of(Sweep)))

    def sweeps(self, *, limit: int | None = None, page_size: int = 50) -> Iterator[SweepSummary]:
        return self._paginate("/v1/sweeps", SweepSummary, {}, limit, page_size)

    def sweep_link(self, sweep_id: str | Sweep, *, ttl_s: int | None = None) -> str:
        return self._send(self._link_call(f"/v1/sweeps/{_id(sweep_id)}/link", ttl_s)).url

    # -- API keys --------------------------------------------------------------------------------

    def keys(
        self, *, tenant: str | None = None, all_tenants: bool = False, limit: int | None = None, page_size: int = 50
    ) -> Iterator[ApiKey]:
        """API keys, newest first: the caller's tenant's; with an admin key, ``tenant``'s or every
        tenant's (``all_tenants``). Never a secret."""
        return self._paginate("/v1/keys", ApiKey, self._keys_params(tenant, all_tenants), limit, page_size)

    def create_key(self, tenant: str, *, admin: bool = False) -> CreatedApiKey:
        """A new key for ``tenant`` (created if new); ``.key`` is the whole key, shown once (admin)."""
        return self._send(self._create_key_call(tenant, admin))

    def revoke_key(self, key: str | ApiKey) -> ApiKey:
        """Revoke a key by id, prefix, whole key or ``ApiKey`` (admin). Idempotent; every API
        replica refuses the key within a second."""
        return self._send(self._revoke_key_call(key))

    # -- service ---------------------------------------------------------------------------------

    def methods(self) -> list[Method]:
        return self._send(self._get("/v1/methods", _list_of(Method)))

    def recipes(self) -> list[Recipe]:
        """The named recipes (``GET /v1/recipes``), per target the recommended one first."""
        return self._send(self._get("/v1/recipes", _list_of(Recipe)))

    def workers(self) -> list[Worker]:
        return self._send(self._get("/v1/workers", _list_of(Worker)))

    def _paginate(
        self, path: str, item: type[M], params: dict[str, Any], limit: int | None, page_size: int
    ) -> Iterator[M]:
        cursor, n = None, 0
        while True:
            size = page_size if limit is None else max(1, min(page_size, limit - n))
            page = self._send(self._page_call(path, item, {**params, "limit": size, "cursor": cursor}))
            for obj in page.items:
                if limit is not None and n >= limit:
                    return
                n += 1
                yield obj
            if not page.next_cursor or (limit is not None and n >= limit):
                return
            cursor = page.next_cursor


class AsyncClient(_BaseClient):
    """The modelpress API for asyncio: ``Client``'s methods as coroutines (the listings are async
    iterators). Use ``async with``, or call ``aclose()``.

    >>> async with AsyncClient() as mp:
    ...     job = await mp.wait(await mp.submit(model_id, [("quantize.cast", {"dtype": "bfloat16"})]))
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = 3,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        event_hooks: Mapping[str, list[Callable[..., Any]]] | None = None,
    ) -> None:
        super().__init__(
            base_url,
            api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            headers=headers,
        )
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=self._headers,
            timeout=timeout,
            transport=transport,
            event_hooks=dict(event_hooks or {}),
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call[R]) -> R:
        with ExitStack() as stack:
            files = call.upload.open(stack) if call.upload else None
            attempt = 0
            while True:
                try:
                    resp = await self._http.request(
                        call.method,
                        call.path,
                        params=call.params,
                        json=call.json,
                        data=call.data,
                        files=files,
                        headers=call.headers,
                    )
                except httpx.TransportError as e:
                    delay = self._retry_delay(attempt, error=e, resendable=call.resendable)
                    if delay is None:
                        raise self._transport_error(e, self._url(call.path), attempt + 1) from e
                else:
                    if resp.is_success:
                        return call.parse(resp)
                    delay = self._retry_delay(attempt, response=resp)
                    if delay is None:
                        raise APIError.from_response(resp)
                attempt += 1
                await asyncio.sleep(delay)

    async def _drive(self, steps: Steps[R]) -> R:
        got: Any = None
        try:
            while True:
                try:
                    op = steps.send(got)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
                if isinstance(op, Sleep):
                    await asyncio.sleep(op.seconds)
                    got = None
                    continue
                body = op.body if op.on_sent is None or op.body is None else _aiter(slices(op.body, op.on_sent))
                try:
                    got = await self._http.request(op.method, op.url, headers=op.headers, content=body)
                except httpx.TransportError as e:
                    got = e
        finally:
            steps.close()

    async def upload_model(
        self,
        path_or_dir: str | os.PathLike[str] | UploadPlan,
        *,
        name: str | None = None,
        on_progress: ProgressFn | None = None,
        idempotency_key: str | None = None,
        include: Iterable[str] = (),
        exclude: Iterable[str] = (),
        resumable: bool | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        restart: bool = False,
        on_start: Callable[[int, int], Any] | None = None,
    ) -> Model:
        plan = self._plan(path_or_dir, include, exclude)
        if resumable is not False:
            try:
                return await self._drive(
                    self._resumable_create_steps(
                        plan,
                        "/v1/models",
                        _json_of(Model),
                        name,
                        on_progress,
                        on_start,
                        idempotency_key,
                        chunk_size,
                        restart,
                    )
                )
            except TusUnsupported as e:
                self._tus_refused(e, resumable)
        files = [f.path for f in plan.files]
        return await self._send(self._upload_model_call(plan.root, name, on_progress, idempotency_key, files))

    async def upload_file(
        self,
        path: str | os.PathLike[str],
        *,
        on_progress: ProgressFn | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        restart: bool = False,
    ) -> str:
        return await self._drive(self._upload_file_steps(path, on_progress, chunk_size, restart))

    async def create_dataset(
        self,
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        on_progress: ProgressFn | None = None,
        idempotency_key: str | None = None,
        resumable: bool | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        restart: bool = False,
    ) -> Dataset:
        plan = single_file_plan(path)
        if resumable is not False:
            try:
                return await self._drive(
                    self._resumable_create_steps(
                        plan,
                        "/v1/datasets",
                        _json_of(Dataset),
                        name,
                        on_progress,
                        None,
                        idempotency_key,
                        chunk_size,
                        restart,
                    )
                )
            except TusUnsupported as e:
                self._tus_refused(e, resumable)
        return await self._send(self._create_dataset_call(path, name, on_progress, idempotency_key))

    async def import_model(self, name: str | None, source: str, *, idempotency_key: str | None = None) -> Model:
        return await self._send(self._import_call(name, source, idempotency_key))

    async def wait_model(
        self,
        model_id: str | Model,
        *,
        timeout: float | None = None,
        poll_interval: float = 1.0,
        on_progress: Callable[[Model], Any] | None = None,
    ) -> Model:
        deadline = None if timeout is None else time.monotonic() + timeout
        last = None
        while True:
            model = await self.get_model(model_id)
            if on_progress is not None and self._model_key(model) != last:
                last = self._model_key(model)
                res = on_progress(model)
                if asyncio.iscoroutine(res):
                    await res
            delay = self._model_wait_delay(model, deadline, timeout, poll_interval)
            if delay is None:
                return model
            await asyncio.sleep(delay)

    async def get_model(self, model_id: str | Model) -> Model:
        return await self._send(self._get(f"/v1/models/{_id(model_id)}", _json_of(Model)))

    async def get_dataset(self, dataset_id: str | Dataset) -> Dataset:
        return await self._send(self._get(f"/v1/datasets/{_id(dataset_id)}", _json_of(Dataset)))

    async def delete_model(self, model_id: str | Model) -> None:
        await self._send(_Call("DELETE", f"/v1/models/{_id(model_id)}", _no_body))

    async def delete_dataset(self, dataset_id: str | Dataset) -> None:
        await self._send(_Call("DELETE", f"/v1/datasets/{_id(dataset_id)}", _no_body))

    async def delete_job(self, job_id: str | Job) -> None:
        """Delete a finished job and its artifact (409 while it is queued or running, or a sweep's point)."""
        await self._send(_Call("DELETE", f"/v1/jobs/{_id(job_id)}", _no_body))

    async def delete_sweep(self, sweep_id: str | Sweep) -> None:
        """Delete a sweep and its points' jobs (409 while a point is queued or running)."""
        await self._send(_Call("DELETE", f"/v1/sweeps/{_id(sweep_id)}", _no_body))

    def models(self, *, limit: int | None = None, page_size: int = 50) -> AsyncIterator[Model]:
        return self._paginate("/v1/models", Model, {}, limit, page_size)

    def datasets(self, *, limit: int | None = None, page_size: int = 50) -> AsyncIterator[Dataset]:
        return self._paginate("/v1/datasets", Dataset, {}, limit, page_size)

    async def submit(
        self,
        model_id: str | Model,
        steps: Iterable[StepLike] = (),
        *,
        recipe: str | None = None,
        name: str | None = None,
        dataset_id: str | Dataset | None = None,
        eval_dataset_id: str | Dataset | None = None,
        evaluation: Mapping[str, Any] | None = None,
        output: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        return await self._send(
            self._submit_call(
                model_id, steps, name, dataset_id, eval_dataset_id, evaluation, idempotency_key, output, recipe
            )
        )

    async def estimate(
        self,
        model_id: str | Model,
        steps: Iterable[StepLike] = (),
        *,
        recipe: str | None = None,
        dataset_id: str | Dataset | None = None,
        eval_dataset_id: str | Dataset | None = None,
        evaluation: Mapping[str, Any] | None = None,
        output: Mapping[str, Any] | None = None,
    ) -> Estimate:
        """The plan of a job without submitting it (``POST /v1/jobs/estimate``)."""
        return await self._send(
            self._estimate_call(model_id, steps, dataset_id, eval_dataset_id, evaluation, output, recipe)
        )

    async def get_job(self, job_id: str | Job) -> Job:
        return await self._send(self._get(f"/v1/jobs/{_id(job_id)}", _json_of(Job)))

    def jobs(self, *, status: str | None = None, limit: int | None = None, page_size: int = 50) -> AsyncIterator[Job]:
        return self._paginate("/v1/jobs", Job, {"status": status}, limit, page_size)

    async def cancel(self, job_id: str | Job) -> Job:
        return await self._send(_Call("POST", f"/v1/jobs/{_id(job_id)}/cancel", _json_of(Job)))

    async def wait(
        self,
        job_id: str | Job,
        *,
        timeout: float | None = None,
        poll_interval: float = 1.0,
        on_progress: Callable[[Job], Any] | None = None,
    ) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        last = None
        while True:
            job = await self.get_job(job_id)
            if on_progress is not None and self._progress_key(job) != last:
                last = self._progress_key(job)
                res = on_progress(job)
                if asyncio.iscoroutine(res):
                    await res
            if job.done:
                return self._wait_outcome(job)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise WaitTimeout(f"job {job.id} is still {job.status} after {timeout} s", job)
            await asyncio.sleep(poll_interval if left is None else min(poll_interval, left))

    async def download(
        self, job_id: str | Job, dest: str | os.PathLike[str], *, on_progress: ProgressFn | None = None
    ) -> Download:
        jid = _id(job_id)
        job = await self.get_job(jid)
        if job.artifact is None:
            await self._send(_Call("GET", f"/v1/jobs/{jid}/artifact", _no_body, headers={"Range": "bytes=0-0"}))
            job = await self.get_job(jid)
            if job.artifact is None:
                raise APIError(409, "artifact_not_ready", "Conflict", f"job {jid} has no artifact")
        st = _DownloadState.plan(job, dest, on_progress)
        return await self._fetch(st, f"/v1/jobs/{jid}/artifact")

    async def download_file(
        self, job_id: str | Job, name: str, dest: str | os.PathLike[str], *, on_progress: ProgressFn | None = None
    ) -> Download:
        path = f"/v1/jobs/{_id(job_id)}/artifact/files/{quote(name, safe='')}"
        head = await self._send(_Call("HEAD", path, _response))
        return await self._fetch(_file_state(head, name, dest, on_progress), path)

    async def _fetch(self, st: _DownloadState, path: str) -> Download:
        attempt, location = 0, None
        while st.offset < st.total or st.offset == 0:
            try:
                resp = await self._http.send(st.request(self._http, path, location), stream=True)
                try:
                    if resp.is_redirect and location is None:  # presigned object-storage URL
                        location = resp.headers["location"]
                        continue
                    if resp.status_code == 416 and st.offset:
                        st.restart()
                        continue
                    if resp.is_success:
                        mode = st.accept(resp, from_api=location is None)
                        if mode is None:
                            continue
                        with st.part.open(mode) as f:
                            async for chunk in resp.aiter_bytes(_CHUNK):
                                f.write(chunk)
                                st.wrote(chunk)
                        break
                    await resp.aread()
                    delay = self._retry_delay(attempt, response=resp)
                    if location is not None and attempt < self.max_retries:
                        delay = 0.0  # the presigned URL failed (expired?): ask the API for a fresh one
                    if delay is None:
                        raise APIError.from_response(resp)
                finally:
                    await resp.aclose()
            except httpx.TransportError as e:
                delay = self._retry_delay(attempt, error=e, resendable=True)
                if delay is None:
                    raise self._transport_error(e, self._url(path), attempt + 1) from e
            location = None  # a retry asks the API again (a presigned URL may have expired)
            attempt += 1
            await asyncio.sleep(delay)
        return st.finish()

    async def report(self, job_id: str | Job) -> Report:
        return await self._send(self._get(f"/v1/jobs/{_id(job_id)}/report", _json_of(Report)))

    async def report_link(self, job_id: str | Job, *, ttl_s: int | None = None) -> str:
        return (await self._send(self._link_call(f"/v1/jobs/{_id(job_id)}/report/link", ttl_s))).url

    async def sweep(
        self,
        model_id: str | Model,
        steps: Iterable[StepLike] = (),
        vary: Mapping[str, Iterable[Any]] | None = None,
        *,
        recipe: str | None = None,
        name: str | None = None,
        dataset_id: str | Dataset | None = None,
        eval_dataset_id: str | Dataset | None = None,
        evaluation: Mapping[str, Any] | None = None,
        output: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Sweep:
        return await self._send(
            self._sweep_call(
                model_id, steps, vary, name, dataset_id, eval_dataset_id, evaluation, idempotency_key, output, recipe
            )
        )

    async def get_sweep(self, sweep_id: str | Sweep) -> Sweep:
        return await self._send(self._get(f"/v1/sweeps/{_id(sweep_id)}", _json_of(Sweep)))

    def sweeps(self, *, limit: int | None = None, page_size: int = 50) -> AsyncIterator[SweepSummary]:
        return self._paginate("/v1/sweeps", SweepSummary, {}, limit, page_size)

    async def sweep_link(self, sweep_id: str | Sweep, *, ttl_s: int | None = None) -> str:
        return (await self._send(self._link_call(f"/v1/sweeps/{_id(sweep_id)}/link", ttl_s))).url

    def keys(
        self, *, tenant: str | None = None, all_tenants: bool = False, limit: int | None = None, page_size: int = 50
    ) -> AsyncIterator[ApiKey]:
        return self._paginate("/v1/keys", ApiKey, self._keys_params(tenant, all_tenants), limit, page_size)

    async def create_key(self, tenant: str, *, admin: bool = False) -> CreatedApiKey:
        return await self._send(self._create_key_call(tenant, admin))

    async def revoke_key(self, key: str | ApiKey) -> ApiKey:
        return await self._send(self._revoke_key_call(key))

    async def methods(self) -> list[Method]:
        return await self._send(self._get("/v1/methods", _list_of(Method)))

    async def recipes(self) -> list[Recipe]:
        """The named recipes (``GET /v1/recipes``), per target the recommended one first."""
        return await self._send(self._get("/v1/recipes", _list_of(Recipe)))

    async def workers(self) -> list[Worker]:
        return await self._send(self._get("/v1/workers", _list_of(Worker)))

    async def _paginate(
        self, path: str, item: type[M], params: dict[str, Any], limit: int | None, page_size: int
    ) -> AsyncIterator[M]:
        cursor, n = None, 0
        while True:
            size = page_size if limit is None else max(1, min(page_size, limit - n))
            page = await self._send(self._page_call(path, item, {**params, "limit": size, "cursor": cursor}))
            for obj in page.items:
                if limit is not None and n >= limit:
                    return
                n += 1
                yield obj
            if not page.next_cursor or (limit is not None and n >= limit):
                return
            cursor = page.next_cursor
