"""Conditional reads (RFC 9110 §13): ``ETag`` on single-resource reads, ``If-None-Match`` → 304.

A read's ETag is computed from the body actually sent (:func:`body_etag`), so it changes exactly
when the representation does: a job's as it progresses, a sweep's as its points finish, the JSON
and the HTML of one URL apart. It is strong: the same bytes, the same tag, on every API process.
The artifact downloads (app/jobs/downloads.py) have their own tags (the artifact's sha256) and
share :func:`none_match`. ``Link`` headers of list pages are built in core/pagination.py; their
OpenAPI entry is :data:`PAGE_LINK_HEADERS`. docs/HTTP.md describes both to clients.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from fastapi import Response
from fastapi.responses import StreamingResponse

# A quoted entity-tag, weak or strong. Parsed rather than split on ",": a tag may hold a comma.
_ENTITY_TAG = re.compile(r'(?:W/)?"[^"]*"')
# What a 200 carries that its 304 must repeat (RFC 9110 §15.4.5: those a cache would update).
_KEPT_ON_304 = ("ETag", "Cache-Control", "Vary", "Content-Location", "Expires")
# A client may keep the body, and must ask again (If-None-Match) before using it: job state moves.
_DEFAULT_CACHE_CONTROL = "private, no-cache"


def none_match(header: str, etag: str) -> bool:
    """Whether ``If-None-Match: header`` matches ``etag``: ``*``, or one of its tags by weak
    comparison (``W/`` ignored on both sides)."""
    if header.strip() == "*":
        return True
    plain = etag.removeprefix("W/")
    return any(t.removeprefix("W/") == plain for t in _ENTITY_TAG.findall(header))


def body_etag(body: bytes) -> str:
    """The strong ETag of a response body: 128 bits of its BLAKE2b, quoted."""
    return '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"'


def tagged(if_none_match: str | None, response: Response) -> Response:
    """``response`` with its ETag (and ``Cache-Control: private, no-cache`` unless it has one),
    or the 304 that replaces it when ``if_none_match`` names that ETag. Only a 200 with its body
    in hand is tagged: an error, or a stream, goes out as it is."""
    if response.status_code != 200 or isinstance(response, StreamingResponse):
        return response
    etag = body_etag(bytes(response.body))
    response.headers["ETag"] = etag
    if "cache-control" not in response.headers:
        response.headers["Cache-Control"] = _DEFAULT_CACHE_CONTROL
    if if_none_match and none_match(if_none_match, etag):
        kept = {name: response.headers[name] for name in _KEPT_ON_304 if name in response.headers}
        return Response(status_code=304, headers=kept, background=response.background)
    return response


def _header(description: str, required: bool = True) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "string"}, "required": required}


# The OpenAPI of a tagged read (app.routing.ETagRoute adds them to its operation).
ETAG_HEADERS = {
    "ETag": _header("strong: a hash of this body; send it back in `If-None-Match` to get 304 while it is current"),
    "Cache-Control": _header("`private, no-cache` (revalidate before reuse), or the page's own (`no-store`)"),
}
NOT_MODIFIED = {
    "description": "Not modified: `If-None-Match` named the current ETag (no body)",
    "headers": {"ETag": _header("the current ETag")},
}
IF_NONE_MATCH_PARAMETER = {
    "name": "If-None-Match",
    "in": "header",
    "required": False,
    "description": "ETags from earlier reads (or `*`): 304 Not Modified, no body, when one is current",
    "schema": {"type": "string"},
}

# The OpenAPI of a list page's headers (the value: core.pagination.link_header).
PAGE_LINK_HEADERS = {
    "Link": _header(
        'RFC 8288: `<url>; rel="first"` always, and `<url>; rel="next"` unless this is the last page '
        "(the same query with `cursor` set); relative when the service has no public base URL"
    )
}
