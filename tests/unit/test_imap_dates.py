from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.ingest.imap.sync import internaldate


def test_a_storable_internaldate_is_kept_with_its_offset() -> None:
    when = internaldate("17-Jul-1996 02:44:25 -0700")
    assert when == datetime(1996, 7, 17, 2, 44, 25, tzinfo=timezone(timedelta(hours=-7)))


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "yesterday",
        "01-Jan-0999 00:00:00 +0000",
        "31-Dec-9999 23:00:00 -0500",
        "31-Feb-2020 00:00:00 +0000",
    ],
)
def test_a_missing_malformed_or_unstorable_internaldate_is_now(value: str | None) -> None:
    before = datetime.now(UTC)
    assert before <= internaldate(value) <= datetime.now(UTC)
