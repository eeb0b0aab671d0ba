"""Message content on demand: ``GET /v1/messages/{id}/raw`` and
``GET /v1/messages/{id}/attachments/{index}``.

flightlog keeps the fields of a synced message, not its bytes. The raw message (RFC 5322, as the
server stores it) is fetched from the account's IMAP server when a client asks, as Nylas and
EmailEngine do: the message's key names its folder (``imap:{folder id}:...``), the sync's UID map
gives its UID, and ``UID FETCH <uid> (BODY.PEEK[])`` in a folder opened with ``EXAMINE`` reads
it without setting ``\\Seen``.

Every limit is explicit (:class:`ContentSettings`): the size of a message served (its
``RFC822.SIZE`` is asked first, and the fetch refuses a literal above the limit, so a server that
lies about the size is cut off), the time one fetch may take, and how many fetches one gateway
process runs at once (more wait, then get a 503). Tenants see generic errors (the IMAP server
could not be reached, refused the login); the detail goes to the log.

An attachment is found by parsing the whole message (:func:`libs.mime.parse_message` with its
contents kept) and taking the one at ``index`` of the listing, checked against the stored
listing's filename and type. Sender-written content is served as a download with ``nosniff`` and a
sandbox CSP, so a browser never renders it on the API's origin.

Answers: 200 ``message/rfc822`` (or the attachment's type); 404 when the message does not
exist, is another application's, did not come from IMAP, or is no longer on the server
(expunged, its folder deleted or its UIDVALIDITY changed); 409 when the account's credentials
were removed; 422 when the message is larger than the limit; 502 when the server fails; 503 when
too many fetches are running.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web
from aiohttp.helpers import content_disposition_header
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from libs.accounts import Application
from libs.aio import wait_for
from libs.events import MAX_ATTACHMENTS
from libs.imap.client import AuthFailed, ImapConnection, ImapError
from libs.imap_accounts import AccountRow, ImapAccountsSettings, SyncStore
from libs.imap_login import AccountLogin
from libs.mime import (
    MAX_HEADER_NAME_CHARS,
    MAX_HEADER_VALUE_CHARS,
    MAX_LISTED_HEADERS,
    parse_message,
)
from libs.oauth import OAuthError, TokenRefused
from libs.openapi import Answer, ApiRoutes, Operation, Param
from services.gateway import schemas
from services.gateway.auth import authenticated, path_id
from services.gateway.errors import ApiError, NotFound
from services.gateway.imap_accounts import IMAP_LOGIN, IMAP_SETTINGS, IMAP_STORE
from services.gateway.messages import attachment_list, message_row
from services.gateway.openapi import MESSAGE

__all__ = [
    "API", "CONTENT_SETTINGS", "MAX_HEADER_BYTES", "ContentSettings", "ImapSource", "add_content_routes",
    "fetch_raw", "imap_source",
]  # fmt: skip

log = logging.getLogger(__name__)

API: Final = ApiRoutes()
# The most of a header block read from the server (a partial fetch: the server cuts it).
MAX_HEADER_BYTES: Final = 256 * 1024
ATTACHMENT_INDEX: Final = {"type": "string", "pattern": "^[0-9]{1,3}$", "description": "from 0"}


class ContentSettings(BaseSettings):
    """Limits of content fetched on demand (``FLIGHTLOG_CONTENT_*``)."""

    model_config = SettingsConfigDict(env_prefix="FLIGHTLOG_", extra="ignore", frozen=True)

    # The largest message served whole; it is held in memory while it is sent.
    content_max_bytes: int = Field(default=32 * 1024 * 1024, gt=0, le=256 * 1024 * 1024)
    # Connect, log in, EXAMINE and fetch of one request together.
    content_timeout_s: float = Field(default=30.0, gt=0)
    # Fetches one gateway process runs at once (each holds an IMAP connection and its message);
    # a request waits up to content_queue_wait_s for its turn, then gets a 503.
    content_concurrency: int = Field(default=8, gt=0)
    content_queue_wait_s: float = Field(default=5.0, ge=0)


CONTENT_SETTINGS: Final = web.AppKey("content_settings", ContentSettings)
_SLOTS: Final = web.AppKey("content_slots", asyncio.Semaphore)


@dataclass(frozen=True, slots=True)
class ImapSource:
    """Where a synced message lives on its IMAP server."""

    account: AccountRow
    folder: str
    uidvalidity: int | None
    uid: int


def _folder_id(message_key: str) -> int | None:
    prefix, _, rest = message_key.partition(":")
    folder, sep, _ = rest.partition(":")
    if prefix != "imap" or not sep or not folder.isdigit() or len(folder) > 20:
        return None
    return int(folder)


async def imap_source(store: SyncStore, account_id: int, message_key: str) -> ImapSource | None:
    """The folder and UID of a synced message as the sync last saw them; None when the message
    did not come from IMAP or is no longer in the sync's map (expunged, folder deleted)."""
    folder_id = _folder_id(message_key)
    if folder_id is None:
        return None
    account = await store.account(account_id)
    folder = next((f for f in await store.folders(account_id) if f.id == folder_id), None)
    if account is None or folder is None:
        return None
    entries = await store.uids_with_keys(account_id, folder_id, [message_key])
    if not entries:
        return None
    return ImapSource(account, folder.name, folder.uidvalidity, min(entries))


