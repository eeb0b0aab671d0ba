"""The documents the gateway answers with, as pydantic models: the OpenAPI document's response
schemas are generated from them (:mod:`services.gateway.openapi`).

The handlers build these documents as dicts (a page of messages is built without a model in
between); the e2e fuzz test checks every answer against the schemas generated here. Request
bodies are the models the handlers validate with, next to their handlers.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from libs.events import Direction, Status
from libs.openapi import PublicId
from services.gateway.constants import MAX_RETENTION_S, MIN_RETENTION_S

__all__ = [
    "Account",
    "AccountErasure",
    "AccountPage",
    "ApiKey",
    "ApiKeyList",
    "Application",
    "ApplicationRetention",
    "Attachment",
    "Cursor",
    "Delta",
    "DeltaPage",
    "Doc",
    "HeaderField",
    "ImapAccount",
    "ImapFolder",
    "ImapSync",
    "Message",
    "MessageAccepted",
    "MessageDeleted",
    "MessageDetail",
    "MessageHeaders",
    "MessagePage",
    "NewApiKey",
    "NonNegative",
    "Participant",
    "Participants",
    "Retention",
    "Thread",
    "ThreadDetail",
    "ThreadPage",
    "Token",
]

Token = Annotated[str, Field(min_length=1, max_length=128)]
Shard = Annotated[int, Field(ge=0, le=65535)]
NonNegative = Annotated[int, Field(ge=0)]


TlsMode = Literal["implicit", "starttls", "none"]


class Doc(BaseModel):
    """Every member is always present (null when it has no value), and no other."""

    model_config = ConfigDict(extra="forbid")


class Attachment(Doc):
    filename: str | None
    content_type: str
    size_bytes: NonNegative = Field(description="decoded size")
    content_id: str | None
    inline: bool
    sha256: Annotated[str, Field(pattern="^[0-9a-f]{64}$")] | None = Field(
        description="hex SHA-256 of the decoded content; null for messages stored before it was computed"
    )


class Participant(Doc):
    name: str | None = Field(description="the display name; null when the message gives none")
    email: str = Field(description="the address (a phone number on SMS channels)")


class Participants(Doc):
    """Every participant with its display name, by role (empty lists when the role has none)."""

    from_: list[Participant] = Field(alias="from")
    to: list[Participant]
    cc: list[Participant]
    bcc: list[Participant]
    reply_to: list[Participant]


class Message(Doc):
    id: PublicId
    account_id: PublicId
    message_key: str
    version: Annotated[int, Field(ge=1)]
    status: Status | None
    direction: Direction | None
    channel: str | None
    from_: str | None = Field(alias="from")
    to: list[str]
    cc: list[str]
    bcc: list[str] = Field(description="bare addresses; names in participants")
    reply_to: list[str] = Field(description="bare addresses; names in participants")
    participants: Participants
    subject: str | None
    snippet: str | None
    error_code: str | None
    unread: bool
    starred: bool
    folder: str | None
    labels: list[str]
    source: str | None
    occurred_at: datetime
    final_at: datetime | None
    redacted: bool
    created_at: datetime
    updated_at: datetime
    thread_key: str | None = Field(description="equal for the messages of one conversation (email)")
    size_bytes: NonNegative | None = Field(description="raw message size")
    attachments: list[Attachment]
    parse_warnings: list[str] = Field(
        description="what could not be read cleanly from the raw message, e.g. truncated"
    )
    date: datetime | None = Field(description="the Date header (the sender's clock), in UTC")
    message_id: str | None = Field(description="the Message-ID header, with its angle brackets")
    in_reply_to: str | None = Field(description="the first id of the In-Reply-To header")
    references: list[str] = Field(description="the References ids, oldest first")


class MessageDetail(Message):
    body_text: str | None
    body_html: str | None


class HeaderField(Doc):
    name: str
    value: str


class MessageHeaders(Doc):
    id: PublicId
    headers: list[HeaderField]


class MessagePage(Doc):
    data: list[Message]
    next_page_token: Token | None


class MessageAccepted(Doc):
    id: PublicId
    status: Literal["accepted"]
    detail: str


class MessageDeleted(Doc):
    id: PublicId
    account_id: PublicId
    version: Annotated[int, Field(ge=1)]
    deleted: Literal[True]


class Thread(Doc):
    """A conversation: the account's messages that share a ``thread_key`` and are not deleted."""

    id: PublicId
    account_id: PublicId
    thread_key: str
    version: Annotated[int, Field(ge=1)] = Field(description="counts the thread's changes")
    subject: str | None = Field(description="the subject of the earliest message that has one")
    message_count: Annotated[int, Field(ge=1)]
    unread_count: NonNegative
    last_message_at: datetime = Field(description="occurred_at of the latest message")
    participants: list[Participant] = Field(
        description="everyone in from, to, cc and bcc of the thread's latest messages (at most"
        " THREAD_PARTICIPANT_MESSAGES of them), once each, earliest first"
    )


