"""A thin typed layer over aioimaplib: connect and log in, LIST, SELECT with CONDSTORE/QRESYNC,
and parsing of FETCH, LIST, SEARCH, VANISHED and SELECT responses.

What the server sends is bounded: a literal larger than the most we ever ask for, or a response
larger than its command's cap, drops the connection (:class:`ResponseTooLarge`) instead of being
buffered; numbers are read with bounded digits; UID sets stay ranges (:class:`UidSet`).

Exceptions::

    ImapError (retriable: back off and reconnect)
     ├── AuthFailed (not retriable: wait for new credentials)
     ├── HostRefused (the host resolves to a loopback or private address)
     └── ResponseTooLarge (the server sent more than a cap allows; the connection is dropped)
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from dataclasses import dataclass, field
from typing import Any, Final

import aioimaplib

from libs.aio import wait_for
from libs.imap.sasl import ABORT, MAX_CHALLENGE_BYTES, initial_response
from libs.imap.uids import MAX_UID, UidSet, UidSetTooLarge
from libs.mime import MAX_RAW_BYTES
from libs.outbound import AddressRefused, has_control_characters, resolve_public

__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "LOGIN_METHODS",
    "AuthFailed",
    "FetchItem",
    "HostRefused",
    "Imap4",
    "ImapConnection",
    "ImapError",
    "ListedFolder",
    "ResponseTooLarge",
    "SelectInfo",
    "decode_mailbox_utf7",
    "parse_fetch",
    "parse_gm_labels",
    "parse_list",
    "parse_search",
    "parse_select",
    "quote_mailbox",
]

# What one response may make us buffer unless its command says otherwise (a FLAGS fetch of a
# 500,000-message folder is about 40 MiB; a body fetch has a cap of its own, see uid_fetch).
DEFAULT_MAX_RESPONSE_BYTES: Final = 64 * 1024 * 1024
# How :meth:`ImapConnection.connect` logs in: LOGIN with a password, or AUTHENTICATE with an
# OAuth2 access token by one mechanism, or ``oauth2``: OAUTHBEARER when the server offers it,
# else XOAUTH2 (Gmail offers both, Microsoft 365 only XOAUTH2).
LOGIN_METHODS: Final = ("login", "xoauth2", "oauthbearer", "oauth2")
# Every literal we ask for is a body or header cut at MAX_RAW_BYTES (``<0.N>`` partials).
MAX_LITERAL_BYTES: Final = MAX_RAW_BYTES


class ImapError(Exception):
    retriable = True


class AuthFailed(ImapError):
    retriable = False


class HostRefused(ImapError):
    """The server's host resolves to an address that is not allowed (loopback, private); retried
    like any connection failure, as the name may resolve elsewhere later."""


class ResponseTooLarge(ImapError):
    """The server sent more than we asked for or than a cap allows; the connection was dropped."""


_FETCH_START: Final = re.compile(rb"^(\d+) FETCH \(")
_LITERAL: Final = re.compile(rb"\{(\d+)\}$")
# Bounded digits: int() of a server's 10,000-digit number is slow, then an error.
_UID: Final = re.compile(rb"\bUID (\d{1,10})\b")
_FLAGS: Final = re.compile(rb"\bFLAGS \(([^)]*)\)")
_SIZE: Final = re.compile(rb"\bRFC822\.SIZE (\d{1,19})\b")
_DATE: Final = re.compile(rb'\bINTERNALDATE "([^"]+)"')
_MODSEQ: Final = re.compile(rb"\bMODSEQ \((\d{1,19})\)")
_NUMBER: Final = re.compile(rb"\d+")
# Gmail's extensions (X-GM-EXT-1): 64-bit ids, and a parenthesised list of labels
_GM_MSGID: Final = re.compile(rb"\bX-GM-MSGID (\d{1,20})\b")
_GM_THRID: Final = re.compile(rb"\bX-GM-THRID (\d{1,20})\b")
_GM_LABELS: Final = b"X-GM-LABELS ("
MAX_GM_LABELS: Final = 1000  # labels kept of one message; a mailbox has at most 10,000 (Gmail)
_MAX_ID: Final = 2**64 - 1
_LIST: Final = re.compile(rb'^(?:LIST )?\(([^)]*)\) (?:"(?:[^"\\]|\\.)*"|NIL) (.*)$')
_SPECIAL: Final = {
    "\\sent": "sent", "\\drafts": "drafts", "\\trash": "trash", "\\junk": "junk",
    "\\archive": "archive", "\\all": "all", "\\flagged": "flagged",
}  # fmt: skip


@dataclass(slots=True)
class FetchItem:
    uid: int
    flags: list[str] = field(default_factory=list)
    size: int | None = None
    internaldate: str | None = None
    modseq: int | None = None
    body: bytes | None = None
    # Gmail (X-GM-EXT-1): the message's and its thread's ids, and its labels (None: not asked)
    gm_msgid: int | None = None
    gm_thrid: int | None = None
    gm_labels: list[str] | None = None


@dataclass(frozen=True, slots=True)
class ListedFolder:
    name: str
    role: str | None
    selectable: bool


@dataclass(slots=True)
class SelectInfo:
    uidvalidity: int | None = None
    uidnext: int | None = None
    exists: int = 0
    highestmodseq: int | None = None
    # QRESYNC's expunges since the last sync; None when the server's set had more than
    # MAX_UID_RANGES ranges (the sync then compares UID lists instead)
    vanished: UidSet | None = field(default_factory=UidSet)
    changed: list[FetchItem] = field(default_factory=list)


def quote_mailbox(name: str) -> str:
    # Folder names are sent as UTF-8 (ENABLE UTF8=ACCEPT is not assumed; Dovecot accepts them).
    if has_control_characters(name):  # a server's LIST may hold anything; parse_list drops these
        raise ImapError(f"a folder name with control characters cannot be sent: {name[:80]!r}")
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_fetch(lines: list[Any]) -> list[FetchItem]:
    """FETCH responses as aioimaplib hands them over: a line, then the literal as a bytearray."""
    items: list[FetchItem] = []
    meta = b""
    body: bytes | None = None
    expecting_literal = False
    in_item = False

    def close() -> None:
        nonlocal meta
        labels: list[str] | None = None
        at = meta.find(_GM_LABELS)
        if at >= 0:
            # cut out before the other items are searched: a label is any quoted string
            labels, end = parse_gm_labels(meta, at + len(_GM_LABELS))
            meta = meta[:at] + meta[end:]
        uid = _UID.search(meta)
        if uid is None or not 0 < int(uid[1]) <= MAX_UID:
            return
        flags = _FLAGS.search(meta)
        size = _SIZE.search(meta)
        date = _DATE.search(meta)
        modseq = _MODSEQ.search(meta)
        items.append(
            FetchItem(
                uid=int(uid[1]),
                flags=flags[1].decode("utf-8", "replace").split() if flags else [],
                size=int(size[1]) if size else None,
                internaldate=date[1].decode() if date else None,
                modseq=int(modseq[1]) if modseq else None,
                body=body,
                gm_msgid=_gm_id(_GM_MSGID.search(meta)),
                gm_thrid=_gm_id(_GM_THRID.search(meta)),
                gm_labels=labels,
            )
        )

    for line in lines:
        if isinstance(line, bytearray) and expecting_literal:
            body = bytes(line)
            expecting_literal = False
            continue
        data = bytes(line)
        if _FETCH_START.match(data):
            if in_item:
                close()
            meta, body, in_item = data, None, True
        elif in_item:
            meta += b" " + data
        else:
            continue
        expecting_literal = _LITERAL.search(data) is not None
    if in_item:
        close()
    return items


def _gm_id(match: re.Match[bytes] | None) -> int | None:
    if match is None:
        return None
    value = int(match[1])
    return value if 0 < value <= _MAX_ID else None


def parse_gm_labels(data: bytes, start: int) -> tuple[list[str], int]:
    """The labels of an ``X-GM-LABELS (`` list whose first label starts at ``start``, and the
    offset after its ``)``. A label is an atom (``\\Inbox``, ``Work``) or a quoted string with
    ``\\`` escapes, in modified UTF-7 (RFC 3501 5.1.3) like a mailbox name. One pass over the
    bytes; at most :data:`MAX_GM_LABELS` are kept. A list cut short ends at the data's end."""
    labels: list[str] = []
    i, n = start, len(data)
    while i < n:
        c = data[i]
        if c == 0x29:  # ")"
            return labels, i + 1
        if c == 0x20:
            i += 1
            continue
        token = bytearray()
        if c == 0x22:  # '"'
            i += 1
            while i < n and data[i] != 0x22:
                if data[i] == 0x5C and i + 1 < n:  # a backslash escapes the next byte
                    i += 1
                token.append(data[i])
                i += 1
            i += 1  # the closing quote
        else:
            while i < n and data[i] not in (0x20, 0x29):
                token.append(data[i])
                i += 1
        if len(labels) < MAX_GM_LABELS:
            labels.append(decode_mailbox_utf7(bytes(token)))
    return labels, n


