"""The hostile-input suite of issue 12: no message can stall, wedge or bloat the pipeline.

Each case sends one poison to an account of its own (posted to ingest, or APPENDed to the
account's Dovecot mailbox for the pipeline's IMAP sync to pick up), then ordinary messages on the
same account whose keys hash to the poison's Kafka partition, so in transform and persist they
queue right behind it. Every ordinary message must be queryable through the gateway within 10 s
of being sent (docs/architecture.md's target, waited for as a deadline, not timed as a speed), and
the poison must end one of three ways: stored (its parse warnings read through the gateway), dead-lettered
with its reason (``flightlog.dlq`` read from where it ended when the test began), or refused at
ingest with a 4xx problem document naming the problem (and, for a refused item, dead-lettered by
ingest with the field named).

The services are the session's ``pipeline``, shared with the other e2e modules: a poison that
wedges a partition shows here as ordinary messages that never come, and in the modules after.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from cli.mailbox_gen import DOMAIN, fill_maildir
from cli.stack import IMAP_TEST_PASSWORD, Stack
from libs.config import KafkaSettings
from libs.dlq import DeadLetter, parse_dead_letter
from libs.events import MAX_BODY_BYTES, message_key_bytes
from libs.http import PROBLEM_CONTENT_TYPE
from libs.imap.client import Imap4
from libs.kafka import DLQ, INFLIGHT, TOPICS, make_consumer
from libs.shards import ShardRouter
from services.ingest.imap.sync import message_key as imap_message_key
from tests.e2e.client import event
from tests.e2e.conftest import Pipeline
from tests.e2e.hostile import (
    SCRIPT_STORM,
    STYLE_STORM,
    encoded_word_storm,
    fits_raw_mime,
    html_message,
    long_header,
    many_parts,
    nested_json,
    nested_multipart,
    ordinary_message,
    oversize_message,
    partition_of,
)
from tests.scratch import dovecot_user

pytestmark = pytest.mark.e2e

ORDINARY: Final = 3  # ordinary messages behind each poison
QUERYABLE_WITHIN_S: Final = 10.0  # docs/architecture.md: "ordinary messages behind it queryable within 10 s"
# The target bounds the messages behind a poison, not the poison's own verdict: a parse that runs
# out of its time budget, or a write charged its attempts before the DLQ, may take longer.
SETTLED_WITHIN_S: Final = 30.0
# Before the clock starts: the pipeline's IMAP sync must take the new account and sync its first
# message (a consumer of flightlog.imap-accounts, a login, an initial sync), none of it the target.
IMAP_READY_WITHIN_S: Final = 60.0
POLL_S: Final = 0.1
INFLIGHT_PARTITIONS: Final = next(s.partitions for s in TOPICS if s.name == INFLIGHT)

Via = Literal["event", "raw_mime", "imap", "ingest_body", "webhook_body"]
RawBuilder = Callable[[str], bytes]  # a message id -> the raw message


@dataclass(frozen=True, slots=True)
class Settled:
    """Accepted, then stored or (when ``dead_letter_ok``) dead-lettered with a reason."""

    warning: str | None = None  # the parse warning a stored poison must carry
    warned: bool = False  # a stored poison must carry some parse warning
    dead_letter_ok: bool = True


@dataclass(frozen=True, slots=True)
class Refused:
    """Refused at ingest (or the gateway) with one of ``statuses`` and a problem document that
    names ``field`` among a 422's item errors, or has ``title``."""

    statuses: frozenset[int]
    field: str | None = None
    title: str | None = None


@dataclass(frozen=True, slots=True)
class Poison:
    name: str
    via: Via
    fate: Settled | Refused
    html: str | None = None  # via event: the body_html of an inbound message
    raw: RawBuilder | None = None  # via raw_mime or imap
    overrides: dict[str, Any] = field(default_factory=dict)  # via event: fields of the event itself
    content: dict[str, Any] = field(default_factory=dict)  # via event: fields of its content
    body: bytes | None = None  # via ingest_body or webhook_body: the whole request body

    @property
    def id(self) -> str:
        return f"{self.name}-{self.via}"


def _html(repeated: str, times: int) -> RawBuilder:
    return lambda message_id: html_message(message_id, repeated * times)


