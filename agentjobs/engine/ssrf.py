"""Which webhook URLs the server may call, and a connection that goes only where we checked.

Why this exists
---------------

A webhook URL is an address chosen by whoever submits a run, and the server fetches it from
inside the operator's network. Without a guard, `webhook_url=http://169.254.169.254/...`
or `http://10.0.0.5:6379/` turns the job server into a proxy onto internal services (SSRF).
So:

* **Scheme and shape.** Only `http` and `https` URLs with a host are accepted.
* **Every resolved address must be public.** The host is resolved asynchronously
  (`trio.socket.getaddrinfo`: numeric hosts inline, names in a worker thread, so a slow DNS
  server never blocks the event loop) and *all* its addresses are screened; one private
  address is enough to refuse, because the connection could land on any of them.
  Address tricks (`2130706433`, `0x7f.1`, `localhost.`, IPv4-mapped IPv6, NAT64 and 6to4
  addresses embedding a private IPv4) are caught because we screen what the resolver
  returns, not what the URL looks like.
* **Pinning.** A check is worthless if the HTTP client resolves the name again and gets a
  different answer (DNS rebinding). `PinnedBackend` is an httpcore network backend that
  connects only to the screened addresses, while the request keeps the URL's host for the
  `Host` header and for TLS (SNI and certificate verification).
* **Operator override.** On-prem setups legitimately deliver to private receivers.
  `WebhookPolicy.parse("127.0.0.1/32,10.0.0.0/8,hooks.internal")` allows networks and host
  names explicitly (`--webhook-allow`, `AGENTJOBS_WEBHOOK_ALLOW`).

The address table is spelled out here (IANA special-purpose registries) rather than taken
from `ipaddress.is_private`/`is_global`, whose answers changed between Python releases; those
properties are consulted as a second, stricter net only.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
from collections.abc import Iterable
from typing import Final

import attrs
import httpcore
import httpx
import trio

__all__ = [
    "PinnedBackend",
    "ResolvedTarget",
    "UnsafeWebhookURL",
    "WebhookPolicy",
    "address_problem",
    "check_url",
    "parse_url",
    "target_key",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL_LENGTH: Final = 2048
DEFAULT_RESOLVE_TIMEOUT: Final = 5.0
_ALLOW_HINT: Final = "; an operator can allow it with --webhook-allow"


class UnsafeWebhookURL(ValueError):
    """The URL may not be called. `reason` is a sentence fit for a 422 `detail`.

    `permanent` tells a delivery whether retrying can help: a bad scheme or a private IP
    literal never changes, but a name that does not resolve (or resolves to a private
    address) may after a DNS change, so those attempts are retried like network errors.
    """

    def __init__(self, reason: str, *, permanent: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


# -- the address table ----------------------------------------------------------------------

_V4_BLOCKED: Final[tuple[tuple[ipaddress.IPv4Network, str], ...]] = tuple(
    (ipaddress.IPv4Network(net), why)
    for net, why in (
        ("0.0.0.0/8", "an unspecified ('this network') address"),
        ("10.0.0.0/8", "a private address"),
        ("100.64.0.0/10", "a shared (carrier-grade NAT) address"),
        ("127.0.0.0/8", "a loopback address"),
        ("169.254.0.0/16", "a link-local address"),
        ("172.16.0.0/12", "a private address"),
        ("192.0.0.0/24", "an IETF protocol assignment address"),
        ("192.0.2.0/24", "a documentation address"),
        ("192.88.99.0/24", "a 6to4 relay anycast address"),
        ("192.168.0.0/16", "a private address"),
        ("198.18.0.0/15", "a benchmarking address"),
        ("198.51.100.0/24", "a documentation address"),
        ("203.0.113.0/24", "a documentation address"),
        ("224.0.0.0/4", "a multicast address"),
        ("255.255.255.255/32", "the broadcast address"),
        ("240.0.0.0/4", "a reserved address"),
    )
)

_V6_BLOCKED: Final[tuple[tuple[ipaddress.IPv6Network, str], ...]] = tuple(
    (ipaddress.IPv6Network(net), why)
    for net, why in (
        ("::/128", "the unspecified address"),
        ("::1/128", "a loopback address"),
        ("::/96", "an IPv4-compatible address (deprecated)"),
        ("64:ff9b:1::/48", "a local-use NAT64 address"),
        ("100::/64", "a discard-only address"),
        ("2001:db8::/32", "a documentation address"),
        ("3fff::/20", "a documentation address"),
        ("5f00::/16", "a segment-routing address"),
        ("fc00::/7", "a unique-local (private) address"),
        ("fe80::/10", "a link-local address"),
        ("fec0::/10", "a site-local address (deprecated)"),
        ("ff00::/8", "a multicast address"),
    )
)

_GLOBAL_UNICAST_V6: Final = ipaddress.IPv6Network("2000::/3")
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
_IETF_V6: Final = ipaddress.IPv6Network("2001::/23")  # Teredo, ORCHID, AMT, ... : not hosts


def _v4_problem(addr: ipaddress.IPv4Address) -> str | None:
    for net, why in _V4_BLOCKED:
        if addr in net:
            return why
    if not addr.is_global:
        return "not a globally routable address"
    return None


def address_problem(addr: IPAddress) -> str | None:
    """Why `addr` is not a public unicast address (a noun phrase), or None if it is.

    IPv6 forms that carry an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`, NAT64
    `64:ff9b::/96`, 6to4 `2002::/16`, Teredo) are judged by the IPv4 address inside, since
    that is where the packets end up.
    """
    if isinstance(addr, ipaddress.IPv4Address):
        return _v4_problem(addr)
    addr = ipaddress.IPv6Address(addr.packed)  # drop a %scope: it does not change the verdict
    mapped = addr.ipv4_mapped
    if mapped is not None:
        inner = _v4_problem(mapped)
        return f"an IPv4-mapped form of {inner}" if inner else None
    if addr in _NAT64:
        embedded = ipaddress.IPv4Address(addr.packed[-4:])
        inner = _v4_problem(embedded)
        return f"a NAT64 form of {inner}" if inner else None
    sixtofour = addr.sixtofour
    if sixtofour is not None:
        inner = _v4_problem(sixtofour)
        return f"a 6to4 form of {inner}" if inner else None
    teredo = addr.teredo
    if teredo is not None:
        for part in teredo:
            inner = _v4_problem(part)
            if inner:
                return f"a Teredo address embedding {inner}"
        return "a Teredo tunnel address"
    for net, why in _V6_BLOCKED:
        if addr in net:
            return why
    if addr in _IETF_V6:
        return "an IETF protocol assignment address"
    if addr not in _GLOBAL_UNICAST_V6:
        return "outside the global unicast range"
    if not addr.is_global:
        return "not a globally routable address"
    return None


def _unwrap(addr: IPAddress) -> IPAddress:
    """The IPv4 address behind an IPv4-mapped IPv6 one, so one allow entry covers both."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        return ipaddress.IPv6Address(addr.packed)
    return addr


# -- the operator's policy ---------------------------------------------------------------------

_HOST_RE: Final = re.compile(r"^(\*\.|\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_-]+$")


def _norm_host(host: str) -> str:
    return host.strip().rstrip(".").lower()


@attrs.frozen(slots=True)
class WebhookPolicy:
    """What the operator allows beyond the public internet.

    `networks`: addresses inside any of them are accepted whatever their kind.
    `hosts`: URLs naming one of these hosts are accepted whatever they resolve to (a name
    starting with `.` or `*.` covers its subdomains). The unspecified address and multicast
    stay refused even then: they are never a receiver.
    """

    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, spec: str | Iterable[str] | None) -> WebhookPolicy:
        """From `"127.0.0.1/32,10.0.0.0/8,hooks.internal"` (or a list of such strings).

        Raises ValueError naming the entry that is neither a network nor a host name.
        """
        if spec is None:
            return cls()
        items = [spec] if isinstance(spec, str) else list(spec)
        networks: list[IPNetwork] = []
        hosts: set[str] = set()
        for item in items:
            for raw in re.split(r"[,\s]+", item):
                entry = raw.strip()
                if not entry:
                    continue
                try:
                    networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                    continue
                except ValueError:
                    pass
                host = _norm_host(entry)
                if not _HOST_RE.match(host) or host.replace(".", "").isdigit() or "/" in host:
                    raise ValueError(
                        f"webhook allow entry {entry!r} is neither an IP network "
                        "(10.0.0.0/8, 127.0.0.1) nor a host name (hooks.internal, .internal)"
                    )
                hosts.add("." + host[2:] if host.startswith("*.") else host)
        return cls(tuple(networks), frozenset(hosts))

    def allows_host(self, host: str) -> bool:
        host = _norm_host(host)
        if host in self.hosts:
            return True
        return any(h.startswith(".") and (host.endswith(h) or host == h[1:]) for h in self.hosts)

    def allows_address(self, addr: IPAddress) -> bool:
        plain = _unwrap(addr)
        return any(plain.version == net.version and plain in net for net in self.networks)

    def describe(self) -> str:
        """For the start-up log line: what is allowed besides public addresses."""
        parts = [str(n) for n in self.networks] + sorted(self.hosts)
        return ", ".join(parts) if parts else "public addresses only"


# -- URLs ------------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class ResolvedTarget:
    """A URL that passed the policy, with the addresses a connection may use (in order).

    `host` is the URL's host in ASCII (IDNA) form without brackets: what goes into the
    `Host` header and TLS SNI. `target` is the path and query to request.
    """

    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]
    target: str = "/"
    auth: tuple[str, str] | None = attrs.field(default=None, repr=False)

    @property
    def key(self) -> str:
        """`host:port`, the unit of per-receiver concurrency."""
        return _key(self.host, self.port)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def _key(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_url(url: str) -> httpx.URL:
    """Check a webhook URL's shape (no DNS): http(s), a host, a sane length and port.

    The same parser's output is used to connect, so what we check is what we call.
    """
    if not isinstance(url, str) or not url:
        raise UnsafeWebhookURL("webhook_url must be a non-empty string")
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeWebhookURL(f"webhook_url is longer than {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise UnsafeWebhookURL("webhook_url must not contain whitespace or control characters")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise UnsafeWebhookURL(f"webhook_url is not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        raise UnsafeWebhookURL("webhook_url must use http or https")
    if not parsed.host:
        raise UnsafeWebhookURL("webhook_url must name a host")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise UnsafeWebhookURL("webhook_url has a port outside 1-65535")
    return parsed


def target_key(url: str) -> str:
    """`host:port` of a URL without resolving it (`invalid` if it does not parse)."""
    try:
        parsed = parse_url(url)
    except UnsafeWebhookURL:
        return "invalid"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return _key(parsed.raw_host.decode("ascii").lower(), port)


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


async def _resolve(host: str, port: int, timeout: float) -> list[str]:
    with trio.move_on_after(timeout):
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError, ValueError) as exc:  # ValueError: bad IDNA
            detail = exc.strerror if isinstance(exc, socket.gaierror) and exc.strerror else exc
            raise UnsafeWebhookURL(
                f"webhook_url host {host!r} cannot be resolved ({detail})", permanent=False
            ) from None
        out: list[str] = []
        for family, _type, _proto, _canon, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            addr = str(sockaddr[0])
            if addr not in out:
                out.append(addr)
        if not out:
            raise UnsafeWebhookURL(f"webhook_url host {host!r} has no IP address", permanent=False)
        return out
    raise UnsafeWebhookURL(
        f"resolving webhook_url host {host!r} took longer than {timeout:g} s", permanent=False
    )


async def check_url(
    url: str, policy: WebhookPolicy | None = None, *, timeout: float = DEFAULT_RESOLVE_TIMEOUT
) -> ResolvedTarget:
    """Validate `url`, resolve its host and screen every address against `policy`.

    Returns where a connection may go; raises `UnsafeWebhookURL` with a reason otherwise.
    Call it at submit (to answer 422) and again before every delivery (DNS changes).
    """
    policy = policy if policy is not None else WebhookPolicy()
    parsed = parse_url(url)
    host = parsed.raw_host.decode("ascii").lower()
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    literal = _literal(host)
    host_allowed = literal is None and policy.allows_host(host)
    addresses = [host] if literal is not None else await _resolve(host, port, timeout)
    for text in addresses:
        addr = ipaddress.ip_address(text)
        if policy.allows_address(addr):
            continue
        problem = address_problem(addr)
        if problem is None:
            continue
        plain = _unwrap(addr)
        if host_allowed and not (plain.is_unspecified or plain.is_multicast):
            continue
        if literal is not None:
            raise UnsafeWebhookURL(f"webhook_url host {host} is {problem}{_ALLOW_HINT}")
        raise UnsafeWebhookURL(
            f"webhook_url host {host!r} resolves to {text}, {problem}{_ALLOW_HINT}",
            permanent=False,
        )
    auth = None
    if parsed.username or parsed.password:
        auth = (parsed.username, parsed.password)
    target = parsed.raw_path.decode("ascii") or "/"
    return ResolvedTarget(parsed.scheme, host, port, tuple(addresses), target, auth)


# -- pinned connections ----------------------------------------------------------------------


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend that connects to `target.addresses` and nowhere else.

    httpcore asks to connect to the URL's host; we dial the screened addresses in order
    instead (first that answers wins). TLS still runs against the URL's host name, because
    httpcore passes that as `server_hostname` to `start_tls`. Any other host (a redirect,
    a proxy) is refused outright.
    """

    def __init__(
        self, target: ResolvedTarget, inner: httpcore.AsyncNetworkBackend | None = None
    ) -> None:
        self.target = target
        self._inner = inner if inner is not None else httpcore.TrioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if host.strip("[]").lower() != self.target.host or port != self.target.port:
            raise httpcore.ConnectError(
                f"refusing to connect to {_key(host, port)}: only {self.target.key} was checked"
            )
        last: Exception | None = None
        for address in self.target.addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None  # addresses is never empty
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("webhooks are never delivered over unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def default_ssl_context() -> ssl.SSLContext:
    """Certificate-verifying TLS context (certifi's roots), as httpx would use."""
    return httpcore.default_ssl_context()
