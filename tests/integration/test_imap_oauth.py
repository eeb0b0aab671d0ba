"""OAuth2 IMAP accounts against the stack's OAuth2 Dovecot (``dovecot-oauth``: Dovecot's oauth2
passdb asking the stack's token server, RFC 7662 introspection, about every token): both SASL
mechanisms, a sync whose access token expires and is refreshed, an access token refused and
refreshed once, and a revoked grant that leaves the account in ``auth_failed``."""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from cli.mailbox_gen import DOMAIN, live_message
from cli.stack import Dovecot, OAuthServer, Stack
from libs.accounts import create_application
from libs.imap.client import AuthFailed, ImapConnection
from libs.imap.sasl import initial_response
from libs.imap_accounts import AccountRow, SyncStore
from libs.imap_login import AccountLogin
from libs.oauth import OAuthSettings, TokenClient, TokenRefused
from libs.shards import ShardRouter
from services.gateway.imap_accounts import NewImapAccount, OAuthGrant, create_imap_account
from services.ingest.imap.settings import ImapSettings
from services.ingest.imap.sync import AccountSync
from tests.integration import test_imap_sync as base
from tests.integration.test_imap_sync import InflightTap, doveadm, imap_client, new_mailbox, running
from tests.oauth_tokens import grant, oauth_settings, refresh, revoke
from tests.polling import eventually
from tests.scratch import app_name

pytestmark = pytest.mark.timeout(300)

WITHIN_S = 60.0  # a deadline for a condition polled for, not a speed under test

# the IMAP sync tests' fixtures: a producer, an inflight tap, sync settings, the store
producer, tap, imap_settings, store = base.producer, base.tap, base.imap_settings, base.store


@pytest.fixture
def oauth_dovecot(stack: Stack) -> Dovecot:
    stack.oauth_server.up()
    stack.dovecot_oauth.up()
    return stack.dovecot_oauth


@pytest.fixture
def token_server(stack: Stack, oauth_dovecot: Dovecot) -> OAuthServer:
    return stack.oauth_server


@pytest.fixture
def settings(token_server: OAuthServer) -> OAuthSettings:
    return oauth_settings(token_server, oauth_refresh_margin_s=1.0)


@pytest.fixture
async def login(store: SyncStore, settings: OAuthSettings) -> AsyncIterator[AccountLogin]:
    async with TokenClient(settings) as tokens:
        yield AccountLogin(store, tokens, settings)


def _connection(server: Dovecot) -> ImapConnection:
    return ImapConnection("127.0.0.1", server.port, "none", timeout_s=30, allow_private=True)


@pytest.mark.parametrize("method", ["xoauth2", "oauthbearer", "oauth2"])
async def test_an_access_token_logs_in_by_either_mechanism(
    oauth_dovecot: Dovecot, token_server: OAuthServer, method: str
) -> None:
    user = new_mailbox(oauth_dovecot, 1, "oauth")
    address = f"{user}@{DOMAIN}"
    tokens = await grant(token_server, address)
    conn = _connection(oauth_dovecot)
    await conn.connect(address, tokens["access_token"], method=method)
    try:
        info = await conn.select("INBOX")
        assert info.exists == 1
    finally:
        await conn.close()
    # a token is its user's only: another user's name with it is refused, as is a made-up token
    other = new_mailbox(oauth_dovecot, 0, "oauth")
    for username, token in ((f"{other}@{DOMAIN}", tokens["access_token"]), (address, "not-a-token")):
        with pytest.raises(AuthFailed, match="challenge"):  # the server's error challenge was answered
            await _connection(oauth_dovecot).connect(username, token, method=method)


@pytest.mark.parametrize("method", ["xoauth2", "oauthbearer"])
async def test_credentials_with_control_characters_never_reach_the_server(method: str) -> None:
    # a host that cannot resolve: the refusal comes before any connection
    conn = ImapConnection("unresolvable.invalid", 143, "none", timeout_s=5)
    for username, token in (("a@b.test", "tok\r\nA1 LOGOUT"), ("a@b.test\x01auth=Bearer x", "tok")):
        with pytest.raises(AuthFailed, match="control characters"):
            await conn.connect(username, token, method=method)
        with pytest.raises(ValueError, match="control characters"):
            initial_response(method, username, token, "h", 1)


