"""SSRF guard for URL sources: which addresses a transfer may connect to (SPEC §4).

"URL sources of transfers refuse private, loopback and link-local addresses unless allowed by
configuration (SSRF), and never follow a redirect into them." The rule is enforced in three
places, because each alone can be bypassed:

1. :func:`check_url` before every request, *including every redirect hop* (the URL source
   follows redirects itself, never aiohttp): only ``http``/``https``; a host written as an
   address -- also in the legacy forms ``2130706433``, ``0177.0.0.1``, ``0x7f.1``, ``127.1``
   that ``inet_aton`` accepts -- is judged as that address.
2. :class:`GuardedResolver`: every address a host name resolves to is judged; one refused
   address refuses the host (a name with a mix of public and private records is suspect).
3. The connector's socket factory (:func:`guarded_connector`) judges the address of *every
   socket it connects*, whatever the resolver said or whatever path aiohttp took (IP literals
   skip the resolver). This is the check that DNS rebinding cannot race: the address judged is
   the address connected to.

What is refused (:func:`forbidden_reason`): unspecified (``0.0.0.0``, ``::``), loopback,
link-local (``169.254.0.0/16`` with the cloud metadata service, ``fe80::/10``), multicast,
private (RFC 1918, ``fc00::/7``), reserved, site-local, and anything else not globally
routable (e.g. ``100.64.0.0/10``, documentation ranges). An IPv4 address embedded in IPv6 is
judged as IPv4: IPv4-mapped ``::ffff:a.b.c.d`` and NAT64 ``64:ff9b::a.b.c.d`` by the embedded
address alone, 6to4 ``2002:AABB:CCDD::`` by both.

Configuration (:class:`AddressPolicy`): ``allow_private=True`` switches the check off (a
trusted network, tests); ``allow_networks`` lets chosen CIDRs through while everything else
stays refused. HTTP proxies are never used for URL sources (``trust_env`` stays off): a proxy
would connect on our behalf to an address we never see.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohappyeyeballs import AddrInfoType, SocketFactoryType
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from processing.sources import SourceError

__all__ = [
    "ALLOWED_SCHEMES",
    "Address",
    "AddressBlocked",
    "AddressNotAllowed",
    "AddressPolicy",
    "GuardedResolver",
    "Network",
    "UrlNotAllowed",
    "address_error",
    "check_url",
    "forbidden_reason",
    "guarded_connector",
    "parse_host_address",
    "parse_networks",
]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The only URL schemes a transfer may fetch, on the first request and on every redirect.
ALLOWED_SCHEMES = frozenset({"http", "https"})

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIXTOFOUR = ipaddress.IPv6Network("2002::/16")


class AddressNotAllowed(SourceError):
    """The URL's host is (or resolves to) an address the policy refuses. Never retryable."""

    def __init__(self, host: str, address: Address, reason: str) -> None:
        super().__init__(
            f"{host!r} is {address} ({reason}): private addresses are not allowed as a source",
            retryable=False,
            code="address_not_allowed",
        )
        self.host = host
        self.address = address
        self.reason = reason


class UrlNotAllowed(SourceError):
    """The URL cannot be fetched at all: other scheme, no host, an odd numeric host."""

    def __init__(self, message: str, *, code: str = "invalid_url") -> None:
        super().__init__(message, retryable=False, code=code)


class AddressBlocked(OSError):
    """Raised inside aiohttp's connect path (resolver, socket factory), where only an
    ``OSError`` travels cleanly; :func:`address_error` turns it back into
    :class:`AddressNotAllowed` for the caller."""

    def __init__(self, host: str, address: Address, reason: str) -> None:
        super().__init__(errno.EACCES, f"connection to {address} ({reason}) refused by policy")
        self.host = host
        self.address = address
        self.reason = reason


# --- judging one address -------------------------------------------------------------------


