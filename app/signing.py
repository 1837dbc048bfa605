"""Short-lived signed links to pages a browser opens without an ``Authorization`` header.

A link is ``<path>?expires=<unix seconds>&signature=<hex>`` with
``signature = HMAC-SHA256(key, "<kind>:<id>:<expires>")``. The key is ``MODELPRESS_SECRET_KEY``
or, when that is empty, a random key created once in ``<data_dir>/secret_key`` (mode 0600):
enough for one host; several API hosts behind a balancer must share ``MODELPRESS_SECRET_KEY``.

A missing or wrong signature answers exactly like a missing object (404); an expired link that
was really issued answers 410 ``link_expired`` so the person knows to ask for a new one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

from app.config import get_settings
from app.errors import Gone, NotFound


@lru_cache
def _key() -> bytes:
    settings = get_settings()
    if settings.secret_key:
        return settings.secret_key.encode()
    path = settings.data_dir / "secret_key"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: two processes starting together agree on the one key that got written.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    for _ in range(50):
        value = path.read_text().strip()
        if value:
            return value.encode()
        time.sleep(0.01)  # the creator is between open and write
    raise RuntimeError(f"{path} is empty")


def _digest(kind: str, object_id: str, expires: int) -> str:
    return hmac.new(_key(), f"{kind}:{object_id}:{expires}".encode(), hashlib.sha256).hexdigest()


def sign(kind: str, object_id: str, ttl_s: int) -> tuple[int, str]:
    """``(expires, signature)`` for a link valid ``ttl_s`` seconds from now."""
    expires = int(time.time()) + ttl_s
    return expires, _digest(kind, object_id, expires)


def link(request: Any, route_name: str, kind: str, object_id: str, ttl_s: int | None) -> tuple[str, datetime]:
    """An absolute signed URL to the route ``route_name`` of ``object_id`` (its path parameter is
    ``<kind>_id``), valid ``ttl_s`` seconds (default: settings), and when it expires."""
    ttl = ttl_s or get_settings().report_link_ttl_s
    expires, signature = sign(kind, object_id, ttl)
    url = request.url_for(route_name, **{f"{kind}_id": object_id}).include_query_params(expires=expires, signature=signature)
    return str(url), datetime.fromtimestamp(expires, timezone.utc)


def verify(kind: str, object_id: str, expires: int | None, signature: str | None) -> None:
    # Bytes, not str: compare_digest refuses a str with non-ASCII characters (a fuzzed signature)
    # with TypeError, and a wrong signature must be a 404 whatever its characters.
    if expires is None or not signature or not hmac.compare_digest(
        _digest(kind, object_id, expires).encode(), signature.encode("utf-8", "surrogateescape")
    ):
        raise NotFound(f"no {kind} {object_id}")
    if expires < time.time():
        raise Gone("this link has expired; ask the API for a new one", code="link_expired")
