"""Resumable uploads (tus 1.0) at /v1/uploads: core protocol (X-HTTP-Method-Override included)
plus the creation, checksum (sha1, sha256), expiration and termination extensions
(docs/UPLOADS.md). Every response under the prefix, errors included, carries
``Tus-Resumable: 1.0.0`` (TusRoute, and TusProtocol for what no route of it answers); a request
with another (or no) ``Tus-Resumable`` is refused with 412, except OPTIONS. An upload id of another
tenant answers 404 like a missing one, whatever else the request says."""

from __future__ import annotations

import email.utils
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from app.auth import CurrentCaller
from app.deps import SettingsDep, UoW
from app.errors import API_ERRORS, problem_responses
from app.resumable import service
from core.errors import ModelpressError, PayloadTooLarge, PreconditionFailed, RequestTimeout, UnsupportedMediaType
from core.tables import Upload

TUS = {"Tus-Resumable": service.TUS_VERSION}
OFFSET_OCTET_STREAM = "application/offset+octet-stream"


class TusRoute(APIRoute):
    """Adds ``Tus-Resumable`` to every response of the route, the errors raised in it (those of
    its dependencies, such as a missing API key, included)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def tus_handler(request: Request) -> Response:
            try:
                response = await handler(request)
            except (ModelpressError, HTTPException) as e:
                e.headers = {**(e.headers or {}), **TUS}
                raise
            response.headers.update(TUS)
            return response

        return tus_handler


router = APIRouter(prefix="/v1/uploads", tags=["uploads"], route_class=TusRoute)

PREFIX = "/v1/uploads"
# X-HTTP-Method-Override (tus core): a client limited to POST sends it to the upload's URL with the
# method it means. Only these, and only under the prefix: nowhere else does a header pick a method.
_OVERRIDABLE = frozenset({"PATCH", "DELETE", "HEAD"})
_TUS_HEADER = (b"tus-resumable", service.TUS_VERSION.encode())


class TusProtocol:
    """ASGI middleware for the paths under ``/v1/uploads``, outside every other middleware:

    * ``Tus-Resumable`` on every response, including those no upload route made (a 404 or 405 of
      the router, the body limits' 413, 408 and 422): the protocol asks for it on all of them, and
      TusRoute covers only what its routes answer. Not on an unexpected 500: Starlette answers
      those from its ServerErrorMiddleware, outside every added middleware;
    * ``POST /v1/uploads/{id}`` with ``X-HTTP-Method-Override: PATCH`` (or ``DELETE``, ``HEAD``)
      is that method, before anything else reads the request (the body limits stream a PATCH's
      body to disk instead of holding a POST's to the JSON limit)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        if path != PREFIX and not path.startswith(PREFIX + "/"):
            await self.app(scope, receive, send)
            return
        if scope.get("method") == "POST" and path.startswith(PREFIX + "/"):
            for k, v in scope.get("headers", ()):
                if k == b"x-http-method-override":
                    meant = v.decode("latin-1").strip().upper()
                    if meant in _OVERRIDABLE:
                        scope = {**scope, "method": meant}
                    break

        async def tus_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(k.lower() == b"tus-resumable" for k, _ in headers):
                    message = {**message, "headers": [*headers, _TUS_HEADER]}
            await send(message)

        await self.app(scope, receive, tus_send)


def _h(description: str, example: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if example is not None:
        schema["example"] = example
    return {"description": description, "schema": schema}


_TUS_RESUMABLE_H = _h("`1.0.0`: the protocol version of the server", "1.0.0")
_EXPIRES_H = _h("when the upload expires unless finished and used (RFC 9110 date)")
_OFFSET_H = _h("bytes received so far", "1048576")
TusResumable = Annotated[
    str | None,
    Header(alias="Tus-Resumable", description="Required: `1.0.0` (412 otherwise)", examples=["1.0.0"]),
]


def _http_date(dt: datetime) -> str:
    return email.utils.format_datetime(dt.astimezone(UTC), usegmt=True)


def _check_version(value: str | None) -> None:
    if value != service.TUS_VERSION:
        raise PreconditionFailed(
            f"send Tus-Resumable: {service.TUS_VERSION} (this server speaks tus {service.TUS_VERSION})",
            code="tus_version_unsupported",
            headers={"Tus-Version": service.TUS_VERSION, "Connection": "close"},
        )


def _state_headers(upload: Upload) -> dict[str, str]:
    return {
        "Upload-Offset": str(upload.offset),
        "Upload-Length": str(upload.length),
        "Upload-Expires": _http_date(upload.expires_at),
        "Cache-Control": "no-store",
    }


@router.options(
    "",
    status_code=204,
    responses={
        204: {
            "description": "The protocol as served",
            "headers": {
                "Tus-Resumable": _TUS_RESUMABLE_H,
                "Tus-Version": _h("`1.0.0`", "1.0.0"),
                "Tus-Extension": _h(f"`{service.TUS_EXTENSIONS}`", service.TUS_EXTENSIONS),
                "Tus-Max-Size": _h("the largest Upload-Length accepted (`max_upload_bytes`)"),
                "Tus-Checksum-Algorithm": _h(f"`{service.CHECKSUM_ALGORITHMS}`", service.CHECKSUM_ALGORITHMS),
            },
        },
        **problem_responses(*API_ERRORS),
    },
)
def upload_options(caller: CurrentCaller, settings: SettingsDep) -> Response:
    """What the server supports: tus version, extensions, maximum size, checksum algorithm."""
    return Response(
        status_code=204,
        headers={
            "Tus-Version": service.TUS_VERSION,
            "Tus-Extension": service.TUS_EXTENSIONS,
            "Tus-Max-Size": str(settings.max_upload_bytes),
            "Tus-Checksum-Algorithm": service.CHECKSUM_ALGORITHMS,
        },
    )


@router.post(
    "",
    status_code=201,
    response_class=Response,
    responses={
        201: {
            "description": "Created: PATCH the bytes to `Location`",
            "headers": {
                "Location": _h("`/v1/uploads/{upload_id}`"),
                "Upload-Expires": _EXPIRES_H,
                "Tus-Resumable": _TUS_RESUMABLE_H,
            },
        },
        **problem_responses(400, *API_ERRORS, 412, 413, 429),
    },
)
def create_upload(
    caller: CurrentCaller,
    uow: UoW,
    settings: SettingsDep,
    tus_resumable: TusResumable = None,
    upload_length: Annotated[
        str | None,
        Header(alias="Upload-Length", description="Required: the file's size in bytes (at most Tus-Max-Size)"),
    ] = None,
    upload_metadata: Annotated[
        str | None,
        Header(
            alias="Upload-Metadata",
            description="Comma-separated `key base64(value)` pairs; `filename` is required and follows the "
            "rules of multipart uploads (`*.safetensors`, `*.json`, text, `.jsonl`)",
        ),
    ] = None,
) -> Response:
    """Create an upload (tus creation): its length and file name; no bytes yet."""
    _check_version(tus_resumable)
    length = service.parse_length(upload_length, settings)
    meta = service.parse_metadata(upload_metadata)
    upload = service.create(uow, caller, settings, length, meta)
    return Response(
        status_code=201,
        headers={"Location": f"/v1/uploads/{upload.id}", "Upload-Expires": _http_date(upload.expires_at)},
    )


@router.head(
    "/{upload_id}",
    status_code=200,
    response_class=Response,
    responses={
        200: {
            "description": "The upload's state (no body)",
            "headers": {
                "Upload-Offset": _OFFSET_H,
                "Upload-Length": _h("the declared size"),
                "Upload-Metadata": _h("the metadata as created"),
                "Upload-Expires": _EXPIRES_H,
                "Cache-Control": _h("`no-store`"),
                "Tus-Resumable": _TUS_RESUMABLE_H,
            },
        },
        **problem_responses(*API_ERRORS, 404, 410, 412),
    },
)
def head_upload(upload_id: str, caller: CurrentCaller, uow: UoW, tus_resumable: TusResumable = None) -> Response:
    """How many bytes the server has (resume from `Upload-Offset`)."""
    upload = service.get(uow, caller, upload_id)
    _check_version(tus_resumable)
    service.check_open(upload)
    headers = _state_headers(upload)
    if upload.meta:
        headers["Upload-Metadata"] = service.encode_metadata(upload.meta)
    return Response(status_code=200, headers=headers)


@router.patch(
    "/{upload_id}",
    status_code=204,
    response_class=Response,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {OFFSET_OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}},
        }
    },
    responses={
        204: {
            "description": "The bytes are on disk",
            "headers": {"Upload-Offset": _OFFSET_H, "Upload-Expires": _EXPIRES_H, "Tus-Resumable": _TUS_RESUMABLE_H},
        },
        **problem_responses(400, *API_ERRORS, 404, 408, 409, 410, 412, 413, 415, 460),
    },
)
async def patch_upload(
    upload_id: str,
    request: Request,
    caller: CurrentCaller,
    uow: UoW,
    settings: SettingsDep,
    tus_resumable: TusResumable = None,
    upload_offset: Annotated[
        str | None,
        Header(alias="Upload-Offset", description="Required: the upload's current offset (409 otherwise)"),
    ] = None,
    upload_checksum: Annotated[
        str | None,
        Header(
            alias="Upload-Checksum",
            description="`sha256 <base64 digest of this body>` (or `sha1 ...`): a mismatch is 460 and the chunk "
            "is discarded",
        ),
    ] = None,
) -> Response:
    """Append bytes at `Upload-Offset` (`Content-Type: application/offset+octet-stream`). Bytes of a
    body cut off midway are kept (HEAD, then resume)."""
    upload = await run_in_threadpool(service.snapshot, caller, upload_id)
    _check_version(tus_resumable)
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != OFFSET_OCTET_STREAM:
        raise UnsupportedMediaType(f"send Content-Type: {OFFSET_OCTET_STREAM}", headers={"Connection": "close"})
    offset = service.parse_offset(upload_offset)
    checksum = service.parse_checksum(upload_checksum)
    service.check_open(upload)
    service.check_offset(upload, offset)  # again under the lock: this read may be stale
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and offset + int(declared) > upload.length:
        raise PayloadTooLarge(
            f"the body goes past the declared Upload-Length of {upload.length} bytes", headers={"Connection": "close"}
        )
    with service.locked_staging(settings, upload) as fh:
        got = await service.receive(uow, caller, settings, upload, fh, offset, checksum, request.stream())
        # Committed before the lock goes: the next PATCH reads this offset, not the one before it.
        await run_in_threadpool(uow.commit)
    headers = {"Upload-Offset": str(got.offset), "Upload-Expires": _http_date(upload.expires_at)}
    if got.stalled:
        raise RequestTimeout(
            f"no byte of the body arrived for {settings.body_read_timeout_s:g} s; "
            f"the {got.offset - offset} bytes before are kept",
            headers={**headers, "Connection": "close"},
        )
    return Response(status_code=204, headers=headers)


@router.delete(
    "/{upload_id}",
    status_code=204,
    response_class=Response,
    responses={
        204: {"description": "Removed", "headers": {"Tus-Resumable": _TUS_RESUMABLE_H}},
        **problem_responses(*API_ERRORS, 404, 412),
    },
)
def delete_upload(
    upload_id: str, caller: CurrentCaller, uow: UoW, settings: SettingsDep, tus_resumable: TusResumable = None
) -> Response:
    """Remove an upload and its bytes (tus termination)."""
    service.get(uow, caller, upload_id)
    _check_version(tus_resumable)
    service.terminate(uow, caller, settings, upload_id)
    return Response(status_code=204)