def _judged_forms(address: Address) -> list[Address]:
    """The addresses that stand for `address` when it is judged (embedded IPv4 included)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # ::ffff:a.b.c.d reaches a.b.c.d, nothing else
            return [address.ipv4_mapped]
        if address in _NAT64:  # 64:ff9b::a.b.c.d: the NAT64 gateway connects to a.b.c.d
            return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
        if address in _SIXTOFOUR and address.sixtofour is not None:
            return [address, address.sixtofour]
    return [address]


def forbidden_reason(address: Address) -> str | None:
    """Why connecting to `address` is refused by default, or None for a public address."""
    for form in _judged_forms(address):
        checks: list[tuple[str, bool]] = [
            ("unspecified", form.is_unspecified),
            ("loopback", form.is_loopback),
            ("link-local", form.is_link_local),
            ("multicast", form.is_multicast),
            ("reserved", form.is_reserved),
            ("private", form.is_private),
        ]
        if isinstance(form, ipaddress.IPv6Address):
            checks.append(("site-local", form.is_site_local))
        checks.append(("not globally routable", not form.is_global))
        for reason, hit in checks:
            if hit:
                return reason
    return None


def parse_networks(text: str | Iterable[str]) -> tuple[Network, ...]:
    """CIDRs from ``"10.0.0.0/8, fd00::/8"`` (or an iterable); a bare address is a /32 or
    /128. Raises ``ValueError`` naming the bad entry."""
    items = text.split(",") if isinstance(text, str) else list(text)
    networks: list[Network] = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"not an IP network (CIDR): {item!r}") from None
    return tuple(networks)


@dataclass(frozen=True, kw_only=True)
class AddressPolicy:
    """Which addresses URL sources may connect to.

    ``allow_private``: no address check at all (default False: SPEC §4).
    ``allow_networks``: CIDRs allowed even though private/loopback/...; everything else stays
    refused. An embedded IPv4 address (``::ffff:10.0.0.1``) matches IPv4 networks.
    """

    allow_private: bool = False
    allow_networks: tuple[Network, ...] = ()

    @classmethod
    def from_config(
        cls, *, allow_private: bool = False, allow_networks: str | Iterable[str] = ()
    ) -> AddressPolicy:
        """From setting values, e.g. ``from_config(allow_networks="10.1.0.0/16")``."""
        return cls(allow_private=allow_private, allow_networks=parse_networks(allow_networks))

    def refusal(self, address: Address) -> str | None:
        """Why `address` is refused under this policy, or None when it is allowed."""
        if self.allow_private:
            return None
        forms = [address, *_judged_forms(address)]
        if any(form in network for form in forms for network in self.allow_networks):
            return None
        return forbidden_reason(address)

    def check(self, host: str, address: Address) -> None:
        """Raise :class:`AddressNotAllowed` unless `address` (of `host`) is allowed."""
        reason = self.refusal(address)
        if reason is not None:
            raise AddressNotAllowed(host, address, reason)


# --- URLs ----------------------------------------------------------------------------------

_LEGACY_IPV4 = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}$", re.IGNORECASE)


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """`host` read the way ``inet_aton`` (and so ``getaddrinfo``) reads it: 1 to 4 parts,
    each decimal, octal (leading 0) or hex (0x); the last part fills the remaining bytes."""
    if not _LEGACY_IPV4.match(host):
        return None
    values: list[int] = []
    for part in host.split("."):
        lowered = part.lower()
        if lowered.startswith("0x"):
            values.append(int(lowered[2:] or "0", 16))
        elif len(part) > 1 and part.startswith("0"):
            if any(c in "89" for c in part):
                return None
            values.append(int(part, 8))
        else:
            values.append(int(part))
    *head, last = values
    if any(v > 0xFF for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    number = last
    for index, value in enumerate(head):
        number |= value << (8 * (3 - index))
    return ipaddress.IPv4Address(number)


def parse_host_address(host: str) -> tuple[Address | None, bool]:
    """``(address, canonical)`` for a URL host written as an IP address, ``(None, True)`` for
    a name. `canonical` is False for the legacy numeric forms (``2130706433``, ``127.1``)."""
    bare = host.strip("[]").rstrip(".")
    bare = bare.split("%", 1)[0]  # an IPv6 zone id (fe80::1%eth0) names an interface only
    try:
        return ipaddress.ip_address(bare), True
    except ValueError:
        pass
    legacy = _legacy_ipv4(bare)
    return (legacy, False) if legacy is not None else (None, True)


def check_url(url: URL, policy: AddressPolicy) -> None:
    """Refuse `url` before any connection: scheme, host, and a host that is an address.

    Host *names* are judged later, on every address they resolve to (GuardedResolver and the
    socket factory); this catches what never reaches the resolver.
    """
    if url.scheme not in ALLOWED_SCHEMES:
        raise UrlNotAllowed(
            f"only http and https URLs can be fetched, not {url.scheme or 'a relative'!r} URL",
            code="scheme_not_allowed",
        )
    host = url.raw_host
    if not host:
        raise UrlNotAllowed(f"URL without a host: {str(url)!r}")
    address, canonical = parse_host_address(host)
    if address is None:
        return
    policy.check(host, address)
    if not canonical:
        # aiohttp refuses these too; say so in our words.
        raise UrlNotAllowed(f"host {host!r} is a non-canonical IPv4 address")


# --- aiohttp glue: the connect-time checks -------------------------------------------------


def _address_of(text: str) -> Address:
    return ipaddress.ip_address(text.split("%", 1)[0])


class GuardedResolver(AbstractResolver):
    """Resolves with `inner` and refuses the whole host when any address it resolved to is
    refused by the policy (raises :class:`AddressBlocked`).

    The default inner resolver is aiohttp's ``ThreadedResolver`` (the system's
    ``getaddrinfo``, which needs no closing; aiohttp does not close a resolver it was given).
    """

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self._inner = inner if inner is not None else aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            address = _address_of(result["host"])
            reason = self.policy.refusal(address)
            if reason is not None:
                raise AddressBlocked(host, address, reason)
        return results

    async def close(self) -> None:
        await self._inner.close()


def _guarded_socket_factory(policy: AddressPolicy) -> SocketFactoryType:
    def factory(addr_info: AddrInfoType) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        address = _address_of(str(sockaddr[0]))
        reason = policy.refusal(address)
        if reason is not None:
            raise AddressBlocked(str(sockaddr[0]), address, reason)
        return socket.socket(family=family, type=type_, proto=proto)

    return factory


def guarded_connector(
    policy: AddressPolicy, *, resolver: AbstractResolver | None = None, **kwargs: Any
) -> aiohttp.TCPConnector:
    """A ``TCPConnector`` that connects only to addresses `policy` allows.

    `resolver` is the one wrapped by :class:`GuardedResolver` (default: threaded
    ``getaddrinfo``). No DNS cache: every connection resolves afresh and is judged (the socket
    factory would catch a stale cached address anyway). Extra `kwargs` go to ``TCPConnector``
    (limits, ssl). Create it inside a running event loop.
    """
    return aiohttp.TCPConnector(
        resolver=GuardedResolver(policy, resolver),
        socket_factory=_guarded_socket_factory(policy),
        use_dns_cache=False,
        **kwargs,
    )


def address_error(exc: BaseException) -> AddressNotAllowed | None:
    """The :class:`AddressNotAllowed` behind an aiohttp connection error, if policy caused it
    (aiohttp wraps our ``AddressBlocked`` in ``ClientConnectorError`` and friends)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, AddressNotAllowed):
            return current
        if isinstance(current, AddressBlocked):
            return AddressNotAllowed(current.host, current.address, current.reason)
        inner = getattr(current, "os_error", None)
        if isinstance(inner, BaseException) and id(inner) not in seen:
            current = inner
        else:
            current = current.__cause__ or current.__context__
    return None
