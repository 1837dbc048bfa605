"""Sign-in for the dashboard: the API key in a cookie, and the CSRF rule of its forms.

**The cookie.** ``POST /ui/login`` checks the key exactly as the API checks a bearer key
(:func:`app.auth.authenticate`) and stores the key itself in the cookie ``modelpress_ui``:
``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no other site's page sends it),
``Path=/ui`` (the browser sends it to the dashboard only; the ``/v1`` routes never read cookies,
so the API's bearer auth is unchanged), ``Secure`` when the dashboard is served over https. Every
page authenticates the key again, through the same cache as the API: a revoked key signs its
cookie out within the API's revocation bound (app/auth.py).

**CSRF.** Every POST (sign in, sign out, upload) must come from a page of this dashboard: its
``Origin`` (or, without one, its ``Referer``) must name this host, as the request's ``Host`` header
or ``MODELPRESS_PUBLIC_BASE_URL`` spells it. A browser sets both headers itself, so another site's
page cannot forge them; with ``SameSite=Strict`` the cookie would not be sent anyway. A POST
without either header is refused (403 ``csrf_origin``): browsers that post forms send ``Origin``.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from app.auth import Caller, authenticate
from app.errors import Forbidden
from core.errors import Unauthorized
from core.signing import public_base_url

COOKIE = "modelpress_ui"
COOKIE_PATH = "/ui"
# A working day: a browser left signed in on a shared machine is signed out by the next morning.
COOKIE_MAX_AGE_S = 12 * 3600


def cookie_options(secure: bool) -> dict[str, object]:
    """The attributes of the sign-in cookie (``Response.set_cookie`` keywords, less key and value)."""
    return {
        "max_age": COOKIE_MAX_AGE_S,
        "path": COOKIE_PATH,
        "httponly": True,
        "samesite": "strict",
        "secure": secure,
    }


def _origin(url: str) -> str | None:
    """``scheme://host[:port]`` of an absolute http(s) URL, lower-cased; None for anything else
    (``null``, a relative or malformed URL)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


def allowed_hosts(host_header: str | None, public_base: str) -> set[str]:
    """The ``host[:port]`` a page of this dashboard has: the request's ``Host`` and the public base URL's."""
    hosts = {host_header.strip().lower()} if host_header and host_header.strip() else set()
    base = _origin(public_base) if public_base else None
    if base:
        hosts.add(base.split("://", 1)[1])
    return hosts


def same_origin(headers: Mapping[str, str], public_base: str) -> bool:
    """Whether a POST comes from a page of this dashboard (see the module docstring)."""
    claimed = headers.get("origin") or headers.get("referer")
    origin = _origin(claimed) if claimed else None
    if origin is None:
        return False
    host = origin.split("://", 1)[1]
    hosts = allowed_hosts(headers.get("host"), public_base)
    # A Host of "example.com:80" and an Origin of "http://example.com" are the same place.
    return host in hosts or any(h in (f"{host}:80", f"{host}:443") for h in hosts)


def check_origin(headers: Mapping[str, str]) -> None:
    """403 ``csrf_origin`` unless the POST comes from a page of this dashboard."""
    if not same_origin(headers, public_base_url()):
        raise Forbidden(
            "this form must be sent from a page of this dashboard (its Origin names another site, or none)",
            code="csrf_origin",
        )


async def caller_of(key: str | None) -> Caller | None:
    """The caller whose key the cookie holds, or None (no cookie, or a key that no longer works)."""
    if not key:
        return None
    try:
        return await authenticate("bearer", key)
    except Unauthorized:
        return None