STORED: Final = Settled()
TRUNCATED: Final = Settled(warning="truncated")  # over MAX_RAW_BYTES: IMAP fetches only that much
UNREADABLE: Final = Settled(warned=True)  # no parser reads all of it: it must say so
TOO_DEEP: Final = Refused(frozenset({400}), title="JSON nested too deeply")

POISONS: Final = [
    # Quadratic for the old regex (figures in tests/e2e/hostile.py), a deep tree for a DOM parser.
    Poison("script-storm", "event", STORED, html=SCRIPT_STORM * 60_000),
    Poison("style-storm", "event", STORED, html=STYLE_STORM * 60_000),
    Poison("nested-div", "event", STORED, html="<div>" * 100_000),
    Poison("nested-b", "event", STORED, html="<b>" * 100_000),
    # 48,000 is the most of "<script " that fits raw_mime's 512 KiB of base64 (60,000 does not).
    Poison("script-storm", "raw_mime", STORED, raw=_html(SCRIPT_STORM, 48_000)),
    Poison("style-storm", "raw_mime", STORED, raw=_html(STYLE_STORM, 60_000)),
    Poison("script-storm", "imap", TRUNCATED, raw=_html(SCRIPT_STORM, 60_000)),
    Poison("style-storm", "imap", STORED, raw=_html(STYLE_STORM, 60_000)),
    Poison("nested-div", "imap", TRUNCATED, raw=_html("<div>", 100_000)),
    Poison("nested-b", "imap", STORED, raw=_html("<b>", 100_000)),
    # MIME structure: the stdlib parser recurses per level (a RecursionError at 2,000) and builds
    # one object per part.
    Poison("nested-multipart", "raw_mime", UNREADABLE, raw=lambda mid: nested_multipart(mid, 2_000)),
    Poison("nested-multipart", "imap", UNREADABLE, raw=lambda mid: nested_multipart(mid, 2_000)),
    Poison("many-parts", "raw_mime", STORED, raw=lambda mid: many_parts(mid, 20_000)),
    Poison("many-parts", "imap", STORED, raw=lambda mid: many_parts(mid, 20_000)),
    Poison("long-header", "raw_mime", STORED, raw=lambda mid: long_header(mid, 300 * 1024)),
    Poison("long-header", "imap", STORED, raw=lambda mid: long_header(mid, 300 * 1024)),
    # 50,000 openers are 500 KB, past MAX_RAW_BYTES: IMAP cuts them; 38,000 is what raw_mime holds.
    Poison("encoded-word-storm", "raw_mime", STORED, raw=lambda mid: encoded_word_storm(mid, 38_000)),
    Poison("encoded-word-storm", "imap", TRUNCATED, raw=lambda mid: encoded_word_storm(mid, 50_000)),
    # What MariaDB cannot hold: refused at the door, never left for persist to fail on.
    Poison(
        "unstorable-time",
        "event",
        Refused(frozenset({422}), field="occurred_at"),
        overrides={"occurred_at": "9999-12-31T23:00:00-05:00"},
    ),
    Poison(
        "key-over-255-bytes",
        "event",
        Refused(frozenset({422}), field="message_key"),
        overrides={"message_key": "é" * 255},
    ),
    Poison(
        "body-over-limit",
        "event",
        Refused(frozenset({413, 422}), field="content.body_text"),
        content={"body_text": "x" * (MAX_BODY_BYTES + 1)},
    ),
    Poison("oversize", "imap", Settled(warning="truncated", dead_letter_ok=False), raw=oversize_message),
    Poison("nested-json", "ingest_body", TOO_DEEP, body=nested_json(10_000)),
    Poison("nested-json", "webhook_body", TOO_DEEP, body=nested_json(10_000)),
]


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    content_type: str
    body: Any


class Api:
    """The pipeline's ingest and gateway, as one application (its API key) sees them."""

    def __init__(self, http: aiohttp.ClientSession, pipeline: Pipeline, api_key: str) -> None:
        self.http = http
        self.pipeline = pipeline
        self.ingest = pipeline.url("ingest")
        self.gateway = pipeline.url("gateway")
        self.auth = {"Authorization": f"Bearer {api_key}"}

    async def call(self, method: str, url: str, *, json: Any = None, data: bytes | None = None) -> Answer:
        headers = dict(self.auth)
        if data is not None:
            headers["Content-Type"] = "application/json"
        while True:
            async with self.http.request(method, url, json=json, data=data, headers=headers) as resp:
                body = await resp.json(content_type=None) if resp.status != 204 else None
                if resp.status == 429:  # as a real client would: wait and send again
                    await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
                    continue
                return Answer(resp.status, resp.content_type, body)

    async def post_events(self, events: list[dict[str, Any]]) -> Answer:
        return await self.call("POST", f"{self.ingest}/v1/events", json={"events": events})

    async def messages(self, account_id: int) -> dict[str, dict[str, Any]]:
        """The account's messages by message key (a handful per case: one page holds them)."""
        answer = await self.call("GET", f"{self.gateway}/v1/accounts/{account_id}/messages?limit=200")
        assert answer.status == 200, answer
        return {m["message_key"]: m for m in answer.body["data"]}