class ThreadPage(Doc):
    data: list[Thread]
    next_page_token: Token | None


class ThreadDetail(Thread):
    messages: list[Message] = Field(description="the first page of the thread's messages, newest first")
    next_page_token: Token | None = Field(description="the next page: GET /v1/threads/{thread_id}/messages")


class Delta(Doc):
    cursor: Token = Field(description="resume after this change")
    object_type: Literal["message", "thread"]
    object_id: PublicId
    change_type: Literal["created", "updated", "deleted"]
    status: Status | None = Field(
        None, description="the status this change moved the message to; absent when it stayed"
    )
    version: int
    changed_at: datetime
    object: Message | Thread | None = Field(
        description="the object as it is now; null once it is deleted (a thread: once it has no message)"
    )


class DeltaPage(Doc):
    deltas: list[Delta]
    next_cursor: Token
    has_more: bool = Field(description="more changes are ready: ask again at once")


class Cursor(Doc):
    cursor: Token


class Account(Doc):
    id: PublicId
    application_id: PublicId
    email: str
    provider: str
    shard: Shard


class TopicExpiry(Doc):
    topic: str
    retention_s: NonNegative
    records_expire_by: datetime = Field(description="when the topic holds no record of the account any more")


class AccountErasure(Doc):
    """What an erasure removed: rows per table (``shard.<table>``, ``global.<table>``); transform's
    states of the account are tombstoned by transform itself. ``topics`` are what an erasure cannot
    reach: append-only topics keep the account's records until their retention passes."""

    account_id: PublicId
    state: Literal["running", "done"]
    erased: dict[str, NonNegative]
    requested_at: datetime
    finished_at: datetime | None
    topics: list[TopicExpiry]


RetentionSeconds = Annotated[int, Field(ge=MIN_RETENTION_S, le=MAX_RETENTION_S)]


class Retention(Doc):
    """An account's message retention: its own (``retention_s``), else its application's
    (``effective_retention_s`` is what applies; null keeps messages for ever)."""

    account_id: PublicId
    retention_s: RetentionSeconds | None
    effective_retention_s: RetentionSeconds | None


class ApplicationRetention(Doc):
    """The application's message retention (null keeps messages for ever)."""

    retention_s: RetentionSeconds | None


class AccountPage(Doc):
    data: list[Account]
    next_page_token: Token | None


class ApiKey(Doc):
    id: PublicId
    prefix: str = Field(description="the key's first characters, to recognise it")
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyList(Doc):
    data: list[ApiKey]


class NewApiKey(ApiKey):
    api_key: str = Field(description="shown once, never again")


class Application(Doc):
    id: PublicId
    name: str
    api_key: str = Field(description="shown once")


# IMAP sync times are stored without a zone and shown as such (UTC).
ImapTime = Annotated[str | None, Field(description="UTC, ISO 8601")]


class ImapFolder(Doc):
    id: PublicId
    name: str
    role: str | None
    state: str
    message_count: NonNegative
    last_sync_at: ImapTime
    last_error: str | None
    uidvalidity: int | None
    highestmodseq: int | None


class ImapSync(Doc):
    id: PublicId
    host: str
    port: int
    tls_mode: TlsMode
    username: str
    state: str = Field(
        description="pending, running, auth_failed (new credentials needed: refused by the server, or an"
        " OAuth2 refresh token refused by its provider; last_error says which), error (retrying) or"
        " disconnected"
    )
    last_error: str | None
    last_sync_at: ImapTime
    credentials_version: Annotated[int, Field(ge=1)]
    auth: Literal["password", "oauth2"]
    oauth_provider: Literal["google", "microsoft", "generic"] | None
    sasl_mechanism: Literal["xoauth2", "oauthbearer"] | None = Field(
        description="null: OAUTHBEARER when the server offers it, else XOAUTH2"
    )
    folders: list[ImapFolder]


class ImapAccount(ImapSync):
    email: str
    provider: Literal["imap"]
