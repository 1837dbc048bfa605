"""Resumable uploads (tus 1.0 on httpx): what an upload sends, where it remembers its uploads, and
the protocol itself, written once for ``Client`` and ``AsyncClient``.

What is sent (:func:`plan_upload`): the regular files directly in the folder (or the one file given),
minus what the server would refuse, decided before any byte leaves this machine. The rules mirror
the server's (``core/models/validation.py``, ``check_filename``; tests/test_cli_upload.py checks the
two agree): hidden files, subdirectories, ``--exclude`` globs and files no ``--include`` glob matches
are skipped, and so are names the server refuses (pickle formats such as ``*.bin``, ``*.pt``,
``*.ckpt``; other weight formats such as ``*.h5``, ``*.msgpack``, ``*.gguf``; archives; any type
other than ``*.safetensors``, ``*.json``, ``*.txt``, ``*.jinja``, ``*.md``, e.g. ``tokenizer.model``;
names with characters other than letters, digits, ``.``, ``_``, ``-``). Each skipped file comes
with its reason (:attr:`UploadPlan.skipped`). Globs are matched against the path relative to the
folder (``fnmatch``, case-sensitive; ``*`` also matches ``/``).

Where uploads are remembered (:class:`UploadState`): one small JSON file per (server, absolute
path) under the user's cache folder, ``$MODELPRESS_CACHE_DIR`` (else ``$XDG_CACHE_HOME/modelpress``,
else ``~/.cache/modelpress``), in ``uploads/<sha256 of server and path>.json``. Never inside the
model folder: a read-only folder (a Hugging Face cache snapshot) resumes too, and nothing the
server would receive is ever written. It maps each file name to its size, mtime (ns) and upload
URL; it is written (atomically) as soon as an upload is created, so an interrupted run (Ctrl-C,
a cut connection, a killed process) leaves it complete. A rerun HEADs each remembered upload and
sends only what the server does not have yet (from its ``Upload-Offset``); a file whose size or
mtime changed, or whose upload the server no longer knows (404/410, expired), starts over. Before
the create (``POST /v1/models`` or ``/v1/datasets``) is sent, its body and ``Idempotency-Key`` are
written there too: a rerun after a create whose answer was lost sends it again with the same key,
and the server answers with the model it made (nothing uploaded twice, no second model). The state
file is deleted once the model (or dataset) has been created; state files untouched for 30 days
are deleted whenever another upload starts.

The protocol (``upload_all_steps``, ``send_steps``): ``POST /v1/uploads`` (``Upload-Length``, ``Upload-Metadata:
filename``), then ``PATCH`` chunks of ``chunk_size`` bytes (default 16 MiB; one chunk at a time in
memory, the file is never read whole), each with ``Upload-Checksum: sha256 <base64>``. A chunk whose
connection breaks is retried after a backoff (the offset re-read with HEAD first: part of it may
have arrived; so after 408 and 502/504); 409 re-reads the offset (``upload_busy``: after a backoff,
the server is still writing the cut PATCH); 460 (checksum mismatch) resends the chunk;
404/410 starts that file over; 429/503 wait (``Retry-After``); 413 on a chunk within the
upload's length (a limit on request bodies, the server's or a proxy's) halves the chunk size for
the rest of the file, down to 64 KiB. ``max_retries`` failures in a row without progress end the
upload with :class:`TransportError` saying to run it again to resume.

The code here performs no I/O on the network: each protocol step is a generator that yields
:class:`Req` (a request to send) and :class:`Sleep`, and receives the ``httpx.Response`` or the
``httpx.TransportError`` of each request. ``Client`` and ``AsyncClient`` each drive it with a loop
of a few lines (``_drive``), so the decisions exist once.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import json
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx

from modelpress._errors import APIError, TransportError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "PlannedFile",
    "SkippedFile",
    "UploadPlan",
    "UploadState",
    "parse_size",
    "plan_upload",
    "state_dir",
]

DEFAULT_CHUNK_SIZE = 16 * 1024 * 1024
MIN_CHUNK = 64 * 1024  # a 413 halves the chunk size down to this
TUS_VERSION = "1.0.0"
# The server's rules (core/models/validation.py); tests/test_cli_upload.py checks they agree.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".npy", ".npz"})
ARCHIVE_SUFFIXES = frozenset({".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".zst"})
ACCEPTED_SUFFIXES = frozenset({".safetensors", ".json", ".txt", ".jinja", ".md"})
# Weights in formats the server does not take (it names them unsupported; we say what they are).
OTHER_WEIGHT_SUFFIXES = frozenset(
    {".h5", ".hdf5", ".msgpack", ".gguf", ".ggml", ".onnx", ".ot", ".tflite", ".pb", ".mlmodel", ".keras", ".nemo"}
)
FILENAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")

R = TypeVar("R")
ProgressFn = Callable[[int, int], Any]


# -- what is sent --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedFile:
    """A file an upload sends: its name on the server, where it is, its size and mtime (ns)."""

    name: str
    path: Path
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class SkippedFile:
    """A file (or subdirectory) an upload leaves out, and why; ``name`` is relative to the folder."""

    name: str
    reason: str


@dataclass
class UploadPlan:
    """What an upload of ``root`` (a folder, or one file) sends and what it skips."""

    root: Path
    files: list[PlannedFile]
    skipped: list[SkippedFile] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)


def server_refusal(name: str) -> str | None:
    """Why the server would refuse a model file of this name, or None if it takes it."""
    if not FILENAME_RE.fullmatch(name) or ".." in name:
        return "a name the server refuses (letters, digits, '.', '_' and '-' only)"
    lower = name.lower()
    suffix = Path(lower).suffix
    if suffix in PICKLE_SUFFIXES:
        return f"'{suffix}' weights may hold pickled code; the server accepts safetensors only"
    if suffix in ARCHIVE_SUFFIXES or lower.endswith(".tar.gz"):
        return "an archive; the server takes the files of the folder, not archives"
    if suffix in OTHER_WEIGHT_SUFFIXES:
        return f"'{suffix}' weights; the server accepts safetensors only"
    if suffix not in ACCEPTED_SUFFIXES:
        kind = f"'{suffix}' files" if suffix else "files without a suffix"
        return f"{kind} are not accepted (only .safetensors, .json, .txt, .jinja, .md)"
    return None


def _glob_reason(rel: str, include: Sequence[str], exclude: Sequence[str]) -> str | None:
    for pattern in exclude:
        if fnmatch.fnmatchcase(rel, pattern):
            return f"excluded by --exclude {pattern!r}"
    if include and not any(fnmatch.fnmatchcase(rel, p) for p in include):
        return "not matched by any --include"
    return None


def _stat(p: Path) -> PlannedFile:
    st = p.stat()
    return PlannedFile(p.name, p, st.st_size, st.st_mtime_ns)


def plan_upload(
    path: str | os.PathLike[str], *, include: Iterable[str] = (), exclude: Iterable[str] = ()
) -> UploadPlan:
    """What an upload of ``path`` sends (sorted by name) and what it skips, with the reasons.

    A folder: its regular files (symlinks followed), minus hidden ones, subdirectories, files an
    ``exclude`` glob matches or no ``include`` glob matches, and files the server refuses. One
    file: that file (the globs apply to its name); ``ValueError`` if the server would refuse it.
    ``ValueError`` when nothing is left to send, ``FileNotFoundError`` when ``path`` is missing."""
    inc, exc = list(include), list(exclude)
    p = Path(path)
    if p.is_file():
        reason = _glob_reason(p.name, inc, exc) or server_refusal(p.name)
        if reason:
            raise ValueError(f"{p}: {reason}; nothing to upload")
        return UploadPlan(p, [_stat(p)])
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such file or directory")
    files: list[PlannedFile] = []
    skipped: list[SkippedFile] = []
    for entry in sorted(p.iterdir(), key=lambda e: e.name):
        name = entry.name
        why: str | None
        if name.startswith("."):
            why = "hidden"
        elif entry.is_dir():
            why = "a subdirectory (only the files directly in the folder are sent)"
        elif not entry.is_file():
            why = "not a regular file"
        else:
            why = _glob_reason(name, inc, exc) or server_refusal(name)
        if why:
            skipped.append(SkippedFile(name + ("/" if entry.is_dir() else ""), why))
        else:
            files.append(_stat(entry))
    if not files:
        why = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:8]) or "the folder is empty"
        raise ValueError(f"{p}: no files to upload ({why})")
    return UploadPlan(p, files, skipped)


def single_file_plan(path: str | os.PathLike[str]) -> UploadPlan:
    """One file as it is (a dataset, ``upload_file``): no rules of model files apply."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    return UploadPlan(p, [_stat(p)])


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2}
_UNITS.update({"g": 1000**3, "gb": 1000**3, "gib": 1024**3})


