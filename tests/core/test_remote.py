"""qmail-remote's dialogue and results against real SMTP servers on loopback:
aiosmtpd sinks that accept, refuse a recipient (5xx, 4xx), refuse the sender,
refuse DATA or the message, and raw servers that greet badly or hang up."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope, Session

from core.mxroute import Answer, Candidate
from core.remote import Delivered, deliver

MESSAGE = b"Subject: hi\n\nline one\n.starts with a dot\nmid.\r.\nMAIL FROM:<evil@x>\nend\n"


class Sink:
    """aiosmtpd handler: answers per recipient from `rcpt`, per sender from
    `mail`, and keeps what DATA brought."""

    def __init__(self, rcpt: dict[str, str] | None = None, **replies: str) -> None:
        self.rcpt = rcpt or {}
        self.replies = replies
        self.got: list[tuple[str, list[str], bytes]] = []

    async def handle_MAIL(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if "mail" in self.replies:
            return self.replies["mail"]
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        reply = self.rcpt.get(address, "250 OK")
        if reply.startswith("250"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        if "data" in self.replies:
            return self.replies["data"]
        content = envelope.original_content or b""
        self.got.append((str(envelope.mail_from), list(envelope.rcpt_tos), content))
        return "250 ok 1234 qp 99"


@contextlib.contextmanager
def sink(handler: Sink) -> Iterator[int]:
    with socket.socket() as probe:  # aiosmtpd's Controller checks its port by connecting
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


@contextlib.contextmanager
def raw_server(greeting: bytes | None) -> Iterator[int]:
    """Says `greeting` (or nothing) to each client, then hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                if greeting is not None:
                    conn.sendall(greeting)
                    with contextlib.suppress(OSError):
                        conn.settimeout(2)
                        conn.recv(1024)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def route(port: int, *ips: str) -> Answer:
    answer = Answer("example.test", port, how="mx")
    answer.candidates = [Candidate(ip, 10, "mx.example.test") for ip in ips or ("127.0.0.1",)]
    return answer


async def send(answer: Answer, *rcpts: str, sender: str = "a@b.test") -> list[Delivered]:
    return await asyncio.wait_for(
        deliver(
            answer,
            sender,
            list(rcpts),
            MESSAGE,
            helohost="mx.example.org",
            timeoutconnect=5,
            timeoutremote=10,
        ),
        30,
    )


async def test_a_message_is_accepted_with_qmails_text_and_reaches_the_sink_intact() -> None:
    handler = Sink()
    with sink(handler) as port:
        [done] = await send(route(port), "u@example.test")
    assert done.status == "K"
    assert done.text == "127.0.0.1 accepted message.\nRemote host said: 250 ok 1234 qp 99\n"
    [(sender, rcpts, content)] = handler.got
    assert (sender, rcpts) == ("a@b.test", ["u@example.test"])
    # every line end is CRLF on the wire and no stored byte ended DATA early
    assert content.count(b"MAIL FROM:<evil@x>") == 1
    assert b".starts with a dot\r\n" in content
    assert content.endswith(b"end\r\n")


async def test_several_recipients_share_one_transaction_each_with_its_own_reply() -> None:
    handler = Sink(rcpt={"gone@example.test": "550 no such user", "busy@example.test": "450 later"})
    with sink(handler) as port:
        ok, gone, busy = await send(
            route(port), "u@example.test", "gone@example.test", "busy@example.test"
        )
    assert ok.status == "K"
    assert gone == Delivered(
        "gone@example.test",
        "D",
        "127.0.0.1 does not like recipient.\nRemote host said: 550 no such user\n"
        "Giving up on 127.0.0.1.\n",
    )
    assert busy.status == "Z"
    assert busy.text.startswith("127.0.0.1 does not like recipient.\nRemote host said: 450 later\n")
    assert len(handler.got) == 1
    assert handler.got[0][1] == ["u@example.test"]


@pytest.mark.parametrize(
    ("reply", "letter"), [("553 sorry, no", "D"), ("451 not now", "Z")], ids=["5xx", "4xx"]
)
async def test_a_refused_sender_ends_the_transaction(reply: str, letter: str) -> None:
    with sink(Sink(mail=reply)) as port:
        [done] = await send(route(port), "u@example.test")
    assert done.status == letter
    assert done.text == (
        f"Connected to 127.0.0.1 but sender was rejected.\nRemote host said: {reply}\n"
    )


async def test_a_refused_message_after_data() -> None:
    with sink(Sink(data="554 spam, go away")) as port:
        [done] = await send(route(port), "u@example.test")
    assert done == Delivered(
        "u@example.test",
        "D",
        "127.0.0.1 failed after I sent the message.\nRemote host said: 554 spam, go away\n",
    )


async def test_a_bad_greeting_is_temporary() -> None:
    with raw_server(b"554 go away\r\n") as port:
        [done] = await send(route(port), "u@example.test")
    assert done.status == "Z"
    assert done.text == (
        "Connected to 127.0.0.1 but greeting failed.\nRemote host said: 554 go away\n"
    )


async def test_nobody_listening_anywhere_is_no_connection() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening: refused
        [done] = await send(route(port, "127.0.0.1", "127.0.0.2"), "u@example.test")
    assert done == Delivered(
        "u@example.test",
        "Z",
        "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n",
    )


async def test_a_server_that_hangs_up_after_the_greeting_is_a_deferral() -> None:
    with raw_server(b"220 hello\r\n") as port:
        [done] = await send(route(port), "u@example.test")
    assert done == Delivered(
        "u@example.test", "Z", "Connected to 127.0.0.1 but connection died. (#4.4.2)\n"
    )


async def test_a_route_error_is_every_recipients_result() -> None:
    answer = Answer("nowhere.test", 25, error="DSorry, I couldn't find any host named x. (#5.1.2)")
    results = await send(answer, "a@nowhere.test", "b@nowhere.test")
    assert [r.status for r in results] == ["D", "D"]
    assert results[0].text == "Sorry, I couldn't find any host named x. (#5.1.2)\n"