class DeadLetters:
    """``flightlog.dlq`` from where it ended on entering (its one partition, read_committed)."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self.consumer: AIOKafkaConsumer = make_consumer(kafka, group_id=None)
        self.tp = TopicPartition(DLQ, 0)
        self.seen: list[DeadLetter] = []

    async def __aenter__(self) -> DeadLetters:
        await self.consumer.start()
        self.consumer.assign([self.tp])
        await asyncio.sleep(0)  # aiokafka's group-less coordinator must start before stop() cancels it
        end = (await self.consumer.end_offsets([self.tp]))[self.tp]
        self.consumer.seek(self.tp, end)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    async def read(self) -> list[DeadLetter]:
        batch = await self.consumer.getmany(self.tp, timeout_ms=int(POLL_S * 1000))
        for r in batch.get(self.tp, []):
            self.seen.append(parse_dead_letter(r.key, r.value, r.headers, r.offset))
        return self.seen


@pytest.fixture
async def dead_letters(kafka_settings: KafkaSettings, topics: None) -> AsyncIterator[DeadLetters]:
    async with DeadLetters(kafka_settings) as dlq:
        yield dlq


async def wait_until(check: Callable[[], Awaitable[str | None]], deadline: float) -> str | None:
    """Poll ``check`` (None: done, else what is still missing) until it is done or ``deadline``
    (a ``time.monotonic()``) has passed; returns what was still missing then."""
    while True:
        missing = await check()
        if missing is None or time.monotonic() > deadline:
            return missing
        await asyncio.sleep(POLL_S)


def same_partition_keys(account_id: int, poison_key: str, make_key: Callable[[int], str]) -> list[int]:
    """The first ORDINARY numbers ``n`` whose ``make_key(n)`` lands on the poison's partition of
    flightlog.inflight (and so of flightlog.postflight, with as many partitions): each ordinary
    message then waits behind the poison in one consumer's queue, not beside it in another's."""
    target = partition_of(message_key_bytes(account_id, poison_key), INFLIGHT_PARTITIONS)
    found: list[int] = []
    n = 0
    while len(found) < ORDINARY:
        if partition_of(message_key_bytes(account_id, make_key(n)), INFLIGHT_PARTITIONS) == target:
            found.append(n)
        n += 1
    return found


def assert_refused(answer: Answer, fate: Refused) -> None:
    assert answer.status in fate.statuses, answer
    assert answer.content_type == PROBLEM_CONTENT_TYPE, answer
    if fate.title is not None:
        assert answer.body["title"] == fate.title, answer.body
    if fate.field is not None and answer.status == 422:
        assert fate.field in [e["field"] for e in answer.body["errors"]], answer.body


async def assert_ordinary_queryable(
    api: Api, account_id: int, ordinary: set[str], sent_at: float, poison_key: str
) -> None:
    seen: dict[str, dict[str, Any]] = {}

    async def missing() -> str | None:
        nonlocal seen
        seen = await api.messages(account_id)
        left = ordinary - set(seen)
        return None if not left else f"{len(left)} of {len(ordinary)} ordinary messages"

    left = await wait_until(missing, sent_at + QUERYABLE_WITHIN_S)
    if left is not None:
        poison = "stored" if poison_key in seen else "not stored"
        # The consumer groups are shared with every pipeline on the stack: a rebalance shows here.
        logs = "\n".join(
            f"--- {name}:\n{api.pipeline.services[name].proc.log_tail(8)}"
            for name in ("transform", "persist")
        )
        pytest.fail(
            f"{left} not queryable {QUERYABLE_WITHIN_S:.0f} s after they were sent (the poison: {poison})\n"
            + logs
        )


async def assert_settled(
    api: Api, dlq: DeadLetters, account_id: int, poison_key: str, fate: Settled, sent_at: float
) -> None:
    """The poison is stored, with the warnings ``fate`` asks for, or in the DLQ with a reason."""
    kafka_key = message_key_bytes(account_id, poison_key)
    stored: dict[str, Any] | None = None
    dead: list[DeadLetter] = []

    async def pending() -> str | None:
        nonlocal stored, dead
        stored = (await api.messages(account_id)).get(poison_key)
        dead = [d for d in await dlq.read() if d.key == kafka_key]
        return None if stored is not None or dead else "the poison's fate"

    if await wait_until(pending, sent_at + SETTLED_WITHIN_S) is not None:
        pytest.fail(f"the poison was neither stored nor dead-lettered within {SETTLED_WITHIN_S:.0f} s")
    if stored is not None:
        # Served whole, body included: a stored poison the gateway cannot answer for is stuck too.
        answer = await api.call("GET", f"{api.gateway}/v1/messages/{stored['id']}")
        assert answer.status == 200, answer.status
        warnings = answer.body["parse_warnings"]
        if fate.warning is not None:
            assert fate.warning in warnings, stored
        if fate.warned:
            assert warnings, f"stored without a parse warning: {stored}"
        return
    assert fate.dead_letter_ok, f"dead-lettered, but it must be stored: {dead}"
    assert all(d.reason and d.stage in ("transform", "persist") for d in dead), dead


async def assert_dead_lettered_at_ingest(dlq: DeadLetters, event_id: str, field_name: str) -> None:
    """ingest writes a refused item to the DLQ before it answers 422, so it is there by now (the
    wait is only for this consumer's fetches)."""
    needle = event_id.encode()

    async def not_found() -> str | None:
        found = [d for d in await dlq.read() if d.value is not None and needle in d.value]
        return None if found else "the refused item"

    assert await wait_until(not_found, time.monotonic() + 10) is None, "the refused item is not in the DLQ"
    (letter,) = [d for d in dlq.seen if d.value is not None and needle in d.value]
    assert letter.stage == "ingest" and field_name in letter.reason, letter


def inbound(account_id: int, key: str, **content: Any) -> dict[str, Any]:
    return event(
        account_id, key, "received", direction="inbound",
        content={"channel": "email", "from": "sender@example.org", "subject": key, **content},
    )  # fmt: skip


def synced(account_id: int, key: str, raw: bytes) -> dict[str, Any]:
    """Raw MIME as IMAP sync posts it, but through POST /v1/events."""
    assert fits_raw_mime(raw), f"{len(raw)} bytes do not fit content.raw_mime"
    return event(
        account_id, key, "synced", source="imap",
        content={"raw_mime": base64.b64encode(raw).decode()}, flags={"unread": True, "folder": "INBOX"},
    )  # fmt: skip


@pytest.mark.parametrize("poison", POISONS, ids=[p.id for p in POISONS])
async def test_a_poison_is_settled_and_holds_no_ordinary_message_back(
    poison: Poison,
    pipeline: Pipeline,
    stack: Stack,
    router: ShardRouter,
    tenant_factory: Any,
    http: aiohttp.ClientSession,
    dead_letters: DeadLetters,
) -> None:
    shard = router.shard_map.shards[0]
    if poison.via == "imap":
        await imap_case(poison, pipeline, stack, shard, tenant_factory, http, dead_letters)
    else:
        await posted_case(poison, pipeline, shard, tenant_factory, http, dead_letters)


async def posted_case(
    poison: Poison, pipeline: Pipeline, shard: int, tenant_factory: Any,
    http: aiohttp.ClientSession, dlq: DeadLetters,
) -> None:  # fmt: skip
    tenant = await tenant_factory([shard])
    account = tenant.accounts[0].id
    api = Api(http, pipeline, tenant.api_key)
    tag = uuid.uuid4().hex[:10]
    poison_key = str(poison.overrides.get("message_key", f"poison-{tag}"))

    refused_item: dict[str, Any] | None = None
    if poison.via == "event":
        content = {"body_html": poison.html} if poison.html is not None else {}
        item = {**inbound(account, poison_key, **content, **poison.content), **poison.overrides}
        answer = await api.post_events([item])
        refused_item = item
    elif poison.via == "raw_mime":
        assert poison.raw is not None
        answer = await api.post_events([synced(account, poison_key, poison.raw(f"{poison_key}@example.org"))])
    elif poison.via == "ingest_body":
        answer = await api.call("POST", f"{api.ingest}/v1/events", data=poison.body)
    else:
        answer = await api.call("POST", f"{api.gateway}/v1/webhooks", data=poison.body)

    if isinstance(poison.fate, Refused):
        assert_refused(answer, poison.fate)
        if answer.status == 422 and refused_item is not None and poison.fate.field is not None:
            await assert_dead_lettered_at_ingest(dlq, refused_item["event_id"], poison.fate.field)
    else:
        assert answer.status == 202, answer

    # Ordinary messages take the poison's road: raw MIME behind raw MIME (the same parser, the
    # same pool), plain events behind the rest.
    numbers = same_partition_keys(account, poison_key, lambda n: f"ordinary-{n}-{tag}")
    keys = [f"ordinary-{n}-{tag}" for n in numbers]
    if poison.via == "raw_mime":
        batch = [synced(account, k, ordinary_message(f"{k}@example.org", k)) for k in keys]
    else:
        batch = [inbound(account, k, body_text=f"ordinary mail {k}") for k in keys]
    sent_at = time.monotonic()
    answer = await api.post_events(batch)
    assert answer.status == 202, answer

    await assert_ordinary_queryable(api, account, set(keys), sent_at, poison_key)
    if isinstance(poison.fate, Settled):
        await assert_settled(api, dlq, account, poison_key, poison.fate, sent_at)


async def imap_case(
    poison: Poison, pipeline: Pipeline, stack: Stack, shard: int, tenant_factory: Any,
    http: aiohttp.ClientSession, dlq: DeadLetters,
) -> None:  # fmt: skip
    assert poison.raw is not None and isinstance(poison.fate, Settled)
    server = stack.dovecot
    user = dovecot_user("hostile")
    address = f"{user}@{DOMAIN}"
    server.add_user(address)
    fill_maildir(server, user, 1)  # the message whose arrival says the account is synced
    tenant = await tenant_factory([])
    api = Api(http, pipeline, tenant.api_key)
    created = await api.call(
        "POST", f"{api.gateway}/v1/accounts",
        json={"email": address, "host": "127.0.0.1", "port": server.port, "tls_mode": "none",
              "username": address, "password": IMAP_TEST_PASSWORD, "shard": shard},
    )  # fmt: skip
    assert created.status == 201, created
    account = int(created.body["id"])
    try:
        first: dict[str, dict[str, Any]] = {}

        async def not_synced() -> str | None:
            nonlocal first
            first = await api.messages(account)
            return None if first else "the mailbox's first message"

        assert await wait_until(not_synced, time.monotonic() + IMAP_READY_WITHIN_S) is None, (
            f"the IMAP account was not synced within {IMAP_READY_WITHIN_S:.0f} s"
        )
        # "imap:<folder id>:<identity>": the keys of what comes next can be computed, so ordinary
        # messages can be made to hash to the poison's partition.
        folder_id = int(next(iter(first)).split(":")[1])
        raw = poison.raw(f"poison-{user}@example.org")
        poison_key = imap_message_key(folder_id, raw)

        def ordinary(n: int) -> bytes:
            return ordinary_message(f"ordinary-{n}-{user}@example.org", f"ordinary {n}")

        numbers = same_partition_keys(account, poison_key, lambda n: imap_message_key(folder_id, ordinary(n)))
        keys = {imap_message_key(folder_id, ordinary(n)) for n in numbers}
        client = Imap4("127.0.0.1", server.port, timeout=60)
        await client.wait_hello_from_server()
        assert (await client.login(address, IMAP_TEST_PASSWORD)).result == "OK"
        try:
            assert (await client.append(raw, mailbox="INBOX")).result == "OK"
            sent_at = time.monotonic()
            for n in numbers:
                assert (await client.append(ordinary(n), mailbox="INBOX")).result == "OK"
        finally:
            await client.logout()

        await assert_ordinary_queryable(api, account, keys, sent_at, poison_key)
        await assert_settled(api, dlq, account, poison_key, poison.fate, sent_at)
    finally:
        # The sync would otherwise hold an IDLE connection for as long as the pipeline runs.
        gone = await api.call("DELETE", f"{api.gateway}/v1/accounts/{account}/credentials")
        assert gone.status == 200, gone
