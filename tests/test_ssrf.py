"""The SSRF guard (agentjobs.engine.ssrf): URL shape, address screening, allow-list, DNS."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpcore
import pytest
import trio

from agentjobs.engine.ssrf import (
    PinnedBackend,
    ResolvedTarget,
    UnsafeWebhookURL,
    WebhookPolicy,
    address_problem,
    check_url,
    parse_url,
    target_key,
)

REFUSED = {
    "127.0.0.1": "loopback",
    "127.255.0.9": "loopback",
    "10.1.2.3": "private",
    "172.16.0.1": "private",
    "172.31.255.254": "private",
    "192.168.1.1": "private",
    "169.254.169.254": "link-local",  # cloud metadata
    "100.64.0.1": "carrier-grade NAT",
    "0.0.0.0": "unspecified",
    "224.0.0.1": "multicast",
    "240.0.0.1": "reserved",
    "255.255.255.255": "broadcast",
    "192.0.2.10": "documentation",
    "198.18.0.1": "benchmarking",
    "::1": "loopback",
    "::": "unspecified",
    "fe80::1": "link-local",
    "fc00::1": "unique-local",
    "fd12:3456::1": "unique-local",
    "fec0::1": "site-local",
    "ff02::1": "multicast",
    "2001:db8::1": "documentation",
    "::ffff:127.0.0.1": "IPv4-mapped form of a loopback",
    "::ffff:10.0.0.1": "IPv4-mapped form of a private",
    "::ffff:169.254.169.254": "IPv4-mapped form of a link-local",
    "::127.0.0.1": "IPv4-compatible",
    "64:ff9b::7f00:1": "NAT64 form of a loopback",
    "64:ff9b::a00:1": "NAT64 form of a private",
    "2002:7f00:1::1": "6to4 form of a loopback",
    "2002:c0a8:101::1": "6to4 form of a private",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2": "Teredo",
    "100::1": "discard",
}

PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.215.14",
    "2606:4700:4700::1111",
    "2a00:1450:4001:82a::200e",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
    "2002:808:808::1",
]


@pytest.mark.parametrize(("text", "kind"), sorted(REFUSED.items()))
def test_non_public_addresses_are_named(text: str, kind: str) -> None:
    problem = address_problem(ipaddress.ip_address(text))
    assert problem is not None and kind in problem


@pytest.mark.parametrize("text", PUBLIC)
def test_public_addresses_pass(text: str) -> None:
    assert address_problem(ipaddress.ip_address(text)) is None


def _url(addr: str, port: int = 8080) -> str:
    host = f"[{addr}]" if ":" in addr else addr
    return f"http://{host}:{port}/hook"


@pytest.mark.parametrize("text", sorted(REFUSED))
async def test_literal_urls_are_refused_permanently(text: str) -> None:
    with pytest.raises(UnsafeWebhookURL) as info:
        await check_url(_url(text))
    assert info.value.permanent
    assert "--webhook-allow" in info.value.reason


@pytest.mark.parametrize("text", PUBLIC)
async def test_public_literals_resolve_to_themselves(text: str) -> None:
    target = await check_url(_url(text, 443).replace("http:", "https:"))
    assert target.addresses == (text,)
    assert target.scheme == "https" and target.port == 443


async def test_numeric_tricks_are_screened_by_what_they_resolve_to() -> None:
    for url in ("http://2130706433/", "http://0x7f.1/", "http://017700000001/"):
        with pytest.raises(UnsafeWebhookURL, match="loopback"):
            await check_url(url)


async def test_localhost_name_is_refused_via_dns() -> None:
    for host in ("localhost", "LocalHost"):
        with pytest.raises(UnsafeWebhookURL) as info:
            await check_url(f"http://{host}:9000/x")
        assert "resolves to" in info.value.reason and "loopback" in info.value.reason
        assert not info.value.permanent  # a name's addresses can change: retried at delivery


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("ftp://example.com/x", "http or https"),
        ("file:///etc/passwd", "http or https"),
        ("javascript:alert(1)", "http or https"),
        ("http:///path", "host"),
        ("http://", "host"),
        ("", "non-empty"),
        ("http://example.com:99999/", "port"),
        ("http://exa mple.com/", "whitespace"),
        ("http://example.com/\r\nX-Injected: 1", "whitespace"),
        ("http://example.com/" + "a" * 3000, "longer"),
    ],
)
def test_url_shape(url: str, match: str) -> None:
    with pytest.raises(UnsafeWebhookURL, match=match):
        parse_url(url)


def test_target_key() -> None:
    assert target_key("https://Hooks.Example.com/a?b") == "hooks.example.com:443"
    assert target_key("http://[::1]:81/") == "[::1]:81"
    assert target_key("gopher://x") == "invalid"


# -- the operator's allow-list ---------------------------------------------------------------


def test_policy_parsing() -> None:
    policy = WebhookPolicy.parse("127.0.0.1/32, 10.0.0.0/8,hooks.internal *.corp.example ::1")
    assert [str(n) for n in policy.networks] == ["127.0.0.1/32", "10.0.0.0/8", "::1/128"]
    assert policy.hosts == {"hooks.internal", ".corp.example"}
    assert policy.allows_host("HOOKS.internal.")
    assert policy.allows_host("a.b.corp.example") and policy.allows_host("corp.example")
    assert not policy.allows_host("evilcorp.example")
    assert not policy.allows_host("hooks.internal.evil.com")
    assert WebhookPolicy.parse(None) == WebhookPolicy() == WebhookPolicy.parse("")
    assert WebhookPolicy.parse(["10.0.0.1", "192.168.0.0/16"]).networks[1].prefixlen == 16
    assert "10.0.0.0/8" in policy.describe()
    for bad in ("10.0.0.0/33", "bad host!", "http://x", "1.2.3"):
        with pytest.raises(ValueError, match="neither"):
            WebhookPolicy.parse(bad)


async def test_allowed_networks_open_exactly_those_ranges() -> None:
    policy = WebhookPolicy.parse("127.0.0.1/32,10.0.0.0/8")
    assert (await check_url("http://127.0.0.1:9/x", policy)).addresses == ("127.0.0.1",)
    assert (await check_url("http://10.200.0.1/", policy)).port == 80
    # the IPv4-mapped spelling of an allowed address is the same address
    assert await check_url("http://[::ffff:127.0.0.1]:9/", policy)
    for url in ("http://127.0.0.2/", "http://192.168.0.1/", "http://[::1]/"):
        with pytest.raises(UnsafeWebhookURL):
            await check_url(url, policy)


async def test_allowing_loopback_lets_localhost_through() -> None:
    policy = WebhookPolicy.parse("127.0.0.0/8,::1")
    target = await check_url("http://localhost:9000/x", policy)
    assert target.host == "localhost"
    assert target.addresses and all(ipaddress.ip_address(a).is_loopback for a in target.addresses)


# -- names: a fake resolver stands in for DNS --------------------------------------------------


class FakeResolver(trio.abc.HostnameResolver):
    def __init__(self, table: Mapping[str, list[str]], delay: float = 0.0) -> None:
        self.table = table
        self.delay = delay
        self.asked: list[str] = []

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[Any]:
        name = (host or b"").decode()
        self.asked.append(name)
        await trio.sleep(self.delay)
        if name not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        out: list[Any] = []
        for addr in self.table[name]:
            if ":" in addr:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (addr, port, 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (addr, port)))
        return out

    async def getnameinfo(
        self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int
    ) -> tuple[str, str]:
        raise NotImplementedError


@asynccontextmanager
async def fake_dns(
    table: Mapping[str, list[str]], delay: float = 0.0
) -> AsyncIterator[FakeResolver]:
    resolver = FakeResolver(table, delay)
    previous = trio.socket.set_custom_hostname_resolver(resolver)
    try:
        yield resolver
    finally:
        trio.socket.set_custom_hostname_resolver(previous)


DNS = {
    "public.example": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
    "mixed.example": ["93.184.215.14", "10.0.0.7"],  # one bad address is enough
    "internal.example": ["10.0.0.7"],
    "meta.example": ["169.254.169.254"],
    "v6private.example": ["fd00::5"],
    "zero.example": ["0.0.0.0"],
}


async def test_names_are_resolved_and_every_address_screened() -> None:
    async with fake_dns(DNS) as dns:
        target = await check_url("https://Public.Example/path?q=1", WebhookPolicy())
        assert target.addresses == tuple(DNS["public.example"])
        assert target.host == "public.example" and target.target == "/path?q=1"
        assert dns.asked == ["public.example"]
        for name, kind in (
            ("mixed.example", "10.0.0.7, a private"),
            ("internal.example", "private"),
            ("meta.example", "link-local"),
            ("v6private.example", "unique-local"),
        ):
            with pytest.raises(UnsafeWebhookURL, match=kind):
                await check_url(f"http://{name}/", WebhookPolicy())


async def test_allowed_host_names_may_resolve_anywhere_but_unspecified() -> None:
    policy = WebhookPolicy.parse("internal.example,.example.org,zero.example")
    async with fake_dns({**DNS, "a.example.org": ["192.168.1.5"]}):
        assert (await check_url("http://internal.example/", policy)).addresses == ("10.0.0.7",)
        assert await check_url("http://a.example.org/", policy)
        with pytest.raises(UnsafeWebhookURL, match="unspecified"):
            await check_url("http://zero.example/", policy)
        with pytest.raises(UnsafeWebhookURL):
            await check_url("http://meta.example/", policy)


async def test_unresolvable_and_slow_names_are_refused_but_not_permanently() -> None:
    async with fake_dns(DNS):
        with pytest.raises(UnsafeWebhookURL, match="cannot be resolved") as info:
            await check_url("http://nowhere.example/")
        assert not info.value.permanent
    async with fake_dns(DNS, delay=10):
        with trio.fail_after(2):
            with pytest.raises(UnsafeWebhookURL, match="took longer") as info:
                await check_url("http://public.example/", timeout=0.05)
        assert not info.value.permanent


async def test_resolution_does_not_block_the_event_loop() -> None:
    """A slow lookup runs beside other tasks instead of freezing them."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.01)

    async with fake_dns(DNS, delay=0.3), trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await check_url("http://public.example/")
        nursery.cancel_scope.cancel()
    assert ticks >= 10


