"""The SSRF guard: the address table, URL checks, connect-time checks and redirects.

Servers listen on 127.0.0.1 and 127.0.0.2 (both loopback on Linux); tests that must reach
them allow exactly those addresses and show that everything else stays refused.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from collections import Counter
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer
from yarl import URL

from processing.sources import SourceError, read_range
from processing.sources_url import UrlByteSource, UrlSourceSettings, make_url_session
from processing.ssrf import (
    AddressBlocked,
    AddressNotAllowed,
    AddressPolicy,
    GuardedResolver,
    address_error,
    check_url,
    forbidden_reason,
    guarded_connector,
    parse_host_address,
    parse_networks,
)

ServerFactory = Callable[..., Awaitable[TestServer]]

REFUSED = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),  # the cloud metadata service
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "private"),  # "this network"
    ("100.64.0.1", "not globally routable"),  # carrier-grade NAT
    ("192.0.2.1", "private"),  # documentation
    ("198.18.0.1", "private"),  # benchmarking
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("fec0::1", "site-local"),
    ("ff02::1", "multicast"),
    ("2001:db8::1", "private"),  # documentation
    ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
    ("::ffff:169.254.169.254", "link-local"),
    ("::ffff:10.0.0.1", "private"),
    ("::ffff:0.0.0.0", "unspecified"),
    ("64:ff9b::7f00:1", "loopback"),  # NAT64 of 127.0.0.1
    ("2002:7f00:1::1", "loopback"),  # 6to4 of 127.0.0.1
    ("::127.0.0.1", "reserved"),  # IPv4-compatible (deprecated)
]

ALLOWED = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.215.14",
    "2606:4700:4700::1111",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
]


@pytest.mark.parametrize(("text", "reason"), REFUSED)
def test_refused_by_default(text: str, reason: str) -> None:
    address = ipaddress.ip_address(text)
    assert forbidden_reason(address) == reason
    with pytest.raises(AddressNotAllowed) as caught:
        AddressPolicy().check(text, address)
    assert (caught.value.code, caught.value.retryable) == ("address_not_allowed", False)


@pytest.mark.parametrize("text", ALLOWED)
def test_public_addresses_pass(text: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(text)) is None
    AddressPolicy().check(text, ipaddress.ip_address(text))


@pytest.mark.parametrize(("text", "_reason"), REFUSED)
def test_allow_private_switches_the_check_off(text: str, _reason: str) -> None:
    assert AddressPolicy(allow_private=True).refusal(ipaddress.ip_address(text)) is None


def test_allow_list_lets_exactly_its_networks_through() -> None:
    policy = AddressPolicy.from_config(allow_networks="10.1.0.0/16, 127.0.0.2, fd00::/8")
    assert policy.refusal(ipaddress.ip_address("10.1.200.3")) is None
    assert policy.refusal(ipaddress.ip_address("::ffff:10.1.0.1")) is None  # mapped matches
    assert policy.refusal(ipaddress.ip_address("127.0.0.2")) is None
    assert policy.refusal(ipaddress.ip_address("fd00::5")) is None
    assert policy.refusal(ipaddress.ip_address("10.2.0.1")) == "private"
    assert policy.refusal(ipaddress.ip_address("127.0.0.1")) == "loopback"
    assert policy.refusal(ipaddress.ip_address("169.254.169.254")) == "link-local"


def test_parse_networks_names_the_bad_entry() -> None:
    assert parse_networks("") == ()
    assert parse_networks(["10.0.0.0/8", " "]) == (ipaddress.ip_network("10.0.0.0/8"),)
    with pytest.raises(ValueError, match="'10.0.0.0/33'"):
        parse_networks("192.168.0.0/16,10.0.0.0/33")


@pytest.mark.parametrize(
    ("host", "expected", "canonical"),
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("2130706433", "127.0.0.1", False),  # decimal
        ("017700000001", "127.0.0.1", False),  # octal
        ("0177.0.0.1", "127.0.0.1", False),
        ("0x7f.0.0.1", "127.0.0.1", False),  # hex
        ("0x7f000001", "127.0.0.1", False),
        ("127.1", "127.0.0.1", False),  # short forms
        ("10.1.258", "10.1.1.2", False),
        ("0", "0.0.0.0", False),
        ("[::ffff:7f00:1]", "::ffff:7f00:1", True),
        ("fe80::1%25eth0", "fe80::1", True),
        ("example.com", None, True),
        ("0x7g.0.0.1", None, True),
        ("08.0.0.1", None, True),  # not octal: a name (and unresolvable)
        ("1.2.3.4.5", None, True),
    ],
)
def test_host_addresses_are_read_as_inet_aton_reads_them(
    host: str, expected: str | None, canonical: bool
) -> None:
    address, is_canonical = parse_host_address(host)
    assert (str(address) if address else None, is_canonical) == (expected, canonical)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://[::1]:8080/",
        "http://[::]/",
        "http://0.0.0.0:9000/",
        "http://169.254.169.254/latest/meta-data/",
        "http://2130706433/",
        "http://0177.0.0.1/",
        "http://0x7f.0.0.1/",
        "http://0x7f000001/",
        "http://127.1/",
        "http://[::ffff:127.0.0.1]/",
        "https://[::ffff:a9fe:a9fe]/",
        "http://[fe80::1%25eth0]/",
        "http://10.0.0.1./",
    ],
)
def test_check_url_refuses_private_literal_hosts(url: str) -> None:
    with pytest.raises(AddressNotAllowed):
        check_url(URL(url), AddressPolicy())


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("file:///etc/passwd", "scheme_not_allowed"),
        ("ftp://example.com/x", "scheme_not_allowed"),
        ("gopher://example.com/", "scheme_not_allowed"),
        ("/relative/path", "scheme_not_allowed"),
        ("http:///no-host", "invalid_url"),
        ("http://134744072/", "invalid_url"),  # 8.8.8.8 spelled as one number
    ],
)
def test_check_url_refuses_other_urls(url: str, code: str) -> None:
    with pytest.raises(SourceError) as caught:
        check_url(URL(url), AddressPolicy())
    assert (caught.value.code, caught.value.retryable) == (code, False)


def test_check_url_passes_names_and_public_addresses() -> None:
    check_url(URL("https://example.com/a?b=c"), AddressPolicy())
    check_url(URL("http://8.8.8.8/"), AddressPolicy())


# --- connect time --------------------------------------------------------------------------


class _ScriptedResolver(AbstractResolver):
    """Answers each lookup with the next address of a script (a rebinding DNS server)."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        address = self.answers.pop(0)
        return [
            ResolveResult(hostname=host, host=address, port=port, family=family, proto=0, flags=0)
        ]

    async def close(self) -> None:
        pass


