"""Signing and verifying webhook deliveries (the Standard Webhooks scheme).

For receivers::

    from agentjobs.webhooks import verify, WebhookVerificationError

    try:
        payload = verify(request_body, request_headers, "whsec_...")
    except WebhookVerificationError:
        return 400

Why this scheme: it is a published, widely implemented convention (https://www.standardwebhooks.com),
so receivers can use any of its libraries as well as this module; it signs the delivery id
and a timestamp with the body, so a captured request cannot be replayed later (the
timestamp check) or re-labelled as another delivery (the id).

The wire format:

* secret: `whsec_` + base64 of 24 to 64 random bytes (`generate_secret()`); the HMAC key is
  the decoded bytes.
* `webhook-id`: the delivery's id, the same on every retry of one delivery (deduplicate on it).
* `webhook-timestamp`: unix seconds when this attempt was signed.
* `webhook-signature`: `v1,` + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}")); several
  such entries separated by spaces while a secret is being rotated (one per active secret).

This module uses only the standard library, so a receiver needs nothing else from us.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from typing import Any, Final

__all__ = [
    "DEFAULT_TOLERANCE",
    "WebhookVerificationError",
    "generate_secret",
    "parse_secret",
    "sign",
    "signature_headers",
    "split_secrets",
    "verify",
]

DEFAULT_TOLERANCE: Final = 300  # seconds either side of now; the scheme's recommended value
SECRET_PREFIX: Final = "whsec_"
_MIN_KEY_BYTES: Final = 16


class WebhookVerificationError(Exception):
    """The delivery is not authentic or not fresh; reject it (and do not act on it)."""


def generate_secret(nbytes: int = 32) -> str:
    """A new `whsec_<base64>` secret with `nbytes` random bytes (24 to 64 recommended)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(nbytes)).decode("ascii")


def parse_secret(secret: str) -> bytes:
    """The HMAC key inside `whsec_<base64>` (the prefix is optional, as in other libraries).

    Raises ValueError without echoing the secret, so it cannot leak into logs.
    """
    if not isinstance(secret, str):
        raise ValueError("a webhook secret must be a string like whsec_<base64>")
    text = secret.strip()
    if text.startswith(SECRET_PREFIX):
        text = text[len(SECRET_PREFIX) :]
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook secret must be whsec_ followed by base64") from None
    if len(key) < _MIN_KEY_BYTES:
        raise ValueError(f"a webhook secret must hold at least {_MIN_KEY_BYTES} bytes")
    return key


def split_secrets(secret: str | Iterable[str]) -> list[bytes]:
    """Keys from one secret, several separated by spaces or commas, or a list of them."""
    items = [secret] if isinstance(secret, str) else list(secret)
    keys = [parse_secret(part) for item in items for part in re.split(r"[\s,]+", item) if part]
    if not keys:
        raise ValueError("no webhook secret given")
    return keys


def _as_bytes(payload: bytes | bytearray | memoryview | str) -> bytes:
    return payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)


def _signature(key: bytes, msg_id: str, timestamp: int | str, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")


def sign(
    secret: str | Iterable[str],
    msg_id: str,
    timestamp: int,
    payload: bytes | str,
) -> str:
    """The `webhook-signature` value: `v1,<base64>` per secret, separated by spaces."""
    body = _as_bytes(payload)
    return " ".join(
        "v1," + _signature(key, msg_id, timestamp, body) for key in split_secrets(secret)
    )


def signature_headers(
    msg_id: str,
    timestamp: int,
    payload: bytes | str,
    secret: str | Iterable[str] | None = None,
) -> dict[str, str]:
    """`webhook-id`, `webhook-timestamp` and, with a secret, `webhook-signature`."""
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(int(timestamp))}
    if secret is not None:
        headers["webhook-signature"] = sign(secret, msg_id, int(timestamp), payload)
    return headers


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    for key, item in headers.items():
        if key.lower() == name:
            return item
    return None


def verify(
    payload: bytes | bytearray | memoryview | str,
    headers: Mapping[str, str],
    secret: str | Iterable[str],
    tolerance: float = DEFAULT_TOLERANCE,
    *,
    now: float | None = None,
) -> Any:
    """Check a delivery's signature and freshness; return its parsed JSON body.

    `payload` must be the raw request body, byte for byte (parse it *after* verifying:
    re-serialised JSON would not match). `headers` is any mapping (header names are
    matched case-insensitively). `secret` may list several secrets (during a rotation);
    one valid signature from any of them is enough.

    Raises `WebhookVerificationError` if a header is missing or malformed, if the
    timestamp is more than `tolerance` seconds away from `now` (a replay, or a badly
    wrong clock), or if no signature matches (compared in constant time).
    """
    msg_id = _header(headers, "webhook-id")
    stamp = _header(headers, "webhook-timestamp")
    signatures = _header(headers, "webhook-signature")
    if not msg_id or not stamp or not signatures:
        raise WebhookVerificationError(
            "missing webhook-id, webhook-timestamp or webhook-signature header"
        )
    try:
        timestamp = int(stamp.strip())
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    current = time.time() if now is None else now
    if timestamp < current - tolerance:
        raise WebhookVerificationError("message timestamp too old (possible replay)")
    if timestamp > current + tolerance:
        raise WebhookVerificationError("message timestamp too far in the future")
    body = _as_bytes(payload)
    try:
        keys = split_secrets(secret)
    except ValueError as exc:
        raise WebhookVerificationError(f"cannot verify: {exc}") from None
    expected = [_signature(key, msg_id, timestamp, body).encode("ascii") for key in keys]
    matched = False
    for entry in signatures.split():
        version, _, value = entry.partition(",")
        if version != "v1" or not value:
            continue  # another scheme (e.g. v1a asymmetric): not ours to judge
        given = value.encode("ascii", "replace")
        for want in expected:
            # no early exit: the time taken must not reveal which entry matched
            matched |= hmac.compare_digest(given, want)
    if not matched:
        raise WebhookVerificationError("no matching signature")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise WebhookVerificationError(f"payload is not JSON: {exc}") from None
