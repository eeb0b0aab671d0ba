"""Logging an IMAP account in, whatever its credentials: a password (LOGIN), or an OAuth2 access
token (AUTHENTICATE XOAUTH2 or OAUTHBEARER) that is refreshed before it expires and once more
when the server refuses it. Shared by ingest's sync and the gateway's content fetches, so both
keep the tokens a refresh gave (:meth:`libs.imap_accounts.SyncStore.save_tokens`).

A refresh token the provider refuses raises :class:`libs.oauth.TokenRefused` (the account
waits for new credentials); a token endpoint that cannot be reached raises
:class:`libs.oauth.TokenEndpointFailed` (retried, as an unreachable IMAP server is).
"""

from __future__ import annotations

import logging

from libs.imap.client import AuthFailed, ImapConnection
from libs.imap_accounts import AccountRow, OAuthCredentials, SyncStore
from libs.oauth import OAuthError, OAuthSettings, TokenClient, TokenRefused, needs_refresh

__all__ = ["AccountLogin"]

logger = logging.getLogger(__name__)


class AccountLogin:
    """Logs accounts in.

    :param store: where refreshed tokens are kept.
    :param tokens: the started token client; None where OAuth2 accounts are not to be logged in
        (a login of one then fails as a provider that is not configured).
    :param settings: the refresh margin.
    """

    def __init__(self, store: SyncStore, tokens: TokenClient | None, settings: OAuthSettings) -> None:
        self.store = store
        self.tokens = tokens
        self.margin_s = settings.oauth_refresh_margin_s

    async def connect(self, conn: ImapConnection, account: AccountRow, *, use_condstore: bool = True) -> None:
        oauth = account.oauth
        if oauth is None:
            await conn.connect(account.username, account.password, use_condstore=use_condstore)
            return
        method = oauth.mechanism or "oauth2"
        refreshed = needs_refresh(oauth.access_token, oauth.expires_at, self.margin_s)
        if refreshed:
            await self._refresh(account, oauth)
        try:
            await conn.connect(
                account.username, oauth.access_token or "", use_condstore=use_condstore, method=method
            )
        except AuthFailed as exc:
            if refreshed:
                raise
            # revoked early, or expired sooner than it said: one refresh, one more try
            logger.info("imap account %d: access token refused (%s); refreshing it", account.account_id, exc)
            await self._refresh(account, oauth)
            await conn.connect(
                account.username, oauth.access_token or "", use_condstore=use_condstore, method=method
            )

    async def _refresh(self, account: AccountRow, oauth: OAuthCredentials) -> None:
        if self.tokens is None:
            raise OAuthError("OAuth2 accounts cannot log in here: no token client")
        try:
            fresh = await self.tokens.refresh(oauth.provider, oauth.refresh_token)
        except TokenRefused:
            # Another process (the gateway, an ingest before a rebalance) may have refreshed
            # first at a provider that rotates refresh tokens, spending ours: take what it kept.
            stored = await self.store.account(account.account_id)
            if (
                stored is None or stored.oauth is None
                or stored.credentials_version != account.credentials_version
                or stored.oauth.refresh_token == oauth.refresh_token
            ):  # fmt: skip
                raise
            logger.info(
                "imap account %d: refreshed elsewhere meanwhile; using those tokens", account.account_id
            )
            oauth.refresh_token, oauth.access_token, oauth.expires_at = (
                stored.oauth.refresh_token, stored.oauth.access_token, stored.oauth.expires_at,
            )  # fmt: skip
            if needs_refresh(oauth.access_token, oauth.expires_at, self.margin_s):
                await self._refresh(account, oauth)
            return
        kept = await self.store.save_tokens(account.account_id, account.credentials_version, fresh)
        if not kept:
            logger.info("imap account %d: credentials changed during a refresh; not kept", account.account_id)
        oauth.access_token, oauth.expires_at = fresh.access_token, fresh.expires_at
        if fresh.refresh_token is not None:
            oauth.refresh_token = fresh.refresh_token
        logger.info(
            "imap account %d: access token refreshed (expires %s)", account.account_id, fresh.expires_at
        )
