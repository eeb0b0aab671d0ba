"""Fixtures shared by every test.

Integration and end-to-end tests run against the real local stack. ``stack`` brings it up (it
is idempotent, so `make test` having done it already costs about a second) and applies schemas
and topics; a part that cannot start fails the test session, it never skips. What the tests
create there is named after the run (tests/scratch.py) and removed when the session ends.
"""

from __future__ import annotations

import ast
import asyncio
import faulthandler
import logging
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from types import FrameType
from typing import Any

import pytest

from cli.stack import Stack
from libs.config import DatabaseSettings, KafkaSettings, ServiceSettings, StackSettings
from libs.db import connect
from libs.db.migrate import migrate_global, migrate_shard
from libs.kafka import create_topics
from libs.shards import ShardMap, ShardRouter, load_shard_map, register_clusters
from tests.scratch import Swept, sweep


def _dump_tasks(signum: int, frame: FrameType | None) -> None:
    """``kill -USR1 <pytest pid>``: print where every asyncio task of a hung test waits."""
    loop = asyncio._get_running_loop()
    for task in asyncio.all_tasks(loop) if loop is not None else ():
        print(f"{task!r:.200}", file=sys.stderr)
        awaited: Any = task.get_coro()
        while awaited is not None:  # the whole await chain, not only the task's own frame
            where = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
            if where is not None:
                code = where.f_code
                print(f"    {code.co_filename}:{where.f_lineno} {code.co_name}", file=sys.stderr)
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
    sys.stderr.flush()


signal.signal(signal.SIGUSR1, _dump_tasks)
faulthandler.register(signal.SIGUSR2)  # and ``kill -USR2``: every thread's stack


_swept: list[Swept] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for swept in _swept:
        terminalreporter.write_line(str(swept))


@pytest.fixture(scope="session")
async def scratch() -> AsyncIterator[None]:
    """Set up before, so torn down after, everything that uses the stack: this run's topics,
    applications and Dovecot users are removed once the services that use them have stopped."""
    yield
    settings, db = StackSettings(), DatabaseSettings()
    try:
        async with connect(db, db.global_db_host, db.global_db_port) as conn:
            shard_map: ShardMap | None = await load_shard_map(conn, db.global_db_name)
    except Exception:  # no global schema yet: no application to remove either
        shard_map = None
    stack = Stack(settings)
    _swept.append(
        await sweep(KafkaSettings(), db, shard_map, [stack.dovecot, stack.dovecot_plain, stack.dovecot_oauth])
    )


@pytest.fixture(scope="session")
def stack(scratch: None) -> Iterator[Stack]:
    stack = Stack(StackSettings())
    stack.up()
    yield stack


@pytest.fixture(scope="session")
def db_settings() -> DatabaseSettings:
    return DatabaseSettings()


@pytest.fixture(scope="session")
def kafka_settings() -> KafkaSettings:
    return KafkaSettings()


@pytest.fixture(scope="session")
def service_settings() -> ServiceSettings:
    return ServiceSettings()


@pytest.fixture(scope="session")
async def shard_map(stack: Stack, db_settings: DatabaseSettings) -> ShardMap:
    async with connect(db_settings, db_settings.global_db_host, db_settings.global_db_port) as conn:
        await migrate_global(conn, db_settings.global_db_name)
    shard_map = await register_clusters(db_settings, stack.clusters(), stack.settings.shard_count)
    for shard in shard_map.shards:
        async with connect(db_settings, *shard_map.cluster_of(shard).primary) as conn:
            await migrate_shard(conn, shard)
    return shard_map


@pytest.fixture(scope="session")
async def topics(stack: Stack, kafka_settings: KafkaSettings) -> None:
    await create_topics(kafka_settings)


@pytest.fixture
async def router(shard_map: ShardMap, db_settings: DatabaseSettings) -> AsyncIterator[ShardRouter]:
    async with ShardRouter(db_settings) as router:
        yield router


@pytest.fixture(autouse=True)
async def _no_lingering_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves tasks running behind it (faust's check)."""
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)
    left = [t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()]
    if left:
        for task in left:
            task.cancel()
        pytest.fail(f"test left tasks running: {[t.get_name() for t in left]}")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def _no_sql_warnings() -> Iterator[None]:
    """Fail a test whose SQL drew a warning from the server: the driver (asyncmy) logs them on its
    logger instead of raising a Python warning, which ``filterwarnings = error`` would catch."""
    collect = _Collect()
    driver_logger = logging.getLogger("asyncmy")
    driver_logger.addHandler(collect)
    try:
        yield
    finally:
        driver_logger.removeHandler(collect)
    if collect.records:
        pytest.fail(f"SQL warnings: {[r.getMessage() for r in collect.records]}")


@pytest.fixture(autouse=True)
def _ast_recursion_state() -> None:
    """The CI run of this commit's parent failed test_cli_imports with "SystemError: AST
    constructor recursion depth mismatch" from ``ast.parse`` (CPython 3.11.7's recursion
    accounting, left stale by a RecursionError that an earlier test caught in the same thread);
    the tests after it parsed fine. A throwaway parse before each test takes the stale state, so a
    test that parses Python source (test_cli_imports, test_layout, cli.config_docs) does not."""
    try:
        ast.parse("0")
    except SystemError:
        pass
