"""`qmailtui smtpd` and `qmailtui serve`'s listener against the real qmail-smtpd.

Two doors, the same conversations:

- stdin/stdout: `cd INST && env ... qmail-smtpd` (notqmail, with the
  stand-in qmail-queue) against `qmailtui --root ROOT smtpd`, with the same
  control files, the same environment and the same client bytes, all written
  at once. Compared: the replies, the exit code, and every message stored.
- sockets: qmail-smtpd under ucspi-tcp's `tcpserver -x tcp.smtp.cdb` against
  `qmailtui serve --smtp 127.0.0.1:0`, the same rules in `etc/tcp.smtp`,
  talked to turn by turn over raw sockets. Clients connect from 127.0.0.N, so
  one server pair serves every rule (RELAYCLIENT, DATABYTES, deny).

Stored, theirs: the stand-in's `queue/PID.msg` and `queue/PID.env`, PID being
the `qp` of the 250 reply. Ours: `queue/mess/S/N` without qmail-queue's own
first line (`Received: (qmail PID invoked from network); DATE`, checked), and
`todo/N` without its `u` and `p` records. Once a running core has
preprocessed a message, its envelope is read back from info/, local/ and
remote/, where the order of the recipients is lost: they are compared sorted.
Each case says what qmail answers; that is checked first, so a case tests
what its name says, then ours is compared with qmail.

Normalised, and nothing else: `250 ok TIME qp PID` (TIME checked to be the
time of the run) and the date of qmail-smtpd's Received line. tcpserver runs
with `-l mx.example.org`, the name our listener takes from control/me, so the
`by` part is compared as it is. Where we differ from qmail on purpose
(INTERFACE.md, spec/smtpd.md §11) the difference is asserted exactly: our
EHLO lists `SIZE N` (`SIZE` when databytes is unlimited) and, with
control/servercert.pem at the socket door, `STARTTLS` (and runs it); `MAIL
... SIZE=n` over databytes is refused at MAIL; a command line over LINE_MAX
octets gets LINE_TOO_LONG; without control/rcpthosts we refuse to be an open
relay.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from core.setup import init_root
from tests.processes import read_line, stop

pytestmark = pytest.mark.oracle

CLI = (sys.executable, "-m", "qmailtui")
TIMEOUT = 20.0  # seconds for one session, either side
HOLD = 8.0  # seconds to wait for a timeoutsmtpd of 1
ME = "mx.example.org"
CONTROL: dict[str, str | None] = {
    "me": f"{ME}\n",
    "rcpthosts": f"{ME}\nexample.org\n.example.net\n",
}
ENV: dict[str, str | None] = {"TCPREMOTEIP": "192.0.2.7", "TCPLOCALHOST": ME}
SMTPD_VARIABLES = (  # never inherited from whoever runs the tests
    "TCPREMOTEIP",
    "TCPREMOTEHOST",
    "TCPREMOTEINFO",
    "TCPREMOTEPORT",
    "TCPLOCALHOST",
    "TCPLOCALIP",
    "TCPLOCALPORT",
    "RELAYCLIENT",
    "DATABYTES",
    "QMAILQUEUE",
    "PROTO",
)

# qmail-smtpd's replies, as normalise() leaves them.
BANNER = f"220 {ME} ESMTP"
HELLO = f"250 {ME}"
EHLO = (f"250-{ME}", "250-PIPELINING", "250 8BITMIME")
OK = "250 ok"
GO = "354 go ahead"
QUEUED = "250 ok TIME qp PID"
BYE = f"221 {ME}"
FLUSHED = "250 flushed"
VRFY = "252 send some mail, i'll try my best"
HELP = "214 notqmail home page: https://notqmail.org"
OUR_HELP = "214 qmailtui, a qmail-compatible mail host"  # ours names itself
UNIMPLEMENTED = "502 unimplemented (#5.5.1)"
MAIL_FIRST = "503 MAIL first (#5.5.1)"
RCPT_FIRST = "503 RCPT first (#5.5.1)"
SYNTAX = "555 syntax error (#5.5.4)"
NO_RELAY = "553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"
BAD_SENDER = "553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)"
TOO_BIG = "552 sorry, that message size exceeds my databytes limit (#5.3.4)"
LOOPING = "554 too many hops, this message is looping (#5.4.6)"
BARE_LF = "451 See https://cr.yp.to/docs/smtplf.html."
NO_CONTROLS = "421 unable to read controls (#4.3.0)"
TIMED_OUT = "451 timeout (#4.4.2)"

# Ours only (spec/smtpd.md §11).
LINE_MAX = 4096  # octets of a command line before its LF (a CR counts)
LINE_TOO_LONG = "500 line too long (#5.5.2)"

HELO = "HELO client.test"
FROM = "MAIL FROM:<alice@client.test>"
TO = "RCPT TO:<bob@example.org>"
BODY = b"Subject: hi\r\n\r\nbody\r\n.\r\n"


def lines(*commands: str | bytes) -> bytes:
    """Command lines, each ended by CR LF."""
    return b"".join((c.encode("latin-1") if isinstance(c, str) else c) + b"\r\n" for c in commands)


def sized(n: int) -> bytes:
    """DATA whose stored form is exactly n bytes (n >= 1): one line of n - 1 x's."""
    return b"x" * (n - 1) + b"\r\n.\r\n"


def long(n: int, address: str = "b@example.org") -> str:
    """`address` with its local part grown to n bytes in all. qmail-smtpd refuses
    addresses of 900 bytes and more (addrparse: `addr.len > 900` counts the NUL)."""
    local, domain = address.split("@")
    return local * (n - len(domain) - 1) + "@" + domain


def hops(n: int, line: bytes = b"Received: from a by b; 1 Jan 2024 00:00:00 -0000") -> bytes:
    return (line + b"\r\n") * n


def deliver(rcpt: str, data: bytes, sender: str = "alice@client.test") -> bytes:
    """HELO, MAIL, one RCPT, DATA, the data, QUIT."""
    return lines(HELO, f"MAIL FROM:<{sender}>", f"RCPT TO:<{rcpt}>", "DATA") + data + lines("QUIT")


DELIVERED = (HELLO, OK, OK, GO, QUEUED, BYE)  # what deliver() gets when all goes well


@dataclass(frozen=True)
class Case:
    """One session at the stdin/stdout door. `replies` (after the banner) and
    `code` are what qmail-smtpd does; `envelopes` (records joined by `|`) and
    `received` and `stored` (each message after qmail-smtpd's Received line),
    when given, what it queued."""

    send: bytes
    replies: tuple[str, ...]
    code: int = 0
    control: Mapping[str, str | None] = field(default_factory=dict)  # over CONTROL; None: absent
    env: Mapping[str, str | None] = field(default_factory=dict)  # over ENV; None: unset
    envelopes: tuple[str, ...] | None = None
    received: bytes | None = None  # qmail-smtpd's Received line in each, dated DATE
    stored: tuple[bytes, ...] | None = None
    banner: str | None = BANNER  # None: not even a banner
    ours: tuple[str, ...] | None = None  # an intended difference: our replies, banner
    # included, SIZE taken out of EHLO as everywhere
    ours_code: int | None = None  # and our exit code, when not qmail-smtpd's
    ours_envelopes: tuple[str, ...] | None = None  # and what we queue, when not the same
    hold_open: bool = False  # stdin stays open after `send` (for the timeout)


