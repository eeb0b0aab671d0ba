"""Transform throughput on synced events with raw MIME, beside the same messages without it.

Not part of ``flightlog bench`` yet: ``python -m cli.bench.mime [--events N] [--no-kafka]``.

Three kinds of ``message.synced`` event carry the same generated mailbox (a seeded mix of 5-50 KB
messages: plain text, multipart/alternative, and multipart/mixed with a PDF or PNG attachment,
RFC 2047 subjects, reply threads):

- ``raw_mime``: the raw message, base64, as IMAP sync sends it; transform parses it;
- ``parsed``: the fields the parser would find (subject, from, to, bodies) sent ready-made;
- ``minimal``: a subject only.

Two figures per kind: the transform's CPU path in-process (decode the event, ``lifecycle.apply``,
encode the postflight record and the changelog state: what the worker does per event besides
Kafka I/O), and a real :class:`~services.transform.worker.TransformWorker` on private topics of
the running Kafka (events produced first, then timed from the first batch to the last commit).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import random
import statistics
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.header import Header
from typing import Any

from libs.config import KafkaSettings
from libs.events import Event, EventType, decode_event, encode, message_key_bytes
from libs.kafka import TopicSpec, create_topics, make_admin, make_producer
from libs.lifecycle import apply
from libs.mime import parse_message
from services.transform.worker import TransformWorker

__all__ = ["main", "make_mailbox"]

ACCOUNT = 1 << 48 | 1
T0 = datetime(2026, 1, 1, tzinfo=UTC)
WORDS = (
    "the quarterly report attached please review before friday meeting budget café über naïve "
    "shipment invoice thanks regards schedule update project milestone résumé 東京 données"
).split()


_TEXT_PART = "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"


def _text(rng: random.Random, size: int) -> str:
    out: list[str] = []
    n = 0
    while n < size:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
        out.append(line)
        n += len(line.encode()) + 2
    return "\r\n".join(out)


def _qp_free_html(text: str) -> str:
    paragraphs = "".join(f"<p>{line}</p>\r\n" for line in text.split("\r\n"))
    return f"<html><head><style>p{{margin:0}}</style></head><body>{paragraphs}</body></html>"


def _message(rng: random.Random, i: int) -> bytes:
    """One message of roughly 5-50 KB (its raw size, attachments included)."""
    target = rng.randint(5_000, 50_000)
    subject = f"{rng.choice(WORDS)} {rng.choice(WORDS)} #{i}"
    headers = [
        f"From: {Header('Jürgen Müller', 'utf-8').encode()} <j{i % 50}@example.de>",
        f"To: a@example.org, {Header('Влад', 'koi8-r').encode()} <b@example.org>",
        f"Subject: {Header(subject, 'utf-8').encode()}",
        f"Message-ID: <m{i}@bench.test>",
        "Date: Thu, 01 Jan 2026 09:00:00 +0000",
        "MIME-Version: 1.0",
    ]
    if i % 3 and i > 3:
        root = f"<m{i - i % 3}@bench.test>"
        headers += [f"In-Reply-To: {root}", f"References: {root}"]
    kind = rng.random()
    if kind < 0.4:
        body = _text(rng, target - 600)
        parts = _TEXT_PART + body
        return ("\r\n".join(headers) + "\r\n" + parts + "\r\n").encode()
    text_size = (target // 3) if kind < 0.7 else (target // 6)
    text = _text(rng, text_size)
    alternative = (
        'Content-Type: multipart/alternative; boundary="alt"\r\n\r\n'
        f"--alt\r\n{_TEXT_PART}{text}\r\n--alt\r\n{_TEXT_PART.replace('plain', 'html')}"
        f"{_qp_free_html(text)}\r\n--alt--\r\n"
    )
    if kind < 0.7:
        return ("\r\n".join(headers) + "\r\n" + alternative).encode()
    attachment = rng.randbytes(max(1000, (target - 3 * text_size) * 3 // 4))
    name, ctype = ("report.pdf", "application/pdf") if rng.random() < 0.5 else ("photo.png", "image/png")
    mixed = (
        'Content-Type: multipart/mixed; boundary="mix"\r\n\r\n--mix\r\n' + alternative + "\r\n--mix\r\n"
        f'Content-Type: {ctype}\r\nContent-Disposition: attachment; filename="{name}"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(attachment).decode() + "--mix--\r\n"
    )
    return ("\r\n".join(headers) + "\r\n" + mixed).encode()


def make_mailbox(count: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    return [_message(rng, i) for i in range(count)]


def _event(i: int, content: dict[str, Any]) -> Event:
    return Event.model_validate(
        {
            "event_id": f"bench-{i}",
            "account_id": ACCOUNT,
            "message_key": f"m{i}",
            "type": EventType.SYNCED,
            "occurred_at": T0 + timedelta(seconds=i),
            "source": "imap",
            "content": content,
            "flags": {"unread": True, "folder": "INBOX"},
        }
    )


def make_events(mailbox: list[bytes]) -> dict[str, list[Event]]:
    raw, parsed, minimal = [], [], []
    for i, message in enumerate(mailbox):
        p = parse_message(message)
        raw.append(_event(i, {"raw_mime": base64.b64encode(message).decode(), "size_bytes": len(message)}))
        fields = {"channel": "email", "from": p.sender, "to": p.to, "subject": p.subject,
                  "body_text": p.body_text, "body_html": p.body_html}  # fmt: skip
        parsed.append(_event(i, {k: v for k, v in fields.items() if v is not None}))
        minimal.append(_event(i, {"subject": p.subject}))
    return {"raw_mime": raw, "parsed": parsed, "minimal": minimal}


@dataclass
class CpuFigures:
    events_per_s: float
    event_bytes: float
    state_bytes: float
    record_bytes: float


def cpu_path(events: list[Event], rounds: int = 3) -> CpuFigures:
    """What the worker does per event besides Kafka I/O, best of ``rounds``."""
    values = [encode(e) for e in events]
    best = float("inf")
    state_sizes: list[int] = []
    record_sizes: list[int] = []
    for _ in range(rounds):
        state_sizes, record_sizes = [], []
        started = time.perf_counter()
        for value in values:
            outcome = apply(None, decode_event(value))
            assert outcome.state is not None and outcome.value is not None
            state_sizes.append(len(outcome.state.model_dump_json().encode()))
            record_sizes.append(len(outcome.value))
        best = min(best, time.perf_counter() - started)
    return CpuFigures(
        len(values) / best,
        statistics.fmean(len(v) for v in values),
        statistics.fmean(state_sizes),
        statistics.fmean(record_sizes),
    )


async def worker_throughput(kafka: KafkaSettings, events: list[Event], partitions: int = 6) -> float:
    """Events/s of one TransformWorker over ``events`` already on its private inflight topic."""
    suffix = uuid.uuid4().hex[:8]
    inflight, postflight, state = (f"bench.mime.{suffix}.{n}" for n in ("inflight", "postflight", "state"))
    specs = (
        TopicSpec(inflight, partitions),
        TopicSpec(postflight, partitions),
        TopicSpec(state, partitions, {"cleanup.policy": "compact"}),
    )
    await create_topics(kafka, specs)
    try:
        async with make_producer(kafka, linger_ms=20) as producer:
            sends = [
                await producer.send(inflight, encode(e), key=message_key_bytes(e.account_id, e.message_key))
                for e in events
            ]
            await asyncio.gather(*sends)
        worker = TransformWorker(
            kafka, transactional_id=f"bench-mime-{suffix}", group_id=f"bench-mime-{suffix}",
            inflight_topic=inflight, postflight_topic=postflight, state_topic=state,
        )  # fmt: skip
        async with worker:
            done = 0
            started: float | None = None
            deadline = time.monotonic() + 300
            while done < len(events):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the worker processed {done} of {len(events)} events in 300 s")
                n = await worker.process_once()
                if n and started is None:
                    started = time.perf_counter()
                done += n
            assert started is not None
            return len(events) / (time.perf_counter() - started)
    finally:
        admin = make_admin(kafka)
        await admin.start()
        try:
            await admin.delete_topics([s.name for s in specs])
        finally:
            await admin.close()


async def run(count: int, kafka: bool) -> None:
    mailbox = make_mailbox(count)
    sizes = [len(m) for m in mailbox]
    print(
        f"{count} messages, raw size mean {statistics.fmean(sizes) / 1024:.1f} KiB"
        f" (min {min(sizes) / 1024:.1f}, max {max(sizes) / 1024:.1f})"
    )
    started = time.perf_counter()
    for m in mailbox:
        parse_message(m)
    print(f"libs.mime.parse_message alone: {count / (time.perf_counter() - started):,.0f} messages/s")
    events = make_events(mailbox)
    print(f"{'kind':<10} {'cpu ev/s':>10} {'event B':>9} {'state B':>9} {'record B':>9} {'worker ev/s':>12}")
    for kind, evs in events.items():
        cpu = cpu_path(evs)
        worker = f"{await worker_throughput(KafkaSettings(), evs):,.0f}" if kafka else "-"
        print(
            f"{kind:<10} {cpu.events_per_s:>10,.0f} {cpu.event_bytes:>9,.0f} {cpu.state_bytes:>9,.0f}"
            f" {cpu.record_bytes:>9,.0f} {worker:>12}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--no-kafka", action="store_true", help="only the in-process CPU path")
    args = parser.parse_args()
    asyncio.run(run(args.events, not args.no_kafka))


if __name__ == "__main__":
    main()
