"""What an ingest restart does with accounts whose credentials were refused: nothing, until new
credentials arrive (a replayed server with no transcript records any connection as a mismatch)."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer

from libs.imap_accounts import SyncStore
from libs.shards import ShardRouter
from services.ingest.imap.settings import ImapSettings
from services.ingest.imap.sync import AccountSync
from tests.imap_replay import ReplayServer
from tests.integration.test_imap_gmail import gmail_account
from tests.integration.test_imap_sync import imap_settings, producer, store, tap
from tests.polling import eventually

pytestmark = pytest.mark.timeout(60)
__all__ = ["imap_settings", "producer", "store", "tap"]


async def test_refused_credentials_are_not_tried_again_after_a_restart(
    router: ShardRouter, store: SyncStore, producer: AIOKafkaProducer, imap_settings: ImapSettings
) -> None:
    async with ReplayServer([]) as server:
        account_id, settings = await gmail_account(router, store, producer, imap_settings, server.port)
        await store.set_account_state(account_id, "auth_failed", "the IMAP server refused the credentials")
        sync = AccountSync(account_id, store, producer, settings)
        await asyncio.wait_for(sync.run(), 30)  # returns: waits for new credentials
        assert sync.state == "auth_failed"
        await store.set_account_state(account_id, "pending")  # as new credentials do
        again = asyncio.create_task(AccountSync(account_id, store, producer, settings).run())
        try:
            # this one connects: the server has nothing to play
            await eventually(lambda: bool(server.mismatches), 30, "a connection")
        finally:
            again.cancel()
            await asyncio.gather(again, return_exceptions=True)
    assert server.mismatches == ["a connection beyond the transcripts"]
    view = await store.account_public(account_id)
    assert view is not None and view["state"] != "auth_failed"
