"""Which webhook targets the service may connect to: a guard against server-side request forgery.

A webhook URL is the one place where a tenant makes the service open a connection of its choice,
so the service must not become a way into its own network (a database, a cloud metadata endpoint
at 169.254.169.254, an admin port on localhost). The rule:

* only ``http`` and ``https`` URLs with a host;
* the host is resolved (``socket.getaddrinfo``) and **every** address it resolves to must be a
  global unicast address: an address that is private, loopback, link-local, multicast, reserved,
  unspecified or otherwise not globally routable is refused. An IPv6 address that embeds an IPv4
  one (IPv4-mapped ``::ffff:a.b.c.d``, 6to4, Teredo, NAT64 ``64:ff9b::/96``) is judged by that IPv4
  address too, so ``::ffff:127.0.0.1`` is loopback;
* except addresses inside ``MODELPRESS_WEBHOOK_ALLOW_NETWORKS`` (comma-separated CIDRs or
  addresses, e.g. ``127.0.0.1/32,10.1.0.0/16``), which are allowed whatever their kind.

Because the addresses are checked rather than the name, every spelling of an address (``0x7f.1``,
``2130706433``, ``[::ffff:7f00:1]``, a DNS name that points at it) is caught. The check runs at
submit time and again before every delivery attempt, and the delivery connects to the address
this check returned (``Target.address``), not to a second resolution of the name: a DNS answer
that changes between the check and the connection (DNS rebinding) cannot slip a private address in.

Exceptions::

    ValueError             -- not an http(s) URL with a host (``parse``)
    ├── TargetRefused      -- resolves to an address the rule refuses (``reason`` says which)
    └── TargetUnresolvable -- the host does not resolve (maybe for now: DNS is down)
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import SplitResult, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL_LENGTH = 2000
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class TargetRefused(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TargetUnresolvable(ValueError):
    pass


@dataclass(frozen=True)
class Target:
    """A checked webhook URL: connect to ``address`` (one of the host's checked addresses) and
    send ``host`` as the Host header and TLS server name."""

    url: str
    scheme: str
    host: str  # as in the URL, without brackets; an IP literal or a DNS name
    port: int
    address: str  # the checked IP to connect to


def parse(url: str) -> SplitResult:
    """The URL's parts if it is an absolute http(s) URL with a host; ValueError otherwise."""
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"a webhook URL is at most {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise ValueError("a webhook URL may not contain whitespace or control characters")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError("a webhook URL must be http:// or https://")
    try:
        host, _port = parts.hostname, parts.port  # .port raises ValueError on a bad port
    except ValueError as e:
        raise ValueError(f"invalid webhook URL: {e}") from None
    if not host:
        raise ValueError("a webhook URL needs a host")
    if parts.fragment:
        raise ValueError("a webhook URL may not have a #fragment")
    return parts


@lru_cache(maxsize=16)
def allow_networks(spec: str) -> tuple[IPNetwork, ...]:
    """``MODELPRESS_WEBHOOK_ALLOW_NETWORKS`` parsed: CIDRs or single addresses, comma-separated."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"MODELPRESS_WEBHOOK_ALLOW_NETWORKS: {item!r} is not an IP network or address") from None
        if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net[0].ipv4_mapped is not None:
            # ::ffff:a.b.c.d/n means the IPv4 network (addresses are compared unmapped).
            net = ipaddress.IPv4Network((int(net[0].ipv4_mapped), net.prefixlen - 96))
        out.append(net)
    return tuple(out)


def _unmapped(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    out = []
    if addr.sixtofour is not None:
        out.append(addr.sixtofour)
    if addr.teredo is not None:
        out.extend(addr.teredo)  # (server, client)
    if addr in _NAT64:
        out.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    return out


def _kind(addr: IPAddress) -> str | None:
    """Why ``addr`` (unmapped) is not a global unicast address, or None if it is one."""
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link-local"
    if addr.is_multicast:
        return "multicast"
    if addr.is_reserved:
        return "reserved"
    if addr.is_private:
        return "private"
    if isinstance(addr, ipaddress.IPv6Address) and addr.is_site_local:
        return "site-local"
    if not addr.is_global:
        return "not globally routable"
    return None


def refusal(address: str | IPAddress, allowed: tuple[IPNetwork, ...] = ()) -> str | None:
    """Why the service may not connect to ``address`` (its kind: ``"loopback"``, ``"private"``,
    ...), or None if it may: a global unicast address, or one inside ``allowed``."""
    addr = _unmapped(ipaddress.ip_address(address) if isinstance(address, str) else address)
    if any(addr.version == net.version and addr in net for net in allowed):
        return None
    kind = _kind(addr)
    if kind is None and isinstance(addr, ipaddress.IPv6Address):
        for v4 in _embedded_ipv4(addr):
            inner = _kind(v4)
            if inner is not None:
                return f"an IPv6 address embedding {v4} ({inner})"
    return kind


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as e:
        raise TargetUnresolvable(f"{host} does not resolve ({e})") from None
    addresses: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        ip = str(sockaddr[0]).split("%", 1)[0]  # an IPv6 scope id ("fe80::1%eth0") is not part of the address
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise TargetUnresolvable(f"{host} does not resolve")
    return addresses


def check(url: str, allow: str = "") -> Target:
    """The target to connect to for ``url``, if every address its host resolves to is allowed
    (``allow``: the ``MODELPRESS_WEBHOOK_ALLOW_NETWORKS`` value). Raises ValueError (bad URL),
    TargetRefused, or TargetUnresolvable."""
    parts = parse(url)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    port = parts.port or (443 if scheme == "https" else 80)
    allowed = allow_networks(allow)
    addresses = _resolve(host, port)
    for ip in addresses:
        kind = refusal(ip, allowed)
        if kind is not None:
            shown = f"{ip} is {kind}" if ip == host else f"{host} resolves to {ip}, which is {kind}"
            raise TargetRefused(
                f"{shown}: only public addresses, or those in MODELPRESS_WEBHOOK_ALLOW_NETWORKS, may receive webhooks"
            )
    return Target(url=url, scheme=scheme, host=host, port=port, address=addresses[0])
