"""Generated Dovecot mailboxes: varied MIME messages written straight into a test user's maildir.

Used by the IMAP sync tests and by ``flightlog bench``; the user must exist first
(:meth:`cli.stack.Dovecot.add_user` with ``f"{user}@{DOMAIN}"``).
"""

from __future__ import annotations

import base64
import os
import shutil
import time
from email.header import Header
from pathlib import Path

from cli.stack import Dovecot

__all__ = ["DOMAIN", "fill_maildir", "live_message", "make_message"]

DOMAIN = "flightlog.test"
CHARSETS = ("utf-8", "iso-8859-1", "koi8-r", "shift_jis", "iso-2022-jp", "gb2312")
WORDS = ("Grüße", "Привет", "こんにちは", "café", "你好", "naïve")


def make_message(i: int) -> tuple[bytes, str]:
    """A varied message (plain, RFC 2047 headers, alternative, attachments, broken) and its flags."""
    kind = i % 6
    charset = CHARSETS[i % len(CHARSETS)]
    word = WORDS[i % len(WORDS)]
    try:
        subject = Header(f"{word} #{i}", charset).encode()
    except (UnicodeEncodeError, LookupError):
        subject = Header(f"{word} #{i}", "utf-8").encode()
    name = Header(f"Jürgen {i}", "utf-8").encode()
    head = (
        f'From: {name} <sender{i % 37}@example.org>\r\nTo: user@{DOMAIN}, "B" <b{i}@example.org>\r\n'
        f"Subject: {subject}\r\nDate: Mon, 02 Nov 2026 10:{i % 60:02d}:00 +0000\r\nMIME-Version: 1.0\r\n"
    )
    if kind != 5:
        head += f"Message-ID: <gen-{i}@example.org>\r\n"
    if i % 7 == 0 and i:
        head += f"In-Reply-To: <gen-{i - 7}@example.org>\r\n"
        head += f"References: <gen-0@example.org> <gen-{i - 7}@example.org>\r\n"
    if kind in (0, 1):
        body = f"Content-Type: text/plain; charset=utf-8\r\n\r\nHello {word} number {i}\r\n"
    elif kind == 2:
        body = (
            'Content-Type: multipart/alternative; boundary="alt"\r\n\r\n--alt\r\n'
            f"Content-Type: text/plain; charset=utf-8\r\n\r\n{word} text {i}\r\n--alt\r\n"
            f"Content-Type: text/html; charset=utf-8\r\n\r\n<p>{word} <b>html</b> {i}</p>\r\n--alt--\r\n"
        )
    elif kind == 3:
        payload = base64.b64encode(os.urandom(300 + i % 700)).decode()
        fname = Header(f"Bericht-{word}-{i}.pdf", "utf-8").encode()
        body = (
            'Content-Type: multipart/mixed; boundary="mix"\r\n\r\n--mix\r\n'
            f"Content-Type: text/plain; charset=utf-8\r\n\r\nsee attached {i}\r\n--mix\r\n"
            f'Content-Type: application/pdf\r\nContent-Disposition: attachment; filename="{fname}"\r\n'
            f"Content-Transfer-Encoding: base64\r\n\r\n{payload}\r\n--mix--\r\n"
        )
    elif kind == 4:
        body = (
            'Content-Type: multipart/mixed; boundary="never-closed"\r\n\r\n--never-closed\r\n'
            "Content-Type: text/plain; charset=x-no-such-charset\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            f"!!!not base64 {i}\r\n"
        )
    else:  # no Message-ID, undeclared 8-bit bytes, junk header line
        return (
            head + "Garbage header without colon\r\n\r\n"
        ).encode() + f"raw {i} ".encode() + b"\xff\xfe\r\n", ""
    return (head + body).encode(), "S" if i % 3 == 0 else ""


def fill_maildir(server: Dovecot, user: str, n: int, folder: str = "") -> None:
    """Write ``n`` messages straight into the user's maildir (Dovecot indexes them on SELECT)."""
    base = server.dir / "mail" / DOMAIN / user / "Maildir"
    target = base / (f".{folder}" if folder else "")
    for sub in ("cur", "new", "tmp"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    start = int(time.time()) - 86400 * 30
    for i in range(n):
        raw, flags = make_message(i)
        path = target / "cur" / f"{start + i}.M{i}P{os.getpid()}.gen:2,{flags}"
        path.write_bytes(raw)
        os.utime(path, (start + i * 60, start + i * 60))
    if folder:
        subs = base / "subscriptions"
        subs.write_text((subs.read_text() if subs.exists() else "") + folder + "\n")
    for root, dirs, files in os.walk(server.dir / "mail" / DOMAIN / user):
        for name in dirs + files:
            shutil.chown(Path(root) / name, "mail", "mail")
    shutil.chown(server.dir / "mail" / DOMAIN / user, "mail", "mail")


def live_message(tag: str, user: str) -> bytes:
    """A small new message whose Subject is ``tag`` (how its row is found again)."""
    return (
        f"From: live@example.org\r\nTo: {user}@{DOMAIN}\r\nSubject: {tag}\r\n"
        f"Message-ID: <{tag}@example.org>\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\nnew mail {tag}\r\n"
    ).encode()
