"""qmail-remote's SMTP dialogue: one message to one host's recipients, with
qmail's per-recipient results and texts (spec/remote.md §6, §8, §9).

Given the addresses core/mxroute.py found, it connects to the first that
answers within `timeoutconnect` (skipping those the timeout table marks
down) and never tries another after a connect succeeds, as qmail-remote.
Unlike qmail-remote it says EHLO (falling back to HELO), takes STARTTLS when
offered and given a context, sends SIZE and BODY=8BITMIME where they are
offered, pipelines MAIL and the RCPTs where PIPELINING is offered, and may
carry several recipients in one transaction, each with its own reply. The
message goes out through smtpclient.wire(), which keeps every stored byte
sequence from ending DATA early.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Protocol

from core.mxroute import Answer
from core.quote import quote2
from core.smtpclient import Client, Dropped, Reply, wire

NO_CONNECTION = "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n"


@dataclass(frozen=True, slots=True)
class Delivered:
    """One recipient's result, as qmail-rspawn reports it to qmail-send."""

    recipient: str
    status: str  # "K", "Z" or "D"
    text: str


class Timeouts(Protocol):
    """The timeout table as delivery uses it (core/tcpto.py's Table)."""

    def down_until(self, ip: str, now: float) -> float | None: ...

    def record(self, ip: str, timed_out: bool, now: float) -> None: ...


class _Stop(Exception):
    """The whole transaction ends: letter and text for every recipient left."""

    def __init__(self, letter: str, text: str) -> None:
        super().__init__(text)
        self.letter = letter
        self.text = text


def _said(reply: Reply) -> str:
    return f"Remote host said: {reply.text}"


def _letter(reply: Reply) -> str:
    return "D" if reply.code >= 500 else "Z"


def _address(address: str) -> bytes:
    """qmail-remote's addrmangle: the local part quoted when needed; an address
    without @ (the empty sender) as it is."""
    text = quote2(address) if "@" in address else address
    return text.encode("utf-8", "surrogateescape")


async def deliver(
    answer: Answer,
    sender: str,
    recipients: list[str],
    message: bytes,
    *,
    helohost: str,
    timeoutconnect: float,
    timeoutremote: float,
    tls: ssl.SSLContext | None = None,
    tcpto: Timeouts | None = None,
) -> list[Delivered]:
    """Deliver `message` (LF line ends, as stored) to `recipients`; one result
    each, in order. With `tcpto`, addresses it marks down are skipped and
    every connect attempt is recorded there (spec/remote.md §6)."""
    if answer.error is not None:
        return [Delivered(r, answer.error[0], answer.error[1:] + "\n") for r in recipients]
    for candidate in answer.candidates:
        if tcpto is not None and tcpto.down_until(candidate.ip, time.time()) is not None:
            continue
        sock = await _connect(candidate.ip, answer.port, timeoutconnect, tcpto)
        if sock is None:
            continue
        try:
            client = await Client.over(sock, timeoutremote)
        except OSError:
            sock.close()
            text = f"Connected to {candidate.ip} but connection died. (#4.4.2)\n"
            return [Delivered(r, "Z", text) for r in recipients]
        try:
            return await _transaction(
                client, candidate.ip, helohost, sender, recipients, message, tls
            )
        finally:
            client.close()
    return [Delivered(r, "Z", NO_CONNECTION) for r in recipients]


async def _connect(
    ip: str, port: int, timeoutconnect: float, tcpto: Timeouts | None
) -> socket.socket | None:
    """A connected socket, or None (the next address is tried). Only a
    timeout counts in the table; a refusal clears it like a success."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (ip, port)), timeoutconnect)
    except (TimeoutError, OSError) as e:
        sock.close()
        timed_out = isinstance(e, TimeoutError) or e.errno == errno.ETIMEDOUT
        if tcpto is not None:
            tcpto.record(ip, timed_out, time.time())
        return None
    if tcpto is not None:
        tcpto.record(ip, False, time.time())
    return sock


async def _transaction(
    client: Client,
    ip: str,
    helohost: str,
    sender: str,
    recipients: list[str],
    message: bytes,
    tls: ssl.SSLContext | None,
) -> list[Delivered]:
    results: dict[str, Delivered] = {}
    critical = False  # the final dot is on its way: a lost connection may mean a duplicate
    try:
        greeting = await client.reply()
        if greeting.code != 220:
            raise _Stop("Z", f"Connected to {ip} but greeting failed.\n{_said(greeting)}")
        await _hello(client, ip, helohost)
        if tls is not None and client.offers("STARTTLS"):
            reply = await client.command(b"STARTTLS")
            if reply.code == 220:  # refused: nothing changed, go on in the clear
                try:
                    await client.starttls(tls)
                except Dropped:
                    raise _Stop("Z", f"Connected to {ip} but STARTTLS failed.\n") from None
                await _hello(client, ip, helohost)
        payload = wire(message)
        mail = b"MAIL FROM:<" + _address(sender) + b">"
        if client.offers("SIZE"):
            mail += b" SIZE=%d" % len(payload)
        if client.offers("8BITMIME") and any(b > 127 for b in message):
            mail += b" BODY=8BITMIME"  # without it the bytes go as they are, as qmail sends them
        rcpts = [b"RCPT TO:<" + _address(r) + b">" for r in recipients]
        if client.offers("PIPELINING"):
            mail_reply, *rcpt_replies = await client.pipeline([mail, *rcpts])
        else:
            mail_reply = await client.command(mail)
            rcpt_replies = []
        if mail_reply.code >= 400:
            said = _said(mail_reply)
            text = f"Connected to {ip} but sender was rejected.\n{said}"
            raise _Stop(_letter(mail_reply), text)
        accepted = []
        for n, rcpt in enumerate(recipients):
            reply = rcpt_replies[n] if rcpt_replies else await client.command(rcpts[n])
            if reply.code >= 400:
                text = f"{ip} does not like recipient.\n{_said(reply)}Giving up on {ip}.\n"
                results[rcpt] = Delivered(rcpt, _letter(reply), text)
            else:
                accepted.append(rcpt)
        if not accepted:
            client.quit()
            return [results[r] for r in recipients]
        start = await client.command(b"DATA")
        if start.code != 354:
            raise _Stop(_letter(start), f"{ip} failed on DATA command.\n{_said(start)}")
        critical = True
        await client.send(payload)
        final = await client.reply()
        if final.code >= 400:
            text = f"{ip} failed after I sent the message.\n{_said(final)}"
            raise _Stop(_letter(final), text)
        text = f"{ip} accepted message.\n{_said(final)}"
        for rcpt in accepted:
            results[rcpt] = Delivered(rcpt, "K", text)
        client.quit()
        return [results[r] for r in recipients]
    except _Stop as stop:
        client.quit()
        return [results.get(r) or Delivered(r, stop.letter, stop.text) for r in recipients]
    except Dropped:
        duplicate = "Possible duplicate! " if critical else ""
        text = f"Connected to {ip} but connection died. {duplicate}(#4.4.2)\n"
        return [results.get(r) or Delivered(r, "Z", text) for r in recipients]


async def _hello(client: Client, ip: str, helohost: str) -> None:
    """EHLO, else HELO; qmail-remote's HELO must get exactly 250."""
    reply = await client.hello(helohost)
    if reply.code != 250:
        said = _said(reply)
        raise _Stop("Z", f"Connected to {ip} but my name was rejected.\n{said}")
