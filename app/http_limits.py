"""Request bodies, bounded before any route sees them: a pure ASGI middleware (``BaseHTTPMiddleware``
would buffer streamed responses).

- **Size.** A body other than a streamed upload is at most ``max_json_body_bytes``: a larger
  ``Content-Length`` is refused before a byte is read, a chunked body as soon as it passes the
  limit (413 ``payload_too_large``). Uploads are streamed to disk and bounded by their routes:
  multipart POSTs to the routes in ``upload_paths`` by app/uploads.py (``max_upload_bytes``, form
  fields), tus PATCHes under ``patch_prefixes`` by app/resumable (the declared Upload-Length).
  A JSON POST to an upload path (a model from finished uploads) is bounded as any JSON body.
- **Time.** A client that stops sending mid-body (it declared more than it sends, or stalls) is
  answered 408 ``request_timeout`` after ``body_read_timeout_s`` without a byte, instead of
  holding a connection and a worker thread forever.
- **Strict JSON.** A JSON body (``application/json``, ``*+json``, or no Content-Type) must be
  UTF-8 and pass core/jsonsafe.py: at most ``MAX_DEPTH`` levels, numbers of at most
  ``MAX_NUMBER_CHARS`` characters, no NaN, no repeated key, no lone surrogate or NUL in a string.
  Refused here, with the place named (``errors[0].loc``), so that what FastAPI, pydantic, the
  idempotency digest and the database get is always JSON they can handle.

Every refusal is an RFC 9457 problem like the app's own, with ``Connection: close`` when the
client may still be sending.
"""

from __future__ import annotations

import asyncio
import email.message
import json
from collections.abc import Iterable

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core import jsonsafe
from core.config import get_settings
from core.errors import PROBLEM_JSON, RequestTimeout

_INLINE_PARSE_BYTES = 64 * 1024

_STATUS_TITLES = {
    400: "Bad request",
    408: "Request timeout",
    413: "Payload too large",
    422: "Request could not be processed",
}


def _is_json(content_type: str | None) -> bool:
    """As FastAPI decides whether to parse a body as JSON (and a body without a Content-Type:
    it is refused as JSON-or-nothing by every JSON route)."""
    if not content_type:
        return True
    msg = email.message.Message()
    msg["content-type"] = content_type
    return msg.get_content_maintype() == "application" and (
        msg.get_content_subtype() == "json" or msg.get_content_subtype().endswith("+json")
    )


async def _send_problem(
    send: Send, status: int, code: str, detail: str, errors: list[dict] | None = None, close: bool = False
) -> None:
    body = {
        "type": f"/problems/{code}",
        "title": _STATUS_TITLES[status],
        "status": status,
        "detail": detail,
        "code": code,
    }
    if errors is not None:
        body["errors"] = errors
    raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    headers = [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(raw)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": raw})


class _TooLarge(Exception):
    pass


class _Stalled(Exception):
    pass


class _Disconnected(Exception):
    pass


class BodyLimits:
    """See the module docstring. ``upload_paths``: the routes that stream multipart uploads;
    ``patch_prefixes``: the path prefixes whose PATCH bodies are streamed (tus chunks)."""

    def __init__(self, app: ASGIApp, upload_paths: Iterable[str] = (), patch_prefixes: Iterable[str] = ()) -> None:
        self.app = app
        self.upload_paths = frozenset(upload_paths)
        self.patch_prefixes = tuple(patch_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = content_type = None
        chunked = False
        for k, v in scope.get("headers", ()):  # one pass: this runs on every request (GET /v1/jobs/{id} too)
            if k == b"content-length":
                length = v.decode("latin-1").strip()
            elif k == b"transfer-encoding":
                chunked = b"chunked" in v.lower()
            elif k == b"content-type":
                content_type = v.decode("latin-1")
        if not chunked and length in (None, "", "0"):
            await self.app(scope, receive, send)  # no body: nothing to bound
            return
        settings = get_settings()
        limit, timeout = settings.max_json_body_bytes, settings.body_read_timeout_s
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        method = scope.get("method")
        if (method == "POST" and path in self.upload_paths and not _is_json(content_type)) or (
            method == "PATCH" and self.patch_prefixes and path.startswith(self.patch_prefixes)
        ):
            await self.app(scope, _stall_guard(receive, timeout), send)
            return
        if length is not None and length.isdigit() and int(length) > limit:
            await _send_problem(
                send,
                413,
                "payload_too_large",
                f"request body of {int(length)} bytes is over the limit of {limit} bytes",
                close=True,
            )
            return
        body = await _read_body_or_refuse(receive, send, limit, timeout)
        if body is None:
            return
        if body and _is_json(content_type) and not await _json_or_refuse(body, send):
            return
        await self.app(scope, _replay(body, receive), send)


async def _read_body_or_refuse(receive: Receive, send: Send, limit: int, timeout: float) -> bytes | None:
    """The whole body, or None once a 413 or 408 was sent (or the client left)."""
    try:
        return await _read_body(receive, limit, timeout)
    except _TooLarge:
        detail = f"request body is over the limit of {limit} bytes"
        await _send_problem(send, 413, "payload_too_large", detail, close=True)
    except _Stalled:
        await _send_problem(
            send,
            408,
            "request_timeout",
            f"no byte of the request body arrived for {timeout:g} s (a Content-Length larger than the body sent?)",
            close=True,
        )
    except _Disconnected:
        pass
    return None


async def _json_or_refuse(body: bytes, send: Send) -> bool:
    """True if the body is JSON the strict loader takes; else sends the 400/422 and returns False."""
    # A leading byte order mark is ignored, as FastAPI's parse (utf-8-sig) ignores it.
    doc = body.removeprefix(b"\xef\xbb\xbf")
    try:
        # A large body is parsed off the event loop (a few MB take tens of milliseconds).
        await run_in_threadpool(jsonsafe.loads, doc) if len(doc) > _INLINE_PARSE_BYTES else jsonsafe.loads(doc)
    except jsonsafe.JSONRejected as e:
        status = 400 if e.code == "json_not_utf8" else 422
        loc = ["body", *e.path]
        await _send_problem(send, status, e.code, f"request body: {e}", [{"loc": loc, "msg": e.reason, "type": e.code}])
        return False
    return True


async def _read_body(receive: Receive, limit: int, timeout: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            message = await asyncio.wait_for(receive(), timeout)
        except TimeoutError:
            raise _Stalled from None
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The buffered body as one message, then the real channel (a disconnect while streaming)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _stall_guard(receive: Receive, timeout: float) -> Receive:
    """``receive`` that gives up after ``timeout`` s without a message while the body is still
    coming (afterwards, waiting is for a disconnect and may last as long as the response)."""
    done = False

    async def guarded() -> Message:
        nonlocal done
        if done:
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), timeout)
        except TimeoutError:
            raise RequestTimeout(
                f"no byte of the request body arrived for {timeout:g} s (a Content-Length larger than the body sent?)",
                headers={"Connection": "close"},
            ) from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            done = True
        return message

    return guarded