def test_sasl_initial_responses_are_as_specified() -> None:
    xoauth2 = base64.b64decode(initial_response("xoauth2", "me@x.test", "tok", "imap.x.test", 993))
    assert xoauth2 == b"user=me@x.test\x01auth=Bearer tok\x01\x01"  # Google's XOAUTH2 document
    bearer = base64.b64decode(initial_response("oauthbearer", "a,b=c@x.test", "tok", "imap.x.test", 993))
    # RFC 7628 3.1 with RFC 5801's escapes of "," and "=" in the authorization identity
    assert bearer == b"n,a=a=2Cb=3Dc@x.test,\x01host=imap.x.test\x01port=993\x01auth=Bearer tok\x01\x01"


async def _oauth_account(
    router: ShardRouter, store: SyncStore, producer: AIOKafkaProducer, settings: ImapSettings,
    server: Dovecot, address: str, oauth: OAuthGrant,
) -> int:  # fmt: skip
    app, _ = await create_application(router, app_name("imap-oauth"))
    body = NewImapAccount(
        email=address, host="127.0.0.1", port=server.port, tls_mode="none", username=address, oauth=oauth
    )
    created = await create_imap_account(router, store, producer, settings, app.id, body)
    assert created["auth"] == "oauth2" and created["oauth_provider"] == "generic", created
    return int(created["id"])


def _granted(tokens: dict[str, Any], **extra: Any) -> OAuthGrant:
    """The grant of a token response, as an application hands it over."""
    return OAuthGrant(
        provider="generic", refresh_token=tokens["refresh_token"], access_token=tokens["access_token"],
        access_token_expires_in=tokens["expires_in"], **extra,
    )  # fmt: skip


async def _stored(store: SyncStore, account_id: int) -> AccountRow:
    account = await store.account(account_id)
    assert account is not None and account.oauth is not None
    return account


async def test_a_sync_goes_on_after_its_access_token_expires(
    router: ShardRouter, store: SyncStore, producer: AIOKafkaProducer, imap_settings: ImapSettings,
    tap: InflightTap, oauth_dovecot: Dovecot, token_server: OAuthServer, login: AccountLogin,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, logger="libs.imap_login")
    caplog.set_level(logging.INFO, logger="services.ingest.imap.sync")
    user = new_mailbox(oauth_dovecot, 1, "oauth")
    address = f"{user}@{DOMAIN}"
    first = await grant(token_server, address, lifetime_s=3)  # every access token of it: 3 s
    oauth = _granted(first, sasl_mechanism="oauthbearer")
    account_id = await _oauth_account(router, store, producer, imap_settings, oauth_dovecot, address, oauth)
    got = tap.watch(account_id)
    sync = AccountSync(account_id, store, producer, imap_settings, login)
    async with running(sync):
        await eventually(lambda: len(got.of("message.synced")) == 1, WITHIN_S, "the first message")
        stored = await _stored(store, account_id)
        assert stored.oauth is not None and stored.oauth.expires_at is not None
        expires_at = stored.oauth.expires_at

        # The token expires; the server drops the session; the sync logs in again with a new one.
        await eventually(lambda: datetime.now(UTC) > expires_at, WITHIN_S, "the access token to expire")
        doveadm(oauth_dovecot, "kick", address)
        async with imap_client(oauth_dovecot, user) as client:
            assert (await client.append(live_message(f"expiry-{user}", user), mailbox="INBOX")).result == "OK"
        await eventually(lambda: len(got.of("message.synced")) == 2, WITHIN_S, "mail after the expiry")

    renewed = await _stored(store, account_id)
    assert renewed.oauth is not None
    assert renewed.oauth.access_token != first["access_token"]
    # the server rotates refresh tokens: the new one was kept, and the old one is spent
    assert renewed.oauth.refresh_token != first["refresh_token"]
    status, body = await refresh(token_server, first["refresh_token"])
    assert status == 400 and body["error"] == "invalid_grant"
    assert renewed.credentials_version == 1  # a refresh is no new credentials: no restart
    # refreshed before the login, not after the server refused the expired token
    assert _logged(caplog, account_id, "access token refreshed")
    assert not _logged(caplog, account_id, "access token refused")
    # a session that ends once its token has expired (Microsoft 365 ends them) is no error
    lost = [r.getMessage() for r in caplog.records if f"imap account {account_id}: " in r.getMessage()]
    assert any("after its access token expired" in m for m in lost), lost
    assert not any("retrying in" in m for m in lost), lost


def _logged(caplog: pytest.LogCaptureFixture, account_id: int, what: str) -> bool:
    return any(f"imap account {account_id}: {what}" in r.getMessage() for r in caplog.records)