# -- pinning ---------------------------------------------------------------------------------


class RecordingBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, refuse: set[str]) -> None:
        self.dialled: list[tuple[str, int]] = []
        self.refuse = refuse

    async def connect_tcp(self, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        self.dialled.append((host, port))
        if host in self.refuse:
            raise httpcore.ConnectError("refused")
        return "stream"

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


async def test_pinned_backend_dials_only_the_screened_addresses() -> None:
    target = ResolvedTarget("https", "hooks.example", 443, ("203.0.114.1", "203.0.114.2"))
    inner = RecordingBackend(refuse={"203.0.114.1"})
    backend = PinnedBackend(target, inner)
    assert await backend.connect_tcp("hooks.example", 443) == "stream"  # type: ignore[comparison-overlap]
    assert inner.dialled == [("203.0.114.1", 443), ("203.0.114.2", 443)]
    with pytest.raises(httpcore.ConnectError, match=r"only hooks\.example:443 was checked"):
        await backend.connect_tcp("other.example", 443)
    with pytest.raises(httpcore.ConnectError):
        await backend.connect_tcp("hooks.example", 8443)
    with pytest.raises(httpcore.ConnectError, match="unix"):
        await backend.connect_unix_socket("/run/docker.sock")
    inner.refuse = {"203.0.114.1", "203.0.114.2"}
    with pytest.raises(httpcore.ConnectError):
        await backend.connect_tcp("hooks.example", 443)
    assert target.host_header == "hooks.example"
    assert ResolvedTarget("http", "::1", 81, ("::1",)).host_header == "[::1]:81"
