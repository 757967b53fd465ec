"""The SMTP client against scripted servers on loopback: replies read as
qmail-remote reads them, PIPELINING used when offered, and the DATA bytes."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from core.mxroute import Answer, Candidate
from core.remote import deliver
from core.smtpclient import Client, Reply, wire

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def server(script: Script) -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(script(reader, writer), 10)
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        await srv.wait_closed()


async def client(port: int) -> Client:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setblocking(False)
    return await Client.over(sock, 5)


async def first_reply(sent: bytes) -> Reply:
    """What the client reads of `sent`, a server's first words."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(sent)
        await writer.drain()
        await reader.read(1)

    async with server(script) as port:
        c = await client(port)
        reply = await c.reply()
        c.close()
    return reply


@pytest.mark.parametrize(
    ("sent", "code", "text"),
    [
        (b"250 ok\r\n", 250, "250 ok\n"),
        (b"250-first\r\n250-second\r\n250 last\r\n", 250, "250-first\n250-second\n250 last\n"),
        (b"451-the code of the first line\r\n250 counts\r\n", 451, None),
        (b"250 nul\0byte\r\n", 250, "250 nul?byte\n"),
        (b"250 bare lf\n", 250, "250 bare lf\n"),
        (b"abc what\r\n", None, "abc what\n"),  # qmail's arithmetic: a huge code
    ],
)
async def test_replies_are_read_as_smtpcode_reads_them(
    sent: bytes, code: int | None, text: str | None
) -> None:
    reply = await first_reply(sent)
    if code is not None:
        assert reply.code == code
    else:
        assert reply.code >= 500
    if text is not None:
        assert reply.text == text


async def test_a_long_reply_is_kept_to_5000_bytes() -> None:
    lines = b"".join(b"250-" + b"x" * 70 + b"\r\n" for _ in range(200))
    reply = await first_reply(lines + b"250 end\r\n")
    assert reply.code == 250
    assert len(reply.text) == 5000


def test_no_stored_byte_sequence_ends_data_early() -> None:
    out = wire(b"a\n.\nmid.\r.\nb\r\n.\rc")
    assert out == b"a\r\n..\r\nmid.\r\n..\r\nb\r\n..\r\nc\r\n.\r\n"
    assert out.count(b"\r\n.\r\n") == 1
    assert out.endswith(b"\r\n.\r\n")


async def test_pipelining_sends_mail_and_every_rcpt_before_reading_a_reply() -> None:
    """The server answers nothing until MAIL and all three RCPTs are in: a
    client that waited for each reply would hang here until the timeout."""
    seen: list[bytes] = []
    ended = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 pipe.test ESMTP\r\n")
        seen.append(await reader.readline())
        writer.write(b"250-pipe.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
        for _ in range(4):
            seen.append(await reader.readline())
        writer.write(b"250 sender ok\r\n250 ok\r\n550 5.1.1 nobody here\r\n451 later\r\n")
        seen.append(await reader.readline())
        writer.write(b"354 go\r\n")
        while (line := await reader.readline()) != b".\r\n":
            seen.append(line)
        writer.write(b"250 queued\r\n")
        seen.append(await reader.readline())
        ended.set()

    async with server(script) as port:
        answer = Answer("pipe.test", port, how="mx")
        answer.candidates = [Candidate("127.0.0.1", 10, "pipe.test")]
        results = await asyncio.wait_for(
            deliver(
                answer,
                "a@b.test",
                ["x@pipe.test", "y@pipe.test", "z@pipe.test"],
                b"Subject: hi\n\n\xe9t\xe9\n",
                helohost="mx.example.org",
                timeoutconnect=5,
                timeoutremote=5,
            ),
            20,
        )
        await asyncio.wait_for(ended.wait(), 10)
    assert seen[1] == b"MAIL FROM:<a@b.test> BODY=8BITMIME\r\n"
    assert seen[2:5] == [b"RCPT TO:<%s@pipe.test>\r\n" % n for n in (b"x", b"y", b"z")]
    assert seen[5] == b"DATA\r\n"
    assert seen[-1] == b"QUIT\r\n"
    assert [(r.recipient, r.status) for r in results] == [
        ("x@pipe.test", "K"),
        ("y@pipe.test", "D"),
        ("z@pipe.test", "Z"),
    ]
    assert results[0].text == "127.0.0.1 accepted message.\nRemote host said: 250 queued\n"
    assert results[1].text == (
        "127.0.0.1 does not like recipient.\n"
        "Remote host said: 550 5.1.1 nobody here\n"
        "Giving up on 127.0.0.1.\n"
    )


async def test_a_refused_starttls_goes_on_in_the_clear() -> None:
    import ssl

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 tls.test ESMTP\r\n")
        await reader.readline()
        writer.write(b"250-tls.test\r\n250 STARTTLS\r\n")
        assert await reader.readline() == b"STARTTLS\r\n"
        writer.write(b"454 TLS not available now\r\n")
        for reply in (b"250 ok", b"250 ok", b"354 go"):
            await reader.readline()
            writer.write(reply + b"\r\n")
        while await reader.readline() != b".\r\n":
            pass
        writer.write(b"250 in the clear\r\n")
        await reader.readline()

    async with server(script) as port:
        answer = Answer("tls.test", port, how="mx")
        answer.candidates = [Candidate("127.0.0.1", 10, "tls.test")]
        [result] = await deliver(
            answer,
            "a@b.test",
            ["x@tls.test"],
            b"Subject: hi\n\nhi\n",
            helohost="mx.example.org",
            timeoutconnect=5,
            timeoutremote=5,
            tls=ssl.create_default_context(),
        )
    assert result.status == "K"
    assert result.text.endswith("Remote host said: 250 in the clear\n")