def decode_mailbox_utf7(raw: bytes) -> str:
    """RFC 3501's modified UTF-7 (``&`` starts base64 of UTF-16BE with ``,`` for ``/``, ``-``
    ends it, ``&-`` is ``&``); a malformed shift is kept as it was sent."""
    if b"&" not in raw:
        return raw.decode("ascii", "replace")
    out: list[str] = []
    i = 0
    while i < len(raw):
        amp = raw.find(b"&", i)
        if amp < 0:
            out.append(raw[i:].decode("ascii", "replace"))
            break
        out.append(raw[i:amp].decode("ascii", "replace"))
        dash = raw.find(b"-", amp)
        if dash < 0:
            out.append(raw[amp:].decode("ascii", "replace"))
            break
        chunk = raw[amp + 1 : dash]
        if not chunk:
            out.append("&")
        else:
            try:
                padded = chunk.replace(b",", b"/") + b"=" * (-len(chunk) % 4)
                out.append(base64.b64decode(padded, validate=True).decode("utf-16-be"))
            except (ValueError, UnicodeDecodeError):
                out.append(raw[amp : dash + 1].decode("ascii", "replace"))
        i = dash + 1
    return "".join(out)


def parse_list(lines: list[Any]) -> list[ListedFolder]:
    out = []
    for line in lines:
        match = _LIST.match(bytes(line))
        if match is None:
            continue
        attrs = match[1].decode().lower().split()
        raw = match[2].decode("utf-8", "replace").strip()
        name = raw[1:-1].replace('\\"', '"').replace("\\\\", "\\") if raw.startswith('"') else raw
        if has_control_characters(name):
            continue  # never selectable safely (quote_mailbox refuses it); not a folder to sync
        role = next((_SPECIAL[a] for a in attrs if a in _SPECIAL), None)
        if role is None and name.upper() == "INBOX":
            role = "inbox"
        out.append(ListedFolder(name, role, "\\noselect" not in attrs and "\\nonexistent" not in attrs))
    return out