async def test_every_resolution_is_judged_so_rebinding_is_refused() -> None:
    resolver = GuardedResolver(AddressPolicy(), _ScriptedResolver("93.184.215.14", "127.0.0.1"))
    first = await resolver.resolve("rebind.example", 80)
    assert first[0]["host"] == "93.184.215.14"
    with pytest.raises(AddressBlocked) as caught:
        await resolver.resolve("rebind.example", 80)
    assert isinstance(address_error(caught.value), AddressNotAllowed)


async def test_one_private_record_refuses_the_host() -> None:
    class Mixed(_ScriptedResolver):
        async def resolve(
            self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
        ) -> list[ResolveResult]:
            return [
                ResolveResult(hostname=host, host=a, port=port, family=family, proto=0, flags=0)
                for a in ("93.184.215.14", "10.0.0.7")
            ]

    with pytest.raises(AddressBlocked, match="10.0.0.7"):
        await GuardedResolver(AddressPolicy(), Mixed()).resolve("mixed.example", 80)


DATA = bytes(range(256)) * 4096


@pytest.fixture
def target_hits() -> Counter[str]:
    return Counter()


@pytest.fixture
async def target(aiohttp_server: ServerFactory, target_hits: Counter[str]) -> TestServer:
    """The server an attacker wants to reach, on 127.0.0.1; counts every request."""

    async def data(request: web.Request) -> web.Response:
        target_hits[request.path] += 1
        return web.Response(body=DATA)

    app = web.Application()
    app.router.add_get("/data", data)
    return await aiohttp_server(app)


@pytest.fixture
async def hop(aiohttp_server: ServerFactory, target: TestServer) -> TestServer:
    """An "allowed" server on 127.0.0.2 whose answers redirect elsewhere."""
    routes = {
        "/to-loopback": f"http://127.0.0.1:{target.port}/data",
        "/to-localhost": f"http://localhost:{target.port}/data",
        "/to-decimal": f"http://2130706433:{target.port}/data",
        "/to-mapped": f"http://[::ffff:127.0.0.1]:{target.port}/data",
        "/to-file": "file:///etc/passwd",
        "/loop": "/loop",
        "/to-self": "/data",
    }

    async def redirect(request: web.Request) -> web.Response:
        if request.path == "/data":
            return web.Response(body=DATA)
        return web.Response(status=302, headers={"Location": routes[request.path]})

    app = web.Application()
    app.router.add_get("/{name}", redirect)
    return await aiohttp_server(app, host="127.0.0.2")


