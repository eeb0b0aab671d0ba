"""OAuth2 for IMAP accounts: the providers, and fresh access tokens from refresh tokens.

An OAuth2 account stores its refresh token and its last access token (both encrypted, as
passwords are: :mod:`libs.crypto`). Before a login the access token is refreshed when it expires
within ``oauth_refresh_margin_s`` (or its expiry is unknown and the server refused it): one
``refresh_token`` grant at the provider's token endpoint, through authlib's OAuth2 client
(:class:`TokenClient`). A provider that refuses the refresh token (RFC 6749 5.2: revoked,
expired, the client removed) ends the account's sync in ``auth_failed`` until the tenant gives
new tokens; a provider that cannot be reached is retried like an IMAP server.

Providers: ``google`` and ``microsoft`` with their published endpoints, and ``generic``, whose
endpoints are settings; each needs its client id (and secret) in settings before accounts may
use it.

Exceptions::

    OAuthError
     ├── ProviderNotConfigured (not retriable: no client id or endpoint for it in settings)
     ├── TokenRefused (not retriable: the provider refused the refresh token; ``error`` is the
     │                 RFC 6749 code, safe to show; ``description`` is the provider's text, for logs)
     └── TokenEndpointFailed (retriable: unreachable, a 5xx, an answer that is no token)
"""

from __future__ import annotations

import logging
import re
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import httpx2
from authlib.integrations.base_client.errors import OAuthError as _AuthlibError
from authlib.integrations.httpx_client import AsyncOAuth2Client
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "ACCESS_TOKEN_PATTERN",
    "MAX_ACCESS_TOKEN_CHARS",
    "MAX_REFRESH_TOKEN_CHARS",
    "PROVIDERS",
    "REFRESH_TOKEN_PATTERN",
    "SASL_MECHANISMS",
    "OAuthError",
    "OAuthSettings",
    "Provider",
    "ProviderNotConfigured",
    "TokenClient",
    "TokenEndpointFailed",
    "TokenRefused",
    "Tokens",
    "needs_refresh",
]

logger = logging.getLogger(__name__)

ProviderName = Literal["google", "microsoft", "generic"]
PROVIDERS: Final = ("google", "microsoft", "generic")
SASL_MECHANISMS: Final = ("xoauth2", "oauthbearer")
# Google's access tokens are about 200 characters, Microsoft's (JWTs) up to a few KiB; the
# columns hold their encryption (libs/db/migrations/global/0015_imap_oauth.sql).
MAX_ACCESS_TOKEN_CHARS: Final = 8192
MAX_REFRESH_TOKEN_CHARS: Final = 4096
# RFC 6750 2.1 b64token; RFC 6749 Appendix A.17 VSCHAR for refresh tokens. Neither admits a
# control character, so no token can end the AUTHENTICATE line it is sent in.
ACCESS_TOKEN_PATTERN: Final = r"^[A-Za-z0-9\-._~+/]+=*$"
REFRESH_TOKEN_PATTERN: Final = r"^[\x20-\x7e]+$"
# RFC 6749 5.2: the error codes a token endpoint may answer with. Only these reach a tenant;
# anything else a provider says is logged.
_STANDARD_ERRORS: Final = frozenset(
    {"invalid_request", "invalid_client", "invalid_grant", "unauthorized_client", "unsupported_grant_type",
     "invalid_scope"}
)  # fmt: skip
_MAX_EXPIRES_IN_S: Final = 366 * 86_400  # a longer expires_in is taken as this
_ACCESS: Final = re.compile(ACCESS_TOKEN_PATTERN)
_REFRESH: Final = re.compile(REFRESH_TOKEN_PATTERN)


class OAuthError(Exception):
    retriable = False


class ProviderNotConfigured(OAuthError):
    pass


class TokenRefused(OAuthError):
    """The token endpoint refused the refresh token (RFC 6749 5.2)."""

    def __init__(self, error: str, description: str | None) -> None:
        self.error = error if error in _STANDARD_ERRORS else "refused"
        self.description = description
        super().__init__(f"{error}: {description}" if description else error)


class TokenEndpointFailed(OAuthError):
    retriable = True


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    authorization_url: str
    token_url: str
    client_id: str
    client_secret: str