_CODE: Final = re.compile(rb"\[(UIDVALIDITY|UIDNEXT|HIGHESTMODSEQ) (\d{1,19})\]")
_EXISTS: Final = re.compile(rb"^(\d{1,10}) EXISTS")
_VANISHED: Final = re.compile(rb"^VANISHED (?:\(EARLIER\) )?([\d:,]+)")


def parse_search(lines: list[Any], max_uids: int) -> set[int]:
    """The UIDs of a UID SEARCH response as aioimaplib hands it over ("SEARCH" stripped, the
    tagged status last). More than ``max_uids`` UIDs, or a number that is no UID, is an error:
    a set of ints costs about 30 times the bytes of their digits."""
    uids: set[int] = set()
    for line in lines[:-1]:
        for match in _NUMBER.finditer(bytes(line)):
            token = match[0]
            if len(token) > 10 or not 0 < (uid := int(token)) <= MAX_UID:
                raise ImapError(f"UID SEARCH returned {token[:20].decode()}, which is no UID")
            uids.add(uid)
            if len(uids) > max_uids:
                raise ImapError(f"UID SEARCH returned more than {max_uids} UIDs")
    return uids


def parse_select(lines: list[Any]) -> SelectInfo:
    info = SelectInfo()
    fetches: list[Any] = []
    vanished: list[UidSet] = []
    for line in lines:
        data = bytes(line)
        for code, value in _CODE.findall(data):
            if code == b"UIDVALIDITY":
                info.uidvalidity = int(value)
            elif code == b"UIDNEXT":
                info.uidnext = int(value)
            else:
                info.highestmodseq = int(value)
        if m := _EXISTS.match(data):
            info.exists = int(m[1])
        elif m := _VANISHED.match(data):
            try:
                vanished.append(UidSet.parse(m[1]))
            except UidSetTooLarge:
                info.vanished = None
            except ValueError as exc:
                raise ImapError(f"malformed VANISHED response: {exc}") from exc
        elif _FETCH_START.match(data):
            fetches.append(data)
    if info.vanished is not None:
        info.vanished = UidSet.merge(vanished)
    info.changed = parse_fetch(fetches)
    return info


