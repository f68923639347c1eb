"""Signing and verification (agentjobs.webhooks): the Standard Webhooks scheme."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from agentjobs.webhooks import (
    WebhookVerificationError,
    generate_secret,
    parse_secret,
    sign,
    signature_headers,
    split_secrets,
    verify,
)

# The published test vector of the Standard Webhooks specification: matching it means any
# receiver library of that scheme verifies our deliveries.
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TS = 1614265330
VECTOR_BODY = '{"test": 2432232314}'
VECTOR_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

BODY = b'{"job_id":"run_1","status":"succeeded","result":"hi"}'
NOW = 1_800_000_000


def hand_signature(secret: str, msg_id: str, ts: int, body: bytes) -> str:
    """An independent computation, straight from the scheme's definition."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def test_matches_the_published_vector() -> None:
    assert sign(VECTOR_SECRET, VECTOR_ID, VECTOR_TS, VECTOR_BODY) == VECTOR_SIG
    headers = {
        "webhook-id": VECTOR_ID,
        "webhook-timestamp": str(VECTOR_TS),
        "webhook-signature": VECTOR_SIG,
    }
    assert verify(VECTOR_BODY, headers, VECTOR_SECRET, now=VECTOR_TS) == {"test": 2432232314}
    # a bare base64 secret (no prefix) is the same key, as in the reference libraries
    assert verify(VECTOR_BODY, headers, VECTOR_SECRET[6:], now=VECTOR_TS + 10)


def test_round_trip_and_independent_hmac() -> None:
    secret = generate_secret()
    headers = signature_headers("msg_abc", NOW, BODY, secret)
    assert headers["webhook-id"] == "msg_abc"
    assert headers["webhook-timestamp"] == str(NOW)
    assert headers["webhook-signature"] == hand_signature(secret, "msg_abc", NOW, BODY)
    assert verify(BODY, headers, secret, now=NOW)["job_id"] == "run_1"


def test_header_names_are_case_insensitive_and_str_payload_works() -> None:
    secret = generate_secret()
    headers = {k.title(): v for k, v in signature_headers("m", NOW, BODY, secret).items()}
    assert "Webhook-Signature" in headers
    assert verify(BODY.decode(), headers, secret, now=NOW)["status"] == "succeeded"


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda h, b: (h, b + b" "), id="body-changed"),
        pytest.param(lambda h, b: ({**h, "webhook-id": "msg_other"}, b), id="id-changed"),
        pytest.param(
            lambda h, b: ({**h, "webhook-timestamp": str(NOW + 1)}, b), id="timestamp-changed"
        ),
        pytest.param(
            lambda h, b: ({**h, "webhook-signature": "v1,AAAA"}, b), id="signature-garbage"
        ),
        pytest.param(
            lambda h, b: (
                {**h, "webhook-signature": h["webhook-signature"].replace("v1", "v2")},
                b,
            ),
            id="unknown-version-only",
        ),
        pytest.param(
            lambda h, b: ({k: v for k, v in h.items() if k != "webhook-signature"}, b),
            id="no-signature",
        ),
        pytest.param(
            lambda h, b: ({k: v for k, v in h.items() if k != "webhook-id"}, b), id="no-id"
        ),
        pytest.param(lambda h, b: ({**h, "webhook-timestamp": "soon"}, b), id="timestamp-not-int"),
    ],
)
def test_tampering_is_rejected(mutate: object) -> None:
    secret = generate_secret()
    headers = signature_headers("msg_1", NOW, BODY, secret)
    bad_headers, bad_body = mutate(headers, BODY)  # type: ignore[operator]
    with pytest.raises(WebhookVerificationError):
        verify(bad_body, bad_headers, secret, now=NOW)


def test_wrong_secret_is_rejected() -> None:
    headers = signature_headers("msg_1", NOW, BODY, generate_secret())
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify(BODY, headers, generate_secret(), now=NOW)


def test_timestamp_tolerance_protects_against_replay() -> None:
    secret = generate_secret()
    headers = signature_headers("msg_1", NOW, BODY, secret)
    assert verify(BODY, headers, secret, now=NOW + 300)  # the default window is 5 minutes
    assert verify(BODY, headers, secret, now=NOW - 300)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(BODY, headers, secret, now=NOW + 301)
    with pytest.raises(WebhookVerificationError, match="future"):
        verify(BODY, headers, secret, now=NOW - 301)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(BODY, headers, secret, tolerance=10, now=NOW + 11)
    assert verify(BODY, headers, secret, tolerance=3600, now=NOW + 3000)


def test_rotation_signs_with_every_secret_and_verifies_with_any() -> None:
    old, new = generate_secret(), generate_secret()
    headers = signature_headers("msg_1", NOW, BODY, f"{old} {new}")
    entries = headers["webhook-signature"].split(" ")
    assert entries == [
        hand_signature(old, "msg_1", NOW, BODY),
        hand_signature(new, "msg_1", NOW, BODY),
    ]
    assert verify(BODY, headers, old, now=NOW)
    assert verify(BODY, headers, new, now=NOW)
    # a receiver that holds both secrets accepts a delivery signed with either one
    only_new = signature_headers("msg_1", NOW, BODY, new)
    assert verify(BODY, only_new, [old, new], now=NOW)
    assert verify(BODY, only_new, f"{old},{new}", now=NOW)


def test_other_scheme_entries_are_ignored_not_fatal() -> None:
    secret = generate_secret()
    headers = signature_headers("msg_1", NOW, BODY, secret)
    headers["webhook-signature"] = "v1a,c29tZXRoaW5n " + headers["webhook-signature"]
    assert verify(BODY, headers, secret, now=NOW)


def test_unsigned_headers_when_no_secret() -> None:
    headers = signature_headers("msg_1", NOW, BODY)
    assert headers == {"webhook-id": "msg_1", "webhook-timestamp": str(NOW)}
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify(BODY, headers, generate_secret(), now=NOW)


def test_non_json_body_is_an_error_after_a_valid_signature() -> None:
    secret = generate_secret()
    headers = signature_headers("msg_1", NOW, b"not json", secret)
    with pytest.raises(WebhookVerificationError, match="not JSON"):
        verify(b"not json", headers, secret, now=NOW)


def test_secret_parsing_never_echoes_the_secret() -> None:
    assert len(parse_secret(generate_secret(24))) == 24
    for bad in ("whsec_not*base64", "whsec_" + base64.b64encode(b"short").decode(), ""):
        with pytest.raises(ValueError) as info:
            parse_secret(bad)
        assert bad.removeprefix("whsec_") not in str(info.value) or not bad
    with pytest.raises(ValueError):
        split_secrets(" , ")
    assert len(split_secrets([generate_secret(), generate_secret() + " " + generate_secret()])) == 3


def test_verify_returns_any_json_value() -> None:
    secret = generate_secret()
    body = json.dumps([1, "two", None]).encode()
    assert verify(body, signature_headers("m", NOW, body, secret), secret, now=NOW) == [
        1,
        "two",
        None,
    ]