class OAuthSettings(BaseSettings):
    """OAuth2 providers of IMAP accounts (``FLIGHTLOG_OAUTH_*``), shared by the gateway (which
    refuses a provider that is not configured) and ingest (which refreshes tokens).

    A provider is configured once its client id is set (and, for ``generic``, both endpoints).
    ``oauth_tls_ca_file`` adds PEM certificates to trust for the token endpoints (the local
    stack's token server); ``oauth_refresh_margin_s`` is how long before its expiry an access
    token is refreshed; ``oauth_timeout_s`` bounds one token request.
    """

    model_config = SettingsConfigDict(env_prefix="FLIGHTLOG_", extra="ignore", frozen=True)

    # The platform's OAuth2 client at Google (empty: Google accounts are refused)
    oauth_google_client_id: str = ""
    oauth_google_client_secret: str = Field(default="", repr=False)  # that client's secret
    # The platform's OAuth2 client at Microsoft Entra ID (empty: Microsoft accounts are refused)
    oauth_microsoft_client_id: str = ""
    oauth_microsoft_client_secret: str = Field(default="", repr=False)  # that client's secret
    # The Entra ID tenant in the endpoints' path: common, organizations, or a tenant id
    oauth_microsoft_tenant: str = "common"
    # The generic provider's authorization endpoint (RFC 6749 3.1), for applications to send
    # users to; `flightlog dev` points the generic provider at the local stack's token server
    oauth_generic_authorization_url: str = ""
    oauth_generic_token_url: str = ""  # its token endpoint (RFC 6749 3.2), where tokens are refreshed
    oauth_generic_client_id: str = ""  # the platform's client there (empty: generic accounts are refused)
    oauth_generic_client_secret: str = Field(default="", repr=False)  # that client's secret
    # PEM certificates trusted for the token endpoints besides the system's (a private CA)
    oauth_tls_ca_file: str | None = None
    # An access token is refreshed before a login when it expires within this many seconds
    oauth_refresh_margin_s: float = Field(default=300.0, ge=0)
    # One token request, connect to answer
    oauth_timeout_s: float = Field(default=15.0, gt=0)

    def provider(self, name: str) -> Provider:
        if name == "google":
            urls = ("https://accounts.google.com/o/oauth2/v2/auth", "https://oauth2.googleapis.com/token")
            client = (self.oauth_google_client_id, self.oauth_google_client_secret)
        elif name == "microsoft":
            base = f"https://login.microsoftonline.com/{self.oauth_microsoft_tenant}/oauth2/v2.0"
            urls = (f"{base}/authorize", f"{base}/token")
            client = (self.oauth_microsoft_client_id, self.oauth_microsoft_client_secret)
        elif name == "generic":
            urls = (self.oauth_generic_authorization_url, self.oauth_generic_token_url)
            client = (self.oauth_generic_client_id, self.oauth_generic_client_secret)
        else:
            raise ProviderNotConfigured(f"unknown OAuth2 provider {name!r}")
        if not client[0] or not all(urls):
            raise ProviderNotConfigured(
                f"the OAuth2 provider {name!r} is not configured (FLIGHTLOG_OAUTH_{name.upper()}_*)"
            )
        return Provider(name, *urls, *client)


@dataclass(frozen=True, slots=True)
class Tokens:
    """What a refresh gave: the new access token, its expiry (None: not said), and a new refresh
    token when the provider rotates them (None: keep the old one)."""

    access_token: str
    expires_at: datetime | None
    refresh_token: str | None


def needs_refresh(access_token: str | None, expires_at: datetime | None, margin_s: float) -> bool:
    """Whether to refresh before a login: no access token, or one expiring within the margin. A
    token of unknown expiry is tried as it is (a refusal then refreshes it once)."""
    if not access_token:
        return True
    return expires_at is not None and expires_at - timedelta(seconds=margin_s) <= datetime.now(UTC)


class TokenClient:
    """Refreshes access tokens with authlib's OAuth2 client, one per provider (each keeps its
    connections); ``start()``, idempotent ``stop()``, ``async with``."""

    def __init__(self, settings: OAuthSettings) -> None:
        self.settings = settings
        self._clients: dict[str, AsyncOAuth2Client] = {}
        self._tls: ssl.SSLContext | None = None

    async def start(self) -> None:
        self._tls = ssl.create_default_context()  # the system's CAs, host names checked
        if self.settings.oauth_tls_ca_file:
            self._tls.load_verify_locations(cafile=self.settings.oauth_tls_ca_file)

    async def stop(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    async def __aenter__(self) -> TokenClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _client(self, provider: Provider) -> AsyncOAuth2Client:
        client = self._clients.get(provider.name)
        if client is None:
            if self._tls is None:
                raise OAuthError("the token client is not started")
            client = AsyncOAuth2Client(
                provider.client_id,
                provider.client_secret,
                token_endpoint_auth_method="client_secret_post",  # what Google and Microsoft take
                timeout=self.settings.oauth_timeout_s,
                verify=self._tls,
                follow_redirects=False,
            )
            self._clients[provider.name] = client
        return client

    async def refresh(self, provider_name: str, refresh_token: str) -> Tokens:
        provider = self.settings.provider(provider_name)
        client = self._client(provider)
        try:
            # the client's ``token`` attribute is shared: read the answer before any other await
            token: dict[str, Any] = dict(
                await client.refresh_token(provider.token_url, refresh_token=refresh_token)
            )
        except _AuthlibError as exc:
            raise TokenRefused(str(exc.error), exc.description) from None
        except (httpx2.HTTPError, ValueError) as exc:
            raise TokenEndpointFailed(f"{provider.name} token endpoint: {exc!r}") from None
        return _tokens(provider.name, token, refresh_token)


def _tokens(provider: str, token: dict[str, Any], old_refresh_token: str) -> Tokens:
    access = token.get("access_token")
    if not isinstance(access, str) or len(access) > MAX_ACCESS_TOKEN_CHARS or not _ACCESS.match(access):
        raise TokenEndpointFailed(f"{provider} token endpoint answered without a usable access token")
    refresh = token.get("refresh_token")
    if refresh == old_refresh_token:
        refresh = None
    if refresh is not None and (
        not isinstance(refresh, str) or len(refresh) > MAX_REFRESH_TOKEN_CHARS or not _REFRESH.match(refresh)
    ):
        raise TokenEndpointFailed(f"{provider} token endpoint answered with an unusable refresh token")
    expires_at: datetime | None = None
    expires_in = token.get("expires_in")
    if isinstance(expires_in, int | float | str) and str(expires_in).isdigit():
        seconds = min(int(expires_in), _MAX_EXPIRES_IN_S)
        expires_at = datetime.fromtimestamp(time.time() + seconds, UTC)
    return Tokens(access, expires_at, refresh)
