"""Remote delivery through `qmailtui serve --resolver DNS --remote-port PORT`:
a real DNS server on loopback (tests/dnsserver.py) sends domains to aiosmtpd
sinks on 127.0.0.x (tests/sinks.py) that accept, stall, defer, refuse, hang
up or offer STARTTLS. Messages go in with `qmailtui inject`; what is checked
is what the sinks received, the log lines, the bounces in the sender's
Maildir and what `queue show` / `queue destinations` say."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from core.paths import QmailRoot
from core.tcpto import Table
from tests.dnsserver import Records, dns_server
from tests.processes import add_maildir_user, maildir_files, qmailtui, serving, wait_until
from tests.sinks import Behaviour, Sinks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SENDER = "owner@mx.example.org"
FAST, STALL, LATER, BAD, HANGUP, TLS, DEAD, BACKUP = (f"127.0.0.{i}" for i in range(2, 10))
ZONE: Records = {
    ("fast.test", "MX"): ["10 mx.fast.test."],
    ("mx.fast.test", "A"): [FAST],
    ("plain.test", "A"): [FAST],  # no MX: the A record
    ("fallback.test", "MX"): ["10 dead.fallback.test.", "20 backup.fallback.test."],
    ("dead.fallback.test", "A"): [DEAD],  # nothing listens there
    ("backup.fallback.test", "A"): [BACKUP],
    ("slow.test", "MX"): ["10 mx.slow.test."],
    ("mx.slow.test", "A"): [STALL],
    ("later.test", "MX"): ["10 mx.later.test."],
    ("mx.later.test", "A"): [LATER],
    ("bad.test", "MX"): ["10 mx.bad.test."],
    ("mx.bad.test", "A"): [BAD],
    ("hangup.test", "A"): [HANGUP],
    ("tls.test", "A"): [TLS],
    ("down.test", "MX"): ["10 first.down.test.", "20 second.down.test."],
    ("first.down.test", "A"): [FAST],
    ("second.down.test", "A"): [BACKUP],
    ("dead.test", "A"): ["127.0.0.20"],  # a listener whose queue is full: connects time out
}
MESSAGE = (
    b"From: owner@mx.example.org\nSubject: out\n\n"
    b"line one\n.starts with a dot\nmid.\r.\nMAIL FROM:<evil@x>\n.\nend\n"
)


def behaviours() -> dict[str, Behaviour]:
    return {
        FAST: Behaviour(),
        STALL: Behaviour(stall=True),
        LATER: Behaviour(rcpt_default="450 mailbox busy, try later"),
        BAD: Behaviour(rcpt={"nosuch@bad.test": "550 5.1.1 no such user here"}),
        HANGUP: Behaviour(hang_up=True),
        TLS: Behaviour(),
        BACKUP: Behaviour(),
    }


@dataclass
class World:
    root: QmailRoot
    sinks: Sinks
    maildir: Path  # the sender's, where bounces arrive

    def inject(self, *recipients: str, message: bytes = MESSAGE) -> None:
        done = qmailtui(self.root, "inject", "-f", SENDER, *recipients, stdin=message)
        assert done.returncode == 0, done.stderr

    def log(self) -> str:
        path = self.root.log / "current"
        return path.read_text() if path.exists() else ""

    def wait_log(self, text: str, timeout: float = 20) -> None:
        wait_until(lambda: text in self.log(), timeout, f"{text!r} in the log:\n{self.log()}")

    def json(self, *args: str) -> Any:
        done = qmailtui(self.root, *args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def queue(self) -> list[dict[str, Any]]:
        done = qmailtui(self.root, "queue", "list", "--json")
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]

    def wait_empty(self, timeout: float = 20) -> None:
        wait_until(lambda: not self.queue(), timeout, f"an empty queue:\n{self.log()}")


@contextmanager
def world(
    root: QmailRoot, tls: Any = None, control: dict[str, str] | None = None
) -> Iterator[World]:
    maildir = add_maildir_user(root, "owner")
    for name, value in {"smtproutes": "", **(control or {})}.items():  # DNS decides
        root.control_file(name).write_text(value)
    kinds = behaviours()
    if tls is not None:
        kinds[TLS] = Behaviour(tls=tls)
    with dns_server(ZONE) as dns, Sinks(kinds) as sinks:
        options = ("--resolver", dns.address, "--remote-port", str(sinks.port))
        with serving(root, extra=options):
            yield World(root, sinks, maildir)


def bounces(w: World) -> list[str]:
    return [p.read_text(errors="replace") for p in maildir_files(w.maildir)]


def test_mx_a_fallback_and_one_transaction_per_domain(root: QmailRoot) -> None:
    rcpts = ["a@fast.test", "b@FAST.test", "c@fast.test", "d@plain.test", "e@fallback.test"]
    with world(root) as w:
        w.inject(*rcpts)
        w.sinks.wait_for(rcpts, 20)
        w.wait_empty()
    by_domain = {a.recipients[0].rpartition("@")[2].lower(): a for a in w.sinks.arrivals}
    assert by_domain["fast.test"].recipients == ("a@fast.test", "b@FAST.test", "c@fast.test")
    assert by_domain["fast.test"].sink == FAST  # one transaction for the three
    assert by_domain["plain.test"].sink == FAST  # no MX: its A record
    assert by_domain["fallback.test"].sink == BACKUP  # the lower preference is dead
    assert len(w.sinks.arrivals) == 3
    for arrival in w.sinks.arrivals:
        assert arrival.sender == SENDER
        # the stored bytes, line ends as CRLF; nothing ended DATA early
        assert arrival.data.endswith(
            b"line one\r\n.starts with a dot\r\nmid.\r\n.\r\nMAIL FROM:<evil@x>\r\n.\r\nend\r\n"
        ), arrival.data
    log = w.log()
    assert log.count(f"success: {FAST}_accepted_message./Remote_host_said:_250_ok") == 4
    assert f"success: {BACKUP}_accepted_message." in log
    for rcpt in rcpts:
        assert f"to remote {rcpt}\n" in log
    assert bounces(w) == []


def test_a_stalled_host_does_not_hold_up_the_others(root: QmailRoot) -> None:
    with world(root) as w:
        w.inject("x@slow.test", "y@fast.test")
        w.inject("z@fast.test")
        w.sinks.wait_for(["y@fast.test", "z@fast.test"], 20)
        assert w.sinks.got("x@slow.test") == []
        state = w.json("queue", "destinations")
        [slow] = [d for d in state["destinations"] if d["domain"] == "slow.test"]
        assert slow["in_flight"] == 1
        assert state["concurrency"]["remote"] == 1  # only the stalled transaction is left
        w.sinks.release()
        w.sinks.wait_for(["x@slow.test"], 20)
        w.wait_empty()


def test_a_4xx_defers_on_qmails_schedule_and_a_retry_delivers(root: QmailRoot) -> None:
    with world(root) as w:
        w.inject("u@later.test")
        w.wait_log(
            f"deferral: {LATER}_does_not_like_recipient./"
            "Remote_host_said:_450_mailbox_busy,_try_later/"
            f"Giving_up_on_{LATER}./"
        )
        [message] = w.queue()
        shown = w.json("queue", "show", str(message["id"]))
        [r] = shown["message"]["recipients"]
        assert r["state"] == "pending"
        assert r["attempts"] == 1
        assert "450 mailbox busy, try later" in r["last_reply"]
        assert r["next_attempt"] is not None
        [dest] = shown["destinations"]
        assert dest["domain"] == "later.test"
        assert dest["last_status"] == "Z"
        assert "450 mailbox busy" in dest["last_reply"]
        w.sinks.behaviours[LATER].rcpt_default = "250 OK"
        done = qmailtui(root, "queue", "retry", str(message["id"]))
        assert done.returncode == 0, done.stderr
        w.sinks.wait_for(["u@later.test"], 20)
        w.wait_empty()


def test_a_5xx_bounces_with_the_remote_reply_quoted(root: QmailRoot) -> None:
    with world(root) as w:
        w.inject("nosuch@bad.test", "fine@bad.test")
        w.sinks.wait_for(["fine@bad.test"], 20)
        wait_until(lambda: bounces(w) != [], 20, "a bounce in owner's Maildir")
        w.wait_empty()
    [bounce] = bounces(w)
    assert "Subject: failure notice" in bounce
    assert (
        "<nosuch@bad.test>:\n"
        f"{BAD} does not like recipient.\n"
        "Remote host said: 550 5.1.1 no such user here\n"
        f"Giving up on {BAD}.\n"
    ) in bounce
    assert "fine@bad.test" not in bounce.split("--- Below this line")[0]


def test_a_host_that_hangs_up_is_a_deferral(root: QmailRoot) -> None:
    with world(root) as w:
        w.inject("u@hangup.test")
        w.wait_log(f"deferral: Connected_to_{HANGUP}_but_connection_died._(#4.4.2)/")
        assert len(w.queue()) == 1


def test_past_the_queue_lifetime_a_deferral_becomes_a_bounce(root: QmailRoot) -> None:
    with world(root, control={"queuelifetime": "0\n"}) as w:
        w.inject("u@later.test")
        wait_until(lambda: bounces(w) != [], 20, "a bounce in owner's Maildir")
        w.wait_empty()
    [bounce] = bounces(w)
    assert "Remote host said: 450 mailbox busy, try later\n" in bounce
    assert "I'm not going to try again; this message has been in the queue too long." in bounce


def test_no_such_domain_bounces_and_smtproutes_ports_win(root: QmailRoot) -> None:
    with Sinks({"127.0.0.10": Behaviour()}) as other:
        routes = f"routed.test:127.0.0.10:{other.port}\n"
        with world(root, control={"smtproutes": routes}) as w:
            w.inject("u@routed.test", "v@nosuch.test")
            other.wait_for(["u@routed.test"], 20)
            wait_until(lambda: bounces(w) != [], 20, "a bounce in owner's Maildir")
            w.wait_empty()
    [bounce] = bounces(w)
    assert "<v@nosuch.test>:\nSorry, I couldn't find any host named nosuch.test. (#5.1.2)\n" in (
        bounce
    )


def test_starttls_when_the_server_offers_it(root: QmailRoot) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("sink.tls.test")
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    with world(root, tls=context) as w:
        w.inject("u@tls.test")
        [arrival] = w.sinks.wait_for(["u@tls.test"], 20)
        w.wait_empty()
    assert arrival.tls  # an unknown CA does not stop opportunistic TLS
    assert arrival.data.endswith(b"end\r\n")


def test_an_address_marked_down_is_skipped_until_tcpok(root: QmailRoot) -> None:
    with world(root) as w:
        now = time.time()
        table = Table(root.queue / "lock" / "tcpto")
        table.record(FAST, True, now - 300)
        table.record(FAST, True, now)  # two timeouts two minutes apart: down
        listed = qmailtui(root, "tcpto")
        assert listed.returncode == 0, listed.stderr
        line = rf"^{re.escape(FAST)} timed out [0-9] seconds ago; # recent timeouts: 2$"
        assert re.search(line, listed.stdout, re.M), listed.stdout
        told = qmailtui(root, "explain", "u@down.test").stdout
        assert f"{FAST} timed out twice: skipped until" in told, told
        assert f"u@down.test: remote: to {BACKUP} port {w.sinks.port}" in told, told
        w.inject("u@down.test")
        [arrival] = w.sinks.wait_for(["u@down.test"], 20)
        assert arrival.sink == BACKUP  # the preference-10 address was skipped
        assert w.sinks.connections.get(FAST, 0) == 0
        [dest] = [d for d in w.json("queue", "destinations")["destinations"]]
        assert dest["domain"] == "down.test"
        assert FAST not in dest["addresses"] or FAST in dest["down_until"]
        done = qmailtui(root, "tcpok")
        assert done.returncode == 0, done.stderr
        assert qmailtui(root, "tcpto").stdout == ""
        w.inject("v@down.test")
        [arrival] = w.sinks.wait_for(["v@down.test"], 20)
        assert arrival.sink == FAST


@contextmanager
def black_hole(ip: str, port: int) -> Iterator[None]:
    """A listener that never accepts, its backlog full: a connect there gets
    no answer at all, as with a host that is down."""
    import socket

    listener = socket.socket()
    listener.bind((ip, port))
    listener.listen(0)
    filler = socket.create_connection((ip, port), timeout=5)
    try:
        yield
    finally:
        filler.close()
        listener.close()


def test_a_host_that_does_not_answer_is_probed_one_attempt_at_a_time(root: QmailRoot) -> None:
    with (
        world(root, control={"timeoutconnect": "2\n"}) as w,
        black_hole("127.0.0.20", w.sinks.port),
    ):
        w.inject("a@dead.test")
        w.wait_log("deferral: Sorry,_I_wasn't_able_to_establish_an_SMTP_connection._(#4.4.1)/")
        listed = qmailtui(root, "tcpto").stdout
        assert "127.0.0.20 timed out" in listed, listed
        assert "# recent timeouts: 1" in listed, listed
        w.inject("b@dead.test")  # the probe: it waits for timeoutconnect again
        w.wait_log("to remote b@dead.test")
        w.inject("c@dead.test")  # not tried while the probe runs
        w.wait_log("another_attempt_is_under_way./", timeout=5)
        [dest] = w.json("queue", "destinations")["destinations"]
        assert dest["domain"] == "dead.test"
        assert dest["timed_out_at"] is not None
        assert len(w.queue()) == 3  # all deferred, nothing lost
