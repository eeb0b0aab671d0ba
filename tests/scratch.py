"""Names for what a test session creates on the shared stack, and the sweep that removes it.

The stack outlives every test run (`make dev` and several checkouts share it), so whatever a test
creates carries this run's id: Kafka topics are ``test.<run>.<kind>.<hex>``, consumer groups
``test-<run>-<kind>-<hex>``, applications ``test-<run>-<kind>-<hex>`` (their accounts, messages,
change rows, webhook endpoints and IMAP accounts go with them) and Dovecot users
``<prefix>-<run>-<hex>`` (their maildirs go with them). :func:`sweep`, run by the session
fixture in tests/conftest.py, removes this run's and those of runs older than
:data:`STALE_AFTER_S` (a run killed before its teardown); other runs going on now are left alone.
The run id begins with the start time in hex, which is how a stale run is told apart.
"""

from __future__ import annotations

import fcntl
import logging
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from cli.mailbox_gen import DOMAIN
from cli.stack import Dovecot
from libs.config import DatabaseSettings, KafkaSettings
from libs.db import connect, shard_schema
from libs.kafka import TopicSpec, create_topics, make_consumer, partition_count
from libs.shards import ShardMap

__all__ = [
    "RUN_ID",
    "STALE_AFTER_S",
    "Swept",
    "app_name",
    "dovecot_user",
    "group_name",
    "sweep",
    "topic_name",
]

logger = logging.getLogger(__name__)

RUN_ID = f"{int(time.time()):08x}{uuid.uuid4().hex[:4]}"
STALE_AFTER_S = 24 * 3600.0  # far beyond any session: a run this old was killed
_RUN = re.compile(r"(?:^|[-.])([0-9a-f]{8})([0-9a-f]{4})[-.]")


def _hex() -> str:
    return uuid.uuid4().hex[:8]


def topic_name(kind: str) -> str:
    return f"test.{RUN_ID}.{kind}.{_hex()}"


def group_name(kind: str) -> str:
    return f"test-{RUN_ID}-{kind}-{_hex()}"


def app_name(kind: str) -> str:
    return f"test-{RUN_ID}-{kind}-{_hex()}"


def dovecot_user(prefix: str) -> str:
    """A local part for a Dovecot user of this run (used as ``f"{user}@{DOMAIN}"``)."""
    return f"{prefix}-{RUN_ID}-{_hex()}"


async def commit_end_offsets(kafka: KafkaSettings, group: str, *topics: str) -> None:
    """Start a new consumer group at the topics' ends, as if it had read them so far: a process
    of the tests that reads a shared topic in a group of its own must not work through its
    history (flightlog.postflight holds every record since the stack was made). ``topics`` are
    among :data:`libs.kafka.TOPICS`."""
    tps = [TopicPartition(t, p) for t in topics for p in range(await partition_count(kafka, t))]
    async with make_consumer(kafka, group_id=group) as consumer:
        consumer.assign(tps)
        await consumer.commit(dict(await consumer.end_offsets(tps)))


async def transform_topics(
    kafka: KafkaSettings, prefix: str, partitions: int, *, state_partitions: int | None = None
) -> tuple[str, str, str]:
    """Inflight, postflight and changelog topics of this run for a transform of a test's own
    (the changelog with ``state_partitions``, by default as many as the others)."""
    base = topic_name(prefix)
    inflight, postflight, state = (f"{base}.{n}" for n in ("inflight", "postflight", "state"))
    changelog = partitions if state_partitions is None else state_partitions
    await create_topics(
        kafka,
        (
            TopicSpec(inflight, partitions),
            TopicSpec(postflight, partitions),
            TopicSpec(state, changelog, {"cleanup.policy": "compact"}),
        ),
    )
    return inflight, postflight, state


def _removable(name: str, now: float) -> bool:
    """This run's, or a stale run's."""
    found = _RUN.search(name)
    if found is None:
        return False
    run = found.group(1) + found.group(2)
    return run == RUN_ID or now - int(found.group(1), 16) > STALE_AFTER_S


@dataclass
class Swept:
    """What one sweep removed, for the session's summary line."""

    topics: int = 0
    applications: int = 0
    accounts: int = 0
    rows: int = 0
    dovecot_users: int = 0
    errors: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = (
            f"scratch {RUN_ID}: removed {self.topics} topics, {self.applications} applications "
            f"({self.accounts} accounts, {self.rows} rows), {self.dovecot_users} Dovecot users"
        )
        return text + (f"; failed: {'; '.join(self.errors)}" if self.errors else "")


async def _sweep_topics(kafka: KafkaSettings, now: float, swept: Swept) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.kafka_bootstrap_servers)
    await admin.start()
    try:
        doomed = [t for t in await admin.list_topics() if t.startswith("test.") and _removable(t, now)]
        if doomed:
            await admin.delete_topics(doomed)
        swept.topics = len(doomed)
    finally:
        await admin.close()


