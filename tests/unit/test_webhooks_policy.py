"""The dispatcher's delivery policy without I/O: how an answer is classified, what becomes of the
delivery under each ordering, and how ``Retry-After`` is read."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.gateway.webhooks.dispatcher import Decision, Outcome, classify, decide, parse_retry_after_s
from services.gateway.webhooks.settings import WebhookSettings
from services.gateway.webhooks.store import SKIP_REFUSED, STRICT

S = WebhookSettings()
HOUR_S = 3600.0
NOW = datetime(2026, 11, 30, 6, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (None, Outcome.TRANSIENT),  # no answer: refused connection, timeout, target check
        (200, Outcome.DELIVERED),
        (204, Outcome.DELIVERED),
        (299, Outcome.DELIVERED),
        (301, Outcome.TRANSIENT),  # redirects are not followed, and say nothing about the event
        (400, Outcome.REFUSED),
        (401, Outcome.REFUSED),
        (403, Outcome.REFUSED),
        (404, Outcome.REFUSED),
        (408, Outcome.TRANSIENT),
        (409, Outcome.REFUSED),
        (410, Outcome.GONE),
        (413, Outcome.REFUSED),
        (422, Outcome.REFUSED),
        (429, Outcome.TRANSIENT),
        (499, Outcome.REFUSED),
        (500, Outcome.TRANSIENT),
        (502, Outcome.TRANSIENT),
        (503, Outcome.TRANSIENT),
        (599, Outcome.TRANSIENT),
    ],
)
def test_classify(status: int | None, outcome: Outcome) -> None:
    assert classify(status) is outcome


@given(st.integers(min_value=100, max_value=599))
def test_only_4xx_other_than_408_410_429_is_a_refusal(status: int) -> None:
    refused = classify(status) is Outcome.REFUSED
    assert refused == (400 <= status < 500 and status not in (408, 410, 429))


def _decide(
    outcome: Outcome, ordering: str, refusals: int = 0, age_s: float = 60.0, **kw: object
) -> Decision:
    return decide(
        outcome,
        ordering=ordering,
        attempts=refusals + 1,
        refusals=refusals,
        age_s=age_s,
        settings=S,
        rng=random.Random(7),
        **kw,  # type: ignore[arg-type]
    )


def test_default_settings_bound_refusals() -> None:
    assert S.webhooks_refused_max_attempts == 3
    assert S.webhooks_refused_retry_base_s == 2.0


def test_skip_refused_fails_after_the_bounded_attempts_without_disabling() -> None:
    first = _decide(Outcome.REFUSED, SKIP_REFUSED)
    assert first.state == "pending" and first.refusals == 1 and not first.disable
    assert first.retry_in_s is not None and 1.5 <= first.retry_in_s <= 2.5  # short, not 5 s and up
    second = _decide(Outcome.REFUSED, SKIP_REFUSED, refusals=1)
    assert second.state == "pending" and second.refusals == 2
    assert second.retry_in_s is not None and 3.0 <= second.retry_in_s <= 5.0
    third = _decide(Outcome.REFUSED, SKIP_REFUSED, refusals=2)
    assert third == Decision("failed", None, 3, disable=False) and third.skipped
    # even past the retry window: the receiver answered, so the endpoint stays enabled
    late = _decide(Outcome.REFUSED, SKIP_REFUSED, refusals=2, age_s=30 * HOUR_S)
    assert late.state == "failed" and not late.disable


def test_one_attempt_bound_fails_at_once() -> None:
    one = WebhookSettings(webhooks_refused_max_attempts=1)
    got = decide(Outcome.REFUSED, ordering=SKIP_REFUSED, attempts=1, refusals=0, age_s=1.0, settings=one)
    assert got.state == "failed"
    with pytest.raises(ValueError):
        WebhookSettings(webhooks_refused_max_attempts=0)


def test_strict_retries_a_refusal_until_the_window_then_disables() -> None:
    for refusals in (0, 2, 10, 40):
        got = _decide(Outcome.REFUSED, STRICT, refusals=refusals)
        assert got.state == "pending" and not got.disable and got.refusals == refusals + 1
    end = _decide(Outcome.REFUSED, STRICT, refusals=40, age_s=S.webhooks_retry_window_s + 1)
    assert end.state == "failed" and end.disable and not end.skipped


@pytest.mark.parametrize("ordering", [SKIP_REFUSED, STRICT])
def test_transient_failures_keep_the_retry_schedule(ordering: str) -> None:
    got = _decide(Outcome.TRANSIENT, ordering, refusals=2)
    assert got.state == "pending" and not got.disable
    assert got.refusals == 0  # a transient failure breaks a run of refusals
    assert got.retry_in_s is not None and 3.75 <= got.retry_in_s  # the ordinary 5 s base, not 2 s
    end = _decide(Outcome.TRANSIENT, ordering, age_s=S.webhooks_retry_window_s + 1)
    assert end == Decision("failed", None, 0, disable=True)


@pytest.mark.parametrize("ordering", [SKIP_REFUSED, STRICT])
def test_gone_disables_the_endpoint_and_keeps_the_delivery(ordering: str) -> None:
    assert _decide(Outcome.GONE, ordering).state == "pending"
    assert not _decide(Outcome.GONE, ordering, refusals=1).disable
    got = _decide(Outcome.GONE, ordering, refusals=2)
    assert got.state == "pending" and got.disable and got.refusals == 3


def test_delivered() -> None:
    assert _decide(Outcome.DELIVERED, SKIP_REFUSED, refusals=2) == Decision("delivered")


def test_retry_after_is_honoured_within_the_longest_delay() -> None:
    plain = _decide(Outcome.TRANSIENT, SKIP_REFUSED)
    assert plain.retry_in_s is not None and plain.retry_in_s < 10
    asked = _decide(Outcome.TRANSIENT, SKIP_REFUSED, retry_after_s=120.0)
    assert asked.retry_in_s == 120.0
    sooner = _decide(Outcome.TRANSIENT, SKIP_REFUSED, retry_after_s=0.0)  # never sooner than backoff
    assert sooner.retry_in_s == plain.retry_in_s
    huge = _decide(Outcome.TRANSIENT, SKIP_REFUSED, retry_after_s=10 * 24 * HOUR_S)
    assert huge.retry_in_s == S.webhooks_retry_max_delay_s


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        ("", None),
        ("٣", None),  # a digit, but not an ASCII one
        (format_datetime(NOW + timedelta(seconds=90), usegmt=True), 90.0),
        (format_datetime(NOW - timedelta(seconds=90), usegmt=True), 0.0),  # already past
        ("Mon, 30 Nov 2026 06:01:00", 60.0),  # no zone: GMT
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after_s(value, NOW) == seconds


@given(st.text(max_size=60))
def test_parse_retry_after_never_raises(value: str) -> None:
    got = parse_retry_after_s(value, NOW)
    assert got is None or got >= 0
