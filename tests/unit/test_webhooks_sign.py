"""Standard Webhooks signing, checked against the independent reference implementation."""

from __future__ import annotations

import base64
import json
import random
import time
from datetime import UTC, datetime

import pytest
import standardwebhooks
from hypothesis import given
from hypothesis import strategies as st

from libs.backoff import backoff_s
from libs.outbound import is_public_address
from libs.webhooks import (
    InvalidSecret,
    WebhookVerificationError,
    generate_secret,
    secret_bytes,
    sign,
    sign_headers,
    verify,
)
from services.gateway.webhooks.dispatcher import build_payload, event_types
from services.gateway.webhooks.settings import WebhookSettings
from services.gateway.webhooks.targets import TargetRefused, check_url_syntax

NOW = 1_795_000_000

# The example of the Standard Webhooks specification's test vectors (svix's "msg_p5jX...").
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TS = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_spec_vector() -> None:
    assert sign(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY) == SPEC_SIG
    headers = {"Webhook-Id": SPEC_ID, "Webhook-Timestamp": str(SPEC_TS), "Webhook-Signature": SPEC_SIG}
    assert verify(SPEC_SECRET, headers, SPEC_BODY, now_s=SPEC_TS) == SPEC_ID


@given(body=st.binary(max_size=2000).map(lambda b: base64.b64encode(b)), msg_id=st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40))  # fmt: skip
def test_reference_implementation_verifies_ours(body: bytes, msg_id: str) -> None:
    secret = generate_secret()
    headers = sign_headers([secret], msg_id, NOW, body)
    ref = standardwebhooks.Webhook(secret)
    assert ref.sign(msg_id, _dt(NOW), body.decode()) == headers["webhook-signature"]


