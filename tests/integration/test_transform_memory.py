"""transform's memory and restored state stay bounded over many large messages.

A target in docs/architecture.md.

A real transform process (``python -m services.transform``, topics of its own) with a 1 s
final-state TTL takes 20,000 inbound messages of 50 KB bodies. Kept, they would be about 1 GB
in memory and in the changelog; bounded, transform's RSS hardly moves between the 2,000th and the
20,000th message, the changelog's states carry no bodies, and once the sweep has tombstoned the
expired states a restart restores next to nothing. Restore time is printed, not asserted (no
timing assertions in tests; ``flightlog bench`` reports it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import pytest

from cli.bench.transform_memory import TransformUnderTest
from cli.stack import Stack
from libs.config import KafkaSettings

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

MESSAGES: Final = 20_000
WARMUP: Final = 2_000  # fetch buffers, batches and allocator arenas reach their working size
BODY_BYTES: Final = 50_000
# 18,000 bodies of 50 KB are 858 MiB: a transform that kept them (or a tenth of them) would be
# far over; a bounded one grows by its allocator's noise and the states alive within one TTL.
RSS_GROWTH_BOUND_BYTES: Final = 64 * 2**20
# A final state without its content is a few hundred bytes of JSON; with it, over 50 KB.
STATE_BYTES_BOUND: Final = BODY_BYTES // 10
# With a 1 s TTL and a sweep every 0.5 s every state expires about 1.5 s after its message's last
# event, so once the run is over the changelog holds (almost) none: far from the 20,000 a
# changelog without expiry would restore.
RESTORED_BOUND: Final = 1_000


async def test_rss_and_restored_states_do_not_grow_with_messages(
    stack: Stack, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    async with TransformUnderTest(
        kafka_settings, tmp_path, body_bytes=BODY_BYTES, final_state_ttl_s=1.0, sweep_interval_s=0.5
    ) as transform:
        ready = transform.memory()
        await transform.feed(WARMUP)
        warm = transform.memory()
        run_s = await transform.feed(MESSAGES - WARMUP)
        end = transform.memory()
        growth = end.rss_bytes - warm.rss_bytes
        print(
            f"\ntransform RSS: {ready.rss_bytes / 2**20:.0f} MiB ready, {warm.rss_bytes / 2**20:.0f} MiB "
            f"after {WARMUP:,} messages, {end.rss_bytes / 2**20:.0f} MiB after {MESSAGES:,} "
            f"(peak {end.hwm_bytes / 2**20:.0f} MiB); {MESSAGES - WARMUP:,} messages in {run_s:.1f} s"
        )
        assert growth < RSS_GROWTH_BOUND_BYTES, (
            f"transform's RSS grew by {growth / 2**20:.0f} MiB over {MESSAGES - WARMUP:,} messages of "
            f"{BODY_BYTES:,} B (bound {RSS_GROWTH_BOUND_BYTES / 2**20:.0f} MiB): it keeps what it processed"
        )

        fold = await transform.read_changelog()
        if fold.live:
            mean = fold.live_bytes / fold.live
            assert mean < STATE_BYTES_BOUND, f"live states average {mean:,.0f} B: final states keep content"

        # Every message is final, so the sweep should tombstone them all; waiting for none left
        # makes the restore below restore what expiry leaves, not what a moment happened to hold.
        live_at_end = fold.live
        live = await transform.wait_live_states(0, timeout_s=30)
        print(f"live states in the changelog: {live_at_end:,} after the run, {live:,} after the sweep")
        assert live <= RESTORED_BOUND, (
            f"{live:,} states still live in the changelog 30 s after the run (bound {RESTORED_BOUND:,}): "
            "expired states are not tombstoned"
        )

        restore = await transform.restart()
        print(
            f"restart: {restore.states:,} states restored in {restore.seconds:.2f} s from "
            f"{fold.records:,} changelog records; ready after {restore.ready_s:.1f} s, "
            f"RSS {restore.rss_bytes / 2**20:.0f} MiB"
        )
        assert restore.states <= RESTORED_BOUND