def parse_size(text: str) -> int:
    """``16MiB``, ``8M``, ``512k``, ``1048576`` -> bytes (``k``/``M``/``G``: powers of 1000;
    ``KiB``/``MiB``/``GiB``: of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size (e.g. 16MiB, 8M, 1048576)")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n < 1:
        raise ValueError(f"{text!r}: a size must be at least 1 byte")
    return n


# -- where uploads are remembered ---------------------------------------------------------------


def state_dir() -> Path:
    """``$MODELPRESS_CACHE_DIR``, else ``$XDG_CACHE_HOME/modelpress``, else ``~/.cache/modelpress``."""
    explicit = os.environ.get("MODELPRESS_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "modelpress"


class UploadState:
    """The uploads of one (server, path), remembered in a JSON file (see the module's docstring).

    A state file that cannot be read (damaged, another version) is ignored: the upload starts over.
    One that cannot be written (a read-only cache) only loses the ability to resume."""

    VERSION = 1
    STALE_S = 30 * 24 * 3600

    def __init__(self, server: str, root: Path, directory: Path | None = None) -> None:
        self.server = server.rstrip("/")
        self.root = root.resolve()
        key = hashlib.sha256(f"{self.server}\n{self.root}".encode()).hexdigest()[:32]
        self.path = (directory or state_dir()) / "uploads" / f"{key}.json"
        self.files: dict[str, dict[str, Any]] = {}
        # The create about to be sent (``{"key", "body"}``), kept until it succeeded: a rerun after
        # a create whose answer was lost sends it again with the same Idempotency-Key (the server
        # answers with the model it made) instead of uploading everything again.
        self.create: dict[str, Any] | None = None
        self._load()
        self._prune()

    def _prune(self) -> None:
        """State files untouched for ``STALE_S`` go (their uploads expired on the server long ago)."""
        cutoff = time.time() - self.STALE_S
        with contextlib.suppress(OSError):
            for old in self.path.parent.glob("*.json"):
                with contextlib.suppress(OSError):
                    if old != self.path and old.stat().st_mtime < cutoff:
                        old.unlink()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if (
            isinstance(data, dict)
            and data.get("version") == self.VERSION
            and data.get("server") == self.server
            and data.get("root") == str(self.root)
            and isinstance(data.get("files"), dict)
        ):
            self.files = {k: v for k, v in data["files"].items() if isinstance(v, dict)}
            create = data.get("create")
            self.create = create if isinstance(create, dict) else None

    def url_for(self, f: PlannedFile) -> str | None:
        """The upload URL of ``f`` if one was created for the file as it is now (same size and mtime)."""
        entry = self.files.get(f.name)
        if entry and entry.get("size") == f.size and entry.get("mtime_ns") == f.mtime_ns:
            url = entry.get("url")
            return url if isinstance(url, str) and url else None
        return None

    def stale_url(self, f: PlannedFile) -> str | None:
        """The upload URL remembered for an earlier version of ``f`` (its size or mtime changed)."""
        entry = self.files.get(f.name)
        url = entry.get("url") if entry else None
        return url if isinstance(url, str) and url and self.url_for(f) is None else None

    def remember(self, f: PlannedFile, url: str) -> None:
        self.files[f.name] = {"size": f.size, "mtime_ns": f.mtime_ns, "url": url, "created": int(time.time())}
        self.save()

    def save(self) -> None:
        data = {
            "version": self.VERSION,
            "server": self.server,
            "root": str(self.root),
            "files": self.files,
            "create": self.create,
        }
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as out:
                    json.dump(data, out, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

    def pending_create(self, plan: UploadPlan, name: str | None) -> dict[str, Any] | None:
        """The create remembered for these very files (unchanged) and name, if any."""
        c = self.create
        if not c or not isinstance(c.get("body"), dict) or not isinstance(c.get("key"), str):
            return None
        body = c["body"]
        same_files = isinstance(body.get("files"), dict) and set(body["files"]) == {f.name for f in plan.files}
        if body.get("name") != name or not same_files or not all(self.url_for(f) for f in plan.files):
            return None
        return c

    def forget(self) -> None:
        """Delete the state file (the uploads were used)."""
        self.files, self.create = {}, None
        with contextlib.suppress(OSError):
            self.path.unlink()


# -- the protocol, as steps that a client performs ------------------------------------------------


@dataclass
class Req:
    """A request to send; ``on_sent(n)`` follows the bytes of ``body`` handed to the connection."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None = None
    on_sent: Callable[[int], None] | None = None


@dataclass
class Sleep:
    seconds: float


Op = Req | Sleep
# Each step yields an Op and receives the Response (or TransportError) of a Req, None after a Sleep.
Steps = Generator[Op, Any, R]
SLICE = 1 << 20  # bytes handed to httpx at a time, so the progress bar moves inside a chunk


class Policy(Protocol):
    """What the upload needs of a client: its retry policy (``_BaseClient`` has it)."""

    max_retries: int

    def _backoff(self, attempt: int) -> float: ...

    def _retry_delay(
        self,
        attempt: int,
        *,
        response: httpx.Response | None = None,
        error: Exception | None = None,
        resendable: bool = False,
    ) -> float | None: ...

    def _url(self, path: str) -> str: ...

    def _transport_error(self, e: httpx.TransportError, call_url: str, attempts: int) -> TransportError: ...


class TusUnsupported(Exception):
    """The server has no ``/v1/uploads`` (an older server): 404 or 405 on the creation."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"{response.request.url}: {response.status_code}")
        self.response = response


@dataclass
class Progress:
    """Bytes of every file on the server (resumed or sent), reported as ``on_progress(done, total)``;
    ``resumed``: what was already there when this run started, ``sent``: what this run added."""

    total: int
    on_progress: ProgressFn | None = None
    done: dict[str, int] = field(default_factory=dict)
    resumed: int = 0
    sent: int = 0

    def at(self, name: str, offset: int) -> None:
        self.done[name] = offset
        if self.on_progress is not None:
            self.on_progress(sum(self.done.values()), self.total)


def upload_id(url: str) -> str:
    """The id at the end of an upload URL (``/v1/uploads/{id}``)."""
    return url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def _tus(headers: Mapping[str, str] | None = None) -> dict[str, str]:
    return {"Tus-Resumable": TUS_VERSION, **(headers or {})}


def json_req(method: str, path: str, body: Any, headers: Mapping[str, str] | None = None) -> Req:
    raw = json.dumps(body).encode()
    return Req(method, path, {"Content-Type": "application/json", **(headers or {})}, raw)


def request(policy: Policy, req: Req, *, resendable: bool) -> Steps[httpx.Response]:
    """Send ``req``, retrying 429/503 and failures before it was sent (or any failure if
    ``resendable``): the last response, whatever its status, or TransportError."""
    attempt = 0
    while True:
        got = yield req
        if isinstance(got, httpx.TransportError):
            delay = policy._retry_delay(attempt, error=got, resendable=resendable)
            if delay is None:
                url = policy._url(req.url) if req.url.startswith("/") else req.url
                raise policy._transport_error(got, url, attempt + 1) from got
        else:
            delay = policy._retry_delay(attempt, response=got) if not got.is_success else None
            if delay is None:
                return got  # type: ignore[no-any-return]
        attempt += 1
        yield Sleep(delay)


def _create(policy: Policy, f: PlannedFile) -> Steps[str]:
    """``POST /v1/uploads`` for ``f``: its upload URL (TusUnsupported on an older server)."""
    meta = "filename " + base64.b64encode(f.name.encode()).decode()
    headers = _tus({"Upload-Length": str(f.size), "Upload-Metadata": meta})
    # Resent after a possible arrival: the worst case is an unused upload, which expires.
    resp = yield from request(policy, Req("POST", "/v1/uploads", headers, b""), resendable=True)
    if resp.status_code in (404, 405):
        raise TusUnsupported(resp)
    if not resp.is_success:
        raise APIError.from_response(resp)
    location: str | None = resp.headers.get("location")
    if not location:
        raise APIError(resp.status_code, "no_location", "Bad answer", "POST /v1/uploads answered without a Location")
    return location


def _head(policy: Policy, url: str, size: int) -> Steps[int | None]:
    """The server's offset of an upload, or None when it is gone (404/410) or of another length."""
    resp = yield from request(policy, Req("HEAD", url, _tus()), resendable=True)
    if resp.status_code in (404, 410):
        return None
    if not resp.is_success:
        raise APIError.from_response(resp)
    length = resp.headers.get("upload-length")
    if length is not None and length.isdigit() and int(length) != size:
        return None
    try:
        return int(resp.headers["upload-offset"])
    except (KeyError, ValueError):
        return None


def _forget_upload(policy: Policy, url: str) -> Steps[None]:
    """DELETE an upload that will not be used (best effort: it expires anyway)."""
    with contextlib.suppress(APIError, TransportError):
        yield from request(policy, Req("DELETE", url, _tus()), resendable=True)


def resume_point(policy: Policy, f: PlannedFile, state: UploadState | None) -> Steps[tuple[str | None, int]]:
    """Where the upload of ``f`` stands: its URL and the server's offset when ``state`` remembers
    an upload of the file as it is now and the server still has it, else ``(None, 0)``."""
    url = state.url_for(f) if state else None
    if url:
        offset = yield from _head(policy, url, f.size)
        if offset is not None and offset <= f.size:
            return url, offset
    elif state and (stale := state.stale_url(f)):
        yield from _forget_upload(policy, stale)  # the file changed since: that upload is of no use
    return None, 0


def _patch(url: str, offset: int, chunk: bytes, progress: Progress, name: str, sha256: bytes | None = None) -> Req:
    """The PATCH of ``chunk`` at ``offset``, with its sha256 (``Upload-Checksum``; ``sha256``:
    the digest when the caller has it already)."""
    digest = base64.b64encode(sha256 or hashlib.sha256(chunk).digest()).decode()
    headers = _tus(
        {
            "Content-Type": "application/offset+octet-stream",
            "Upload-Offset": str(offset),
            "Upload-Checksum": f"sha256 {digest}",
            "Content-Length": str(len(chunk)),  # the body is streamed in slices
        }
    )
    return Req("PATCH", url, headers, chunk, on_sent=lambda n: progress.at(name, offset + n))


def _failure(policy: Policy, got: httpx.Response | httpx.TransportError, failures: int) -> tuple[float | None, str]:
    """What to do after a PATCH that did not succeed: ``(delay, why)``; ``delay`` None: send the
    chunk again at once (460), else wait that long and ask the server for its offset first.
    404/410 (``why`` "gone") start the file over; any other error is raised."""
    if isinstance(got, httpx.TransportError):
        return policy._backoff(failures), f"{type(got).__name__}: {got or type(got).__name__}"
    status = got.status_code
    if status == 409:  # another offset (ask it, go on from there), or a PATCH still running: wait
        busy = _code(got) == "upload_busy"
        return (policy._backoff(failures) if busy else 0.0), "409 upload busy" if busy else "409 offset mismatch"
    if status in (408, 502, 504):  # the body stalled, a gateway gave up: part of it may be kept
        return policy._backoff(failures), f"{status} {got.reason_phrase}"
    if status == 460:  # the chunk arrived damaged: send it again
        return None, "460 checksum mismatch"
    if status in (404, 410):  # expired or unknown: this file starts over
        return 0.0, "gone"
    if status in (429, 503):
        return policy._retry_delay(0, response=got) or policy._backoff(failures), str(status)
    raise APIError.from_response(got)


def _code(resp: httpx.Response) -> str | None:
    with contextlib.suppress(ValueError):
        body = resp.json()
        return str(body.get("code")) if isinstance(body, dict) else None
    return None


def send_steps(
    policy: Policy,
    f: PlannedFile,
    state: UploadState | None,
    progress: Progress,
    url: str | None,
    offset: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Steps[str]:
    """Send ``f`` from ``offset`` (creating its upload when ``url`` is None): its upload id."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1 byte")
    if url is None:
        url = yield from _start(policy, f, state)
        offset = 0
    progress.at(f.name, offset)
    failures = 0  # in a row, without progress
    with ReadAhead(f.path) as reader:
        while offset < f.size:
            chunk, digest = reader.take(offset, min(chunk_size, f.size - offset))
            if not chunk:
                raise ValueError(f"{f.path}: the file shrank while it was being uploaded; upload it again")
            end = offset + len(chunk)
            if end < f.size:  # read and hashed while this chunk is on the wire
                reader.ask(end, min(chunk_size, f.size - end))
            got = yield _patch(url, offset, chunk, progress, f.name, digest)
            if not isinstance(got, httpx.TransportError) and got.is_success:
                new = got.headers.get("upload-offset")
                moved = int(new) if new is not None and new.isdigit() else offset + len(chunk)
                progress.sent += max(0, moved - offset)
                offset, failures = moved, 0
                progress.at(f.name, offset)
                continue
            if not isinstance(got, httpx.TransportError) and got.status_code == 413 and len(chunk) > MIN_CHUNK:
                # Within the upload's length, a 413 is a limit on the request body (the server's, a
                # proxy's): halve the chunks for the rest of the file; nothing of this one was kept.
                chunk_size = max(MIN_CHUNK, len(chunk) // 2)
                continue
            delay, why = _failure(policy, got, failures)
            failures += 1
            if failures > max(policy.max_retries, 1):
                raise TransportError(
                    f"upload of {f.name} stopped at {offset:,} of {f.size:,} bytes after {failures} failed "
                    f"attempts in a row ({why}); run the same upload again to resume from there",
                    policy._url(url) if url.startswith("/") else url,
                )
            if delay:
                yield Sleep(delay)
            if delay is not None:  # part of the chunk may have arrived: ask the server where it is
                head = None if why == "gone" else (yield from _head(policy, url, f.size))
                if head is None or head > f.size:
                    url = yield from _start(policy, f, state)
                    head = 0
                offset = head
                progress.at(f.name, offset)
    return upload_id(url)


class ReadAhead:
    """The next chunk of a file read and hashed on a thread while the current one is sent: reading
    and sha256 let the GIL go, so they overlap the PATCH in flight instead of following it (the
    client then has the next request ready when the server answers). At most two chunks are in
    memory: the one being sent and the next."""

    def __init__(self, path: Path) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._fh = path.open("rb")
        # seek + read as one (a read asked for and not taken may still be running; os.pread would
        # need no lock but does not exist on Windows).
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="modelpress-read")
        self._next: tuple[int, int, Any] | None = None  # (offset, size, future)

    def _read(self, offset: int, size: int) -> tuple[bytes, bytes]:
        with self._lock:
            self._fh.seek(offset)
            chunk = self._fh.read(size)
        return chunk, hashlib.sha256(chunk).digest()

    def ask(self, offset: int, size: int) -> None:
        """Start reading ``size`` bytes at ``offset`` for a later ``take``."""
        self._next = (offset, size, self._pool.submit(self._read, offset, size))

    def take(self, offset: int, size: int) -> tuple[bytes, bytes]:
        """The chunk at ``offset`` and its sha256: the one asked for, or read now (a retry, a
        resume elsewhere, a smaller chunk after a 413)."""
        asked, self._next = self._next, None
        if asked is not None and asked[:2] == (offset, size):
            result: tuple[bytes, bytes] = asked[2].result()
            return result
        if asked is not None:
            asked[2].cancel()
        return self._read(offset, size)

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._fh.close()


def _start(policy: Policy, f: PlannedFile, state: UploadState | None) -> Steps[str]:
    url = yield from _create(policy, f)
    if state is not None:
        state.remember(f, url)
    return url


def upload_all_steps(
    policy: Policy,
    plan: UploadPlan,
    state: UploadState | None,
    progress: Progress,
    chunk_size: int,
    on_start: Callable[[int, int], Any] | None = None,
) -> Steps[dict[str, str]]:
    """Every file of the plan, one after another: ``{name: upload id}``. First the remembered
    uploads are asked for their offsets (HEAD), then ``on_start(bytes already on the server,
    total)`` is called, then the rest is sent."""
    points = []
    for f in plan.files:
        point = yield from resume_point(policy, f, state)
        points.append(point)
        progress.resumed += point[1]
        progress.done[f.name] = point[1]
    if on_start is not None:
        on_start(progress.resumed, plan.total)
    ids: dict[str, str] = {}
    for f, (url, offset) in zip(plan.files, points, strict=True):
        ids[f.name] = yield from send_steps(policy, f, state, progress, url, offset, chunk_size)
    return ids


def create_key(server: str, ids: Mapping[str, str], name: str | None) -> str:
    """The ``Idempotency-Key`` of the create that uses these uploads: the same on a rerun, so a
    create whose answer was lost is answered again rather than refused or done twice."""
    text = json.dumps({"server": server, "files": dict(sorted(ids.items())), "name": name})
    return str(uuid.uuid5(uuid.NAMESPACE_URL, text))


def slices(body: bytes, on_sent: Callable[[int], None] | None) -> Iterator[bytes]:
    """``body`` in ``SLICE``-byte pieces, ``on_sent`` called as each is taken."""
    view = memoryview(body)
    for start in range(0, len(body), SLICE):
        yield bytes(view[start : start + SLICE])
        if on_sent is not None:
            on_sent(min(start + SLICE, len(body)))