async def _sweep_applications(db: DatabaseSettings, shard_map: ShardMap, now: float, swept: Swept) -> None:
    g = f"`{db.global_db_name}`"
    async with connect(db, db.global_db_host, db.global_db_port) as conn, conn.cursor() as cur:
        await cur.execute(f"SELECT id, name FROM {g}.applications WHERE name LIKE 'test-%%'")
        apps = [int(id_) for id_, name in await cur.fetchall() if _removable(f"{name}-", now)]
    if not apps:
        return
    marks = ", ".join(["%s"] * len(apps))
    async with connect(db, db.global_db_host, db.global_db_port) as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT account_id FROM {g}.account_erasures WHERE application_id IN ({marks})", apps
        )
        erased = [int(a) for (a,) in await cur.fetchall()]
    for shard in shard_map.shards:
        async with connect(db, *shard_map.cluster_of(shard).primary) as conn, conn.cursor() as cur:
            schema = f"`{shard_schema(shard)}`"
            await cur.execute(f"SELECT id FROM {schema}.accounts WHERE application_id IN ({marks})", apps)
            accounts = [int(a) for (a,) in await cur.fetchall()]
            if accounts:
                in_accounts = ", ".join(["%s"] * len(accounts))
                for table in ("messages", "changes", "imap_uids", "outbox"):
                    swept.rows += await cur.execute(
                        f"DELETE FROM {schema}.`{table}` WHERE account_id IN ({in_accounts})", accounts
                    )
                await cur.execute(f"DELETE FROM {schema}.accounts WHERE id IN ({in_accounts})", accounts)
                swept.accounts += len(accounts)
            theirs = [a for a in erased if a >> 48 == shard]
            if theirs:  # the record of erased accounts (libs.erasure) that persist reads
                in_erased = ", ".join(["%s"] * len(theirs))
                swept.rows += await cur.execute(
                    f"DELETE FROM {schema}.erased_accounts WHERE account_id IN ({in_erased})", theirs
                )
            await conn.commit()
    async with connect(db, db.global_db_host, db.global_db_port) as conn, conn.cursor() as cur:
        endpoints = f"SELECT id FROM {g}.webhook_endpoints WHERE application_id IN ({marks})"
        imap = f"SELECT account_id FROM {g}.imap_accounts WHERE application_id IN ({marks})"
        for statement in (
            f"DELETE FROM {g}.webhook_attempts WHERE endpoint_id IN ({endpoints})",
            f"DELETE FROM {g}.webhook_deliveries WHERE endpoint_id IN ({endpoints})",
            f"DELETE FROM {g}.webhook_endpoints WHERE application_id IN ({marks})",
            f"DELETE FROM {g}.imap_folders WHERE account_id IN ({imap})",
            f"DELETE FROM {g}.imap_accounts WHERE application_id IN ({marks})",
            f"DELETE FROM {g}.smtp_accounts WHERE application_id IN ({marks})",
            f"DELETE FROM {g}.api_keys WHERE application_id IN ({marks})",
            f"DELETE FROM {g}.account_erasures WHERE application_id IN ({marks})",
        ):
            swept.rows += await cur.execute(statement, apps)
        swept.applications = await cur.execute(f"DELETE FROM {g}.applications WHERE id IN ({marks})", apps)
        await conn.commit()


def _sweep_dovecot(server: Dovecot, now: float) -> int:
    """Drop the run's users from the passwd-file (under the lock ``Dovecot.add_users`` takes) and
    delete their maildirs."""
    if not server.users.exists():
        return 0
    with open(server.dir / "users.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lines = server.users.read_text().splitlines()
        doomed = {line.split(":", 1)[0] for line in lines if _removable(line.split("@", 1)[0] + "-", now)}
        if doomed:
            tmp = server.users.with_suffix(".tmp")
            tmp.write_text("".join(f"{line}\n" for line in lines if line.split(":", 1)[0] not in doomed))
            tmp.replace(server.users)
    for address in doomed:
        local, _, domain = address.partition("@")
        shutil.rmtree(Path(server.dir, "mail", domain or DOMAIN, local), ignore_errors=True)
    return len(doomed)


async def sweep(
    kafka: KafkaSettings, db: DatabaseSettings, shard_map: ShardMap | None, dovecots: list[Dovecot]
) -> Swept:
    """Remove this run's (and stale runs') topics, applications and Dovecot users; a part that
    fails is reported, the others are still swept."""
    now = time.time()
    swept = Swept()
    try:
        await _sweep_topics(kafka, now, swept)
    except Exception as exc:  # the other parts are still worth removing
        swept.errors.append(f"topics: {exc!r}")
    if shard_map is not None:
        try:
            await _sweep_applications(db, shard_map, now, swept)
        except Exception as exc:
            swept.errors.append(f"applications: {exc!r}")
    for server in dovecots:
        try:
            swept.dovecot_users += _sweep_dovecot(server, now)
        except OSError as exc:
            swept.errors.append(f"{server.name}: {exc!r}")
    return swept
