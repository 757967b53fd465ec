"""The client end of an SMTP connection, as qmail-remote reads and writes it.

Replies are read the way qmail-remote's smtpcode() reads them: the code is
the first three bytes of the first line, further lines follow while the
fourth byte is `-`, and the whole text (CRs dropped, at most 5000 bytes) is
kept for the log and the bounce. Nothing a server sends is rejected as
malformed; a reply is only ever a code and a text.

Written here rather than taken from aiosmtplib: its protocol drops whatever
a server sends while no command is waiting for a reply, so pipelined replies
(several RCPTs answered in one packet) would be lost, and it refuses reply
lines qmail reads without complaint.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
from dataclasses import dataclass

from core.reads import small_reads

TEXT_MAX = 5000  # qmail-remote's HUGESMTPTEXT
READ_MAX = 64 * 1024  # a reply longer than this is not waited for to its end
LINE_END = re.compile(rb"\r\n|\r|\n")
DOT_AT_LINE_START = re.compile(rb"(?m)^\.")


class Dropped(Exception):
    """The connection died or timed out (qmail-remote: `dropped()`)."""


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str  # every line with its code, CRs dropped, NULs as `?`

    @property
    def lines(self) -> list[str]:
        return self.text.rstrip("\n").split("\n")


def wire(message: bytes) -> bytes:
    """The message as DATA carries it: every CR, LF or CRLF sent as CRLF, a
    dot stuffed at the start of every line, then `.`. So no stored byte
    sequence can end DATA early (spec/remote.md §8.1's hazard)."""
    text = LINE_END.sub(b"\r\n", message)
    if not text.endswith(b"\r\n"):
        text += b"\r\n"
    return DOT_AT_LINE_START.sub(b"..", text) + b".\r\n"


class Client:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self.reader, self.writer, self.timeout = reader, writer, timeout
        self._buffer = b""
        self.extensions: dict[str, str] = {}  # EHLO keyword (upper case) -> its parameters

    @classmethod
    async def over(cls, sock: socket.socket, wait: float) -> Client:
        """A client on a connected socket; `wait`: timeoutremote, for every read and write."""
        reader, writer = await asyncio.open_connection(sock=sock, limit=READ_MAX)
        small_reads(writer.transport)  # replies are lines
        return cls(reader, writer, wait)

    async def _more(self) -> None:
        try:
            chunk = await asyncio.wait_for(self.reader.read(4096), self.timeout)
        except (TimeoutError, OSError, ssl.SSLError) as e:
            raise Dropped(str(e)) from None
        if not chunk:
            raise Dropped("connection closed")
        self._buffer += chunk

    async def _line(self) -> bytes:
        while b"\n" not in self._buffer:
            if len(self._buffer) > READ_MAX:
                raise Dropped("reply line too long")
            await self._more()
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line + b"\n"

    async def reply(self) -> Reply:
        """One reply, read as smtpcode() reads it."""
        kept = (await self._line()).replace(b"\r", b"")
        code = _code(kept)
        line = kept
        while len(line) > 3 and line[3:4] == b"-":
            line = (await self._line()).replace(b"\r", b"")
            kept += line
        text = kept[:TEXT_MAX].replace(b"\0", b"?").decode("utf-8", "surrogateescape")
        return Reply(code, text)

    async def send(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), self.timeout)
        except (TimeoutError, OSError, ssl.SSLError) as e:
            raise Dropped(str(e)) from None

    async def command(self, line: bytes) -> Reply:
        await self.send(line + b"\r\n")
        return await self.reply()

    async def pipeline(self, lines: list[bytes]) -> list[Reply]:
        """Several commands in one write, then their replies in order (RFC 2920)."""
        await self.send(b"".join(line + b"\r\n" for line in lines))
        return [await self.reply() for _ in lines]

    async def hello(self, name: str) -> Reply:
        """EHLO, and its keywords; on anything but 250, HELO."""
        reply = await self.command(b"EHLO " + name.encode("utf-8", "surrogateescape"))
        if reply.code == 250:
            self.extensions = {}
            for line in reply.lines[1:]:
                keyword, _, params = line[4:].strip().partition(" ")
                self.extensions[keyword.upper()] = params
            return reply
        self.extensions = {}
        return await self.command(b"HELO " + name.encode("utf-8", "surrogateescape"))

    def offers(self, keyword: str) -> bool:
        return keyword.upper() in self.extensions

    async def starttls(self, context: ssl.SSLContext) -> None:
        """The handshake on this connection; Dropped if it fails. Anything the
        server sent before it (a pipelining attack on us) is thrown away."""
        self._buffer = b""
        try:
            await asyncio.wait_for(
                self.writer.start_tls(context, server_hostname=None), self.timeout
            )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as e:
            raise Dropped(str(e)) from None

    def quit(self) -> None:
        """QUIT, not waiting for the answer (qmail-remote: "just too ridiculous")."""
        if not self.writer.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                self.writer.write(b"QUIT\r\n")
        self.close()

    def close(self) -> None:
        self.writer.close()


def _code(line: bytes) -> int:
    """smtpcode()'s arithmetic on the first three bytes, digits or not, in an
    unsigned long: a line that does not start with digits comes out huge (a
    permanent error), as with qmail."""
    padded = (line + b"\n\n\n")[:3]
    value = 0
    for byte in padded:
        value = value * 10 + (byte - 48)
    return value % (1 << 64)