CASES: dict[str, Case] = {
    # -- a plain session ---------------------------------------------------------
    "HELO MAIL RCPT DATA QUIT: queued": Case(
        deliver("bob@example.org", BODY),
        DELIVERED,
        envelopes=("Falice@client.test|Tbob@example.org",),
        received=(
            b"Received: from unknown (HELO client.test) (192.0.2.7)\n"
            b"  by mx.example.org with SMTP; DATE\n"
        ),
    ),
    "EHLO: PIPELINING and 8BITMIME": Case(lines("EHLO client.test", "QUIT"), (*EHLO, BYE)),
    "EHLO, then a message": Case(
        lines("EHLO client.test", FROM, TO, "DATA") + BODY + lines("QUIT"),
        (*EHLO, OK, OK, GO, QUEUED, BYE),
    ),
    "several recipients, duplicates kept": Case(
        lines(HELO, FROM, TO, "RCPT TO:<carol@example.org>", TO, "DATA") + BODY + lines("QUIT"),
        (HELLO, OK, OK, OK, OK, GO, QUEUED, BYE),
        envelopes=("Falice@client.test|Tbob@example.org|Tcarol@example.org|Tbob@example.org",),
    ),
    "two messages in one session": Case(
        lines(HELO, FROM, TO, "DATA")
        + BODY
        + lines("MAIL FROM:<carol@client.test>", "RCPT TO:<dave@example.org>", "DATA")
        + b"second\r\n.\r\n"
        + lines("QUIT"),
        (HELLO, OK, OK, GO, QUEUED, OK, OK, GO, QUEUED, BYE),
        envelopes=("Falice@client.test|Tbob@example.org", "Fcarol@client.test|Tdave@example.org"),
    ),
    "no HELO at all: MAIL works, no HELO part in Received": Case(
        lines(FROM, TO, "DATA") + BODY + lines("QUIT"),
        (OK, OK, GO, QUEUED, BYE),
        received=(b"Received: from unknown (192.0.2.7)\n  by mx.example.org with SMTP; DATE\n"),
    ),
    "NOOP VRFY HELP RSET": Case(
        lines("NOOP", "NOOP anything", "VRFY bob", "VRFY", "HELP", "HELP DATA", "RSET", "QUIT"),
        (OK, OK, VRFY, VRFY, HELP, HELP, FLUSHED, BYE),
        ours=(BANNER, OK, OK, VRFY, VRFY, OUR_HELP, OUR_HELP, FLUSHED, BYE),
    ),
    "QUIT with an argument": Case(lines("QUIT now please"), (BYE,)),
    "nothing after the banner: end of input, exit 1": Case(b"", (), code=1),
    "end of input without QUIT: exit 1": Case(lines(HELO, FROM), (HELLO, OK), code=1),
    "end of input inside a command line: no reply to it": Case(lines(HELO) + b"NOOP", (HELLO,), 1),
    "end of input inside DATA: nothing queued": Case(
        lines(HELO, FROM, TO, "DATA") + b"Subject: cut\r\n\r\nhalf", (HELLO, OK, OK, GO), code=1
    ),
    "commands after QUIT are not read": Case(lines("QUIT", "NOOP"), (BYE,)),
    # -- verbs: case, separators, unknown ------------------------------------------
    "verbs in any case": Case(
        lines("hElO client.test", "mail FROM:<a@client.test>", "Rcpt to:<bob@example.org>", "data")
        + BODY
        + lines("rset", "noop", "Quit"),
        (HELLO, OK, OK, GO, QUEUED, FLUSHED, OK, BYE),
        envelopes=("Fa@client.test|Tbob@example.org",),
    ),
    "a tab after the verb makes an unknown verb": Case(
        lines("HELO\tclient.test", "MAIL\tFROM:<a@b>", "NOOP\t", "QUIT"),
        (UNIMPLEMENTED, UNIMPLEMENTED, UNIMPLEMENTED, BYE),
    ),
    "several spaces before the argument are skipped": Case(
        lines("HELO    client.test", "MAIL    FROM:<a@client.test>", "RCPT   TO:<bob@example.org>")
        + lines("DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, OK, GO, QUEUED, BYE),
        envelopes=("Fa@client.test|Tbob@example.org",),
    ),
    "a space before the verb makes an unknown verb": Case(
        lines(" NOOP", " QUIT", "QUIT"), (UNIMPLEMENTED, UNIMPLEMENTED, BYE)
    ),
    "an empty line is an unknown verb": Case(lines("", "", "QUIT"), (UNIMPLEMENTED,) * 2 + (BYE,)),
    "unknown and unimplemented verbs": Case(
        lines(
            "EXPN list",
            "TURN",
            "ETRN example.org",
            "AUTH PLAIN AGFsaWNlAHNlY3JldA==",
            "STARTTLS",
            "BDAT 10 LAST",
            "XYZZY",
            "SEND FROM:<a@b>",
            "QUITX",
            "HELOX client.test",
            "QUIT",
        ),
        (UNIMPLEMENTED,) * 10 + (BYE,),
    ),
    "bare LF ends command lines too": Case(
        b"HELO client.test\nMAIL FROM:<a@client.test>\nRCPT TO:<bob@example.org>\nDATA\n"
        + BODY
        + b"QUIT\n",
        (HELLO, OK, OK, GO, QUEUED, BYE),
    ),
    "only one CR is taken off a command line": Case(
        b"NOOP\r\r\nQUIT\r\r\nQUIT\r\n", (UNIMPLEMENTED, UNIMPLEMENTED, BYE)
    ),
    "a NUL in a command line ends the verb": Case(lines(b"NOOP\0junk", b"QUIT\0junk"), (OK, BYE)),
    "a NUL in an address ends it": Case(
        lines(HELO, b"MAIL FROM:<a@client.test\0junk>", b"RCPT TO:<bob@example.org\0@x.test>")
        + lines("DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, OK, GO, QUEUED, BYE),
        envelopes=("Fa@client.test|Tbob@example.org",),
    ),
    "non-ASCII bytes in commands": Case(
        lines(
            b"HELO cli\xe9nt.test", b"MAIL FROM:<\xe9@client.test>", b"RCPT TO:<b\xf6b@example.org>"
        )
        + lines("DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, OK, GO, QUEUED, BYE),
        envelopes=("F\xe9@client.test|Tb\xf6b@example.org",),
    ),
    # -- order of commands -----------------------------------------------------------
    "RCPT before MAIL": Case(lines(HELO, TO, "QUIT"), (HELLO, MAIL_FIRST, BYE)),
    "DATA before MAIL": Case(lines(HELO, "DATA", "QUIT"), (HELLO, MAIL_FIRST, BYE)),
    "DATA before RCPT": Case(lines(HELO, FROM, "DATA", "QUIT"), (HELLO, OK, RCPT_FIRST, BYE)),
    "DATA after only refused recipients": Case(
        lines(HELO, FROM, "RCPT TO:<x@other.test>", "DATA", "QUIT"),
        (HELLO, OK, NO_RELAY, RCPT_FIRST, BYE),
    ),
    "a second MAIL starts over without the recipients": Case(
        lines(HELO, FROM, TO, "MAIL FROM:<carol@client.test>", "DATA", "RCPT TO:<dan@example.org>")
        + lines("DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, OK, OK, RCPT_FIRST, OK, GO, QUEUED, BYE),
        envelopes=("Fcarol@client.test|Tdan@example.org",),
    ),
    "RSET forgets MAIL and RCPT": Case(
        lines(HELO, FROM, TO, "RSET", "DATA", TO, "QUIT"),
        (HELLO, OK, OK, FLUSHED, MAIL_FIRST, MAIL_FIRST, BYE),
    ),
    "HELO in a transaction forgets it": Case(
        lines(HELO, FROM, TO, HELO, "DATA", "QUIT"), (HELLO, OK, OK, HELLO, MAIL_FIRST, BYE)
    ),
    "EHLO in a transaction forgets it": Case(
        lines(HELO, FROM, TO, "EHLO client.test", "DATA", "QUIT"),
        (HELLO, OK, OK, *EHLO, MAIL_FIRST, BYE),
    ),
    "NOOP VRFY and HELP in a transaction keep it": Case(
        lines(HELO, FROM, "NOOP", TO, "VRFY x", "HELP", "DATA") + BODY + lines("QUIT"),
        (HELLO, OK, OK, OK, VRFY, HELP, GO, QUEUED, BYE),
        ours=(BANNER, HELLO, OK, OK, OK, VRFY, OUR_HELP, GO, QUEUED, BYE),
    ),
    "after DATA a new MAIL is needed": Case(
        lines(HELO, FROM, TO, "DATA") + BODY + lines(TO, "DATA", "QUIT"),
        (HELLO, OK, OK, GO, QUEUED, MAIL_FIRST, MAIL_FIRST, BYE),
    ),
    "after a refused DATA a new MAIL is needed too": Case(
        lines(HELO, FROM, TO, "DATA") + hops(100) + BODY + lines(TO, "DATA", "QUIT"),
        (HELLO, OK, OK, GO, LOOPING, MAIL_FIRST, MAIL_FIRST, BYE),
    ),
    "HELO twice: the last one is in Received": Case(
        lines("HELO first.test", "EHLO second.test", FROM, TO, "DATA") + BODY + lines("QUIT"),
        (HELLO, *EHLO, OK, OK, GO, QUEUED, BYE),
        received=(
            b"Received: from unknown (HELO second.test) (192.0.2.7)\n"
            b"  by mx.example.org with SMTP; DATE\n"
        ),
    ),
    # -- address syntax ---------------------------------------------------------------
    "MAIL FROM:a@b without brackets, ends at a space": Case(
        lines(HELO, "MAIL FROM:alice@client.test SIZE=10", "RCPT TO: bob@example.org junk")
        + lines("DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, OK, GO, QUEUED, BYE),
        envelopes=("Falice@client.test|Tbob@example.org",),
    ),
    "MAIL with no argument: the null sender": Case(
        lines(HELO, "MAIL", TO, "DATA") + BODY + lines("QUIT"),
        (HELLO, OK, OK, GO, QUEUED, BYE),
        envelopes=("F|Tbob@example.org",),
    ),
    "MAIL FROM:<> and MAIL <x> without FROM:": Case(
        lines(HELO, "MAIL FROM:<>", TO, "DATA")
        + BODY
        + lines("MAIL <a@client.test>", "RCPT <bob@example.org>", "DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, OK, GO, QUEUED, OK, OK, GO, QUEUED, BYE),
        envelopes=("F|Tbob@example.org", "Fa@client.test|Tbob@example.org"),
    ),
    "RCPT TO: with nothing, and RCPT TO:<>": Case(
        lines(HELO, FROM, "RCPT TO:", "RCPT TO:<>", "RCPT", "DATA") + BODY + lines("QUIT"),
        (HELLO, OK, OK, OK, OK, GO, QUEUED, BYE),
        envelopes=("Falice@client.test|T|T|T",),
    ),
    "a space between the colon and the bracket": Case(
        lines(HELO, "MAIL FROM: <a@client.test>", "RCPT TO:   <bob@example.org>", "DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, OK, GO, QUEUED, BYE),
        envelopes=("Fa@client.test|Tbob@example.org",),
    ),
    "ESMTP parameters after the bracket are ignored": Case(
        lines(
            HELO,
            "MAIL FROM:<a@client.test> BODY=8BITMIME SIZE=100",
            "RCPT TO:<bob@example.org> X=y",
        )
        + lines("DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, OK, GO, QUEUED, BYE),
        envelopes=("Fa@client.test|Tbob@example.org",),
    ),
    "the first < wins over a bare address": Case(
        lines(HELO, "MAIL FROM:x@y.test <a@client.test>", "RCPT TO:x@other.test <bob@example.org>")
        + lines("DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, OK, GO, QUEUED, BYE),
        envelopes=("Fa@client.test|Tbob@example.org",),
    ),
    "nested brackets": Case(
        lines(HELO, "MAIL FROM:<<a@client.test>>", "RCPT TO:<<bob@example.org>>", "DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, OK, GO, QUEUED, BYE),
        envelopes=("F<a@client.test|T<bob@example.org",),
    ),
    "an unterminated bracket runs to the end of the line": Case(
        lines(HELO, "MAIL FROM:<a@client.test", "RCPT TO:<bob@example.org", "DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, OK, GO, QUEUED, BYE),
        envelopes=("Fa@client.test|Tbob@example.org",),
    ),
    "source routes are dropped": Case(
        lines(
            HELO,
            "MAIL FROM:<@relay.test:a@client.test>",
            "RCPT TO:<@a.test,@b.test:bob@example.org>",
        )
        + lines("DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, OK, GO, QUEUED, BYE),
        envelopes=("Fa@client.test|Tbob@example.org",),
    ),
    "a source route without a colon leaves nothing": Case(
        lines(HELO, "MAIL FROM:<@client.test>", "RCPT TO:<@example.org>", "DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, OK, GO, QUEUED, BYE),
        envelopes=("F|T",),
    ),
    "quoted local parts lose their quotes": Case(
        lines(HELO, 'MAIL FROM:<"a b"@client.test>', 'RCPT TO:<"bob>x"@example.org>')
        + lines('RCPT TO:<"b o b"@example.org>', "DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, OK, OK, GO, QUEUED, BYE),
        envelopes=("Fa b@client.test|Tbob>x@example.org|Tb o b@example.org",),
    ),
    "backslashes escape and disappear": Case(
        lines(HELO, r"MAIL FROM:<a\ b@client.test>", r"RCPT TO:<bob\>x@example.org>")
        + lines(r"RCPT TO:<b\"o\\b@example.org>", "DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, OK, OK, GO, QUEUED, BYE),
        envelopes=('Fa b@client.test|Tbob>x@example.org|Tb"o\\b@example.org',),
    ),
    "odd ends: a tab, a CR, a lone quote, a backslash at the end": Case(
        lines(HELO, "MAIL FROM:\ta@client.test", b"RCPT TO:bob@example.org\r")
        + lines(
            'RCPT TO:<"bob@example.org>', "RCPT TO:<bob@example.org\\", "RCPT TO:<@a:@b:c@x.test>"
        )
        + lines("DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, NO_RELAY, NO_RELAY, OK, NO_RELAY, GO, QUEUED, BYE),
        envelopes=("F\ta@client.test|Tbob@example.org",),
    ),
    "a bare address with a quoted space": Case(
        lines(HELO, 'MAIL FROM:"a b"@client.test', 'RCPT TO:"b o b"@example.org', "DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, OK, GO, QUEUED, BYE),
        envelopes=("Fa b@client.test|Tb o b@example.org",),
    ),
    "addresses of 899 bytes are accepted": Case(
        lines(HELO, f"MAIL FROM:<{long(899, 'a@client.test')}>", f"RCPT TO:<{long(899)}>")
        + lines("DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, OK, GO, QUEUED, BYE),
        envelopes=(f"F{long(899, 'a@client.test')}|T{long(899)}",),
    ),
    "addresses of 900 bytes: 555, the transaction before stays": Case(
        lines(HELO, FROM, TO, f"MAIL FROM:<{long(900, 'a@client.test')}>")
        + lines(f"RCPT TO:<{long(900)}>", "DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, OK, SYNTAX, SYNTAX, GO, QUEUED, BYE),
        envelopes=("Falice@client.test|Tbob@example.org",),
    ),
    "RCPT of 900 bytes before MAIL: MAIL first": Case(
        lines(HELO, f"RCPT TO:<{long(900)}>", "QUIT"), (HELLO, MAIL_FIRST, BYE)
    ),
    "899 bytes once the quotes are taken off": Case(
        lines(HELO, FROM, f'RCPT TO:<"{long(899)[:-12]}"@example.org>', "DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, OK, GO, QUEUED, BYE),
    ),
    # -- localiphost ------------------------------------------------------------------
    "[127.0.0.1] becomes localiphost": Case(
        lines(HELO, "MAIL FROM:<a@[127.0.0.1]>", "RCPT TO:<bob@[127.0.0.1]>", "DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, OK, GO, QUEUED, BYE),
        control={"localiphost": "example.org\n"},
        envelopes=("Fa@example.org|Tbob@example.org",),
    ),
    "[127.0.0.1] becomes me without localiphost": Case(
        lines(HELO, FROM, "RCPT TO:<bob@[127.0.0.1]>", "DATA") + BODY + lines("QUIT"),
        (HELLO, OK, OK, GO, QUEUED, BYE),
        envelopes=("Falice@client.test|Tbob@mx.example.org",),
    ),
    "[0.0.0.0] is local too": Case(
        lines(HELO, FROM, "RCPT TO:<bob@[0.0.0.0]>", "DATA") + BODY + lines("QUIT"),
        (HELLO, OK, OK, GO, QUEUED, BYE),
        envelopes=("Falice@client.test|Tbob@mx.example.org",),
    ),
    "a literal that is not ours stays and is not in rcpthosts": Case(
        lines(HELO, FROM, "RCPT TO:<bob@[198.51.100.1]>", "RCPT TO:<bob@[127.0.0.1]x>", "QUIT"),
        (HELLO, OK, NO_RELAY, NO_RELAY, BYE),
    ),
    "literals: how qmail reads the IP address": Case(
        lines(HELO, FROM, "RCPT TO:<a@[127.000.000.001]>", "RCPT TO:<b@[127.1]>")
        + lines("RCPT TO:<c@[127.0.0.1.]>", "RCPT TO:<d@[IPv6:::1]>", "RCPT TO:<e@[ 127.0.0.1]>")
        + lines("RCPT TO:<f@127.0.0.1>", "RCPT TO:<g@[127.0.0.256]>", "DATA")
        + BODY
        + lines("QUIT"),
        (
            HELLO,
            OK,
            OK,
            NO_RELAY,
            NO_RELAY,
            NO_RELAY,
            NO_RELAY,
            NO_RELAY,
            NO_RELAY,
            GO,
            QUEUED,
            BYE,
        ),
    ),
    "a literal under RELAYCLIENT: replaced, then the suffix": Case(
        lines(HELO, FROM, "RCPT TO:<bob@[127.0.0.1]>", "DATA") + BODY + lines("QUIT"),
        DELIVERED,
        env={"RELAYCLIENT": "@fixme"},
        envelopes=("Falice@client.test|Tbob@mx.example.org@fixme",),
    ),
    "localiphost not in rcpthosts: refused": Case(
        lines(HELO, FROM, "RCPT TO:<bob@[127.0.0.1]>", "QUIT"),
        (HELLO, OK, NO_RELAY, BYE),
        control={"localiphost": "elsewhere.test\n"},
    ),
    "only the last @ is looked at for a literal": Case(
        lines(HELO, FROM, "RCPT TO:<bob@[127.0.0.1]@example.org>", 'RCPT TO:<"bob@[127.0.0.1]">')
        + lines("DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, OK, OK, GO, QUEUED, BYE),
        envelopes=("Falice@client.test|Tbob@[127.0.0.1]@example.org|Tbob@mx.example.org",),
    ),
    # -- rcpthosts: what is relaying and what is not ------------------------------------
    "rcpthosts: exact names, any case": Case(
        lines(HELO, FROM, "RCPT TO:<bob@example.org>", "RCPT TO:<bob@EXAMPLE.Org>")
        + lines(
            f"RCPT TO:<bob@{ME}>", "RCPT TO:<bob@sub.example.org>", "RCPT TO:<bob@example.org.>"
        )
        + lines("RCPT TO:<bob@other.test>", "QUIT"),
        (HELLO, OK, OK, OK, OK, NO_RELAY, NO_RELAY, NO_RELAY, BYE),
    ),
    "rcpthosts: a leading dot matches subdomains only": Case(
        lines(HELO, FROM, "RCPT TO:<bob@sub.example.net>", "RCPT TO:<bob@a.b.example.net>")
        + lines("RCPT TO:<bob@example.net>", "RCPT TO:<bob@xexample.net>", "QUIT"),
        (HELLO, OK, OK, OK, NO_RELAY, NO_RELAY, BYE),
    ),
    "rcpthosts: no domain is local, an empty one is not; <@> is empty": Case(
        lines(HELO, FROM, "RCPT TO:<bob>", "RCPT TO:<bob@>", "RCPT TO:<@>", "QUIT"),
        (HELLO, OK, OK, NO_RELAY, OK, BYE),
    ),
    "relay tricks that end in a local domain are accepted": Case(
        lines(HELO, FROM, "RCPT TO:<user%other.test@example.org>")
        + lines('RCPT TO:<"user@other.test"@example.org>', "RCPT TO:<other.test!user@example.org>")
        + lines("RCPT TO:<user@other.test@example.org>", r"RCPT TO:<user@other.test\>@example.org>")
        + lines("DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, OK, OK, OK, OK, OK, GO, QUEUED, BYE),
        envelopes=(
            "Falice@client.test|Tuser%other.test@example.org|Tuser@other.test@example.org"
            "|Tother.test!user@example.org|Tuser@other.test@example.org"
            "|Tuser@other.test>@example.org",
        ),
    ),
    "relay tricks that end elsewhere are refused": Case(
        lines(HELO, FROM, "RCPT TO:<@example.org:user@other.test>", 'RCPT TO:<"user@other.test">')
        + lines("RCPT TO:<user@example.org@other.test>", "RCPT TO:<user@other.test >")
        + lines("RCPT TO:<user@other.test%example.org>", "RCPT TO:<example.org!user@other.test>")
        + lines("QUIT"),
        (HELLO, OK, NO_RELAY, NO_RELAY, NO_RELAY, NO_RELAY, NO_RELAY, NO_RELAY, BYE),
    ),
    "morercpthosts is looked at after rcpthosts": Case(
        lines(HELO, FROM, "RCPT TO:<bob@more.test>", "RCPT TO:<bob@x.more.net>")
        + lines("RCPT TO:<bob@more.net>", "RCPT TO:<bob@example.org>", "DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, OK, OK, NO_RELAY, OK, GO, QUEUED, BYE),
        control={"morercpthosts": "more.test\n.more.net\n"},
    ),
    # -- RELAYCLIENT -------------------------------------------------------------------
    "RELAYCLIENT empty: every recipient, unchanged": Case(
        lines(HELO, FROM, "RCPT TO:<carol@anywhere.test>", TO, "RCPT TO:<>", "DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, OK, OK, OK, GO, QUEUED, BYE),
        env={"RELAYCLIENT": ""},
        envelopes=("Falice@client.test|Tcarol@anywhere.test|Tbob@example.org|T",),
    ),
    "RELAYCLIENT @fixme: appended to every recipient": Case(
        lines(HELO, FROM, "RCPT TO:<carol@anywhere.test>", TO, "RCPT TO:<>")
        + lines("RCPT TO:<@x.test:dan@y.test>", "DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, OK, OK, OK, OK, GO, QUEUED, BYE),
        env={"RELAYCLIENT": "@fixme"},
        envelopes=(
            "Falice@client.test|Tcarol@anywhere.test@fixme|Tbob@example.org@fixme|T@fixme"
            "|Tdan@y.test@fixme",
        ),
    ),
    "RELAYCLIENT: the suffix is not counted in the 899": Case(
        lines(
            HELO,
            FROM,
            f"RCPT TO:<{long(900, 'b@a.test')}>",
            f"RCPT TO:<{long(899, 'b@a.test')}>",
            "DATA",
        )
        + BODY
        + lines("QUIT"),
        (HELLO, OK, SYNTAX, OK, GO, QUEUED, BYE),
        env={"RELAYCLIENT": "@fixme"},
        envelopes=(f"Falice@client.test|T{long(899, 'b@a.test')}@fixme",),
    ),
    "RELAYCLIENT does not pass badmailfrom": Case(
        lines(HELO, "MAIL FROM:<spam@bad.test>", "RCPT TO:<carol@anywhere.test>", "QUIT"),
        (HELLO, OK, BAD_SENDER, BYE),
        env={"RELAYCLIENT": ""},
        control={"badmailfrom": "spam@bad.test\n"},
    ),
    # -- badmailfrom ------------------------------------------------------------------
    "badmailfrom: an exact address, refused at RCPT": Case(
        lines(HELO, "MAIL FROM:<spam@bad.test>", TO, "DATA", "QUIT"),
        (HELLO, OK, BAD_SENDER, RCPT_FIRST, BYE),
        control={"badmailfrom": "spam@bad.test\n@worse.test\n"},
    ),
    "badmailfrom: matching ignores case": Case(
        lines(HELO, "MAIL FROM:<SPAM@Bad.Test>", TO, "MAIL FROM:<x@WORSE.TEST>", TO, "QUIT"),
        (HELLO, OK, BAD_SENDER, OK, BAD_SENDER, BYE),
        control={"badmailfrom": "spam@bad.test\n@worse.test\n"},
    ),
    "badmailfrom: @domain, but not its subdomains": Case(
        lines(HELO, "MAIL FROM:<anyone@worse.test>", TO)
        + lines("MAIL FROM:<anyone@sub.worse.test>", TO, "MAIL FROM:<other@bad.test>", TO)
        + lines("DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, BAD_SENDER, OK, OK, OK, OK, GO, QUEUED, BYE),
        control={"badmailfrom": "spam@bad.test\n@worse.test\n"},
        envelopes=("Fother@bad.test|Tbob@example.org",),
    ),
    "badmailfrom: a new MAIL from someone else is fine": Case(
        lines(HELO, "MAIL FROM:<spam@bad.test>", TO, FROM, TO, "DATA") + BODY + lines("QUIT"),
        (HELLO, OK, BAD_SENDER, OK, OK, GO, QUEUED, BYE),
        control={"badmailfrom": "spam@bad.test\n"},
    ),
    "badmailfrom: the null sender and source routes": Case(
        lines(HELO, "MAIL FROM:<@relay.test:spam@bad.test>", TO, "MAIL FROM:<>", TO, "QUIT"),
        (HELLO, OK, BAD_SENDER, OK, OK, BYE),
        control={"badmailfrom": "spam@bad.test\n"},
    ),
    # -- databytes ---------------------------------------------------------------------
    "databytes: exactly the limit is accepted": Case(
        deliver("bob@example.org", sized(100)), DELIVERED, control={"databytes": "100\n"}
    ),
    "databytes: one byte over is refused, the session goes on": Case(
        lines(HELO, FROM, TO, "DATA")
        + sized(101)
        + lines(FROM, TO, "DATA")
        + sized(100)
        + lines("QUIT"),
        (HELLO, OK, OK, GO, TOO_BIG, OK, OK, GO, QUEUED, BYE),
        control={"databytes": "100\n"},
    ),
    "databytes: counted after CR LF becomes LF and dots are unstuffed": Case(
        deliver("bob@example.org", b"..x\r\n" * 20 + b"\r\n" * 40 + b".\r\n"),
        DELIVERED,
        control={"databytes": "100\n"},
    ),
    "databytes: the Received lines are not counted": Case(
        deliver("bob@example.org", sized(10)), DELIVERED, control={"databytes": "10\n"}
    ),
    "databytes: bare CRs count as they are stored": Case(
        lines(HELO, FROM, TO, "DATA")
        + b"\r" * 10
        + b"\n.\r\n"
        + lines(FROM, TO, "DATA")
        + b"\r" * 11
        + b"\n.\r\n"
        + lines("QUIT"),
        (HELLO, OK, OK, GO, QUEUED, OK, OK, GO, TOO_BIG, BYE),
        control={"databytes": "10\n"},
        stored=(b"\r" * 9 + b"\n",),
    ),
    "DATABYTES overrides control/databytes": Case(
        lines("EHLO client.test", FROM, TO, "DATA")
        + sized(51)
        + lines(FROM, TO, "DATA")
        + sized(50)
        + lines("QUIT"),
        (*EHLO, OK, OK, GO, TOO_BIG, OK, OK, GO, QUEUED, BYE),
        control={"databytes": "100\n"},
        env={"DATABYTES": "50"},
    ),
    "DATABYTES=0: no limit": Case(
        lines("EHLO client.test", FROM, TO, "DATA") + sized(5000) + lines("QUIT"),
        (*EHLO, OK, OK, GO, QUEUED, BYE),
        control={"databytes": "10\n"},
        env={"DATABYTES": "0"},
    ),
    "EHLO with control/databytes": Case(
        lines("EHLO client.test", "QUIT"), (*EHLO, BYE), control={"databytes": "1000\n"}
    ),
    "SIZE= at the limit is accepted at MAIL": Case(
        lines("EHLO client.test", "MAIL FROM:<a@client.test> SIZE=100", TO, "DATA")
        + sized(100)
        + lines("QUIT"),
        (*EHLO, OK, OK, GO, QUEUED, BYE),
        control={"databytes": "100\n"},
    ),
    "SIZE= with no limit is ignored": Case(
        lines("EHLO client.test", "MAIL FROM:<a@client.test> SIZE=99999999", TO, "QUIT"),
        (*EHLO, OK, OK, BYE),
    ),
    # -- hop counting ------------------------------------------------------------------
    "99 Received lines: accepted": Case(deliver("bob@example.org", hops(99) + BODY), DELIVERED),
    "100 Received lines: looping, nothing queued": Case(
        deliver("bob@example.org", hops(100) + BODY), (HELLO, OK, OK, GO, LOOPING, BYE)
    ),
    "Delivered-To lines count as hops": Case(
        deliver("bob@example.org", hops(50) + hops(50, b"Delivered-To: x@y") + BODY),
        (HELLO, OK, OK, GO, LOOPING, BYE),
    ),
    "any case, no colon needed: received-spf and DELIVERED count": Case(
        deliver(
            "bob@example.org",
            hops(60, b"received-spf: pass") + hops(39, b"DeLiVeReDx") + hops(1, b"RECEIVED") + BODY,
        ),
        (HELLO, OK, OK, GO, LOOPING, BYE),
    ),
    "lines that only start like Received do not count": Case(
        deliver(
            "bob@example.org", hops(99) + hops(5, b"Receive: x") + hops(5, b"Deliver: y") + BODY
        ),
        DELIVERED,
    ),
    "hop lines after the header do not count": Case(
        deliver("bob@example.org", hops(99) + b"\r\n" + hops(10) + b".\r\n"), DELIVERED
    ),
    "a folded Received line counts once": Case(
        deliver("bob@example.org", hops(99, b"Received: from a\r\n  by b") + BODY), DELIVERED
    ),
    "a dot-stuffed .Received line is not counted": Case(
        deliver("bob@example.org", hops(99) + b".Received: x\r\n" + BODY),
        DELIVERED,
    ),
    "CR CR LF is not the empty line that ends the header": Case(
        deliver("bob@example.org", hops(99) + b"\r\r\n" + hops(1) + BODY),
        (HELLO, OK, OK, GO, LOOPING, BYE),
    ),
    "a header line of blanks does not end the header": Case(
        deliver("bob@example.org", hops(99) + b" \r\n" + hops(1) + BODY),
        (HELLO, OK, OK, GO, LOOPING, BYE),
    ),
    # -- DATA: transparency and smuggling ---------------------------------------------
    "dot-stuffing: a leading dot is always dropped": Case(
        deliver("bob@example.org", b"..x\r\n.y\r\n..\r\n...\r\nz.\r\n.\r\n"),
        DELIVERED,
        stored=(b".x\ny\n.\n..\nz.\n",),
    ),
    "a message of just the dot is empty": Case(
        deliver("bob@example.org", b".\r\n"), DELIVERED, stored=(b"",)
    ),
    "an empty line, then the dot": Case(
        deliver("bob@example.org", b"\r\n.\r\n"), DELIVERED, stored=(b"\n",)
    ),
    "bare LF in a line: 451, closed, nothing queued": Case(
        deliver("bob@example.org", b"Subject: x\r\n\r\nline\nsmuggled\r\n.\r\n"),
        (HELLO, OK, OK, GO, BARE_LF),
        code=1,
    ),
    "bare LF on its own after CR LF": Case(
        deliver("bob@example.org", b"Subject: x\r\n\nMAIL FROM:<x@y>\r\n.\r\n"),
        (HELLO, OK, OK, GO, BARE_LF),
        code=1,
    ),
    "LF dot LF does not end the data": Case(
        deliver("bob@example.org", b"Subject: x\r\n\r\nbody\n.\nMAIL FROM:<x@y>\r\n.\r\n"),
        (HELLO, OK, OK, GO, BARE_LF),
        code=1,
    ),
    "dot LF at the start of a line": Case(
        deliver("bob@example.org", b"Subject: x\r\n\r\n.\n.\r\n"), (HELLO, OK, OK, GO, BARE_LF), 1
    ),
    "CR dot CR does not end the data, bare CRs are kept": Case(
        deliver("bob@example.org", b"a\r.\rb\r\nc\rd\r\n\r.\r\r\n.\r\n"),
        DELIVERED,
        stored=(b"a\r.\rb\nc\rd\n\r.\r\n",),
    ),
    "dot CR then not LF at the start of a line": Case(
        deliver("bob@example.org", b".\rx\r\n.\r\r\n.\r.\r\n.\r\n"),
        DELIVERED,
        stored=(b".\rx\n.\r\n.\r.\n",),
    ),
    "CR CR LF keeps one CR": Case(
        deliver("bob@example.org", b"a\r\r\nb\r\r\r\n.\r\n"), DELIVERED, stored=(b"a\r\nb\r\r\n",)
    ),
    "a CR at the end of the data, before the dot": Case(
        deliver("bob@example.org", b"a\r\r\n.\r\n"), DELIVERED, stored=(b"a\r\n",)
    ),
    "SMTP smuggling: CR LF dot LF is not an end": Case(
        deliver("bob@example.org", b"Subject: x\r\n\r\nbody\r\n.\nMAIL FROM:<x@y>\r\n.\r\n"),
        (HELLO, OK, OK, GO, BARE_LF),
        code=1,
    ),
    "SMTP smuggling: CR LF dot CR is not an end": Case(
        deliver("bob@example.org", b"body\r\n.\rMAIL FROM:<x@y>\r\n.\r\n"),
        DELIVERED,
        stored=(b"body\n.\rMAIL FROM:<x@y>\n",),
    ),
    "a 5000-byte line, 8-bit bytes and NUL are stored as they are": Case(
        deliver("bob@example.org", b"x" * 5000 + b"\r\n\xe9\xff\x00\x7f end\r\n.\r\n"),
        DELIVERED,
        stored=(b"x" * 5000 + b"\n\xe9\xff\x00\x7f end\n",),
    ),
    "commands right after the final dot": Case(
        lines(HELO, FROM, TO, "DATA") + b"x\r\n.\r\nNOOP\r\nMAIL FROM:<a@b>\r\nQUIT\r\n",
        (HELLO, OK, OK, GO, QUEUED, OK, OK, BYE),
    ),
    "DATA with an argument": Case(
        lines(HELO, FROM, TO, "DATA now") + BODY + lines("QUIT"), DELIVERED
    ),
    # -- the environment and the Received line ------------------------------------------
    "HELO equal to TCPREMOTEHOST, in another case: no HELO part": Case(
        lines("HELO Client.Test", FROM, TO, "DATA") + BODY + lines("QUIT"),
        DELIVERED,
        env={"TCPREMOTEHOST": "client.test", "TCPREMOTEINFO": "ident"},
        received=(
            b"Received: from client.test (ident@192.0.2.7)\n  by mx.example.org with SMTP; DATE\n"
        ),
    ),
    "HELO with no argument": Case(
        lines("HELO", FROM, TO, "DATA") + BODY + lines("QUIT"),
        DELIVERED,
        received=(
            b"Received: from unknown (HELO ) (192.0.2.7)\n  by mx.example.org with SMTP; DATE\n"
        ),
    ),
    "EHLO with no argument": Case(lines("EHLO", "QUIT"), (*EHLO, BYE)),
    "odd bytes in HELO and the TCP variables are sanitised": Case(
        lines(b"HELO <evil> x;y\t[1.2.3.4]\xe9%+/=:-_", FROM, TO, "DATA") + BODY + lines("QUIT"),
        DELIVERED,
        env={
            "TCPREMOTEHOST": "h\x01st name",
            "TCPREMOTEINFO": "in fo<>",
            "TCPREMOTEIP": "1.2.3.4 x",
            "TCPLOCALHOST": "l()cal",
        },
        received=(
            b"Received: from h?st?name (HELO ?evil??x?y?[1.2.3.4]?%+/=:-?) (in?fo??@1.2.3.4?x)\n"
            b"  by l??cal with SMTP; DATE\n"
        ),
    ),
    "no TCP variables: unknown everywhere": Case(
        deliver("bob@example.org", BODY),
        DELIVERED,
        env={"TCPREMOTEIP": None, "TCPLOCALHOST": None},
        received=(
            b"Received: from unknown (HELO client.test) (unknown)\n  by unknown with SMTP; DATE\n"
        ),
    ),
    "TCPLOCALIP when there is no TCPLOCALHOST": Case(
        deliver("bob@example.org", BODY),
        DELIVERED,
        env={"TCPLOCALHOST": None, "TCPLOCALIP": "192.0.2.2"},
        received=(
            b"Received: from unknown (HELO client.test) (192.0.2.7)\n"
            b"  by 192.0.2.2 with SMTP; DATE\n"
        ),
    ),
    "an empty TCPLOCALHOST is used as it is": Case(
        deliver("bob@example.org", BODY),
        DELIVERED,
        env={"TCPLOCALHOST": "", "TCPLOCALIP": "192.0.2.2", "TCPREMOTEHOST": ""},
        received=b"Received: from  (HELO client.test) (192.0.2.7)\n  by  with SMTP; DATE\n",
    ),
    "an empty TCPREMOTEINFO, and HELO unknown without TCPREMOTEHOST": Case(
        lines("HELO UNKNOWN", FROM, TO, "DATA") + BODY + lines("QUIT"),
        DELIVERED,
        env={"TCPREMOTEINFO": ""},
        received=b"Received: from unknown (@192.0.2.7)\n  by mx.example.org with SMTP; DATE\n",
    ),
    # -- control files -------------------------------------------------------------------
    "smtpgreeting: its first line in the banner, HELO and QUIT": Case(
        lines("EHLO client.test", HELO, "QUIT"),
        (
            "250-mail.example.org at your service",
            "250-PIPELINING",
            "250 8BITMIME",
            "250 mail.example.org at your service",
            "221 mail.example.org at your service",
        ),
        control={"smtpgreeting": "mail.example.org at your service\nsecond line\n"},
        banner="220 mail.example.org at your service ESMTP",
    ),
    "DATABYTES is read as far as its digits go": Case(
        lines("EHLO client.test", FROM, TO, "DATA") + sized(51) + lines("QUIT"),
        (*EHLO, OK, OK, GO, TOO_BIG, BYE),
        env={"DATABYTES": "50 bytes"},
    ),
    "control files: blanks at line ends and comments ignored, upper case": Case(
        lines(HELO, "MAIL FROM:<spam@bad.test>", TO, FROM, "RCPT TO:<bob@upper.test>")
        + lines("RCPT TO:<bob@blank.test>", "RCPT TO:<bob@#comment.test>", "DATA")
        + BODY
        + lines("QUIT"),
        (HELLO, OK, BAD_SENDER, OK, OK, OK, NO_RELAY, GO, QUEUED, BYE),
        control={
            "rcpthosts": "UPPER.TEST\nblank.test \t\n#comment.test\n\n",
            "badmailfrom": "SPAM@BAD.TEST \n",
        },
    ),
    "no control/me: 421 and exit 1": Case(
        lines(HELO, "QUIT"), (), code=1, control={"me": None}, banner=NO_CONTROLS
    ),
    "no control/me but smtpgreeting": Case(
        lines(HELO, "QUIT"),
        ("250 greeting.test", "221 greeting.test"),
        control={"me": None, "smtpgreeting": "greeting.test\n"},
        banner="220 greeting.test ESMTP",
    ),
    "timeoutsmtpd: 451 timeout and exit 1": Case(
        lines(HELO, "MAIL FROM:<a@b>"),
        (HELLO, OK, TIMED_OUT),
        code=1,
        control={"timeoutsmtpd": "1\n"},
        hold_open=True,
    ),
    # -- where we differ on purpose (spec/smtpd.md §11) ------------------------------------
    "ours: MAIL SIZE= over databytes is refused at MAIL": Case(
        lines("EHLO client.test", "MAIL FROM:<a@client.test> SIZE=101", TO, "QUIT"),
        (*EHLO, OK, OK, BYE),
        control={"databytes": "100\n"},
        ours=(BANNER, *EHLO, TOO_BIG, MAIL_FIRST, BYE),
    ),
    "ours: no rcpthosts: 421, not an open relay": Case(
        lines(HELO, FROM, "RCPT TO:<bob@other.test>", "DATA") + BODY + lines("QUIT"),
        (HELLO, OK, OK, GO, QUEUED, BYE),
        control={"rcpthosts": None},
        ours=(NO_CONTROLS,),
        ours_code=1,
    ),
    "ours: control/databytes not a number: 421, where qmail reads it as 0": Case(
        deliver("bob@example.org", sized(5000)),
        DELIVERED,
        control={"databytes": "lots\n"},
        ours=(NO_CONTROLS,),
        ours_code=1,
    ),
    "ours: a command line at the limit is fine": Case(
        lines("NOOP " + "x" * (LINE_MAX - 6), "QUIT"), (OK, BYE)
    ),
    "ours: a command line one octet over the limit gets a 500": Case(
        lines("NOOP " + "x" * (LINE_MAX - 5), "QUIT"),
        (OK, BYE),
        ours=(BANNER, LINE_TOO_LONG, BYE),
    ),
    "ours: a much longer RCPT line gets one 500, the transaction stays": Case(
        lines(HELO, FROM, TO, "RCPT TO:<bob@example.org>" + " " * 3 * LINE_MAX, "DATA")
        + BODY
        + lines("QUIT"),
        (*DELIVERED[:3], OK, GO, QUEUED, BYE),
        ours=(BANNER, HELLO, OK, OK, LINE_TOO_LONG, GO, QUEUED, BYE),
        ours_envelopes=("Falice@client.test|Tbob@example.org",),
    ),
}


# -- running one side ------------------------------------------------------------------


def base_environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SMTPD_VARIABLES}
    env["HOME"] = str(home)
    return env


def write_control(directory: Path, control: Mapping[str, str | None]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in control.items():
        path = directory / name
        if text is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(text, "latin-1")


def qmail_instance(path: Path, oracle: Path, control: Mapping[str, str | None]) -> Path:
    """A qmail home for qmail-smtpd: control files, `bin` -> the oracle."""
    write_control(path / "control", control)
    (path / "bin").symlink_to(oracle)
    if control.get("morercpthosts") is not None:
        subprocess.run(
            [str(oracle / "qmail-newmrh")],
            cwd=path,
            check=True,
            timeout=TIMEOUT,
            capture_output=True,
        )
    return path


def our_root(path: Path, control: Mapping[str, str | None], qmail: Path) -> Path:
    """A root made by `qmailtui init`'s code, with the same control files."""
    root = init_root(path, me=ME).path
    write_control(root / "control", control)
    made = qmail / "control" / "morercpthosts.cdb"
    if made.exists():  # qmail-smtpd reads only the compiled file: give ours both
        shutil.copy(made, root / "control" / "morercpthosts.cdb")
    return root


@dataclass(frozen=True)
class Session:
    code: int | None  # None: still running at the deadline (then killed)
    output: bytes
    errors: bytes
    started: float
    ended: float


def converse(
    argv: list[str], cwd: Path, env: dict[str, str], send: bytes, hold_open: bool = False
) -> Session:
    """Write `send` to the program's stdin, then close it (unless `hold_open`:
    then wait, at most HOLD seconds, for the program to end by itself)."""
    started = time.time()
    with subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    ) as proc:
        try:
            if hold_open:
                assert proc.stdin is not None
                assert proc.stdout is not None
                assert proc.stderr is not None
                proc.stdin.write(send)
                proc.stdin.flush()
                proc.wait(HOLD)  # the output is small: the pipes do not fill
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
                output, errors = proc.stdout.read(), proc.stderr.read()
            else:
                output, errors = proc.communicate(send, timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, errors = proc.communicate(timeout=TIMEOUT)
            return Session(None, output, errors, started, time.time())
    return Session(proc.returncode, output, errors, started, time.time())


# -- normalising -------------------------------------------------------------------------

QP = re.compile(r"250 ok (\d+) qp (\d+)")
DATE = rb"\d{1,2} (?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d -0000"
QUEUE_LINE = re.compile(rb"Received: \(qmail (\d+) invoked from network\); " + DATE + rb"\n")
SMTPD_LINE = re.compile(
    rb"(Received: from [^\n]*\n  by )([^\n]*)( with E?SMTPS?; )(" + DATE + rb")\n"
)


@dataclass(frozen=True)
class Replies:
    lines: tuple[str, ...]  # normalised
    qps: tuple[int, ...]  # the qp of each 250 to DATA, in order


def replies(output: bytes, started: float, ended: float) -> Replies:
    """Reply lines, every one ended by CR LF, `250 ok TIME qp PID` normalised."""
    assert output == b"" or output.endswith(b"\r\n"), output
    found: list[str] = []
    qps: list[int] = []
    for raw in output.split(b"\r\n")[:-1]:
        assert not re.search(rb"[\r\n]", raw), f"a bare CR or LF in a reply: {output!r}"
        line = raw.decode("latin-1")
        m = QP.fullmatch(line)
        if m:
            assert int(started) - 1 <= int(m[1]) <= ended + 1, line
            qps.append(int(m[2]))
            line = QUEUED
        found.append(line)
    return Replies(tuple(found), tuple(qps))


def size_keyword(databytes: int) -> str:
    return f"SIZE {databytes}" if databytes else "SIZE"


def without_our_extensions(lines: tuple[str, ...], size: str, tls: bool = False) -> tuple[str, ...]:
    """Our EHLO replies list SIZE (and STARTTLS with a certificate) besides
    qmail's keywords: check that they are there, exactly once, then take them out."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not lines[i].startswith("250-"):
            out.append(lines[i])
            i += 1
            continue
        end = i
        while end < len(lines) and lines[end].startswith("250-"):
            end += 1
        assert end < len(lines), lines[i:]
        assert lines[end].startswith("250 "), lines[i:]
        greeting, *keywords = (line[4:] for line in lines[i : end + 1])
        ours = [size, "STARTTLS"] if tls else [size]
        for keyword in ours:
            assert keywords.count(keyword) == 1, f"our EHLO should list {keyword!r}: {keywords}"
            keywords.remove(keyword)
        assert not [k for k in keywords if k.startswith(("SIZE", "STARTTLS"))], keywords
        assert keywords, lines[i : end + 1]
        out += [f"250-{greeting}", *(f"250-{k}" for k in keywords[:-1]), f"250 {keywords[-1]}"]
        i = end + 1
    return tuple(out)


@dataclass(frozen=True)
class Stored:
    message: bytes  # after the Received line qmail-smtpd writes, whose date is DATE
    received: bytes  # that Received line
    envelope: tuple[str, ...]  # records: F..., T...


def split_smtpd_line(message: bytes) -> tuple[bytes, bytes]:
    m = SMTPD_LINE.match(message)
    assert m, f"no Received line of qmail-smtpd's form first: {message[:300]!r}"
    return m[1] + m[2] + m[3] + b"DATE\n", message[m.end() :]


def records(data: bytes) -> tuple[str, ...]:
    assert data.endswith(b"\0"), data
    return tuple(r.decode("latin-1") for r in data.split(b"\0")[:-1])


def qmail_stored(inst: Path, qps: tuple[int, ...]) -> list[Stored]:
    """What the stand-in qmail-queue kept for each accepted message."""
    found = []
    for qp in qps:
        message = (inst / "queue" / f"{qp}.msg").read_bytes()
        envelope = (inst / "queue" / f"{qp}.env").read_bytes()
        assert envelope.endswith(b"\0\0"), envelope  # the envelope's own end, then EOF
        received, rest = split_smtpd_line(message)
        found.append(Stored(rest, received, records(envelope[:-1])))
    return found


def message_ids(root: Path) -> set[int]:
    mess = root / "queue" / "mess"
    return {int(n) for d in mess.iterdir() for n in os.listdir(d) if n.isdigit()}


def read_first(*paths: Path) -> bytes | None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            return path.read_bytes()
    return None


def our_envelope(root: Path, msgid: int) -> tuple[tuple[str, ...], int | None, bool]:
    """(records, the p record, in order?): from todo/N (or intd/N), without its u
    and p records; once a running core has preprocessed the message, from info,
    local and remote, where the order holds only within one channel."""
    q = root / "queue"
    split = str(msgid % 23)
    for _ in range(50):  # the core may move it while we look
        todo = read_first(q / "todo" / str(msgid), q / "intd" / str(msgid))
        if todo is not None:
            m = re.match(rb"u(\d+)\0p(\d+)\0", todo)
            assert m, f"todo/{msgid} should start with u and p records: {todo[:100]!r}"
            return records(todo[m.end() :]), int(m[2]), True
        info = read_first(q / "info" / split / str(msgid))
        if info is not None:
            channels = [read_first(q / c / split / str(msgid)) for c in ("local", "remote")]
            found = [["T" + r[1:] for r in records(data)] for data in channels if data]
            if len(found) == 1:
                return (*records(info), *found[0]), None, True
            return (*records(info), *sorted(r for f in found for r in f)), None, False
        time.sleep(0.02)
    raise AssertionError(f"message {msgid} has no envelope in {q}")


def our_stored(root: Path, ids: list[int]) -> list[Ours]:
    """Our queued messages, oldest first, qmail-queue's Received line checked
    and taken off."""
    found: list[Ours] = []
    for msgid in ids:
        data = (root / "queue" / "mess" / str(msgid % 23) / str(msgid)).read_bytes()
        m = QUEUE_LINE.match(data)
        assert m, f"mess/{msgid} should start with qmail-queue's Received line: {data[:200]!r}"
        envelope, pid, ordered = our_envelope(root, msgid)
        received, message = split_smtpd_line(data[m.end() :])
        found.append(Ours(Stored(message, received, envelope), ordered, int(m[1]), pid))
    return found


@dataclass(frozen=True)
class Ours:
    stored: Stored
    ordered: bool  # False: local and remote recipients apart, so compared sorted
    received_pid: int  # in qmail-queue's Received line
    p: int | None  # the p record of todo/N


def compare_stored(detail: str, theirs: list[Stored], ours: list[Ours]) -> None:
    assert len(ours) == len(theirs), f"{detail}\nqmail queued {len(theirs)}, we {len(ours)}"
    for t, o in zip(theirs, ours, strict=True):
        assert o.stored.received == t.received, detail
        assert o.stored.message == t.message, detail
        if o.ordered:
            assert o.stored.envelope == t.envelope, detail
        else:
            assert o.stored.envelope == (t.envelope[0], *sorted(t.envelope[1:])), detail


# -- the stdin/stdout door ---------------------------------------------------------------


def settings(case: Case) -> tuple[dict[str, str | None], dict[str, str]]:
    control = {**CONTROL, **case.control}
    env = {k: v for k, v in {**ENV, **case.env}.items() if v is not None}
    return control, env


def effective_databytes(control: Mapping[str, str | None], env: Mapping[str, str]) -> int:
    """$DATABYTES, else control/databytes, read as qmail's scan_ulong reads them."""
    text = env["DATABYTES"] if "DATABYTES" in env else control.get("databytes") or ""
    digits = re.match(r"\s*(\d*)", text)
    return int(digits[1]) if digits and digits[1] else 0


def make_certificate(control_dir: Path) -> None:
    """control/servercert.pem: a self-signed certificate with its key, in one
    file as the qmail TLS patch keeps them."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make control/servercert.pem")
    key, cert = control_dir / "servercert.key", control_dir / "servercert.crt"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
            *("-nodes", "-days", "2", "-subj", f"/CN={ME}", "-batch"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=TIMEOUT,
    )
    pem = control_dir / "servercert.pem"
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    pem.chmod(0o600)
    key.unlink()
    cert.unlink()


@dataclass(frozen=True)
class Outcome:
    session: Session
    replies: Replies
    stored: list[Stored]


def run_qmail(case: Case, tmp_path: Path, oracle: Path) -> Outcome:
    control, env = settings(case)
    inst = qmail_instance(tmp_path / "qmail", oracle, control)
    session = converse(
        [str(oracle / "qmail-smtpd")],
        inst,
        {**base_environment(tmp_path / "home"), **env},
        case.send,
        case.hold_open,
    )
    said = replies(session.output, session.started, session.ended)
    return Outcome(session, said, qmail_stored(inst, said.qps))


def check_qmail(name: str, case: Case, theirs: Outcome) -> None:
    """qmail-smtpd did what the case says it does."""
    expected = ((case.banner,) if case.banner else ()) + case.replies
    said = theirs.session.output
    assert theirs.replies.lines == expected, f"{name}: qmail-smtpd said {said!r}"
    assert theirs.session.code == case.code, f"{name}: {said!r}"
    if case.envelopes is not None:
        assert tuple("|".join(s.envelope) for s in theirs.stored) == case.envelopes
    if case.received is not None:
        assert [s.received for s in theirs.stored] == [case.received] * len(theirs.stored)
    if case.stored is not None:
        assert tuple(s.message for s in theirs.stored) == case.stored


@pytest.mark.parametrize("name", list(CASES))
def test_qmail_smtpd_says_what_the_case_says(name: str, tmp_path: Path, oracle: Path) -> None:
    case = CASES[name]
    check_qmail(name, case, run_qmail(case, tmp_path, oracle))


def run_ours(case: Case, tmp_path: Path) -> tuple[Path, Session]:
    control, env = settings(case)
    root = our_root(tmp_path / "ours", control, tmp_path / "qmail")
    session = converse(
        [*CLI, "--root", str(root), "smtpd"],
        tmp_path,
        {**base_environment(tmp_path / "home"), **env},
        case.send,
        case.hold_open,
    )
    return root, session


@pytest.mark.parametrize("name", list(CASES))
def test_qmailtui_smtpd_does_what_qmail_smtpd_does(name: str, tmp_path: Path, oracle: Path) -> None:
    case = CASES[name]
    theirs = run_qmail(case, tmp_path, oracle)
    check_qmail(name, case, theirs)
    root, ours = run_ours(case, tmp_path)

    detail = (
        f"{name}:\n qmail: {theirs.session.output!r}\n ours:  {ours.output!r}"
        f"\n our stderr: {ours.errors!r}"
    )
    our_replies = replies(ours.output, ours.started, ours.ended)
    control, env = settings(case)
    plain = without_our_extensions(
        our_replies.lines, size_keyword(effective_databytes(control, env))
    )
    assert plain == (case.ours if case.ours is not None else theirs.replies.lines), detail
    code = theirs.session.code if case.ours_code is None else case.ours_code
    assert ours.code == code, detail
    ids = sorted(message_ids(root))
    assert len(ids) == len(our_replies.qps), f"{detail}\n queued: {ids}"
    stored = our_stored(root, ids)
    if case.ours_envelopes is not None:
        assert tuple("|".join(o.stored.envelope) for o in stored) == case.ours_envelopes, detail
        messages = [(o.stored.received, o.stored.message) for o in stored]
        assert messages == [(t.received, t.message) for t in theirs.stored], detail
    elif case.ours is None or len(ids) == len(theirs.stored):
        compare_stored(detail, theirs.stored, stored)
    writing = list((root / "queue" / "pid").iterdir())
    assert not writing, f"{detail}\n left in queue/pid: {writing}"


def test_qp_is_the_number_in_the_p_record_and_in_qmail_queues_received_line(
    tmp_path: Path, oracle: Path
) -> None:
    """qmail's `qp N` is qmail-queue's pid, so the same N is the `p` record of
    todo/ and the `Received: (qmail N invoked from network)` line, and qmail-send
    logs it (`info msg M: bytes B from <S> qp N uid U`): an admin follows a
    message from the client's 250 to the queue and the log by it. Whatever
    number we give, the three must agree."""
    case = CASES["two messages in one session"]
    theirs = run_qmail(case, tmp_path, oracle)
    qps = theirs.replies.qps
    assert len(set(qps)) == 2  # one qmail-queue per message
    root, ours = run_ours(case, tmp_path)
    our_qps = replies(ours.output, ours.started, ours.ended).qps
    stored = our_stored(root, sorted(message_ids(root)))
    assert [(s.p, s.received_pid) for s in stored] == [(qp, qp) for qp in our_qps], ours.output


# -- the socket door ---------------------------------------------------------------------

RULES = (  # clients connect from these addresses (loopback: all of 127/8 is ours)
    '127.0.0.2:allow,RELAYCLIENT=""\n'
    '127.0.0.3:allow,RELAYCLIENT="@fixme"\n'
    "127.0.0.4:deny\n"
    '127.0.0.5:allow,DATABYTES="100"\n'
    ":allow\n"
)
SOCKET_CONTROL: dict[str, str | None] = {
    **CONTROL,
    "badmailfrom": "spam@bad.test\n",
    "smtproutes": ":127.0.0.1:1\n",  # our core's remote deliveries fail at once, no DNS
}
SOCKET_DATABYTES = {"127.0.0.5": 100}
READ = 5.0  # seconds to wait for the replies of one turn, or for the close
SETTLE = 0.05  # seconds after a write nothing answers, so that the next is a write apart


@dataclass(frozen=True)
class Talk:
    """One connection: each turn is what the client writes (all at once) and how
    many replies it then waits for; `replies` (the banner first) is what qmail-smtpd
    under tcpserver answers. After the last turn the client waits for the server
    to close, unless it `hangs_up` first."""

    turns: tuple[tuple[bytes, int], ...]
    replies: tuple[str, ...]
    source: str = "127.0.0.1"
    hangs_up: bool = False
    envelopes: tuple[str, ...] | None = None
    ours: tuple[str, ...] | None = None  # an intended difference: our replies


def say(*commands: str | bytes) -> tuple[bytes, int]:
    """Commands in one write, waiting for a reply to each."""
    return lines(*commands), len(commands)


GREET = (b"", 1)  # wait for the banner


TALKS: dict[str, Talk] = {
    "turn by turn, a message for a domain in rcpthosts": Talk(
        (GREET, say(HELO), say(FROM), say(TO), say("DATA"), (BODY, 1), say("QUIT")),
        (BANNER, *DELIVERED),
        envelopes=("Falice@client.test|Tbob@example.org",),
    ),
    "EHLO, then MAIL RCPT RCPT DATA in one write": Talk(
        (
            GREET,
            say("EHLO client.test"),
            say(FROM, TO, "RCPT TO:<carol@sub.example.net>", "DATA"),
            (BODY, 1),
            say("QUIT"),
        ),
        (BANNER, *EHLO, OK, OK, OK, GO, QUEUED, BYE),
        envelopes=("Falice@client.test|Tbob@example.org|Tcarol@sub.example.net",),
    ),
    "the whole session in one write, before the banner": Talk(
        ((deliver("bob@example.org", BODY), 7),),
        (BANNER, *DELIVERED),
    ),
    "pipelined: a refused recipient, RSET and a new transaction": Talk(
        (
            GREET,
            say(HELO, FROM, "RCPT TO:<x@other.test>", "RSET", "MAIL FROM:<c@client.test>", TO),
            say("DATA"),
            (BODY, 1),
            say("QUIT"),
        ),
        (BANNER, HELLO, OK, NO_RELAY, FLUSHED, OK, OK, GO, QUEUED, BYE),
        envelopes=("Fc@client.test|Tbob@example.org",),
    ),
    "two messages on one connection": Talk(
        (
            GREET,
            say(HELO, FROM, TO, "DATA"),
            (b"one\r\n.\r\n", 1),
            say("MAIL FROM:<>", "RCPT TO:<dan@example.org>", "DATA"),
            (b"two\r\n.\r\n", 1),
            say("QUIT"),
        ),
        (BANNER, HELLO, OK, OK, GO, QUEUED, OK, OK, GO, QUEUED, BYE),
        envelopes=("Falice@client.test|Tbob@example.org", "F|Tdan@example.org"),
    ),
    "no rule sets RELAYCLIENT: relaying refused": Talk(
        (GREET, say(HELO, FROM, "RCPT TO:<carol@anywhere.test>", "DATA", "QUIT")),
        (BANNER, HELLO, OK, NO_RELAY, RCPT_FIRST, BYE),
    ),
    "a rule sets RELAYCLIENT: relaying allowed": Talk(
        (GREET, say(HELO, FROM, "RCPT TO:<carol@anywhere.test>", "DATA"), (BODY, 1), say("QUIT")),
        (BANNER, *DELIVERED),
        source="127.0.0.2",
        envelopes=("Falice@client.test|Tcarol@anywhere.test",),
    ),
    "a rule sets RELAYCLIENT=@fixme: appended": Talk(
        (GREET, say(HELO, FROM, "RCPT TO:<carol@anywhere.test>", TO, "DATA"), (BODY, 1)),
        (BANNER, HELLO, OK, OK, OK, GO, QUEUED),
        source="127.0.0.3",
        hangs_up=True,
        envelopes=("Falice@client.test|Tcarol@anywhere.test@fixme|Tbob@example.org@fixme",),
    ),
    "RELAYCLIENT from a rule does not pass badmailfrom": Talk(
        (GREET, say(HELO, "MAIL FROM:<spam@bad.test>", "RCPT TO:<carol@anywhere.test>", "QUIT")),
        (BANNER, HELLO, OK, BAD_SENDER, BYE),
        source="127.0.0.2",
    ),
    "a deny rule: closed without a word": Talk((GREET,), (), source="127.0.0.4"),
    "a rule sets DATABYTES": Talk(
        (
            GREET,
            say("EHLO client.test", FROM, TO, "DATA"),
            (sized(101), 1),
            say(FROM, TO, "DATA"),
            (sized(100), 1),
            say("QUIT"),
        ),
        (BANNER, *EHLO, OK, OK, GO, TOO_BIG, OK, OK, GO, QUEUED, BYE),
        source="127.0.0.5",
    ),
    "ours: MAIL SIZE= over a rule's DATABYTES is refused at MAIL": Talk(
        (GREET, say("EHLO client.test", "MAIL FROM:<a@client.test> SIZE=101", TO, "QUIT")),
        (BANNER, *EHLO, OK, OK, BYE),
        source="127.0.0.5",
        ours=(BANNER, *EHLO, TOO_BIG, MAIL_FIRST, BYE),
    ),
    "bare LF in DATA: 451 and the connection is closed": Talk(
        (GREET, say(HELO, FROM, TO, "DATA"), (b"Subject: x\r\n\r\nbody\n.\nQUIT\r\n", 1)),
        (BANNER, HELLO, OK, OK, GO, BARE_LF),
    ),
    "commands pipelined behind the end of data": Talk(
        (
            GREET,
            say(HELO, FROM, TO, "DATA"),
            (
                BODY + lines("MAIL FROM:<>", "RCPT TO:<dan@example.org>", "DATA") + b"two\r\n.\r\n",
                5,
            ),
            say("QUIT"),
        ),
        (BANNER, HELLO, OK, OK, GO, QUEUED, OK, OK, GO, QUEUED, BYE),
        envelopes=("Falice@client.test|Tbob@example.org", "F|Tdan@example.org"),
    ),
    "a message of 3 MB in one write": Talk(
        (GREET, say(HELO, FROM, TO, "DATA"), ((b"x" * 998 + b"\r\n") * 3000 + b".\r\n", 1)),
        (BANNER, HELLO, OK, OK, GO, QUEUED),
        hangs_up=True,
    ),
    "the client hangs up in DATA: nothing queued": Talk(
        (GREET, say(HELO, FROM, TO, "DATA"), (b"Subject: cut\r\n\r\nhalf a line", 0)),
        (BANNER, HELLO, OK, OK, GO),
        hangs_up=True,
    ),
    "the end of data split across writes": Talk(
        (
            GREET,
            say(HELO, FROM, TO, "DATA"),
            (b"line one\r", 0),
            (b"\n.", 0),
            (b"\r", 0),
            (b"\n", 1),
            say("QUIT"),
        ),
        (BANNER, *DELIVERED),
    ),
    "a command in pieces": Talk(
        (GREET, (b"HE", 0), (b"LO client.test\r", 0), (b"\nNO", 1), (b"OP\r\nQUIT\r\n", 2)),
        (BANNER, HELLO, OK, BYE),
    ),
}


def complete_replies(data: bytes) -> int:
    """How many whole replies (a line `NNN text`, after any `NNN-` lines) are in data."""
    return sum(1 for line in data.split(b"\r\n")[:-1] if line[3:4] != b"-")


class Client:
    """A raw SMTP client: what it writes, the bytes it got back, every read bounded."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.got = b""
        self.closed = False  # by the server

    def send(self, data: bytes) -> None:
        if data and not self.closed:
            try:
                self.conn.sendall(data)
            except OSError:
                self.closed = True

    def wait(self, replies: int) -> None:
        """Until `replies` more whole replies came, the server closed, or READ passed."""
        if not replies:
            time.sleep(SETTLE)
        want = complete_replies(self.got) + replies
        deadline = time.monotonic() + READ
        while not self.closed and complete_replies(self.got) < want and self._receive(deadline):
            pass

    def wait_for_close(self) -> None:
        deadline = time.monotonic() + READ
        while not self.closed and self._receive(deadline):
            pass

    def _receive(self, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        self.conn.settimeout(left)
        try:
            chunk = self.conn.recv(65536)
        except TimeoutError:
            return False
        except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            chunk = b""
        self.got += chunk
        self.closed = not chunk
        return True


def connect(port: int, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=READ, source_address=(source, 0))


def talk(listener: Listener, case: Talk) -> tuple[Client, Replies]:
    started = time.time()
    with connect(listener.port, case.source) as conn:
        client = Client(conn)
        for data, replies_wanted in case.turns:
            client.send(data)
            client.wait(replies_wanted)
        if not case.hangs_up:
            client.wait_for_close()
    return client, replies(client.got, started, time.time())


@dataclass(frozen=True)
class Listener:
    port: int
    home: Path  # qmail: the instance; ours: the root


def tcp_rules(etc: Path) -> None:
    """tcp.smtp and tcp.smtp.cdb, compiled by ucspi-tcp's tcprules."""
    etc.mkdir(exist_ok=True)
    (etc / "tcp.smtp").write_text(RULES)
    subprocess.run(
        ["tcprules", str(etc / "tcp.smtp.cdb"), str(etc / "tcp.smtp.tmp")],
        input=RULES.encode(),
        check=True,
        capture_output=True,
        timeout=TIMEOUT,
    )


def listening(
    argv: list[str], cwd: Path, env: dict[str, str], errors: Path, ready: bytes
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server; (its process, the port from its first line matching `ready`)."""
    with open(errors, "ab") as err:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
        )
    assert proc.stdout is not None
    line = read_line(proc.stdout, 30.0)
    m = re.fullmatch(ready, line)
    if not m:
        stop(proc)
        proc.stdout.close()
        raise AssertionError(f"{argv[0]} did not start: {line!r} {errors.read_bytes()!r}")
    return proc, int(m[1])


@contextlib.contextmanager
def qmail_under_tcpserver(
    base: Path, oracle: Path, control: Mapping[str, str | None]
) -> Iterator[Listener]:
    """qmail-smtpd under `tcpserver -x tcp.smtp.cdb`, on 127.0.0.1 and a port of
    the kernel's choosing (-1 prints it). -R -H: no ident or DNS look-ups;
    -l: the local name without DNS, control/me as our listener takes it."""
    if shutil.which("tcpserver") is None or shutil.which("tcprules") is None:
        pytest.skip("ucspi-tcp (tcpserver, tcprules) is not installed")
    inst = qmail_instance(base / "qmail", oracle, control)
    tcp_rules(inst)
    with contextlib.suppress(pytest.skip.Exception):
        make_certificate(inst / "control")  # qmail ignores it; ours offers STARTTLS
    argv = ["tcpserver", "-1", "-R", "-H", "-l", ME, "-x", "tcp.smtp.cdb", "127.0.0.1", "0"]
    proc, port = listening(
        [*argv, str(oracle / "qmail-smtpd")],
        inst,
        base_environment(base / "home"),
        base / "tcpserver.stderr",
        rb"(\d+)\n",
    )
    try:
        yield Listener(port, inst)
    finally:
        stop(proc)
        assert proc.stdout is not None
        proc.stdout.close()


@contextlib.contextmanager
def our_serve(base: Path, control: Mapping[str, str | None], qmail: Path) -> Iterator[Listener]:
    """`qmailtui serve` with the control files, rules in etc/tcp.smtp and
    certificate of the qmail instance `qmail`."""
    root = our_root(base / "ours", control, qmail)
    tcp_rules(root / "etc")
    pem = qmail / "control" / "servercert.pem"
    if pem.exists():
        shutil.copy(pem, root / "control" / "servercert.pem")
    proc, port = listening(
        [*CLI, "--root", str(root), "serve", "--smtp", "127.0.0.1:0", "--pop3", "off"],
        base,
        base_environment(base / "home"),
        base / "serve.stderr",
        rb"ready smtp=127\.0\.0\.1:(\d+) pop3=off\n",
    )
    try:
        yield Listener(port, root)
    finally:
        stop(proc)
        assert proc.stdout is not None
        proc.stdout.close()


@pytest.fixture(scope="module")
def qmail_listener(oracle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listener]:
    with qmail_under_tcpserver(tmp_path_factory.mktemp("listeners"), oracle, SOCKET_CONTROL) as q:
        yield q


@pytest.fixture(scope="module")
def our_listener(qmail_listener: Listener) -> Iterator[Listener]:
    with our_serve(qmail_listener.home.parent, SOCKET_CONTROL, qmail_listener.home) as ours:
        yield ours


def talk_to_qmail(case: Talk, qmail: Listener) -> tuple[Client, Replies, list[Stored]]:
    client, said = talk(qmail, case)
    return client, said, qmail_stored(qmail.home, said.qps)


def check_qmail_talk(
    name: str, case: Talk, client: Client, said: Replies, stored: list[Stored]
) -> None:
    """qmail-smtpd under tcpserver did what the case says it does."""
    assert said.lines == case.replies, f"{name}: qmail-smtpd said {client.got!r}"
    assert client.closed == (not case.hangs_up), f"{name}: closed? {client.got!r}"
    if case.envelopes is not None:
        assert tuple("|".join(s.envelope) for s in stored) == case.envelopes


def our_extensions(listener: Listener, source: str) -> tuple[str, bool]:
    """The SIZE keyword our EHLO lists for a client at `source`, and whether STARTTLS."""
    tls = (listener.home / "control" / "servercert.pem").exists()
    return size_keyword(SOCKET_DATABYTES.get(source, 0)), tls


@pytest.mark.parametrize("name", list(TALKS))
def test_qmail_smtpd_under_tcpserver_says_what_the_case_says(
    name: str, qmail_listener: Listener
) -> None:
    case = TALKS[name]
    check_qmail_talk(name, case, *talk_to_qmail(case, qmail_listener))


@pytest.mark.parametrize("name", list(TALKS))
def test_our_listener_does_what_qmail_smtpd_under_tcpserver_does(
    name: str, qmail_listener: Listener, our_listener: Listener
) -> None:
    case = TALKS[name]
    theirs, said, stored = talk_to_qmail(case, qmail_listener)
    check_qmail_talk(name, case, theirs, said, stored)

    before = message_ids(our_listener.home)
    ours, our_said = talk(our_listener, case)
    detail = f"{name}:\n qmail: {theirs.got!r}\n ours:  {ours.got!r}"
    plain = without_our_extensions(our_said.lines, *our_extensions(our_listener, case.source))
    assert plain == (case.ours if case.ours is not None else said.lines), detail
    assert ours.closed == theirs.closed, detail
    ids = sorted(message_ids(our_listener.home) - before)
    assert len(ids) == len(our_said.qps), f"{detail}\n queued: {ids}"
    if case.ours is None:
        compare_stored(detail, stored, our_stored(our_listener.home, ids))


def test_ours_starts_tls_and_drops_what_was_pipelined_in_the_clear(
    qmail_listener: Listener, our_listener: Listener
) -> None:
    """An intended difference: with control/servercert.pem our EHLO lists STARTTLS,
    which qmail-smtpd answers 502. After `220 ready to start TLS` and the
    handshake, a command sent in the clear behind STARTTLS is dropped, not run
    inside TLS (CVE-2011-0411), and EHLO no longer lists STARTTLS."""
    size, tls = our_extensions(our_listener, "127.0.0.1")
    if not tls:
        pytest.skip("no control/servercert.pem (openssl is needed to make one)")
    smuggled = "MAIL FROM:<smuggled@evil.test>"
    case = Talk(
        (GREET, say("EHLO client.test"), (lines("STARTTLS", smuggled), 1), say("QUIT")),
        (BANNER, *EHLO, UNIMPLEMENTED, OK, BYE),
    )
    theirs, said = talk(qmail_listener, case)
    assert said.lines == case.replies, theirs.got

    before = message_ids(our_listener.home)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    started = time.time()
    with connect(our_listener.port, "127.0.0.1") as conn:
        clear = Client(conn)
        clear.wait(1)
        clear.send(lines("EHLO client.test"))
        clear.wait(1)
        clear.send(lines("STARTTLS", smuggled))
        clear.wait(1)
        with context.wrap_socket(conn, server_hostname=ME) as secure:
            inside = Client(secure)
            for data, wanted in (say("EHLO client.test", FROM, TO, "DATA"), (BODY, 1)):
                inside.send(data)
                inside.wait(wanted)
            inside.send(lines("QUIT"))
            inside.wait_for_close()
    outside = replies(clear.got, started, time.time()).lines
    assert without_our_extensions(outside, size, tls=True) == (
        (BANNER, *EHLO, "220 ready to start TLS")
    ), clear.got
    within = replies(inside.got, started, time.time()).lines
    assert without_our_extensions(within, size) == (*EHLO, OK, OK, GO, QUEUED, BYE), inside.got
    ids = sorted(message_ids(our_listener.home) - before)
    [stored] = our_stored(our_listener.home, ids)
    assert stored.stored.envelope[0] == "Falice@client.test", stored.stored.envelope
    assert stored.stored.message == b"Subject: hi\n\nbody\n"
    assert stored.stored.received.endswith(f"by {ME} with ESMTPS; DATE\n".encode())


def test_an_idle_client_gets_451_timeout_from_both_listeners(tmp_path: Path, oracle: Path) -> None:
    """timeoutsmtpd: a client silent for that long gets `451 timeout (#4.4.2)`
    and the connection is closed. Both servers wait at once."""
    control = {**SOCKET_CONTROL, "timeoutsmtpd": "1\n"}
    with (
        qmail_under_tcpserver(tmp_path, oracle, control) as qmail,
        our_serve(tmp_path, control, qmail.home) as ours,
    ):
        started = time.time()
        with connect(qmail.port, "127.0.0.1") as c1, connect(ours.port, "127.0.0.1") as c2:
            clients = (Client(c1), Client(c2))
            for client in clients:
                client.wait(1)
                client.send(lines(HELO))
                client.wait(1)
            for client in clients:
                client.wait_for_close()
        theirs, our = (replies(c.got, started, time.time()).lines for c in clients)
        assert theirs == (BANNER, HELLO, TIMED_OUT), clients[0].got
        assert our == theirs, clients[1].got
        assert [c.closed for c in clients] == [True, True]
