"""API keys and tenants: who is calling, decided once per request before anything else runs.

**Keys.** The operator gives `tenant:key` pairs (`--api-keys-file`, `AGENTJOBS_API_KEYS`);
a tenant may hold several keys (to rotate one without downtime), a key belongs to exactly
one tenant. A request presents its key as `Authorization: Bearer <key>` or
`X-API-Key: <key>`. When an `Authorization` header with the Bearer scheme is present it
alone decides (a wrong Bearer key is 401 even with a right `X-API-Key`, as in PraisonAI),
so a client never silently acts with a different key than the one it meant to send; an
`Authorization` header of another scheme (a proxy's Basic credentials) is ignored.

**Constant time, with no early exit.** The presented key is hashed (SHA-256) and compared
with `hmac.compare_digest` against the hash of *every* configured key, remembering the
match without breaking out of the loop: neither the time to answer nor its shape says how
many characters of a key were right or which key matched. Hashing first makes every
comparison the same length, so key lengths do not leak either.

**Tenants.** Every run is recorded with the tenant that submitted it, and the engine answers
`NotFound` for another tenant's run, so isolation holds in every endpoint without each
handler having to remember it. Without keys, auth is off and the tenant is None.

Nothing here logs, echoes or stores a key: errors name a line or an entry number only.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable

import attrs

__all__ = [
    "MIN_KEY_CHARS",
    "ApiKey",
    "Credential",
    "KeyRing",
    "parse_api_keys",
    "presented_key",
]

MIN_KEY_CHARS = 16
MAX_KEY_CHARS = 512
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEY_RE = re.compile(r"^[!-~]+$")  # printable ASCII without spaces: safe in any header


@attrs.frozen(slots=True)
class ApiKey:
    """One configured key. `repr` hides the key, so a stray log line cannot show it."""

    tenant: str
    key: str = attrs.field(repr=False)


def _check_entry(tenant: str, key: str, where: str) -> ApiKey:
    if not _TENANT_RE.match(tenant):
        raise ValueError(
            f"{where}: tenant name must be 1-64 letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit)"
        )
    if not _KEY_RE.match(key):
        raise ValueError(
            f"{where}: the key of tenant {tenant!r} must be printable ASCII without spaces"
        )
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(
            f"{where}: the key of tenant {tenant!r} is {len(key)} characters; use at least "
            f"{MIN_KEY_CHARS} (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    if len(key) > MAX_KEY_CHARS:
        raise ValueError(
            f"{where}: the key of tenant {tenant!r} is over {MAX_KEY_CHARS} characters"
        )
    return ApiKey(tenant, key)


def parse_api_keys(text: str, *, source: str, lines: bool) -> list[ApiKey]:
    """`tenant:key` entries from a file (`lines=True`: one per line, `#` comments, blank
    lines skipped) or from a variable (comma-separated). Raises ValueError naming `source`
    and the line or entry number, never the key itself."""
    out: list[ApiKey] = []
    if lines:
        items = [(f"{source} line {n}", line) for n, line in enumerate(text.splitlines(), 1)]
    else:
        items = [(f"{source} entry {n}", part) for n, part in enumerate(text.split(","), 1)]
    for where, raw in items:
        entry = raw.strip()
        if lines and (not entry or entry.startswith("#")):
            continue
        if not entry:
            raise ValueError(f"{where} is empty (expected tenant:key)")
        tenant, sep, key = entry.partition(":")
        if not sep or not tenant.strip() or not key.strip():
            raise ValueError(f"{where} is not tenant:key")
        out.append(_check_entry(tenant.strip(), key.strip(), where))
    return out


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


@attrs.frozen(slots=True)
class KeyRing:
    """The configured keys, as digests, and the optional `/metrics` key.

    Build with `KeyRing.build`, which refuses a key given to two tenants (or twice) and a
    metrics key equal to an API key: either would make "which tenant is this?" ambiguous.
    """

    entries: tuple[tuple[bytes, str], ...] = ()
    metrics_digest: bytes | None = attrs.field(default=None, repr=False)

    @classmethod
    def build(cls, keys: Iterable[ApiKey], metrics_key: str | None = None) -> KeyRing:
        seen: dict[bytes, str] = {}
        entries: list[tuple[bytes, str]] = []
        for k in keys:
            d = _digest(k.key)
            if d in seen:
                other = seen[d]
                raise ValueError(
                    f"the same API key is listed twice (tenants {other!r} and {k.tenant!r}); "
                    "each key must belong to one tenant"
                )
            seen[d] = k.tenant
            entries.append((d, k.tenant))
        metrics_digest = None
        if metrics_key is not None:
            if not _KEY_RE.match(metrics_key) or len(metrics_key) < MIN_KEY_CHARS:
                raise ValueError(
                    f"the metrics key must be at least {MIN_KEY_CHARS} printable ASCII "
                    "characters without spaces"
                )
            metrics_digest = _digest(metrics_key)
            if metrics_digest in seen:
                raise ValueError("the metrics key is also an API key; give it its own value")
        return cls(tuple(entries), metrics_digest)

    @property
    def enabled(self) -> bool:
        """True when API keys are configured (then every API request needs one)."""
        return bool(self.entries)

    @property
    def tenants(self) -> list[str]:
        return sorted({tenant for _, tenant in self.entries})

    def tenant_for(self, presented: str) -> str | None:
        """The tenant owning `presented`, or None. Compares against every key (see the
        module docstring); the loop has no `break`."""
        d = _digest(presented)
        found: str | None = None
        for digest, tenant in self.entries:
            if hmac.compare_digest(digest, d):
                found = tenant
        return found

    def is_metrics_key(self, presented: str) -> bool:
        if self.metrics_digest is None:
            return False
        return hmac.compare_digest(self.metrics_digest, _digest(presented))


@attrs.frozen(slots=True)
class Credential:
    """What a request presented: a key (hidden from `repr`) and where it came from, or a
    reason the credentials could not be read (`problem`)."""

    key: str | None = attrs.field(default=None, repr=False)
    source: str | None = None  # "bearer", "x-api-key" or "query"
    problem: str | None = None


def presented_key(
    authorization: str | None, x_api_key: str | None, query_key: str | None = None
) -> Credential:
    """The key a request presents, from its `Authorization` and `X-API-Key` headers.
    `query_key` is `?api_key=`, passed only where the server accepts it (the stream
    endpoint, with `--sse-query-key`); headers win over it."""
    auth = authorization
    if auth is not None:
        scheme, _, rest = auth.strip().partition(" ")
        if scheme.lower() == "bearer":
            token = rest.strip()
            if not token:
                return Credential(problem="the Authorization header has no key after Bearer")
            return Credential(token, "bearer")
        # another scheme (a proxy's Basic credentials): not ours, look further
    api_key = x_api_key
    if api_key is not None:
        token = api_key.strip()
        if not token:
            return Credential(problem="the X-API-Key header is empty")
        return Credential(token, "x-api-key")
    if query_key:
        return Credential(query_key, "query")
    return Credential()