def settings_with(policy: AddressPolicy) -> UrlSourceSettings:
    return UrlSourceSettings(policy=policy, backoff_initial=0.01, backoff_max=0.02)


ONLY_HOP = AddressPolicy.from_config(allow_networks="127.0.0.2/32")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/data",
        "http://localhost:{port}/data",
        "http://2130706433:{port}/data",
        "http://0x7f.0.0.1:{port}/data",
        "http://[::ffff:127.0.0.1]:{port}/data",
    ],
)
async def test_private_urls_are_refused_without_a_request(
    target: TestServer, target_hits: Counter[str], url: str
) -> None:
    with pytest.raises(SourceError) as caught:
        await UrlByteSource.open(url.format(port=target.port), settings_with(AddressPolicy()))
    assert (caught.value.code, caught.value.retryable) == ("address_not_allowed", False)
    assert sum(target_hits.values()) == 0


@pytest.mark.parametrize("url", ["http://127.0.0.1:{port}/data", "http://localhost:{port}/data"])
async def test_the_connector_refuses_at_connect_time(
    target: TestServer, target_hits: Counter[str], url: str
) -> None:
    """Without check_url in front: the literal is stopped by the socket factory, the name by
    the resolver; neither reaches the server."""
    async with make_url_session(settings_with(ONLY_HOP)) as session:
        with pytest.raises(aiohttp.ClientError) as caught:
            await session.get(url.format(port=target.port))
    blocked = address_error(caught.value)
    assert blocked is not None and blocked.address.is_loopback
    assert sum(target_hits.values()) == 0


@pytest.mark.parametrize("path", ["/to-loopback", "/to-localhost", "/to-decimal", "/to-mapped"])
async def test_a_redirect_into_a_private_address_is_refused(
    hop: TestServer, target_hits: Counter[str], path: str
) -> None:
    with pytest.raises(SourceError) as caught:
        await UrlByteSource.open(f"http://127.0.0.2:{hop.port}{path}", settings_with(ONLY_HOP))
    assert (caught.value.code, caught.value.retryable) == ("address_not_allowed", False)
    assert sum(target_hits.values()) == 0


async def test_a_redirect_to_another_scheme_is_refused(hop: TestServer) -> None:
    with pytest.raises(SourceError) as caught:
        await UrlByteSource.open(f"http://127.0.0.2:{hop.port}/to-file", settings_with(ONLY_HOP))
    assert caught.value.code == "scheme_not_allowed"


async def test_redirects_are_bounded(hop: TestServer) -> None:
    with pytest.raises(SourceError) as caught:
        await UrlByteSource.open(f"http://127.0.0.2:{hop.port}/loop", settings_with(ONLY_HOP))
    assert (caught.value.code, caught.value.retryable) == ("too_many_redirects", False)


async def test_a_redirect_within_the_allowed_host_is_followed(hop: TestServer) -> None:
    url = f"http://127.0.0.2:{hop.port}/to-self"
    async with await UrlByteSource.open(url, settings_with(ONLY_HOP)) as source:
        assert source.final_url.path == "/data"
        assert source.sha256 == hashlib.sha256(DATA).hexdigest()


async def test_allowed_when_the_configuration_allows_private_addresses(
    hop: TestServer, target: TestServer, target_hits: Counter[str]
) -> None:
    url = f"http://127.0.0.2:{hop.port}/to-loopback"
    async with await UrlByteSource.open(url, settings_with(AddressPolicy(allow_private=True))) as s:
        assert s.final_url.host == "127.0.0.1" and s.final_url.port == target.port
        assert await read_range(s, 0, s.size) == DATA
    assert target_hits["/data"] == 1


async def test_a_name_that_rebinds_to_a_private_address_is_refused_on_reconnect(
    hop: TestServer, target: TestServer, target_hits: Counter[str]
) -> None:
    """DNS answers the allowed 127.0.0.2 first, then 127.0.0.1: each connection resolves
    afresh (no DNS cache) and the second one is refused."""
    dns = _ScriptedResolver("127.0.0.2", "127.0.0.1")
    connector = guarded_connector(ONLY_HOP, resolver=dns, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(f"http://files.example:{hop.port}/data") as response:
            assert await response.read() == DATA
        with pytest.raises(aiohttp.ClientError) as caught:
            await session.get(f"http://files.example:{target.port}/data")
    blocked = address_error(caught.value)
    assert blocked is not None and str(blocked.address) == "127.0.0.1"
    assert sum(target_hits.values()) == 0
