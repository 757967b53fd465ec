"""qmail-remote's SMTP dialogue, on aiosmtplib: one message to one host's
recipients, with qmail's per-recipient results and texts (spec/remote.md §6,
§8, §9).

Given the addresses core/mxroute.py found, it connects to the first that
answers within `timeoutconnect` and never tries another after a connect
succeeds, as qmail-remote. Unlike qmail-remote it says EHLO (falling back to
HELO), takes STARTTLS when offered and given a context (a failed handshake
defers: "Connected to IP but STARTTLS failed.") and may carry several recipients in one
transaction, each with its own reply. aiosmtplib sends the DATA: it turns
every lone CR or LF into CRLF and dot-stuffs after every line end, which is
what keeps a stored `\\r.\\n` from ending DATA early (the hazard §8.1
records). Addresses go out with qmail's quoting, as raw commands, so that
no library rewrites them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
import time
from dataclasses import dataclass

import aiosmtplib

from core.mxroute import Answer
from core.quote import quote2
from core.tcpto import Table

NO_CONNECTION = "ZSorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n"
TEXT_MAX = 5000  # qmail-remote keeps at most this much of a reply


@dataclass(frozen=True, slots=True)
class Delivered:
    """One recipient's result, as qmail-rspawn reports it to qmail-send."""

    recipient: str
    status: str  # "K", "Z" or "D"
    text: str


class _Stop(Exception):
    """The whole transaction ends: letter and text for every recipient left."""

    def __init__(self, letter: str, text: str) -> None:
        super().__init__(text)
        self.letter = letter
        self.text = text


def _said(code: int, message: str) -> str:
    """The reply as qmail-remote's smtptext: every line with its code."""
    lines = (message or "").split("\n")
    text = "\n".join(f"{code}-{line}" for line in lines[:-1])
    text = (text + "\n" if text else "") + f"{code} {lines[-1]}".rstrip()
    return text.replace("\0", "?")[:TEXT_MAX]


def _remote_said(code: int, message: str) -> str:
    return f"Remote host said: {_said(code, message)}\n"


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
    tcpto: Table | None = None,
) -> list[Delivered]:
    """Deliver `message` (LF line ends, as stored) to `recipients`; one result
    each, in order. With `tcpto`, addresses it marks down are skipped and
    every connect attempt is recorded there (spec/remote.md §6)."""
    if answer.error is not None:
        return [Delivered(r, answer.error[0], answer.error[1:] + "\n") for r in recipients]
    for candidate in answer.candidates:
        if tcpto is not None and tcpto.down_until(candidate.ip, time.time()) is not None:
            continue
        try:
            client = await _connect(
                candidate.ip, answer.port, helohost, timeoutconnect, timeoutremote, tcpto
            )
        except _Greeting as e:
            said = _remote_said(e.code, e.message)
            text = f"Connected to {e.ip} but greeting failed.\n{said}"
            return [Delivered(r, "Z", text) for r in recipients]
        except _Died as e:
            text = f"Connected to {e.ip} but connection died. (#4.4.2)\n"
            return [Delivered(r, "Z", text) for r in recipients]
        if client is None:
            continue
        try:
            return await _transaction(
                client, candidate.ip, helohost, sender, recipients, message, tls
            )
        finally:
            client.close()
    return [Delivered(r, "Z", NO_CONNECTION[1:]) for r in recipients]


async def _connect(
    ip: str,
    port: int,
    helohost: str,
    timeoutconnect: float,
    timeoutremote: float,
    tcpto: Table | None,
) -> aiosmtplib.SMTP | None:
    """Connected and greeted, or None when the connect failed (the next
    address is tried). Connecting has timeoutconnect, the greeting
    timeoutremote, as in qmail; only a connect timeout counts in the table."""
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
    client = aiosmtplib.SMTP(
        hostname=ip,
        local_hostname=helohost,
        timeout=timeoutremote,
        start_tls=False,
        use_tls=False,
    )
    try:
        await client.connect(sock=sock, port=None)
    except aiosmtplib.SMTPConnectResponseError as e:
        client.close()
        raise _Greeting(ip, e.code, e.message) from None
    except (aiosmtplib.SMTPException, OSError):
        client.close()
        sock.close()
        raise _Died(ip) from None
    return client


class _Died(Exception):
    def __init__(self, ip: str) -> None:
        super().__init__(ip)
        self.ip = ip


class _Greeting(Exception):
    def __init__(self, ip: str, code: int, message: str) -> None:
        super().__init__(message)
        self.ip, self.code, self.message = ip, code, message


