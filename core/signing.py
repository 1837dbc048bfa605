"""The service's secret key, its public address, and the short-lived signed links built from both.

**The secret key.** ``MODELPRESS_SECRET_KEY`` signs report links (below) and is the root of every
tenant's webhook secret (app/webhooks/service.py). Every process that signs or verifies must hold
the same key: a link made by one API host is opened through another, and a webhook is signed by a
worker while the tenant reads its secret from an API host. So:

* **cluster mode requires it** (at least ``MIN_SECRET_KEY_CHARS`` characters): ``modelpress serve``,
  ``worker`` and ``reconcile`` refuse to start without it, and :func:`secret_key` raises
  :class:`MissingSecretKey` rather than fall back to a per-host key. (Before, each host made its
  own random ``<data_dir>/secret_key``: an API host and a worker without a shared data folder
  derived different webhook secrets, and no delivery verified with the secret the API handed out.)
* embedded mode (one host) may leave it empty: a random key created once in
  ``<data_dir>/secret_key`` (mode 0600), shared by the API and its worker subprocess.

**The public base URL.** Absolute links are built from :func:`public_base_url`, never from the
request (its ``Host`` or ``X-Forwarded-*`` headers are the client's to choose, so a link built from
them can point anywhere: host-header injection). ``MODELPRESS_PUBLIC_BASE_URL`` when set (an
``http(s)://host[:port][/prefix]`` URL without query, fragment or credentials); otherwise, in
embedded mode, ``http://127.0.0.1:8000`` (``modelpress serve`` sets it from ``--host``/``--port``);
otherwise, in cluster mode, **no base**: links are relative (``/v1/...``), resolved by the client
against the address it used (the SDK and CLI do), since only the operator knows the address behind
the balancer.

**Links.** A link is ``<base><path>?expires=<unix seconds>&signature=<hex>`` with
``signature = HMAC-SHA256(key, "<kind>:<id>:<expires>")``. A missing or wrong signature answers
exactly like a missing object (404); an expired link that was really issued answers 410
``link_expired`` so the person knows to ask for a new one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any
from urllib.parse import urlencode, urlsplit

from core.config import Settings, get_settings
from core.errors import Gone, NotFound

# 32 characters: 128 bits and more from any sane generator; a short shared key could be found by
# an offline search from one signed link.
MIN_SECRET_KEY_CHARS = 32
EMBEDDED_DEFAULT_BASE_URL = "http://127.0.0.1:8000"
_GENERATE = "python -c 'import secrets; print(secrets.token_hex(32))'"


class MissingSecretKey(RuntimeError):
    """Cluster mode without a usable ``MODELPRESS_SECRET_KEY``."""


class BadPublicBaseUrl(ValueError):
    """``MODELPRESS_PUBLIC_BASE_URL`` is not an absolute http(s) URL without query or fragment."""


def secret_key_problem(settings: Settings) -> str | None:
    """Why this configuration may not sign anything, or None if it may. Only cluster mode has a
    rule: every host needs the same key, so there must be one, and a strong one."""
    if settings.mode != "cluster":
        return None
    if not settings.secret_key:
        return (
            "cluster mode needs MODELPRESS_SECRET_KEY, the same value on every API host and worker "
            "(it signs report links and webhook deliveries; a key per host makes them fail to verify "
            f"elsewhere). Generate one with: {_GENERATE}"
        )
    if len(settings.secret_key) < MIN_SECRET_KEY_CHARS:
        return (
            f"MODELPRESS_SECRET_KEY is {len(settings.secret_key)} characters; cluster mode needs at least "
            f"{MIN_SECRET_KEY_CHARS}. Generate one with: {_GENERATE}"
        )
    return None


@lru_cache
def _key() -> bytes:
    settings = get_settings()
    problem = secret_key_problem(settings)
    if problem:
        raise MissingSecretKey(problem)  # never a per-host key in cluster mode (not cached: raised)
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


def secret_key() -> bytes:
    """The service's signing key (see the module docstring); :class:`MissingSecretKey` in cluster
    mode without one."""
    return _key()


def check_public_base_url(value: str) -> str:
    """``value`` without its trailing slash if it is a usable public base URL (empty stays empty);
    :class:`BadPublicBaseUrl` otherwise."""
    value = value.strip()
    if not value:
        return ""
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise BadPublicBaseUrl(f"MODELPRESS_PUBLIC_BASE_URL {value!r}: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadPublicBaseUrl(f"MODELPRESS_PUBLIC_BASE_URL {value!r} must be an absolute http:// or https:// URL")
    if parts.query or parts.fragment or "?" in value or "#" in value or parts.username or parts.password:
        raise BadPublicBaseUrl(f"MODELPRESS_PUBLIC_BASE_URL {value!r} may not have a query, a fragment or credentials")
    if any(c.isspace() or ord(c) < 0x20 for c in value):
        raise BadPublicBaseUrl(f"MODELPRESS_PUBLIC_BASE_URL {value!r} may not contain whitespace or control characters")
    return value.rstrip("/")


def public_base_url(settings: Settings | None = None) -> str:
    """The base of absolute links: the configured one, else embedded mode's default, else ``""``
    (cluster mode: links are relative). Never derived from a request."""
    settings = settings or get_settings()
    configured = check_public_base_url(settings.public_base_url)
    if configured:
        return configured
    return EMBEDDED_DEFAULT_BASE_URL if settings.mode == "embedded" else ""


def serve_base_url(host: str, port: int) -> str:
    """What ``modelpress serve --host H --port P`` uses when no base URL is configured: the address
    it listens on, with loopback for a wildcard (the one address of this host that surely works)."""
    if host in ("", "0.0.0.0"):  # noqa: S104 - naming the wildcard, not binding it
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def absolute(path: str) -> str:
    """``path`` (``/v1/...``) under the public base URL; unchanged (relative) when there is none."""
    return public_base_url() + path


def _digest(kind: str, object_id: str, expires: int) -> str:
    return hmac.new(_key(), f"{kind}:{object_id}:{expires}".encode(), hashlib.sha256).hexdigest()


def sign(kind: str, object_id: str, ttl_s: int) -> tuple[int, str]:
    """``(expires, signature)`` for a link valid ``ttl_s`` seconds from now."""
    expires = int(time.time()) + ttl_s
    return expires, _digest(kind, object_id, expires)


def link(request: Any, route_name: str, kind: str, object_id: str, ttl_s: int | None) -> tuple[str, datetime]:
    """A signed URL to the route ``route_name`` of ``object_id`` (its path parameter is
    ``<kind>_id``), valid ``ttl_s`` seconds (default: settings), and when it expires.

    Only the route table is taken from ``request`` (``url_path_for``: the path, without the
    request's host or root path); the base is :func:`public_base_url`."""
    ttl = ttl_s or get_settings().report_link_ttl_s
    expires, signature = sign(kind, object_id, ttl)
    path = request.app.url_path_for(route_name, **{f"{kind}_id": object_id})
    url = absolute(f"{path}?{urlencode({'expires': expires, 'signature': signature})}")
    return url, datetime.fromtimestamp(expires, UTC)


def verify(kind: str, object_id: str, expires: int | None, signature: str | None) -> None:
    # Bytes, not str: compare_digest refuses a str with non-ASCII characters (a fuzzed signature)
    # with TypeError, and a wrong signature must be a 404 whatever its characters.
    if (
        expires is None
        or not signature
        or not hmac.compare_digest(
            _digest(kind, object_id, expires).encode(), signature.encode("utf-8", "surrogateescape")
        )
    ):
        raise NotFound(f"no {kind} {object_id}")
    if expires < time.time():
        raise Gone("this link has expired; ask the API for a new one", code="link_expired")
