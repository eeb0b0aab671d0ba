"""A scripted IMAP server that replays protocol transcripts over a real socket, for servers that
cannot run here (Gmail). Each accepted connection plays the next transcript of the list.

A transcript is lines of text (``#`` starts a comment)::

    S: * OK Gimap ready                      sent as is
    C: CAPABILITY                            the client's next command, its tag left out
    S: . OK Success                          "." is the tag of the client's last command
    C+: DONE                                 a client line without a tag (the end of IDLE)
    S: * 1 FETCH (UID 3 BODY[] {{msg:a}})    {{msg:NAME}} becomes a literal of message NAME

Client lines are compared exactly (after the tag). A line that differs is answered ``BAD`` and
recorded in :attr:`ReplayServer.mismatches`, which a test asserts empty; a client that sends
more than its transcript holds is recorded there too. After the last line the connection stays
open and silent (a client in IDLE waits there) until the client or the test closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

__all__ = ["ReplayServer", "Transcript", "load_transcript"]

_LITERAL: Final = re.compile(r"\{\{msg:([A-Za-z0-9_-]+)\}\}")
TRANSCRIPTS: Final = Path(__file__).parent / "transcripts"


@dataclass(frozen=True, slots=True)
class Step:
    who: str  # "S", "C" (tagged command) or "C+" (untagged client line)
    text: str


@dataclass(frozen=True, slots=True)
class Transcript:
    name: str
    steps: tuple[Step, ...]


def load_transcript(name: str, **subst: str) -> Transcript:
    """``transcripts/<name>.imap``, with ``${key}`` replaced by ``subst[key]``."""
    steps = []
    for raw in (TRANSCRIPTS / f"{name}.imap").read_text().splitlines():
        line = raw.rstrip()
        if not line or line.lstrip().startswith("#"):
            continue
        who, sep, text = line.partition(": ")
        if not sep or who not in ("S", "C", "C+"):
            raise ValueError(f"{name}: not a transcript line: {line!r}")
        for key, value in subst.items():
            text = text.replace("${" + key + "}", value)
        steps.append(Step(who, text))
    return Transcript(name, tuple(steps))


@dataclass
class ReplayServer:
    """Replays ``transcripts`` (one per connection, in order) with ``messages`` as literals."""

    transcripts: list[Transcript]
    messages: dict[str, bytes] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)
    played: list[str] = field(default_factory=list)  # transcripts played to their end
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def __aenter__(self) -> ReplayServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _render(self, text: str) -> bytes:
        out = b""
        at = 0
        for match in _LITERAL.finditer(text):
            body = self.messages[match[1]]
            out += text[at : match.start()].encode() + b"{%d}\r\n" % len(body) + body
            at = match.end()
        return out + text[at:].encode() + b"\r\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        if not self.transcripts:
            self.mismatches.append("a connection beyond the transcripts")
            writer.close()
            return
        transcript = self.transcripts.pop(0)
        tag = ""
        try:
            for step in transcript.steps:
                if step.who == "S":
                    text = step.text
                    if text.startswith(". "):
                        text = tag + text[1:]
                    writer.write(self._render(text))
                    await writer.drain()
                    continue
                line = (await reader.readline()).decode(errors="replace").rstrip("\r\n")
                if not line:
                    self.mismatches.append(f"{transcript.name}: the client left before {step.text!r}")
                    return
                if step.who == "C+":
                    got = line
                else:
                    tag, _, got = line.partition(" ")
                if got != step.text:
                    self.mismatches.append(f"{transcript.name}: expected {step.text!r}, got {got!r}")
                    writer.write(f"{tag} BAD not in the transcript\r\n".encode())
                    await writer.drain()
                    return
            self.played.append(transcript.name)
            extra = await reader.readline()  # silent; a client that still talks is a mismatch
            if extra and not extra.upper().rstrip().endswith((b"LOGOUT", b"DONE")):
                self.mismatches.append(f"{transcript.name}: after the end, the client sent {extra[:200]!r}")
        except ConnectionError:
            pass
        finally:
            with contextlib.suppress(ConnectionError):
                writer.close()