def _wait_data(cmd: Any) -> bool:
    """aioimaplib's ``FetchCommand.wait_data`` rescans every line received so far for each new
    line (quadratic: seconds of CPU for a 2,000-message FLAGS fetch); this looks back only to the
    start of the last FETCH item."""
    if not isinstance(cmd, aioimaplib.FetchCommand):
        return bool(cmd.wait_data())
    lines = cmd.response.lines
    i = len(lines) - 1
    while i > 0 and not (isinstance(lines[i], bytes) and _FETCH_ITEM.match(lines[i])):
        i -= 1
    tail = b"".join(x for x in lines[max(i, 0) :] if isinstance(x, bytes))
    return tail.count(b"(") != tail.count(b")")


_FETCH_ITEM: Final = re.compile(rb"[0-9]+ FETCH \(")


class _Protocol(aioimaplib.IMAP4ClientProtocol):  # type: ignore[misc]
    """aioimaplib's protocol with its response loop made iterative (the original recurses once per
    line and overflows the stack on a large FETCH or a QRESYNC SELECT, about 1,000 lines), a
    linear FETCH completeness check, commands that fail as soon as the connection is lost, and
    bounded buffering.

    aioimaplib keeps a response's lines and literals in memory until its tagged status
    (``Command._resp_lines``, ``Command._resp_literal_data``, sized by the server's ``{N}``) and
    an unfinished line, all without limit: a hostile server could send
    ``{4294967295}`` or a line without end. So a literal announced above ``max_literal_bytes`` is
    refused before any of it is read, and more than ``max_response_bytes`` received since our
    last command was sent drops the connection; both fail the pending commands with
    :class:`ResponseTooLarge`.
    """

    lost: Exception | None = None
    max_literal_bytes: int = MAX_LITERAL_BYTES
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    received_bytes: int = 0  # since our last command was sent
    current_command: Any
    pending_sync_command: Any
    # the AUTHENTICATE in progress: (initial response, abort answer); and what the server
    # challenged back (its error, for the log)
    sasl: tuple[str, str] | None = None
    sasl_sent: bool = False
    sasl_challenge: bytes = b""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # an unfinished line in the chunks it came in (aioimaplib's ``incomplete_line`` is
        # joined with every new chunk: quadratic in a long line, such as a SEARCH result)
        self._partial: list[bytes] = []

    def data_received(self, d: bytes) -> None:
        # not aioimaplib's: that one also formats every chunk for a debug log, at any log level
        if self.lost is not None:
            return  # being dropped: nothing more is buffered
        self.received_bytes += len(d)
        if self.received_bytes > self.max_response_bytes:
            self._drop(
                ResponseTooLarge(
                    f"the IMAP server sent more than {self.max_response_bytes} bytes in one response"
                )
            )
            return
        if self._partial and b"\r\n" not in d and not (d[:1] == b"\n" and self._partial[-1][-1:] == b"\r"):
            self._partial.append(d)  # the same line goes on
            return
        data = b"".join((*self._partial, d)) if self._partial else d
        self._partial = []
        try:
            self._handle_responses(data, self._handle_line, self.current_command)
            self.current_command = None
        except aioimaplib.IncompleteRead as incomplete:
            self.current_command = incomplete.cmd
            if incomplete.data:
                self._partial.append(incomplete.data)
        except ResponseTooLarge as exc:
            self._drop(exc)

    def _continuation(self, line: bytes) -> None:
        command = self.pending_sync_command
        if self.sasl is None or command is None or command.name != "AUTHENTICATE":
            super()._continuation(line)
            return
        if not self.sasl_sent:  # a server without SASL-IR asks for the initial response
            answer, self.sasl_sent = self.sasl[0], True
        else:  # an error challenge: answer it, and the server ends the command with NO
            self.sasl_challenge = line[2 : 2 + MAX_CHALLENGE_BYTES]
            answer = self.sasl[1]
        if self.transport is not None:
            self.transport.write(answer.encode() + b"\r\n")

    def _drop(self, exc: ResponseTooLarge) -> None:
        self._fail(exc)
        self._partial, self.current_command = [], None
        if self.transport is not None:
            self.transport.abort()

    def _check_literal(self, digits: bytes) -> None:
        if len(digits) > 12 or int(digits) > self.max_literal_bytes:
            raise ResponseTooLarge(
                f"the IMAP server announced a literal of {digits[:20].decode()} bytes;"
                f" at most {self.max_literal_bytes} are accepted"
            )

    def _fail(self, exc: Exception) -> None:
        if self.lost is not None:
            return
        self.lost = exc
        for cmd in (self.pending_sync_command, *self.pending_async_commands.values()):
            if cmd is not None and not cmd._event.is_set():
                cmd._exception = exc
                cmd.close(b"connection lost", "NO")
        # or the next command would wait on them (aioimaplib removes them only on their answer)
        self.pending_sync_command = None
        self.pending_async_commands.clear()
        self.idle_queue.put_nowait(aioimaplib.STOP_WAIT_SERVER_PUSH)
        self._idle_event.set()

    def connection_lost(self, exc: Exception | None) -> None:
        # aioimaplib leaves pending commands (IDLE included) waiting for their timeout when the
        # server hangs up, as Dovecot does after a UIDVALIDITY change ("IMAP session state is
        # inconsistent, please relogin"): fail them now so the sync reconnects at once.
        self._fail(ConnectionResetError(f"the IMAP server closed the connection ({exc or 'EOF'})"))
        super().connection_lost(exc)

    async def execute(self, command: Any, scrub: str | None = None) -> Any:
        # before aioimaplib registers the command as pending, where no answer would ever end it
        if self.lost is not None:
            raise self.lost
        return await super().execute(command, scrub=scrub)

    def send(self, line: str, scrub: str | None = None) -> None:
        if self.lost is not None:
            raise self.lost
        self.received_bytes = 0
        super().send(line, scrub=scrub)

    def _handle_responses(self, data: bytes, line_handler: Any, current_cmd: Any = None) -> None:
        while True:
            if not data:
                if self.pending_sync_command is not None:
                    self.pending_sync_command.flush()
                if current_cmd is not None and _wait_data(current_cmd):
                    raise aioimaplib.IncompleteRead(current_cmd)
                return
            if current_cmd is not None and current_cmd.wait_literal_data():
                data = current_cmd.append_literal_data(data)
                if current_cmd.wait_literal_data():
                    raise aioimaplib.IncompleteRead(current_cmd)
            line, separator, tail = data.partition(b"\r\n")
            if not separator:
                raise aioimaplib.IncompleteRead(current_cmd, data)
            cmd = line_handler(line, current_cmd)
            begin_literal = aioimaplib.literal_data_re.match(line)
            if begin_literal:
                self._check_literal(begin_literal.group("size"))
                if cmd is None:
                    cmd = aioimaplib.Command("NIL", "unused")
                cmd.begin_literal_data(int(begin_literal.group("size")))
                current_cmd = cmd
            elif cmd is not None and _wait_data(cmd):
                current_cmd = cmd
            else:
                current_cmd = None
            data = tail