def _gone(message_id: int) -> NotFound:
    error = NotFound("message", str(message_id))
    error.detail += ": it is no longer on the IMAP server"
    return error


async def fetch_raw(
    source: ImapSource, settings: ContentSettings, imap: ImapAccountsSettings, message_id: int,
    login: AccountLogin, *, headers_only: bool = False,
) -> bytes:  # fmt: skip
    """The message's bytes, or with ``headers_only`` its header block (at most
    :data:`MAX_HEADER_BYTES` of it, whatever the message's size)."""
    account = source.account
    conn = ImapConnection(
        account.host,
        account.port,
        account.tls_mode,
        settings.content_timeout_s,
        ca_file=imap.imap_tls_ca_file,
        max_response_bytes=settings.content_max_bytes + 64 * 1024,
        allow_private=imap.imap_allow_private_hosts,
    )
    try:
        await login.connect(conn, account, use_condstore=False)
        selected = await conn.examine(source.folder)
        if source.uidvalidity is not None and selected.uidvalidity != source.uidvalidity:
            raise _gone(message_id)
        sizes = await conn.uid_fetch(str(source.uid), "(RFC822.SIZE)")
        size = next((i.size for i in sizes if i.uid == source.uid), None)
        if size is None:
            raise _gone(message_id)
        if headers_only:
            items = await conn.uid_fetch(
                str(source.uid),
                f"(BODY.PEEK[HEADER]<0.{MAX_HEADER_BYTES}>)",
                max_response_bytes=MAX_HEADER_BYTES + 64 * 1024,
                max_literal_bytes=MAX_HEADER_BYTES,
            )
        elif size > settings.content_max_bytes:
            raise ApiError(
                422,
                "Message too large",
                f"the message is {size} bytes; at most {settings.content_max_bytes} are served"
                " (FLIGHTLOG_CONTENT_MAX_BYTES)",
            )
        else:
            items = await conn.uid_fetch(
                str(source.uid),
                "(BODY.PEEK[])",
                max_response_bytes=settings.content_max_bytes + 64 * 1024,
                max_literal_bytes=settings.content_max_bytes,
            )
        body = next((i.body for i in items if i.uid == source.uid and i.body is not None), None)
        if body is None:
            raise _gone(message_id)
        return body
    finally:
        await conn.close()


async def _raw(
    request: web.Request, app: Application, columns: tuple[str, ...], *, headers_only: bool = False
) -> tuple[dict[str, Any], bytes]:
    """The message's row (``columns``) and its raw bytes (or header block) from the IMAP server."""
    message_id = path_id(request, "message_id", "message")
    row = await message_row(request, app, message_id, ", ".join(("account_id", "message_key", *columns)))
    if row is None:
        raise NotFound("message", str(message_id))
    account_id = int(row["account_id"])
    source = await imap_source(request.app[IMAP_STORE], account_id, bytes(row["message_key"]).decode())
    if source is None:
        error = NotFound("message content", str(message_id))
        error.detail += ": only messages synced over IMAP, and still on the server, have content"
        raise error
    if not source.account.password and source.account.oauth is None:
        raise ApiError(409, "No credentials", f"account {account_id} has no IMAP credentials to fetch with")
    settings = request.app[CONTENT_SETTINGS]
    slots = request.app[_SLOTS]
    try:
        await wait_for(slots.acquire(), settings.content_queue_wait_s)
    except TimeoutError:
        raise ApiError(
            503, "Busy", "too many content fetches are running; try again", retry_after_s=1
        ) from None
    imap = request.app[IMAP_SETTINGS]
    try:
        body = await wait_for(
            fetch_raw(source, settings, imap, message_id, request.app[IMAP_LOGIN], headers_only=headers_only),
            settings.content_timeout_s,
        )
    except (AuthFailed, TokenRefused) as exc:
        log.warning("content fetch of %s: %s", message_id, exc)
        raise ApiError(
            502, "IMAP login failed", "the IMAP server refused the account's credentials"
        ) from None
    except (ImapError, OSError, TimeoutError, OAuthError) as exc:
        log.warning("content fetch of %s failed: %r", message_id, exc)
        raise ApiError(502, "IMAP server failed", "the message could not be read from the server") from None
    finally:
        slots.release()
    return row, body


# Content written by a sender: never rendered by a browser on the API's origin.
_UNTRUSTED: Final = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"}