async def test_a_refused_access_token_is_refreshed_once(
    router: ShardRouter, store: SyncStore, producer: AIOKafkaProducer, imap_settings: ImapSettings,
    tap: InflightTap, oauth_dovecot: Dovecot, token_server: OAuthServer, login: AccountLogin,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, logger="libs.imap_login")
    user = new_mailbox(oauth_dovecot, 1, "oauth")
    address = f"{user}@{DOMAIN}"
    tokens = await grant(token_server, address)
    # an access token of unknown expiry that the server no longer takes: tried, refused, refreshed
    oauth = OAuthGrant(
        provider="generic", refresh_token=tokens["refresh_token"], access_token="expired.token"
    )
    account_id = await _oauth_account(router, store, producer, imap_settings, oauth_dovecot, address, oauth)
    got = tap.watch(account_id)
    async with running(AccountSync(account_id, store, producer, imap_settings, login)):
        await eventually(lambda: len(got.of("message.synced")) == 1, WITHIN_S, "the first message")
    stored = await _stored(store, account_id)
    assert stored.oauth is not None and stored.oauth.access_token not in (
        "expired.token",
        tokens["access_token"],
    )
    assert stored.oauth.expires_at is not None
    assert _logged(caplog, account_id, "access token refused")


async def test_a_revoked_grant_leaves_the_account_auth_failed_with_the_reason(
    router: ShardRouter, store: SyncStore, producer: AIOKafkaProducer, imap_settings: ImapSettings,
    tap: InflightTap, oauth_dovecot: Dovecot, token_server: OAuthServer, login: AccountLogin,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    user = new_mailbox(oauth_dovecot, 1, "oauth")
    address = f"{user}@{DOMAIN}"
    tokens = await grant(token_server, address)
    oauth = _granted(tokens, sasl_mechanism="xoauth2")
    account_id = await _oauth_account(router, store, producer, imap_settings, oauth_dovecot, address, oauth)
    got = tap.watch(account_id)
    sync = AccountSync(account_id, store, producer, imap_settings, login)
    async with running(sync) as task:
        await eventually(lambda: len(got.of("message.synced")) == 1, WITHIN_S, "the first message")
        # The user removes the application's access: the refresh token and its access tokens die.
        await revoke(token_server, tokens["refresh_token"])
        doveadm(oauth_dovecot, "kick", address)
        await eventually(task.done, WITHIN_S, "the sync to stop")
    assert sync.state == "auth_failed"
    public = await store.account_public(account_id)
    assert public is not None and public["state"] == "auth_failed", public
    # the tenant sees RFC 6749's code, not what the provider wrote
    assert public["last_error"] == (
        "the OAuth2 provider refused the refresh token (invalid_grant); give the account new tokens"
    )
    assert any("invalid_grant" in r.getMessage() for r in caplog.records)
    # and its login says why, without a round trip to the IMAP server
    account = await _stored(store, account_id)
    with pytest.raises(TokenRefused) as refused:
        await login.connect(_connection(oauth_dovecot), account)
    assert refused.value.error == "invalid_grant"


async def test_a_refresh_token_spent_by_another_process_is_taken_from_the_store(
    router: ShardRouter, store: SyncStore, producer: AIOKafkaProducer, imap_settings: ImapSettings,
    oauth_dovecot: Dovecot, token_server: OAuthServer, login: AccountLogin, settings: OAuthSettings,
) -> None:  # fmt: skip
    """Ingest and the gateway both refresh; the token server rotates refresh tokens, so the
    second to refresh holds a spent one: it takes the tokens the first kept."""
    user = new_mailbox(oauth_dovecot, 0, "oauth")
    address = f"{user}@{DOMAIN}"
    tokens = await grant(token_server, address, lifetime_s=2)
    oauth = _granted(tokens)
    account_id = await _oauth_account(router, store, producer, imap_settings, oauth_dovecot, address, oauth)
    stale = await _stored(store, account_id)  # what the second process read
    assert stale.oauth is not None and stale.oauth.expires_at is not None
    expires_at = stale.oauth.expires_at
    await eventually(lambda: datetime.now(UTC) > expires_at, WITHIN_S, "the access token to expire")
    conn = _connection(oauth_dovecot)
    await login.connect(conn, await _stored(store, account_id))  # refreshes: the refresh token rotates
    await conn.close()
    async with TokenClient(settings) as other_tokens:
        conn = _connection(oauth_dovecot)
        await AccountLogin(store, other_tokens, settings).connect(conn, stale)  # holds the spent one
        await conn.close()
    assert stale.oauth.refresh_token != tokens["refresh_token"]