async def _transaction(
    client: aiosmtplib.SMTP,
    ip: str,
    helohost: str,
    sender: str,
    recipients: list[str],
    message: bytes,
    tls: ssl.SSLContext | None,
) -> list[Delivered]:
    died = f"Connected to {ip} but connection died. (#4.4.2)\n"
    results: dict[str, Delivered] = {}
    try:
        await _hello(client, ip)
        if tls is not None and client.supports_extension("starttls"):
            try:
                await client.starttls(tls_context=tls)
                await _hello(client, ip)
            except (aiosmtplib.SMTPException, ssl.SSLError, OSError):
                raise _Stop("Z", f"Connected to {ip} but STARTTLS failed.\n") from None
        payload = _wire(message)
        mail = b"FROM:<" + _address(sender) + b">"
        if client.supports_extension("size"):
            mail += b" SIZE=%d" % len(payload)
        if client.supports_extension("8bitmime") and any(b > 127 for b in message):
            mail += b" BODY=8BITMIME"  # without it the bytes go as they are, as qmail sends them
        reply = await client.execute_command(b"MAIL", mail)
        if reply.code >= 400:
            letter = "D" if reply.code >= 500 else "Z"
            said = _remote_said(reply.code, reply.message)
            raise _Stop(letter, f"Connected to {ip} but sender was rejected.\n{said}")
        accepted = []
        for rcpt in recipients:
            reply = await client.execute_command(b"RCPT", b"TO:<" + _address(rcpt) + b">")
            if reply.code >= 400:
                letter = "D" if reply.code >= 500 else "Z"
                text = f"{ip} does not like recipient.\n{_remote_said(reply.code, reply.message)}"
                results[rcpt] = Delivered(rcpt, letter, text + f"Giving up on {ip}.\n")
            else:
                accepted.append(rcpt)
        if not accepted:
            return [results[r] for r in recipients]
        sent: list[bool] = []
        try:
            start, final = await _data(client, payload, client.timeout, sent)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError):
            if not sent:
                raise
            text = f"Connected to {ip} but connection died. Possible duplicate! (#4.4.2)\n"
            raise _Stop("Z", text) from None
        if start.code != 354:
            letter = "D" if start.code >= 500 else "Z"
            said = _remote_said(start.code, start.message)
            raise _Stop(letter, f"{ip} failed on DATA command.\n{said}")
        assert final is not None
        if final.code >= 400:
            letter = "D" if final.code >= 500 else "Z"
            said = _remote_said(final.code, final.message)
            raise _Stop(letter, f"{ip} failed after I sent the message.\n{said}")
        text = f"{ip} accepted message.\n{_remote_said(final.code, final.message)}"
        for rcpt in accepted:
            results[rcpt] = Delivered(rcpt, "K", text)
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await client.quit()  # qmail-remote does not even wait for its answer
        return [results[r] for r in recipients]
    except _Stop as stop:
        return [results.get(r) or Delivered(r, stop.letter, stop.text) for r in recipients]
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError):
        return [results.get(r) or Delivered(r, "Z", died) for r in recipients]


def _wire(message: bytes) -> bytes:
    """The message as DATA carries it, as aiosmtplib's execute_data_command
    makes it: every line end CRLF, every line that starts with a dot
    stuffed, then `.`."""
    from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"


async def _data(
    client: aiosmtplib.SMTP, payload: bytes, wait: float | None, sent: list[bool]
) -> tuple[aiosmtplib.SMTPResponse, aiosmtplib.SMTPResponse | None]:
    """DATA and the message, with each reply: qmail tells "failed on DATA
    command" from "failed after I sent the message", which aiosmtplib's data()
    folds into one exception."""
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("not connected")
    async with protocol._command_lock:  # type: ignore[union-attr]
        protocol._response_pending = True
        protocol.write(b"DATA\r\n")
        start = await protocol.read_response(timeout=wait)
        if start.code != 354:
            return start, None
        protocol._response_pending = True
        protocol.write(payload)
        sent.append(True)  # from here a lost connection may mean a duplicate
        return start, await protocol.read_response(timeout=wait)


async def _hello(client: aiosmtplib.SMTP, ip: str) -> None:
    """EHLO, else HELO; qmail-remote's HELO must get exactly 250."""
    try:
        await client.ehlo()
        return
    except aiosmtplib.SMTPHeloError:
        pass
    try:
        await client.helo()
    except aiosmtplib.SMTPHeloError as e:
        said = _remote_said(e.code, e.message)
        raise _Stop("Z", f"Connected to {ip} but my name was rejected.\n{said}") from None