class Imap4(aioimaplib.IMAP4):  # type: ignore[misc]
    """aioimaplib's client on :class:`_Protocol` (implicit TLS when given an ``ssl_context``).
    ``server_hostname`` is the name the certificate must carry when ``host`` is the address it
    was resolved to."""

    def __init__(self, *args: Any, server_hostname: str | None = None, **kwargs: Any) -> None:
        self._server_hostname = server_hostname
        super().__init__(*args, **kwargs)

    def create_client(
        self, host: str, port: int, loop: asyncio.AbstractEventLoop | None, conn_lost_cb: Any = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:  # fmt: skip
        local_loop = loop if loop is not None else asyncio.get_running_loop()
        self.protocol = _Protocol(local_loop, conn_lost_cb)
        tls: dict[str, Any] = {"ssl": ssl_context}
        if ssl_context is not None and self._server_hostname is not None:
            tls["server_hostname"] = self._server_hostname
        self._client_task = local_loop.create_task(
            local_loop.create_connection(lambda: self.protocol, host, port, **tls)
        )


class ImapConnection:
    """One logged-in IMAP connection.

    :param tls_mode: ``implicit`` (IMAPS), ``starttls`` (RFC 9051 6.2.1: upgrade before login;
        a server that does not offer it is an error, never a silent plaintext login) or ``none``
        (loopback only, checked by the API).
    :param ca_file: PEM certificates to trust besides the system's (a self-signed server).
    :param max_response_bytes: the most one response may make us buffer, unless its command
        sets a cap of its own (:meth:`uid_fetch`); past it the connection is dropped.
    :param allow_private: connect to a host that resolves to a loopback or private address (the
        local stack, tests). Otherwise such a host is refused (:class:`HostRefused`); either way
        the connection goes to the address that was resolved and checked, never to a second
        resolution of the name (DNS rebinding).
    """

    def __init__(
        self, host: str, port: int, tls_mode: str, timeout_s: float, ca_file: str | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES, *, allow_private: bool = False,
    ) -> None:  # fmt: skip
        self.host, self.port, self.tls_mode, self.timeout_s = host, port, tls_mode, timeout_s
        self.ca_file = ca_file
        self.max_response_bytes = max_response_bytes
        self.allow_private = allow_private
        self.client: aioimaplib.IMAP4 | None = None
        self.condstore = False
        self.qresync = False
        self.gmail = False  # the server advertises X-GM-EXT-1
        self.selected: str | None = None

    @property
    def imap(self) -> aioimaplib.IMAP4:
        if self.client is None:
            raise ImapError("not connected")
        return self.client

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()  # the system's CAs, hostname checked
        if self.ca_file:
            context.load_verify_locations(cafile=self.ca_file)
        return context

    async def _starttls(self, client: aioimaplib.IMAP4) -> None:
        protocol = client.protocol
        await protocol.capability()
        if "STARTTLS" not in {c.upper() for c in protocol.capabilities}:
            raise ImapError(f"{self.host}:{self.port} does not offer STARTTLS")
        command = aioimaplib.Command("STARTTLS", protocol.new_tag(), loop=protocol.loop)
        self.check(await protocol.execute(command), "STARTTLS")
        loop = asyncio.get_running_loop()
        protocol.transport = await wait_for(
            loop.start_tls(protocol.transport, protocol, self._tls_context(), server_hostname=self.host),
            self.timeout_s,
        )
        protocol.capabilities = set()  # what the server said before TLS is not to be trusted

    async def connect(
        self, username: str, password: str, *, use_condstore: bool = True, method: str = "login"
    ) -> None:
        """Connect and log in; ``method`` is one of :data:`LOGIN_METHODS` (all but ``login`` take
        an OAuth2 access token as ``password``)."""
        if has_control_characters(username) or has_control_characters(password):
            # a CR or LF would end LOGIN and start a command of the server's choosing
            raise AuthFailed("the username or password contains control characters")
        if method not in LOGIN_METHODS:
            raise ImapError(f"unknown login method {method!r}")
        try:
            address = (await resolve_public(self.host, self.port, allow_private=self.allow_private))[0]
        except AddressRefused as exc:
            raise HostRefused(str(exc)) from None
        try:
            tls = self._tls_context() if self.tls_mode == "implicit" else None
            self.client = Imap4(
                address, self.port, timeout=self.timeout_s, ssl_context=tls, server_hostname=self.host
            )
            self.client.protocol.max_response_bytes = self.max_response_bytes
            await wait_for(self.client.wait_hello_from_server(), self.timeout_s)
            if self.tls_mode == "starttls":
                await self._starttls(self.client)
            if method == "login":
                response = await self.client.login(username, password)
            else:
                response = await self._authenticate(self.client, method, username, password)
        except (OSError, TimeoutError, ImapError, aioimaplib.AioImapException) as exc:
            await self.close()
            if isinstance(exc, ImapError):
                raise
            raise ImapError(f"cannot connect to {self.host}:{self.port}: {exc!r}") from exc
        if response.result != "OK":
            text = b" ".join(bytes(x) for x in response.lines).decode("utf-8", "replace")
            await self.close()
            if "[UNAVAILABLE]" in text or "[SERVERBUG]" in text:
                raise ImapError(f"login refused temporarily: {text}")
            raise AuthFailed(f"authentication failed: {text}")
        await self.client.protocol.capability()
        caps = {c.upper() for c in self.client.protocol.capabilities}
        self.gmail = "X-GM-EXT-1" in caps
        self.condstore = use_condstore and "CONDSTORE" in caps
        self.qresync = use_condstore and "QRESYNC" in caps and "ENABLE" in caps
        if self.qresync:
            self.check(await self.client.enable("QRESYNC"), "ENABLE QRESYNC")

    async def _authenticate(self, client: aioimaplib.IMAP4, method: str, username: str, token: str) -> Any:
        """AUTHENTICATE with an OAuth2 mechanism; the token goes out only inside its SASL
        encoding (:func:`libs.imap.sasl.initial_response`), and is never logged."""
        protocol = client.protocol
        if not protocol.capabilities:  # none yet, or reset by STARTTLS
            await protocol.capability()
        caps = {c.upper() for c in protocol.capabilities}
        if method == "oauth2":
            method = "oauthbearer" if "AUTH=OAUTHBEARER" in caps else "xoauth2"
        if f"AUTH={method.upper()}" not in caps:
            raise AuthFailed(f"{self.host}:{self.port} does not offer AUTH={method.upper()}")
        first = initial_response(method, username, token, self.host, self.port)
        protocol.sasl, protocol.sasl_sent, protocol.sasl_challenge = (first, ABORT[method]), False, b""
        args = [method.upper(), first] if "SASL-IR" in caps else [method.upper()]
        protocol.sasl_sent = len(args) == 2
        try:
            command = aioimaplib.Command("AUTHENTICATE", protocol.new_tag(), *args, loop=protocol.loop)
            response = await wait_for(protocol.execute(command, scrub=first), self.timeout_s)
        finally:
            protocol.sasl = None
        if response.result == "OK":
            protocol.state = aioimaplib.AUTH
        elif protocol.sasl_challenge:
            response.lines.append(b"(challenge " + protocol.sasl_challenge + b")")
        return response

    @staticmethod
    def check(response: Any, what: str) -> Any:
        if response.result != "OK":
            text = b" ".join(bytes(x) for x in response.lines).decode("utf-8", "replace")
            raise ImapError(f"{what} failed: {text}")
        return response

    async def list_folders(self) -> list[ListedFolder]:
        response = self.check(await self.imap.list('""', '"*"'), "LIST")
        return parse_list(response.lines)

    async def select(
        self, name: str, *, uidvalidity: int | None = None, modseq: int | None = None
    ) -> SelectInfo:
        arg = quote_mailbox(name)
        if self.qresync and uidvalidity and modseq:
            arg += f" (QRESYNC ({uidvalidity} {modseq}))"
        elif self.condstore:
            arg += " (CONDSTORE)"
        response = self.check(await self.imap.select(arg), f"SELECT {name}")
        self.selected = name
        return parse_select(response.lines)

    async def examine(self, name: str) -> SelectInfo:
        """``EXAMINE``: select ``name`` read-only, so nothing we do there changes a flag."""
        response = self.check(await self.imap.examine(quote_mailbox(name)), f"EXAMINE {name}")
        self.imap.protocol.state = aioimaplib.SELECTED  # aioimaplib sets it only for SELECT
        self.selected = name
        return parse_select(response.lines)

    async def uid_fetch(
        self, uid_set: str, parts: str, *, max_response_bytes: int | None = None,
        max_literal_bytes: int = MAX_LITERAL_BYTES,
    ) -> list[FetchItem]:  # fmt: skip
        """``UID FETCH``; ``max_response_bytes`` caps this response (a body fetch is planned in
        bytes, so more than planned is a server to stop reading from), ``max_literal_bytes`` each
        literal in it (raise it only for a fetch that asks for whole messages)."""
        protocol = self.imap.protocol
        protocol.max_response_bytes = max_response_bytes or self.max_response_bytes
        protocol.max_literal_bytes = max_literal_bytes
        try:
            response = await wait_for(
                protocol.fetch(uid_set, parts, by_uid=True, timeout=self.timeout_s), self.timeout_s * 2
            )
        finally:
            protocol.max_response_bytes = self.max_response_bytes
            protocol.max_literal_bytes = MAX_LITERAL_BYTES
        self.check(response, "UID FETCH")
        return parse_fetch(response.lines)

    @property
    def last_response_bytes(self) -> int:
        """Bytes received since the last command was sent (its response, once it is done)."""
        return int(self.imap.protocol.received_bytes)

    async def uid_list(self, first: int = 1, *, max_uids: int = 1_000_000) -> set[int]:
        """The selected folder's UIDs from ``first`` on (UID SEARCH: one line, unlike FETCH (UID)).
        ``first:*`` also matches the highest UID when it is below ``first``: callers filter."""
        criteria = "ALL" if first <= 1 else f"UID {first}:*"
        response = await wait_for(self.imap.uid_search(criteria, charset=None), self.timeout_s * 2)
        self.check(response, "UID SEARCH")
        return parse_search(response.lines, max_uids)

    async def has_message_id(self, message_id: str) -> bool:
        """Whether the selected folder holds a message with this Message-ID (with its <>)."""
        if has_control_characters(message_id) or '"' in message_id or "\\" in message_id:
            raise ValueError("a Message-ID to search for must not need escaping")
        response = await wait_for(
            self.imap.uid_search(f'HEADER Message-ID "{message_id}"', charset=None), self.timeout_s * 2
        )
        self.check(response, "UID SEARCH")
        return bool(parse_search(response.lines, 1_000))

    async def append(self, raw: bytes, folder: str, flags: str = "(\\Seen)") -> None:
        response = await wait_for(
            self.imap.append(raw, mailbox=quote_mailbox(folder), flags=flags), self.timeout_s * 2
        )
        self.check(response, f"APPEND {folder}")

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is None:
            return
        try:
            if client.has_pending_idle():
                client.idle_done()
            await wait_for(client.logout(), 2.0)
        except (OSError, TimeoutError, ImapError, aioimaplib.AioImapException, AttributeError):
            pass  # a dropped connection (ResponseTooLarge) fails the LOGOUT too
        transport = getattr(client.protocol, "transport", None)
        if transport is not None:
            transport.close()
        for task in list(getattr(client, "tasks", ())):
            task.cancel()
        task = getattr(client, "_client_task", None)
        if task is not None:
            task.cancel()
