"""An OAuth2 IMAP account through the running pipeline: registered at the gateway with a grant of
the stack's token server (the services' ``generic`` provider), synced by ingest from the OAuth2
Dovecot, its raw message read by the gateway with the same tokens; a revoked grant leaves it in
``auth_failed`` with the reason, and a new grant (PATCH) brings it back."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from cli.mailbox_gen import DOMAIN, fill_maildir, live_message
from cli.stack import IMAP_TEST_PASSWORD, Stack
from libs.imap.client import Imap4
from libs.shards import ShardRouter
from tests.e2e.conftest import Pipeline
from tests.e2e.mailbox_helpers import SYNCED_WITHIN_S, Gateway
from tests.integration.test_imap_sync import doveadm
from tests.oauth_tokens import grant, revoke
from tests.polling import eventually
from tests.scratch import dovecot_user

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


async def _state(gateway: Gateway, account_id: int) -> dict[str, Any]:
    status, body = await gateway.call("GET", f"/v1/accounts/{account_id}/sync")
    assert status == 200, body
    result: dict[str, Any] = body
    return result


async def test_an_oauth_account_syncs_is_read_and_recovers_from_a_revoked_grant(
    pipeline: Pipeline, stack: Stack, router: ShardRouter, tenant_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack.oauth_server.up()
    server = stack.dovecot_oauth
    server.up()
    user = dovecot_user("oauth")
    address = f"{user}@{DOMAIN}"
    server.add_user(address)
    fill_maildir(server, user, 1)
    tokens = await grant(stack.oauth_server, address)
    tenant = await tenant_factory([])
    gateway = Gateway(http, pipeline, tenant.api_key)
    oauth = {
        "provider": "generic", "refresh_token": tokens["refresh_token"],
        "access_token": tokens["access_token"], "access_token_expires_in": tokens["expires_in"],
        "sasl_mechanism": "oauthbearer",
    }  # fmt: skip
    status, created = await gateway.call(
        "POST", "/v1/accounts",
        {"email": address, "host": "127.0.0.1", "port": server.port, "tls_mode": "none", "username": address,
         "oauth": oauth, "shard": router.shard_map.shards[0]},
    )  # fmt: skip
    assert status == 201, created
    assert (created["auth"], created["oauth_provider"], created["sasl_mechanism"]) == (
        "oauth2", "generic", "oauthbearer",
    )  # fmt: skip
    assert tokens["refresh_token"] not in str(created) and tokens["access_token"] not in str(created)
    account_id = int(created["id"])
    try:
        messages: dict[str, Any] = {}

        async def synced(count: int) -> bool:
            messages.update(await gateway.messages(account_id))
            return len(messages) >= count

        await eventually(lambda: synced(1), SYNCED_WITHIN_S, "the first message")
        first = next(iter(messages.values()))
        async with http.get(f"{gateway.base}/v1/messages/{first['id']}/raw", headers=gateway.headers) as resp:
            assert resp.status == 200, await resp.text()  # the gateway logged in with the tokens too
            assert b"Subject:" in await resp.read()

        # The user removes the application's access; the next login finds out.
        await revoke(stack.oauth_server, tokens["refresh_token"])
        doveadm(server, "kick", address)

        async def failed() -> bool:
            return bool((await _state(gateway, account_id))["state"] == "auth_failed")

        await eventually(failed, SYNCED_WITHIN_S, "the account to be auth_failed")
        state = await _state(gateway, account_id)
        assert "(invalid_grant)" in state["last_error"], state
        async with http.get(f"{gateway.base}/v1/messages/{first['id']}/raw", headers=gateway.headers) as resp:
            assert resp.status == 502 and resp.content_type == "application/problem+json"

        # A new grant restarts the sync.
        renewed = await grant(stack.oauth_server, address)
        status, body = await gateway.call(
            "PATCH", f"/v1/accounts/{account_id}/credentials",
            {"oauth": {"provider": "generic", "refresh_token": renewed["refresh_token"]}},
        )  # fmt: skip
        assert status == 200 and body["state"] == "pending", body
        client = Imap4("127.0.0.1", server.port, timeout=60)
        await client.wait_hello_from_server()
        assert (await client.login(address, IMAP_TEST_PASSWORD)).result == "OK"
        try:
            assert (
                await client.append(live_message(f"regranted-{user}", user), mailbox="INBOX")
            ).result == "OK"
        finally:
            await client.logout()
        await eventually(lambda: synced(2), SYNCED_WITHIN_S, "mail after the new grant")
        assert (await _state(gateway, account_id))["state"] == "running"
    finally:
        status, gone = await gateway.call("DELETE", f"/v1/accounts/{account_id}/credentials")
        assert status == 200 and gone["state"] == "disconnected", gone
