"""transform's parse pool: a message over its time or memory budget, or one that kills its worker,
is kept with a warning, and the pool goes on with the next one."""

from __future__ import annotations

import base64
import os
import time
from typing import Any

import pytest

from libs.events import MessageContent, Participant
from services.transform.parsing import ParsePool

RAW = base64.b64encode(b"Subject: hi\r\nFrom: a@x.io\r\n\r\nbody\r\n").decode()


# Run in the spawned workers, which import them by name.
def _hang(raw_mime: str, size_bytes: int | None) -> dict[str, Any]:
    time.sleep(600)
    return {}


def _hog(raw_mime: str, size_bytes: int | None) -> dict[str, Any]:
    return {"subject": str(len(bytearray(1 << 31)))}


def _die(raw_mime: str, size_bytes: int | None) -> dict[str, Any]:
    os._exit(3)


def _oversized(raw_mime: str, size_bytes: int | None) -> dict[str, Any]:
    return {"thread_key": "x" * 100}  # over the thread key's 64 characters


async def test_parses_raw_mime_into_the_fields_and_drops_it() -> None:
    async with ParsePool(workers=1, timeout_s=30, memory_limit_bytes=1 << 30) as pool:
        content = await pool.expand(MessageContent(raw_mime=RAW, size_bytes=99))
    assert (
        content.subject == "hi"
        and content.sender == Participant(email="a@x.io")
        and content.body_text == "body\r\n"
    )
    assert content.raw_mime is None and content.size_bytes == 99


@pytest.mark.parametrize(
    ("parse", "warning"),
    [
        (_hang, "parse_timeout"),
        (_hog, "parse_out_of_memory"),
        (_die, "parse_crashed"),
        (_oversized, "parse_invalid"),
    ],
)
async def test_a_message_over_budget_is_kept_with_a_warning_and_the_pool_goes_on(
    parse: Any, warning: str
) -> None:
    async with ParsePool(workers=1, timeout_s=2, memory_limit_bytes=512 << 20, parse=parse) as pool:
        content = await pool.expand(MessageContent(raw_mime=RAW, size_bytes=7, subject="given"))
        assert content.raw_mime is None and content.parse_warnings == [warning]
        assert content.subject == "given" and content.size_bytes == 7  # what the event carried stays
        # The worker was replaced: the next message is parsed (here by the same hostile function).
        again = await pool.expand(MessageContent(raw_mime=RAW))
        assert again.parse_warnings == [warning]


async def test_stop_is_idempotent() -> None:
    pool = ParsePool(workers=1, timeout_s=1, memory_limit_bytes=1 << 30)
    pool.start()
    pool.stop()
    pool.stop()
