"""MIME parsing off the event loop, each message within a time and memory budget.

A message is parsed by :func:`libs.mime.parse_raw_mime` in a worker process of a pebble pool.
A parse that outlasts ``timeout_s`` has its worker killed (pebble starts a new one), one that
exhausts the worker's address-space limit raises MemoryError there, and one that kills its worker
is reported as expired: in each case the message is kept without the raw bytes, with a parse
warning that says why (``parse_timeout``, ``parse_out_of_memory``, ``parse_crashed``, and
``parse_invalid`` for parsed fields the event schema refuses). So no
message, however hostile, can stop the event loop (heartbeats, the transaction's timeout) or be
retried for ever.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import resource
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, Self

from pebble import ProcessExpired, ProcessPool
from prometheus_client import Counter
from pydantic import ValidationError

from libs.events import MessageContent
from libs.mime import MAX_RAW_BYTES, merge_parsed, parse_raw_mime, unparsed

__all__ = ["ParsePool"]

PARSE_FAILURES = Counter(
    "flightlog_transform_parse_failures_total", "Messages kept without parsing, by warning", ["warning"]
)
# spawn, not fork: the parent runs an event loop and Kafka clients that a forked child must not share.
_CONTEXT: Final = multiprocessing.get_context("spawn")


def _limit_memory(max_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))


def _warm() -> None:
    """Nothing: run once per worker at start, so it is spawned and has imported libs.mime."""


def _parse(raw_mime: str, size_bytes: int | None) -> dict[str, Any]:
    return parse_raw_mime(raw_mime, size_bytes, max_bytes=MAX_RAW_BYTES)


class ParsePool:
    """``workers`` processes that parse raw MIME; ``start()``, idempotent ``stop()``, ``async with``.

    :param timeout_s: the most one message may take; over it the message gets ``parse_timeout``.
    :param memory_limit_bytes: each worker's address space (``RLIMIT_AS``).
    :param parse: what a worker runs on ``(raw_mime, size_bytes)``: a module-level function, since
        the spawned worker imports it by name.
    """

    def __init__(
        self,
        *,
        workers: int,
        timeout_s: float,
        memory_limit_bytes: int,
        parse: Callable[[str, int | None], dict[str, Any]] = _parse,
    ) -> None:
        self.workers = workers
        self.parse = parse
        self.timeout_s = timeout_s
        self.memory_limit_bytes = memory_limit_bytes
        self._pool: ProcessPool | None = None

    def start(self) -> None:
        if self._pool is None:
            self._pool = ProcessPool(
                max_workers=self.workers,
                initializer=_limit_memory,
                initargs=(self.memory_limit_bytes,),
                context=_CONTEXT,
            )
            # pebble spawns its workers on the first task: one now per worker (importing this
            # module imports libs.mime), so the first batch of a sync does not wait for them
            for _ in range(self.workers):
                self._pool.schedule(_warm)

    def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()  # type: ignore[no-untyped-call]  # kills a parse in progress; nothing of it is kept
            pool.join()

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def expand(self, content: MessageContent) -> MessageContent:
        """``content`` with its ``raw_mime`` parsed into the message fields (see the module)."""
        if content.raw_mime is None:
            return content
        if self._pool is None:
            raise RuntimeError("ParsePool.expand before start()")
        future = self._pool.schedule(
            self.parse, args=(content.raw_mime, content.size_bytes), timeout=self.timeout_s
        )
        try:
            fields = await asyncio.wrap_future(future)
        except TimeoutError:
            return _failed(content, "parse_timeout")
        except MemoryError:
            return _failed(content, "parse_out_of_memory")
        except ProcessExpired:
            return _failed(content, "parse_crashed")
        try:
            return merge_parsed(content, fields)
        except ValidationError:  # parsed fields the event schema refuses: keep what the event said
            return _failed(content, "parse_invalid")


def _failed(content: MessageContent, warning: str) -> MessageContent:
    PARSE_FAILURES.labels(warning).inc()
    return unparsed(content, warning)