def _dt(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def test_reference_verify_with_rotated_secrets() -> None:
    """During a rotation we send two signatures; a receiver holding either one accepts."""
    old, new = generate_secret(), generate_secret()
    body = b'{"type":"message.created"}'
    now = int(time.time())
    headers = sign_headers([new, old], "evt_1", now, body)
    assert len(headers["webhook-signature"].split()) == 2
    for s in (old, new):
        assert standardwebhooks.Webhook(s).verify(body, headers) == {"type": "message.created"}
        assert verify(s, headers, body) == "evt_1"
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(generate_secret()).verify(body, headers)


def test_verify_rejects_tampering_and_stale_timestamps() -> None:
    secret = generate_secret()
    body = b'{"a":1}'
    headers = sign_headers([secret], "evt_9", NOW, body)
    assert verify(secret, headers, body, now_s=NOW + 10) == "evt_9"
    with pytest.raises(WebhookVerificationError, match="no signature"):
        verify(secret, headers, b'{"a":2}', now_s=NOW)
    with pytest.raises(WebhookVerificationError, match="no signature"):
        verify(generate_secret(), headers, body, now_s=NOW)
    with pytest.raises(WebhookVerificationError, match="tolerance"):
        verify(secret, headers, body, now_s=NOW + 301)
    with pytest.raises(WebhookVerificationError, match="tolerance"):
        verify(secret, headers, body, now_s=NOW - 301)
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify(secret, {k: v for k, v in headers.items() if k != "webhook-id"}, body, now_s=NOW)
    with pytest.raises(WebhookVerificationError, match="no signature"):
        verify(secret, {**headers, "webhook-signature": "v2," + headers["webhook-signature"][3:]},
               body, now_s=NOW)  # fmt: skip
    # any one of several receiver-side secrets is enough
    assert verify([generate_secret(), secret], headers, body, now_s=NOW) == "evt_9"


def test_we_verify_reference_signatures() -> None:
    secret = generate_secret()
    body = b'{"x": "y"}'
    sig = standardwebhooks.Webhook(secret).sign("evt_ref", _dt(NOW), body.decode())
    headers = {"webhook-id": "evt_ref", "webhook-timestamp": str(NOW), "webhook-signature": sig}
    assert verify(secret, headers, body, now_s=NOW) == "evt_ref"


def test_secrets() -> None:
    s = generate_secret()
    assert s.startswith("whsec_") and len(secret_bytes(s)) == 32
    assert secret_bytes(s.removeprefix("whsec_")) == secret_bytes(s)
    assert generate_secret() != s
    for bad in ("whsec_", "whsec_not base64!"):
        with pytest.raises(InvalidSecret):
            secret_bytes(bad)


def test_retry_schedule_spans_more_than_a_day() -> None:
    """With the default settings an endpoint is retried for the whole 28 h window, with growing,
    jittered delays."""
    s = WebhookSettings()
    rng = random.Random(7)
    delays = [
        backoff_s(n, s.webhooks_retry_base_s, s.webhooks_retry_max_delay_s, jitter="spread", rand=rng.random)
        for n in range(1, 40)
    ]
    assert 3.75 <= delays[0] <= 6.25
    assert all(d <= s.webhooks_retry_max_delay_s * 1.25 for d in delays)
    assert delays[5] > delays[0] * 8
    elapsed = 0.0
    attempts = 0
    for d in delays:
        if elapsed > s.webhooks_retry_window_s:
            break
        elapsed += d
        attempts += 1
    assert elapsed > 24 * 3600 and attempts >= 15
    assert len({round(backoff_s(3, 5, 3600, jitter="spread"), 6) for _ in range(20)}) > 1  # jittered


def test_payload_shape() -> None:
    change = {"change_id": "5", "shard": 1, "account_id": "7", "application_id": "3",
              "object_type": "message", "object_id": "9", "change_type": "updated", "version": 2,
              "created_at": "2026-11-23T13:00:00.000001Z"}  # fmt: skip
    assert event_types(change) == ("message.updated", None)
    assert json.loads(build_payload(change, "message.updated")) == {
        "type": "message.updated",
        "timestamp": "2026-11-23T13:00:00.000001Z",
        "data": {"object": "message", "id": "9", "account_id": "7", "application_id": "3",
                 "change_id": "5", "change_type": "updated", "version": 2},
    }  # fmt: skip


def test_a_status_change_has_its_status_type() -> None:
    change = {"change_id": "5", "shard": 1, "account_id": "7", "application_id": "3",
              "object_type": "message", "object_id": "9", "change_type": "created", "version": 2,
              "created_at": "2026-11-23T13:00:00.000001Z", "status": "sent"}  # fmt: skip
    assert event_types(change) == ("message.created", "message.sent")
    body = json.loads(build_payload(change, "message.sent"))
    assert body["type"] == "message.sent" and body["data"]["change_type"] == "created"
    assert body["data"]["status"] == "sent"
    # received has no type of its own, and a thread never has one
    assert event_types(change | {"status": "received"}) == ("message.created", None)
    assert event_types(change | {"object_type": "thread"}) == ("thread.created", None)


@pytest.mark.parametrize(
    ("url", "ok"),
    [("https://example.com/hook", True), ("http://example.com:8080/a?b=c", True),
     ("ftp://example.com/x", False), ("https://u:p@example.com/", False), ("https:///nohost", False),
     ("https://example.com/#frag", False),
     ("https://example.com:99999/", False), ("https://" + "a" * 2050 + ".com/", False)],
)  # fmt: skip
def test_url_syntax(url: str, ok: bool) -> None:
    if ok:
        check_url_syntax(url)
    else:
        with pytest.raises(TargetRefused):
            check_url_syntax(url)


@pytest.mark.parametrize(
    ("address", "public"),
    [("8.8.8.8", True), ("2606:4700::1111", True), ("127.0.0.1", False), ("10.0.0.1", False),
     ("192.168.1.1", False), ("169.254.169.254", False), ("::1", False), ("fd00::1", False),
     ("::ffff:127.0.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False), ("100.64.0.1", False)],
)  # fmt: skip
def test_private_addresses_are_refused(address: str, public: bool) -> None:
    assert is_public_address(address) is public