@API.get(
    "/v1/messages/{message_id}/raw",
    Operation(
        "getMessageRaw",
        "messages",
        "The message as the IMAP server stores it (RFC 5322), fetched when asked",
        (Answer(200, "the raw message", media_type="message/rfc822", schema={"type": "string"}),),
        description="Only messages synced over IMAP have raw content; flightlog keeps no copy, so"
        " every call reads the message from the account's server (without marking it seen).",
        params=(MESSAGE,),
        problems=(404, 409, 422, 502, 503),
    ),
)
@authenticated
async def get_raw(request: web.Request, app: Application) -> web.StreamResponse:
    _, body = await _raw(request, app, ())
    message_id = request.match_info["message_id"]
    return web.Response(
        body=body,
        content_type="message/rfc822",
        headers={
            **_UNTRUSTED,
            "Content-Disposition": content_disposition_header("attachment", filename=f"{message_id}.eml"),
        },
    )


@API.get(
    "/v1/messages/{message_id}/attachments/{index}",
    Operation(
        "getMessageAttachment",
        "messages",
        "One attachment's content, fetched from the IMAP server when asked",
        (
            Answer(
                200,
                "the attachment's bytes, its transfer encoding undone",
                media_type="application/octet-stream",
                schema={"type": "string"},
            ),
        ),
        description="``index`` is the attachment's position in the message's ``attachments``"
        " (from 0). The whole message is read from the server and parsed to find it; the answer"
        " carries the attachment's declared type, always as a download, and its SHA-256 as ETag.",
        params=(MESSAGE, Param("index", ATTACHMENT_INDEX, "position in ``attachments``", where="path")),
        problems=(404, 409, 422, 502, 503),
    ),
)
@authenticated
async def get_attachment(request: web.Request, app: Application) -> web.StreamResponse:
    message_id = request.match_info["message_id"]
    text = request.match_info["index"]
    if not text.isdigit() or len(text) > 3 or int(text) >= MAX_ATTACHMENTS:
        raise NotFound("attachment", f"{text[:10]} of message {message_id[:40]}")
    index = int(text)
    row, body = await _raw(request, app, ("attachments",))
    listed = attachment_list(row["attachments"])
    if index >= len(listed):
        raise NotFound("attachment", f"{index} of message {message_id}")
    parsed = parse_message(body, max_bytes=len(body), with_contents=True)
    contents = parsed.attachment_contents or []
    found = parsed.attachments[index] if index < len(parsed.attachments) else None
    expected = listed[index]
    # The listing was parsed from the sync's cut of the message; the whole message lists the same
    # attachments first. A different one here means the message is not the one that was listed.
    if found is None or (found.filename, found.content_type) != (
        expected["filename"],
        expected["content_type"],
    ):
        error = NotFound("attachment", f"{index} of message {message_id}")
        error.detail += ": the message on the server no longer has it"
        raise error
    headers = {**_UNTRUSTED, "ETag": f'"{found.sha256}"'}
    headers["Content-Disposition"] = (
        content_disposition_header("attachment", filename=found.filename) if found.filename else "attachment"
    )
    return web.Response(body=contents[index], content_type=_safe_type(found.content_type), headers=headers)


@API.get(
    "/v1/messages/{message_id}/headers",
    Operation(
        "getMessageHeaders",
        "messages",
        "The message's header fields as sent, fetched from the IMAP server when asked",
        (Answer(200, "the header fields, in order", schemas.MessageHeaders),),
        description="Only messages synced over IMAP have headers to show; flightlog stores the"
        " fields it reads from them, not the header block, so every call reads the block from the"
        " account's server (without marking the message seen). At most the first"
        f" {MAX_HEADER_BYTES // 1024} KiB of the block, {MAX_LISTED_HEADERS} fields, names cut at"
        f" {MAX_HEADER_NAME_CHARS} and values at {MAX_HEADER_VALUE_CHARS} characters; folded values"
        " are unfolded, encoded words are left as sent.",
        params=(MESSAGE,),
        problems=(404, 409, 502, 503),
    ),
)
@authenticated
async def get_headers(request: web.Request, app: Application) -> web.StreamResponse:
    _, block = await _raw(request, app, (), headers_only=True)
    fields = parse_message(block + b"\r\n", max_bytes=len(block) + 2, with_headers=True).headers or []
    return web.Response(
        body=orjson.dumps(
            {"id": request.match_info["message_id"], "headers": [{"name": k, "value": v} for k, v in fields]}
        ),
        content_type="application/json",
    )


def _safe_type(content_type: str) -> str:
    """The declared type when it is a plain ``type/subtype`` token pair, else octet-stream."""
    return content_type if _MEDIA_TYPE.fullmatch(content_type) else "application/octet-stream"


_MEDIA_TYPE: Final = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}")


def add_content_routes(app: web.Application, settings: ContentSettings) -> None:
    app[CONTENT_SETTINGS] = settings
    app[_SLOTS] = asyncio.Semaphore(settings.content_concurrency)
    API.register(app)
