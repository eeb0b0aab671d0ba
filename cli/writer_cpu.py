"""What one persist batch costs in shard transactions: this process's CPU and MariaDB's, per batch.

``python -m cli.writer_cpu [--records N] [--batches B]`` writes batches shaped like persist's, one
after another: every shard of the map at once, a server's shards in one transaction (as persist's
worker writes them, :func:`services.persist.writer.write_shards`), each shard ``N`` new messages
(the ``sent`` record, with content) and ``N`` updates of the previous batch's (``delivered``,
without). The figures are this process's CPU time and the stack's MariaDB servers' (primaries and
replicas, :func:`cli.bench.cpu.stack_groups`) over ``B`` batches, per batch.

It tells what a batch costs apart from its rows: run it at a few ``--records`` and the part that
does not grow is the transactions' (their statements, each parsed and planned again, and their
commits, with the binlog and a semi-sync replica). A bench application with an account
per shard is created each run (``cli.bench.drive.make_tenant``), as the bench's stages do.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import defaultdict
from datetime import UTC, datetime

from cli.bench import cpu
from cli.bench.drive import make_tenant
from libs.config import DatabaseSettings
from libs.events import Direction, MessageDoc, Participant, PostflightRecord, Status
from libs.ids import shard_of
from libs.shards import ShardRouter
from services.persist.writer import write_shards

__all__ = ["record"]

_WARM_UP_BATCHES = 20


def record(account_id: int, key: str, version: int, status: Status) -> PostflightRecord:
    """A ``sent`` record carries the message's content; a later ``delivered`` one only its status."""
    now = datetime.now(UTC)
    sent = status is Status.SENT
    return PostflightRecord(
        account_id=account_id,
        message_key=key,
        version=version,
        content_version=None if sent else 0,
        message=MessageDoc(
            status=status,
            direction=Direction.OUTBOUND,
            channel="email",
            sender=Participant(email="sender@example.test") if sent else None,
            to=[Participant(email="rcpt@example.test")] if sent else [],
            subject="subject" if sent else None,
            body_text="a short body " * 20 if sent else None,
            occurred_at=now,
            final_at=None if sent else now,
        ),
    )


async def measure(records: int, batches: int) -> str:
    db = DatabaseSettings()
    tenant = await make_tenant(db)
    groups = cpu.stack_groups()
    run = time.time_ns()

    async with ShardRouter(db) as router:

        async def batch(i: int) -> None:
            by_server: dict[int, dict[int, list[PostflightRecord]]] = defaultdict(dict)
            for account in tenant.accounts:
                new = [record(account, f"w{run}-{i}-{j}", 2 * i + 1, Status.SENT) for j in range(records)]
                if i:
                    done = Status.DELIVERED
                    new += [record(account, f"w{run}-{i - 1}-{j}", 2 * i + 2, done) for j in range(records)]
                shard = shard_of(account)
                by_server[router.shard_map.shard_cluster[shard]][shard] = new
            await asyncio.gather(*(write_shards(router, shards) for shards in by_server.values()))

        for i in range(_WARM_UP_BATCHES):
            await batch(i)
        before = cpu.sample(groups)
        for i in range(_WARM_UP_BATCHES, _WARM_UP_BATCHES + batches):
            await batch(i)
        used = cpu.usage(before, cpu.sample(groups))
    ours = used.seconds[cpu.LOAD_GENERATOR]
    theirs = used.seconds.get("MariaDB primaries", 0.0) + used.seconds.get("MariaDB replicas", 0.0)
    wall = used.wall_s
    return (
        f"{batches} batches of {len(tenant.accounts)} shards x {2 * records} records: per batch, "
        f"this process {ours / batches * 1e3:.2f} ms of CPU, MariaDB {theirs / batches * 1e3:.2f} ms, "
        f"wall {wall / batches * 1e3:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=5, help="new messages a shard, as many updates")
    parser.add_argument("--batches", type=int, default=300)
    args = parser.parse_args()
    print(asyncio.run(measure(args.records, args.batches)))


if __name__ == "__main__":
    main()
