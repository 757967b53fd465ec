"""SMTP end to end: `qmailtui serve`, `qmailtui smtpd` under tcpserver and
`qmailtui smtpcheck`, driven by real clients (smtplib, swaks, raw sockets) on
127.0.0.1 port 0, with real files in tmp_path.

Each test starts the processes it needs (a core starts in a few tenths of a
second) and ends them by their pid. Mail for postmaster@, root@ and
mailer-daemon@ lands in ROOT/alias/Maildir, so that is where a delivered
message is read back; a bounce to a local sender lands there too.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from core.paths import QmailRoot
from tests import processes
from tests.e2e.conftest import qmailtui
from tests.processes import CLI, maildir_files, read_line, stop, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

HOST = "mx.example.org"
POSTMASTER = f"postmaster@{HOST}"
SENDER = "sender@client.test"
WAIT = 10.0  # seconds any one wait may take
MAX_READS = 1000  # reads of one reply, at most

# Replies that qmail-smtpd words this way (spec/smtpd.md), byte for byte.
GATEWAY = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
TOO_BIG = b"552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n"
STRAY_LF = b"451 See https://cr.yp.to/docs/smtplf.html.\r\n"
TIMEOUT = b"451 timeout (#4.4.2)\r\n"
OK = b"250 ok\r\n"
GO_AHEAD = b"354 go ahead\r\n"
RECEIVED = re.compile(
    rb"Received: \(qmail \d+ invoked from network\); [^\n]+\n"
    rb"Received: from unknown \(HELO client\.test\) \(127\.0\.0\.1\)\n"
    rb"  by mx\.example\.org with (E?SMTPS?); \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d -0000\n"
)


# -- the core ------------------------------------------------------------------


@dataclass
class Mta:
    """A running `qmailtui serve` and the port its SMTP listener got."""

    root: QmailRoot
    proc: subprocess.Popen[bytes]
    port: int

    def log(self) -> str:
        path = self.root.log / "current"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_log(self, text: str, count: int = 1) -> str:
        wait_until(
            lambda: self.log().count(text) >= count,
            WAIT,
            f"{text!r} logged {count} time(s):\n{self.log()}",
            step=0.02,
        )
        return self.log()

    def flushed(self) -> str:
        """The log with every line the core wrote before now: a HUP's reload
        line is written after them."""
        before = self.log().count("info: configuration reloaded")
        self.proc.send_signal(signal.SIGHUP)
        return self.wait_log("info: configuration reloaded", before + 1)

    def settled(self) -> str:
        """The log once every message queued so far has ended."""
        self.flushed()

        def done() -> bool:
            log = self.log()
            return log.count(" new msg ") == log.count(" end msg ")

        wait_until(done, WAIT, f"every message ended:\n{self.log()}", step=0.02)
        return self.log()


@contextlib.contextmanager
def serving(
    root: QmailRoot,
    *,
    listens: bool = True,
    resolver: str | None = None,
    workers: int | None = None,
) -> Iterator[Mta]:
    """`qmailtui --root ROOT serve --smtp 127.0.0.1:0 --pop3 off` for the block;
    `listens=False`: its ready line must say `smtp=off`; `workers`: its
    --smtp-workers (None: serve's default). Unless a test routes them itself,
    remote deliveries go to 127.0.0.1:1 and defer at once: a relayed message
    stays queued, and no test asks the world's DNS."""
    extra = ["--resolver", resolver] if resolver else []
    if workers is not None:
        extra += ["--smtp-workers", str(workers)]
    with processes.serving(root, extra=tuple(extra)) as proc:
        line = proc.ready_line  # type: ignore[attr-defined]
        ready = re.fullmatch(rb"ready smtp=(?:127\.0\.0\.1:(\d+)|off) pop3=off\n", line)
        if ready is None or (ready[1] is not None) != listens:
            errors = root.path.parent / "serve.stderr"
            raise AssertionError(f"serve said {line!r}:\n{errors.read_text(errors='replace')}")
        yield Mta(root, proc, int(ready[1] or 0))


@pytest.fixture(params=[0, 2], ids=["in-core", "2-workers"])
def mta(root: QmailRoot, request: pytest.FixtureRequest) -> Iterator[Mta]:
    """Sessions in the core, and in two worker processes: the same replies."""
    with serving(root, workers=request.param) as running:
        yield running


# -- clients -------------------------------------------------------------------


def _reply_end(data: bytes) -> int:
    """Where the first whole reply in `data` ends (0: not there yet)."""
    pos = 0
    while True:
        nl = data.find(b"\r\n", pos)
        if nl < 0:
            return 0
        line = data[pos:nl]
        pos = nl + 2
        if line[3:4] != b"-":
            return pos


class Raw:
    """A client socket reading whole SMTP replies; every read bounded in time."""

    def __init__(self, port: int, timeout: float = WAIT) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.timeout = timeout
        self.pending = b""

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv(self, deadline: float) -> bytes:
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            return self.sock.recv(65536)
        except ConnectionResetError:
            return b""

    def reply(self) -> bytes:
        """The next whole reply, all its lines as sent."""
        deadline = time.monotonic() + self.timeout
        for _ in range(MAX_READS):
            end = _reply_end(self.pending)
            if end:
                reply, self.pending = self.pending[:end], self.pending[end:]
                return reply
            chunk = self._recv(deadline)
            if not chunk:
                raise AssertionError(f"closed with no (whole) reply; got {self.pending!r}")
            self.pending += chunk
        raise AssertionError(f"no whole reply in {MAX_READS} reads: {self.pending[:200]!r}")

    def talk(self, command: bytes) -> bytes:
        self.send(command + b"\r\n")
        return self.reply()

    def assert_closed(self) -> None:
        """The server says nothing more and closes the connection."""
        chunk = self._recv(time.monotonic() + self.timeout)
        assert self.pending + chunk == b"", f"more after the end: {self.pending + chunk!r}"


@contextlib.contextmanager
def greeted(port: int) -> Iterator[Raw]:
    with Raw(port) as client:
        assert client.reply() == f"220 {HOST} ESMTP\r\n".encode()
        yield client


def keywords(ehlo: bytes) -> list[bytes]:
    """The EHLO reply's lines after the greeting: PIPELINING, SIZE 10..."""
    return [line[4:] for line in ehlo.split(b"\r\n")[1:] if line]


def smtp(port: int) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=WAIT)


def envelope(client: Raw, sender: str = SENDER, *rcpts: str) -> None:
    """EHLO, MAIL and RCPT, each answered 250, then DATA answered 354."""
    assert client.talk(b"EHLO client.test").startswith(b"250-")
    assert client.talk(f"MAIL FROM:<{sender}>".encode()) == OK
    for rcpt in rcpts or (POSTMASTER,):
        assert client.talk(f"RCPT TO:<{rcpt}>".encode()) == OK
    assert client.talk(b"DATA") == GO_AHEAD


# -- what is on disk -----------------------------------------------------------


def alias_maildir(root: QmailRoot) -> Path:
    return root.alias / "Maildir"


def delivered(root: QmailRoot, count: int) -> list[bytes]:
    """The messages in alias/Maildir, once there are at least `count`."""
    maildir = alias_maildir(root)
    wait_until(
        lambda: len(maildir_files(maildir)) >= count, WAIT, f"{count} message(s) in {maildir}"
    )
    return [path.read_bytes() for path in maildir_files(maildir)]


def delivered_to(message: bytes) -> str:
    found = re.search(rb"^Delivered-To: (\S+)$", message, re.MULTILINE)
    assert found, message
    return found[1].decode()


def where_stored(root: QmailRoot, marker: bytes) -> str | None:
    """Where a message holding `marker` is: the queue is looked at first, since
    a delivery writes the Maildir before the queue lets the message go."""
    for path in sorted((root.queue / "mess").glob("*/*")):
        with contextlib.suppress(OSError):
            if marker in path.read_bytes():
                return "queue"
    for path in maildir_files(alias_maildir(root)):
        if marker in path.read_bytes():
            return "maildir"
    return None


def queue_list(root: QmailRoot) -> list[dict[str, Any]]:
    done = qmailtui("queue", "list", "--json", root=root)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def new_messages(log: str) -> int:
    return log.count(" new msg ")


def write_rules(root: QmailRoot, text: str) -> None:
    root.tcp_smtp.parent.mkdir(exist_ok=True)
    root.tcp_smtp.write_text(text)


def compile_rules(root: QmailRoot) -> Path:
    """etc/tcp.smtp.cdb from etc/tcp.smtp, with ucspi-tcp's tcprules if it is
    there, else by starting a core (which compiles the rules on start)."""
    cdb = root.tcp_smtp.with_name("tcp.smtp.cdb")
    tcprules = shutil.which("tcprules")
    if tcprules is None:
        with serving(root):
            pass
    else:
        subprocess.run(
            [tcprules, str(cdb), f"{cdb}.tmp"],
            input=root.tcp_smtp.read_bytes(),
            check=True,
            capture_output=True,
            timeout=30,
        )
    assert cdb.exists()
    return cdb


# -- 1. smtplib ----------------------------------------------------------------


def test_a_local_message_is_on_disk_when_data_gets_250_then_in_the_maildir(
    root: QmailRoot, mta: Mta
) -> None:
    with smtp(mta.port) as client:
        client.ehlo()
        assert client.mail(SENDER) == (250, b"ok")
        assert client.rcpt(POSTMASTER) == (250, b"ok")
        code, text = client.data(b"Subject: first\r\n\r\nmarker-4711\r\n")
        where = where_stored(mta.root, b"marker-4711")  # right after the 250
    assert code == 250
    assert re.fullmatch(rb"ok \d+ qp \d+", text), text
    assert where in ("queue", "maildir")
    [message] = delivered(mta.root, 1)
    assert message.startswith(
        b"Return-Path: <sender@client.test>\nDelivered-To: postmaster@mx.example.org\n"
    )
    assert RECEIVED.search(message), message
    assert message.endswith(b"\nSubject: first\n\nmarker-4711\n")


def test_mail_for_a_maildir_is_delivered_before_the_250_and_never_queued(
    root: QmailRoot, mta: Mta
) -> None:
    """Direct delivery: the 250 comes once the message is durable in the
    Maildir, and the log tells its story as qmail-send's would."""
    with smtp(mta.port) as client:
        client.ehlo()
        client.mail(SENDER)
        client.rcpt(POSTMASTER)
        code, text = client.data(b"Subject: direct\r\n\r\nmarker-0815\r\n")
        files = maildir_files(alias_maildir(mta.root))  # right after the 250
        queued = list((mta.root.queue / "mess").glob("*/*"))
    assert code == 250
    qp = re.fullmatch(rb"ok \d+ qp (\d+)", text)
    assert qp, text
    assert [f.read_bytes().endswith(b"\nmarker-0815\n") for f in files] == [True]
    assert queued == []
    msgid = int(qp[1])
    size = len(files[0].read_bytes()) - len(
        f"Return-Path: <{SENDER}>\nDelivered-To: {POSTMASTER}\n"
    )
    log = mta.settled()
    lines = [line.split(" ", 1)[1] for line in log.splitlines()]
    story = [line for line in lines if f"msg {msgid}" in line or line.startswith("delivery ")]
    assert [re.sub(r"\d+:", "N:", line).split(" from ")[0] for line in story] == [
        f"new msg {msgid}",
        f"info msg N: bytes {size}",
        f"starting delivery N: msg {msgid} to local {POSTMASTER}",
        "delivery N: success: did_1+0+0/",
        f"end msg {msgid}",
    ]


def test_each_of_several_recipients_gets_the_message(root: QmailRoot, mta: Mta) -> None:
    rcpts = [POSTMASTER, f"root@{HOST}", f"mailer-daemon@{HOST}"]
    with smtp(mta.port) as client:
        assert client.sendmail(SENDER, rcpts, b"Subject: three\r\n\r\nfor three\r\n") == {}
    messages = delivered(mta.root, 3)
    assert sorted(delivered_to(m) for m in messages) == sorted(rcpts)
    assert all(m.endswith(b"\n\nfor three\n") for m in messages)
    log = mta.settled()
    assert new_messages(log) == 1  # one message, three deliveries


def test_rset_forgets_the_sender_and_the_recipients(root: QmailRoot, mta: Mta) -> None:
    with smtp(mta.port) as client:
        client.ehlo()
        assert client.mail("first@client.test") == (250, b"ok")
        assert client.rcpt(f"root@{HOST}") == (250, b"ok")
        assert client.rset() == (250, b"flushed")
        assert client.docmd("DATA") == (503, b"MAIL first (#5.5.1)")
        assert client.mail("second@client.test") == (250, b"ok")
        assert client.rcpt(POSTMASTER) == (250, b"ok")
        assert client.data(b"Subject: after rset\r\n\r\nonce\r\n")[0] == 250
    [message] = delivered(mta.root, 1)
    assert message.startswith(
        b"Return-Path: <second@client.test>\nDelivered-To: postmaster@mx.example.org\n"
    )
    log = mta.settled()
    assert new_messages(log) == 1
    assert log.count("starting delivery ") == 1
    assert f"root@{HOST}" not in log


def test_vrfy_says_252_whatever_the_address(mta: Mta) -> None:
    with smtp(mta.port) as client:
        client.ehlo()
        for who in ("postmaster", POSTMASTER, "nobody-at-all@other.test"):
            assert client.verify(who) == (252, b"send some mail, i'll try my best")


def test_pipelined_commands_in_one_write_get_their_replies_in_order(
    root: QmailRoot, mta: Mta
) -> None:
    with greeted(mta.port) as client:
        client.send(
            b"EHLO client.test\r\n"
            b"MAIL FROM:<sender@client.test>\r\n"
            b"RCPT TO:<postmaster@mx.example.org>\r\n"
            b"RCPT TO:<user@other.test>\r\n"
            b"RCPT TO:<root@mx.example.org>\r\n"
            b"DATA\r\n"
        )
        ehlo = client.reply()
        assert ehlo.startswith(b"250-mx.example.org\r\n")
        assert b"\r\n250-PIPELINING\r\n" in ehlo
        assert [client.reply() for _ in range(5)] == [OK, OK, GATEWAY, OK, GO_AHEAD]
        client.send(
            b"Subject: pipelined\r\n\r\nbody\r\n.\r\n"
            b"MAIL FROM:<>\r\n"
            b"RCPT TO:<postmaster@mx.example.org>\r\n"
            b"RSET\r\n"
            b"NOOP\r\n"
            b"QUIT\r\n"
        )
        assert re.fullmatch(rb"250 ok \d+ qp \d+\r\n", client.reply())
        replies = [client.reply() for _ in range(5)]
        assert replies == [OK, OK, b"250 flushed\r\n", OK, b"221 mx.example.org\r\n"]
        client.assert_closed()
    messages = delivered(root, 2)
    assert sorted(delivered_to(m) for m in messages) == [POSTMASTER, f"root@{HOST}"]
    assert new_messages(mta.settled()) == 1


# -- 2. swaks ------------------------------------------------------------------


def swaks(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    program = shutil.which("swaks")
    if program is None:
        pytest.skip("swaks is not installed (.ci/run installs the Debian package)")
    if "--tls" in args:
        support = subprocess.run(
            [program, "--support"], capture_output=True, text=True, timeout=30, check=False
        )
        if "TLS supported" not in support.stdout + support.stderr:
            pytest.skip(f"this swaks cannot do TLS: {support.stdout + support.stderr}")
    server = ("--server", f"127.0.0.1:{port}", "--ehlo", "client.test", "--timeout", "10")
    return subprocess.run(
        [program, *server, "--from", SENDER, "--to", POSTMASTER, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
        check=False,
    )


def test_swaks_delivers_a_message(root: QmailRoot, mta: Mta) -> None:
    done = swaks(mta.port, "--header", "Subject: by swaks", "--body", "swaks body")
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^<-  250 ok \d+ qp \d+$", done.stdout, re.MULTILINE), done.stdout
    [message] = delivered(root, 1)
    assert b"\nSubject: by swaks\n" in message
    assert b"\nswaks body\n" in message


def test_swaks_pipelining_sends_mail_rcpt_and_data_together(root: QmailRoot, mta: Mta) -> None:
    done = swaks(mta.port, "--pipeline", "--header", "Subject: swaks pipelined")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    mail = lines.index(f" -> MAIL FROM:<{SENDER}>")
    assert lines[mail + 1 : mail + 3] == [f" -> RCPT TO:<{POSTMASTER}>", " -> DATA"], done.stdout
    assert lines[mail + 3 : mail + 6] == ["<-  250 ok", "<-  250 ok", "<-  354 go ahead"]
    [message] = delivered(root, 1)
    assert b"\nSubject: swaks pipelined\n" in message


def _pem_with_cryptography(pem: Path) -> bool:
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        return False
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return True


@pytest.fixture(scope="session")
def servercert(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A self-signed P-256 certificate and its key in one PEM, as the qmail TLS
    patch keeps control/servercert.pem."""
    directory = tmp_path_factory.mktemp("tls")
    pem = directory / "servercert.pem"
    openssl = shutil.which("openssl")
    if openssl is not None:
        key, cert = directory / "key.pem", directory / "cert.pem"
        new_key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
        name = ("-subj", f"/CN={HOST}", "-addext", f"subjectAltName=DNS:{HOST}")
        files = ("-keyout", str(key), "-out", str(cert))
        subprocess.run(
            [openssl, "req", "-x509", *new_key, *name, "-days", "2", *files],
            check=True,
            capture_output=True,
            timeout=60,
            env={**os.environ, "HOME": str(directory), "RANDFILE": str(directory / ".rnd")},
        )
        pem.write_bytes(cert.read_bytes() + key.read_bytes())
    elif not _pem_with_cryptography(pem):
        pytest.skip("neither openssl nor Python's cryptography is installed: no certificate")
    return pem.read_bytes()


@pytest.fixture
def tls_mta(root: QmailRoot, servercert: bytes) -> Iterator[Mta]:
    pem = root.control_file("servercert.pem")
    pem.write_bytes(servercert)
    pem.chmod(0o600)
    with serving(root) as running:
        yield running


def test_swaks_starttls_delivers_and_the_received_line_says_esmtps(
    root: QmailRoot, tls_mta: Mta
) -> None:
    done = swaks(tls_mta.port, "--tls", "--header", "Subject: over tls")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "<-  220 ready to start TLS" in done.stdout
    assert "=== TLS started with cipher " in done.stdout, done.stdout
    [message] = delivered(root, 1)
    received = RECEIVED.search(message)
    assert received, message
    assert received[1] == b"ESMTPS"
    assert b"\nSubject: over tls\n" in message


def test_starttls_with_an_argument_gets_501_and_the_session_stays_plain(tls_mta: Mta) -> None:
    with greeted(tls_mta.port) as client:
        assert b"STARTTLS" in keywords(client.talk(b"EHLO client.test"))
        assert client.talk(b"STARTTLS now").startswith(b"501 ")
        assert client.talk(b"NOOP") == OK


def test_starttls_drops_commands_sent_with_it_in_the_clear(tls_mta: Mta) -> None:
    """CVE-2011-0411: what follows STARTTLS in the same write is never run."""
    with greeted(tls_mta.port) as client:
        assert b"STARTTLS" in keywords(client.talk(b"EHLO client.test"))
        client.send(b"STARTTLS\r\nMAIL FROM:<injected@client.test>\r\n")
        assert client.reply() == b"220 ready to start TLS\r\n"
        assert client.pending == b""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        client.sock = context.wrap_socket(client.sock, server_hostname=HOST)
        assert client.talk(b"RCPT TO:<postmaster@mx.example.org>") == b"503 MAIL first (#5.5.1)\r\n"
        ehlo = client.talk(b"EHLO client.test")
        assert ehlo.startswith(b"250-mx.example.org\r\n")
        assert b"STARTTLS" not in keywords(ehlo)
        assert client.talk(b"STARTTLS").startswith(b"503 ")
        assert client.talk(b"QUIT") == b"221 mx.example.org\r\n"


# -- 3. relaying ---------------------------------------------------------------


RELAY_TRICKS = [
    pytest.param("user%other.test@mx.example.org", False, id="percent"),
    pytest.param('"user@other.test"@mx.example.org', False, id="quoted-at"),
    pytest.param("other.test!user@mx.example.org", False, id="bang"),
    pytest.param("@mx.example.org:user@other.test", True, id="source-route"),
    pytest.param("user@other.test@mx.example.org", False, id="two-ats"),
    pytest.param("user@[127.0.0.1]", False, id="ip-literal"),
    pytest.param("user@other.test", True, id="plain"),
]


@pytest.mark.parametrize(("address", "must_refuse"), RELAY_TRICKS)
def test_no_address_trick_relays_without_relayclient(
    root: QmailRoot, mta: Mta, address: str, must_refuse: bool
) -> None:
    """Refused with 553, or taken as a local address that bounces here: a
    remote recipient is never queued (it would sit deferred in the queue)."""
    with greeted(mta.port) as client:
        assert client.talk(b"EHLO client.test").startswith(b"250-")
        assert client.talk(b"MAIL FROM:<postmaster@mx.example.org>") == OK
        reply = client.talk(f"RCPT TO:<{address}>".encode())
        if reply == GATEWAY:
            assert client.talk(b"DATA") == b"503 RCPT first (#5.5.1)\r\n"
        else:
            assert not must_refuse, reply
            assert reply == OK
            assert client.talk(b"DATA") == GO_AHEAD
            assert client.talk(b"Subject: relay?\r\n\r\ntrick\r\n.").startswith(b"250 ok ")
        assert client.talk(b"QUIT") == b"221 mx.example.org\r\n"
    if reply == GATEWAY:
        assert new_messages(mta.flushed()) == 0
        return
    [bounce] = delivered(root, 1)  # the sender is postmaster@ here: the bounce stays local
    assert b"Sorry, no mailbox here by that name." in bounce, bounce
    assert re.search(rb"\n<[^>\n]*@mx\.example\.org>:\n", bounce), bounce
    wait_until(lambda: queue_list(root) == [], WAIT, f"an empty queue: {queue_list(root)}")
    log = mta.settled()
    assert " to remote " not in log, log
    assert re.search(r"starting delivery \d+: msg \d+ to local .*@mx\.example\.org\n", log), log


@pytest.mark.parametrize(
    ("relayclient", "queued_as"),
    [("", "user@other.test"), ("@fixme", "user@other.test@fixme")],
    ids=["empty", "fixme"],
)
def test_a_relayclient_rule_lets_a_remote_recipient_in_with_its_value_appended(
    root: QmailRoot, relayclient: str, queued_as: str
) -> None:
    write_rules(root, f'127.0.0.1:allow,RELAYCLIENT="{relayclient}"\n')
    with serving(root) as running, smtp(running.port) as client:
        client.ehlo()
        assert client.mail(SENDER) == (250, b"ok")
        assert client.rcpt("user@other.test") == (250, b"ok")
        assert client.data(b"Subject: relayed\r\n\r\nout\r\n")[0] == 250
        [message] = queue_list(root)
    assert [(r["address"], r["channel"]) for r in message["recipients"]] == [(queued_as, "remote")]
    assert message["sender"] == SENDER


# -- 4. tcp rules --------------------------------------------------------------


def test_a_deny_rule_closes_the_connection_without_a_banner(root: QmailRoot) -> None:
    write_rules(root, "127.0.0.1:deny\n")
    with serving(root) as running:
        with Raw(running.port) as client:
            client.assert_closed()
        running.wait_log("tcpserver: deny 127.0.0.1")


def test_a_rules_databytes_refuses_a_bigger_message_with_552(root: QmailRoot) -> None:
    write_rules(root, '127.0.0.1:allow,DATABYTES="10"\n')
    with serving(root) as running:
        with greeted(running.port) as client:
            assert b"SIZE 10" in keywords(client.talk(b"EHLO client.test"))
            assert client.talk(b"MAIL FROM:<sender@client.test>") == OK
            assert client.talk(b"RCPT TO:<postmaster@mx.example.org>") == OK
            assert client.talk(b"DATA") == GO_AHEAD
            assert client.talk(b"0123456789\r\n.") == TOO_BIG  # 11 bytes stored
            assert client.talk(b"NOOP") == OK
            assert client.talk(b"QUIT") == b"221 mx.example.org\r\n"
        assert new_messages(running.flushed()) == 0
        assert queue_list(root) == []


def test_a_rules_syntax_error_at_start_keeps_the_old_cdb_and_is_logged(root: QmailRoot) -> None:
    write_rules(root, '127.0.0.1:allow,RELAYCLIENT=""\n')
    cdb = compile_rules(root)
    old = cdb.read_bytes()
    write_rules(root, '# office\n127.0.0.2:allow\n127.0.0.1:allow RELAYCLIENT=""\n')
    with serving(root) as running:
        log = running.wait_log("etc/tcp.smtp:3")
        assert re.search(r"alert: etc/tcp\.smtp:3: .*unable to parse this line", log), log
        assert cdb.read_bytes() == old
        with greeted(running.port) as client:
            assert client.talk(b"MAIL FROM:<sender@client.test>") == OK
            assert client.talk(b"RCPT TO:<user@other.test>") == OK  # the old rule still rules
            assert client.talk(b"QUIT") == b"221 mx.example.org\r\n"


def test_hup_applies_new_rules_to_new_connections(root: QmailRoot, mta: Mta) -> None:
    with greeted(mta.port) as client:
        assert client.talk(b"MAIL FROM:<sender@client.test>") == OK
        assert client.talk(b"RCPT TO:<user@other.test>") == GATEWAY
    write_rules(root, '127.0.0.1:allow,RELAYCLIENT=""\n')
    mta.flushed()  # HUP, and its reload is done
    with greeted(mta.port) as client:
        assert client.talk(b"MAIL FROM:<sender@client.test>") == OK
        assert client.talk(b"RCPT TO:<user@other.test>") == OK


def test_a_bad_rule_on_hup_keeps_the_old_cdb_and_is_logged(root: QmailRoot) -> None:
    write_rules(root, "127.0.0.1:deny\n")
    with serving(root) as running:
        cdb = root.tcp_smtp.with_name("tcp.smtp.cdb")
        old = cdb.read_bytes()
        write_rules(root, "127.0.0.2:allow\n127.0.0.1:allow,RELAYCLIENT\n")
        log = running.flushed()
        assert re.search(r"alert: etc/tcp\.smtp:2: .*unable to parse this line", log), log
        assert cdb.read_bytes() == old
        with Raw(running.port) as client:
            client.assert_closed()  # still denied by the old rules


def test_without_rcpthosts_serve_does_not_listen_for_smtp_and_says_why(root: QmailRoot) -> None:
    root.control_file("rcpthosts").unlink()
    with serving(root, listens=False) as running:
        running.wait_log("alert: control/rcpthosts is missing")
    assert running.proc.returncode == 0


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            socket_inode = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd))
            if socket_inode:
                inodes.add(socket_inode[1])
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux's /proc/net/tcp")
def test_once_rcpthosts_exists_a_reload_starts_the_smtp_listener(root: QmailRoot) -> None:
    """The alert says "not listening for SMTP until it exists": so once it
    exists and the core reloads, it listens."""
    rcpthosts = root.control_file("rcpthosts")
    rcpthosts.unlink()
    with serving(root, listens=False) as running:
        rcpthosts.write_text(f"{HOST}\n")
        running.flushed()  # HUP, and its reload is done
        pid = running.proc.pid
        wait_until(lambda: listening_ports(pid) != set(), 5, "an SMTP listener")
        [port] = listening_ports(pid)
        with greeted(port) as client:
            assert client.talk(b"QUIT") == b"221 mx.example.org\r\n"


def test_without_rcpthosts_smtpd_answers_421_and_exits_1(root: QmailRoot) -> None:
    root.control_file("rcpthosts").unlink()
    done = qmailtui("smtpd", root=root, stdin=b"QUIT\r\n", env={"TCPREMOTEIP": "127.0.0.1"})
    assert done.returncode == 1
    assert done.stdout == b"421 unable to read controls (#4.3.0)\r\n"
    assert b"control/rcpthosts" in done.stderr


# -- 5. smuggling --------------------------------------------------------------


def test_a_bare_lf_in_data_is_refused_and_the_connection_closed(root: QmailRoot, mta: Mta) -> None:
    with greeted(mta.port) as client:
        envelope(client)
        client.send(b"Subject: lf\r\n\r\nline one\nline two\r\n.\r\n")
        assert client.reply() == STRAY_LF
        client.assert_closed()
    assert new_messages(mta.flushed()) == 0
    assert queue_list(root) == []


SMUGGLED = (
    b"MAIL FROM:<smuggler@other.test>\r\n"
    b"RCPT TO:<root@mx.example.org>\r\n"
    b"DATA\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"smuggled text\r\n"
    b".\r\n"
)


@pytest.mark.parametrize(
    "fake_end",
    [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r"],
    ids=["LF.LF", "CR.CR", "LF.CRLF", "CRLF.LF", "CR.CRLF", "CRLF.CR"],
)
def test_a_fake_end_of_data_never_ends_the_message_nor_starts_another(
    root: QmailRoot, mta: Mta, fake_end: bytes
) -> None:
    """Only CR LF . CR LF ends DATA. A bare LF kills the session (451, nothing
    queued); without one, everything up to the real end is one message."""
    with greeted(mta.port) as client:
        envelope(client)
        client.send(b"Subject: carrier\r\n\r\ncarrier text" + fake_end + SMUGGLED + b"QUIT\r\n")
        first = client.reply()
        if b"\n" in fake_end.replace(b"\r\n", b""):
            assert first == STRAY_LF
            client.assert_closed()
        else:
            assert re.fullmatch(rb"250 ok \d+ qp \d+\r\n", first), first
            assert client.reply() == b"221 mx.example.org\r\n"  # the answer to QUIT, no other
            client.assert_closed()
    log = mta.settled()
    if b"\n" in fake_end.replace(b"\r\n", b""):
        assert new_messages(log) == 0
        assert maildir_files(alias_maildir(root)) == []
        return
    assert new_messages(log) == 1
    [message] = delivered(root, 1)
    assert b"Return-Path: <sender@client.test>\nDelivered-To: postmaster@mx.example.org\n" in (
        message
    )
    stored = b"carrier text" + fake_end.replace(b"\r\n", b"\n") + SMUGGLED.replace(b"\r\n", b"\n")
    assert message.endswith(b"\nSubject: carrier\n\n" + stored.removesuffix(b".\n")), message
    assert "smuggler" not in log


def test_a_bare_cr_in_data_is_stored_as_it_came(root: QmailRoot, mta: Mta) -> None:
    with greeted(mta.port) as client:
        envelope(client)
        reply = client.talk(b"Subject: cr\r\n\r\nbare\rcarriage\r\nend\r\n.")
        assert reply.startswith(b"250 ok "), reply
    [message] = delivered(root, 1)
    assert message.endswith(b"\nSubject: cr\n\nbare\rcarriage\nend\n")


# -- 6. databytes --------------------------------------------------------------

DATABYTES = 200


def sized(size: int) -> bytes:
    """A message as sent (CRLF lines) that is `size` bytes as stored (LF lines)."""
    head = b"Subject: size\r\n\r\n"  # stored with its two CRs less
    message = head + b"x" * (size - (len(head) - 2) - 1) + b"\r\n"
    assert len(message.replace(b"\r\n", b"\n")) == size
    return message


@pytest.fixture
def databytes_mta(root: QmailRoot) -> Iterator[Mta]:
    root.control_file("databytes").write_text(f"{DATABYTES}\n")
    with serving(root) as running:
        yield running


def test_databytes_takes_exactly_n_refuses_n_plus_1_and_the_session_goes_on(
    root: QmailRoot, databytes_mta: Mta
) -> None:
    with smtp(databytes_mta.port) as client:
        client.ehlo()
        assert client.esmtp_features["size"] == str(DATABYTES)
        assert client.mail(SENDER) == (250, b"ok")
        assert client.rcpt(POSTMASTER) == (250, b"ok")
        assert client.data(sized(DATABYTES + 1)) == (552, TOO_BIG[4:-2])
        assert client.noop() == (250, b"ok")
        assert client.mail(SENDER) == (250, b"ok")
        assert client.rcpt(POSTMASTER) == (250, b"ok")
        assert client.data(sized(DATABYTES))[0] == 250
    [message] = delivered(root, 1)
    assert message.endswith(sized(DATABYTES).replace(b"\r\n", b"\n"))
    assert new_messages(databytes_mta.settled()) == 1


def test_mail_with_a_size_over_databytes_gets_552(databytes_mta: Mta) -> None:
    with smtp(databytes_mta.port) as client:
        client.ehlo()
        assert client.mail(SENDER, [f"SIZE={DATABYTES + 1}"]) == (552, TOO_BIG[4:-2])
        assert client.rcpt(POSTMASTER) == (503, b"MAIL first (#5.5.1)")
        assert client.mail(SENDER, [f"SIZE={DATABYTES}"]) == (250, b"ok")


# -- 7. limits -----------------------------------------------------------------


def quit_then_admitted(client: Raw, port: int) -> None:
    """The client leaves; then a new connection is greeted, not refused."""
    assert client.talk(b"QUIT") == b"221 mx.example.org\r\n"
    client.assert_closed()

    def admitted() -> bool:
        with Raw(port) as again:
            return again.reply().startswith(b"220 ")

    wait_until(admitted, WAIT, "a new connection once one closed")


def test_a_third_connection_from_one_ip_gets_421_until_one_closes(root: QmailRoot) -> None:
    root.control_file("concurrencyperip").write_text("2\n")
    with serving(root) as running, greeted(running.port) as first, greeted(running.port):
        with Raw(running.port) as third:
            assert third.reply().startswith(b"421 ")
            third.assert_closed()
        quit_then_admitted(first, running.port)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_a_client_that_reconnects_at_once_is_never_counted_twice(
    root: QmailRoot, workers: int
) -> None:
    """With sessions in workers, the core hears that a session ended a moment
    after the client does: a client at its limit that quits and connects again
    at once must not get the 421 that its old session's count would give."""
    root.control_file("concurrencyperip").write_text("2\n")
    greetings: list[bytes] = []

    def churn() -> None:
        for _ in range(40):
            with Raw(running.port) as client:
                greeting = client.reply()
                greetings.append(greeting[:4])
                if greeting.startswith(b"220 "):
                    assert client.talk(b"QUIT").startswith(b"221 ")

    with (
        serving(root, workers=workers) as running,
        concurrent.futures.ThreadPoolExecutor(2) as pool,
    ):
        for done in [pool.submit(churn) for _ in range(2)]:
            done.result(timeout=60)
    assert greetings.count(b"220 ") == 80, sorted(set(greetings))


def test_an_idle_client_is_timed_out_with_451(root: QmailRoot) -> None:
    root.control_file("timeoutsmtpd").write_text("1\n")
    with serving(root) as running, greeted(running.port) as client:
        assert client.talk(b"EHLO client.test").startswith(b"250-")
        started = time.monotonic()
        assert client.reply() == TIMEOUT
        assert time.monotonic() - started > 0.8
        client.assert_closed()


def test_a_client_that_keeps_talking_is_not_timed_out(root: QmailRoot) -> None:
    root.control_file("timeoutsmtpd").write_text("1\n")
    with serving(root) as running, greeted(running.port) as client:
        for _ in range(3):  # 1.8 s in all, each pause well under the 1 s timeout
            time.sleep(0.6)
            assert client.talk(b"NOOP") == OK


def test_a_connection_over_concurrencyincoming_gets_421(root: QmailRoot) -> None:
    root.control_file("concurrencyincoming").write_text("1\n")
    with serving(root) as running, greeted(running.port), Raw(running.port) as second:
        assert second.reply().startswith(b"421 ")
        second.assert_closed()


# -- 8. TERM -------------------------------------------------------------------


def test_term_says_421_to_an_idle_client_exits_0_and_keeps_the_accepted_message(
    root: QmailRoot,
) -> None:
    with serving(root) as running:
        with greeted(running.port) as client:
            envelope(client)
            assert client.talk(b"Subject: before term\r\n\r\nkept\r\n.").startswith(b"250 ok ")
            running.proc.send_signal(signal.SIGTERM)
            assert client.reply() == b"421 mx.example.org closing connection\r\n"
            client.assert_closed()
        assert running.proc.wait(20) == 0
    in_queue = [m for m in queue_list(root) if m["sender"] == SENDER]
    in_maildir = [m for m in maildir_files(alias_maildir(root)) if b"\nkept\n" in m.read_bytes()]
    assert len(in_queue) + len(in_maildir) == 1, (in_queue, in_maildir)


# -- 9. sessions in worker processes ---------------------------------------------


def smtp_workers(serve_pid: int) -> list[int]:
    """The pids of a core's SMTP worker processes."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(b")", 1)[1].split()[1])
        if ppid == serve_pid and b"core.smtpworker" in cmdline:
            found.append(int(entry))
    return sorted(found)


def test_the_connection_limits_count_across_workers(root: QmailRoot) -> None:
    """The core counts every worker's clients: tcpserver's -c is one number."""
    root.control_file("concurrencyincoming").write_text("3\n")
    with serving(root, workers=2) as running:
        assert len(smtp_workers(running.proc.pid)) == 2
        with greeted(running.port) as first, greeted(running.port), greeted(running.port):
            with Raw(running.port) as fourth:
                assert fourth.reply() == b"421 too many connections, try again later (#4.3.2)\r\n"
                fourth.assert_closed()
            quit_then_admitted(first, running.port)


@pytest.mark.parametrize("workers", [0, 2], ids=["in-core", "2-workers"])
def test_the_snapshot_shows_the_listeners_sessions_against_their_limits(
    root: QmailRoot, workers: int
) -> None:
    """What a console shows of the SMTP listener: sessions, limits, who holds
    them, and how many were turned away; with workers, each one's share."""
    root.control_file("concurrencyincoming").write_text("3\n")
    with serving(root, workers=workers) as running:
        with greeted(running.port), greeted(running.port), greeted(running.port):
            with Raw(running.port) as fourth:
                assert fourth.reply().startswith(b"421 ")
                fourth.assert_closed()
            done = qmailtui("snapshot", root=root)
            assert done.returncode == 0, done.stderr
            listeners = json.loads(done.stdout)["listeners"]
        assert listeners["pop3"] is None  # --pop3 off
        smtp_status = listeners["smtp"]
        assert smtp_status["address"] == f"127.0.0.1:{running.port}"
        assert (smtp_status["sessions"], smtp_status["max"]) == (3, 3)
        assert (smtp_status["accepted"], smtp_status["refused"]) == (3, 1)
        assert smtp_status["busiest"] == [{"ip": "127.0.0.1", "sessions": 3}]
        if workers:
            shares = smtp_status["workers"]
            assert sorted(w["pid"] for w in shares) == smtp_workers(running.proc.pid)
            assert sum(w["sessions"] for w in shares) == 3
        else:
            assert "workers" not in smtp_status


def test_a_worker_that_dies_is_replaced_and_its_clients_are_counted_out(
    root: QmailRoot,
) -> None:
    root.control_file("concurrencyincoming").write_text("1\n")
    with serving(root, workers=1) as running:
        [worker] = smtp_workers(running.proc.pid)
        with greeted(running.port) as client:
            envelope(client)
            client.send(b"Subject: half\r\n\r\nnever finished\r\n")
            os.kill(worker, signal.SIGKILL)
            client.assert_closed()
        running.wait_log(f"alert: SMTP worker {worker} exited with status -9; starting another")
        running.wait_log(f"started in place of {worker}")
        assert len(smtp_workers(running.proc.pid)) == 1
        with smtp(running.port) as again:  # the limit of 1 is free again
            again.sendmail(SENDER, [POSTMASTER], b"Subject: after\r\n\r\nqueued\r\n")
        bodies = delivered(root, 1)
        assert b"\nqueued\n" in bodies[0]
        assert not any(b"never finished" in b for b in bodies)


def test_term_to_the_whole_process_group_still_says_421_and_keeps_the_message(
    root: QmailRoot,
) -> None:
    """A supervisor (systemd's control-group kill, a Ctrl-C) signals every
    process: the workers leave the stopping to the core, so their clients get
    the core's 421 instead of a dropped connection."""
    with serving(root, workers=2) as running:
        workers = smtp_workers(running.proc.pid)
        assert len(workers) == 2
        with greeted(running.port) as sent, greeted(running.port) as idle:
            envelope(sent)
            assert sent.talk(b"Subject: before term\r\n\r\nkept\r\n.").startswith(b"250 ok ")
            os.killpg(running.proc.pid, signal.SIGTERM)
            for client in (sent, idle):
                assert client.reply() == b"421 mx.example.org closing connection\r\n"
                client.assert_closed()
        assert running.proc.wait(20) == 0
        assert "exited with status" not in running.log(), running.log()
    wait_until(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), WAIT, "workers gone"
    )
    in_queue = [m for m in queue_list(root) if m["sender"] == SENDER]
    in_maildir = [m for m in maildir_files(alias_maildir(root)) if b"\nkept\n" in m.read_bytes()]
    assert len(in_queue) + len(in_maildir) == 1, (in_queue, in_maildir)


def process_ids(pid: int) -> tuple[list[int], list[int], str]:
    """(real, effective, saved, fs uids), the same for gids, and the groups."""
    status = Path(f"/proc/{pid}/status").read_text()
    uids = [int(x) for x in re.search(r"^Uid:\s+(.*)$", status, re.M)[1].split()]  # type: ignore[index]
    gids = [int(x) for x in re.search(r"^Gid:\s+(.*)$", status, re.M)[1].split()]  # type: ignore[index]
    groups = re.search(r"^Groups:[ \t]*(.*)$", status, re.M)[1].strip()  # type: ignore[index]
    return uids, gids, groups


@pytest.mark.skipif(os.geteuid() != 0, reason="only a core run as root changes users")
def test_workers_of_a_root_core_run_unprivileged_and_still_do_starttls(
    root: QmailRoot, servercert: bytes
) -> None:
    """As qmail-smtpd under qmaild: no session parses network input as root,
    and the certificate the worker cannot read comes from the core."""
    pem = root.control_file("servercert.pem")
    pem.write_bytes(servercert)
    pem.chmod(0o600)
    with serving(root, workers=2) as running:
        workers = smtp_workers(running.proc.pid)
        assert len(workers) == 2
        for pid in workers:
            uids, gids, groups = process_ids(pid)
            assert 0 not in uids, uids
            assert 0 not in gids, gids
            assert len(set(uids)) == 1, uids
            assert len(set(gids)) == 1, gids
            assert groups == ""
        for _ in range(2):  # both workers
            done = swaks(running.port, "--tls", "--header", "Subject: tls as nobody")
            assert done.returncode == 0, done.stdout + done.stderr
            assert "=== TLS started with cipher " in done.stdout, done.stdout


def test_hup_reaches_the_workers(root: QmailRoot) -> None:
    with serving(root, workers=2) as running:
        root.control_file("smtpgreeting").write_text("changed.example greets you\n")
        running.flushed()  # HUP, and the core has reloaded
        for _ in range(4):  # connections go to both workers
            with Raw(running.port) as client:
                assert client.reply() == b"220 changed.example greets you ESMTP\r\n"


# -- 10. qmailtui smtpd under tcpserver -----------------------------------------


def qmailtui_command() -> list[str]:
    """The installed `qmailtui` beside this interpreter, else its module."""
    script = Path(sys.executable).parent / "qmailtui"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return list(CLI)


@dataclass
class TcpServer:
    proc: subprocess.Popen[bytes]
    port: int
    errors: Path

    def ends(self) -> list[str]:
        """tcpserver -v's `end PID status S` lines so far."""
        return re.findall(r"^tcpserver: end \d+ status (\d+)$", self.errors.read_text(), re.M)


@contextlib.contextmanager
def tcpserver(root: QmailRoot, rules: str) -> Iterator[TcpServer]:
    program = shutil.which("tcpserver")
    if program is None or shutil.which("tcprules") is None:
        pytest.skip("ucspi-tcp is not installed (.ci/run installs the Debian package)")
    write_rules(root, rules)
    cdb = compile_rules(root)
    errors = root.path.parent / "tcpserver.stderr"
    # -1: print the port; -v: log each child's exit status; -HR: no DNS, no ident
    options = ("-1", "-v", "-HR", "-l", HOST, "-c", "10", "-x", str(cdb))
    smtpd = (*qmailtui_command(), "--root", str(root.path), "smtpd")
    argv = [program, *options, "127.0.0.1", "0", *smtpd]
    with processes.tcpserver_port(argv, errors) as (proc, port):
        yield TcpServer(proc, port, errors)


def test_smtpd_under_tcpserver_queues_with_the_rules_relayclient(root: QmailRoot) -> None:
    with tcpserver(root, '127.0.0.1:allow,RELAYCLIENT="@fixme"\n') as server:
        with smtp(server.port) as client:
            code, banner = client.ehlo()
            assert code == 250
            assert banner.startswith(b"mx.example.org\n")
            assert client.mail(SENDER) == (250, b"ok")
            assert client.rcpt("user@other.test") == (250, b"ok")
            assert client.data(b"Subject: via tcpserver\r\n\r\nqueued\r\n")[0] == 250
        wait_until(lambda: server.ends() == ["0"], WAIT, "smtpd exits 0 after QUIT")
    [todo] = sorted((root.queue / "todo").iterdir())
    env = todo.read_bytes()
    assert b"\0Tuser@other.test@fixme\0" in env, env
    assert f"\0F{SENDER}\0".encode() in env, env
    [mess] = [p for p in (root.queue / "mess").glob("*/*") if p.name == todo.name]
    text = mess.read_bytes()
    assert RECEIVED.search(text), text
    assert text.endswith(b"\nSubject: via tcpserver\n\nqueued\n")


def test_smtpd_under_tcpserver_offers_starttls_with_servercert(
    root: QmailRoot, servercert: bytes
) -> None:
    """As the qmail TLS patch under tcpserver: STARTTLS over fds 0 and 1, the
    session starts over inside TLS, and the Received line says ESMTPS."""
    pem = root.control_file("servercert.pem")
    pem.write_bytes(servercert)
    pem.chmod(0o600)
    with tcpserver(root, ":allow\n") as server:
        done = swaks(server.port, "--tls", "--header", "Subject: tls via tcpserver")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "<-  250 STARTTLS" in done.stdout, done.stdout
        assert "=== TLS started with cipher " in done.stdout, done.stdout
        wait_until(lambda: server.ends() == ["0"], WAIT, "smtpd exits 0 after QUIT")
    [mess] = list((root.queue / "mess").glob("*/*"))
    text = mess.read_bytes()
    received = RECEIVED.search(text)
    assert received, text
    assert received[1] == b"ESMTPS"
    assert b"\nSubject: tls via tcpserver\n" in text


def test_smtpd_under_tcpserver_exits_1_when_the_client_just_goes(root: QmailRoot) -> None:
    with tcpserver(root, ":allow\n") as server:
        with Raw(server.port) as client:
            assert client.reply() == b"220 mx.example.org ESMTP\r\n"
            assert client.talk(b"HELO client.test") == b"250 mx.example.org\r\n"
        wait_until(lambda: server.ends() == ["256"], WAIT, "smtpd exits 1 on EOF")


def test_smtpd_under_tcpserver_with_a_core_running_is_delivered_at_once(root: QmailRoot) -> None:
    with serving(root), tcpserver(root, ":allow\n") as server:
        with smtp(server.port) as client:
            assert client.sendmail(SENDER, [POSTMASTER], b"Subject: woken\r\n\r\nnow\r\n") == {}
        [message] = delivered(root, 1)
    assert message.endswith(b"\nSubject: woken\n\nnow\n")


def test_smtpd_exits_0_after_quit_and_1_at_end_of_input(root: QmailRoot) -> None:
    env = {"TCPREMOTEIP": "127.0.0.1", "TCPLOCALHOST": HOST}
    done = qmailtui("smtpd", root=root, stdin=b"HELO client.test\r\nQUIT\r\n", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        b"220 mx.example.org ESMTP\r\n250 mx.example.org\r\n221 mx.example.org\r\n"
    )
    done = qmailtui("smtpd", root=root, stdin=b"HELO client.test\r\n", env=env)
    assert done.returncode == 1, done.stderr
    assert done.stdout == b"220 mx.example.org ESMTP\r\n250 mx.example.org\r\n"


def test_smtpd_times_out_an_idle_client_with_451_and_exits_1(root: QmailRoot) -> None:
    root.control_file("timeoutsmtpd").write_text("1\n")
    proc = subprocess.Popen(
        [*CLI, "--root", str(root.path), "smtpd"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        assert read_line(proc.stdout, WAIT) == b"220 mx.example.org ESMTP\r\n"
        assert read_line(proc.stdout, WAIT) == TIMEOUT
        assert proc.wait(WAIT) == 1
    finally:
        try:
            stop(proc)
        finally:
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()


# -- 11. qmailtui smtpcheck ----------------------------------------------------


@pytest.fixture(params=[False, True], ids=["no-core", "core"])
def checked_root(request: pytest.FixtureRequest, root: QmailRoot) -> Iterator[QmailRoot]:
    """Rules, rcpthosts and badmailfrom with known line numbers; a core running
    or not (with one, smtpcheck must ask it: the root is locked)."""
    root.control_file("rcpthosts").write_text(f"{HOST}\n.example.net\n")
    root.control_file("badmailfrom").write_text("# spammers\nspammer@bad.test\n@evil.test\n")
    write_rules(root, '# the office\n127.0.0.2:allow,RELAYCLIENT=""\n127.0.0.3:deny\n:allow\n')
    compile_rules(root)
    if request.param:
        with serving(root):
            yield root
    else:
        yield root


def smtpcheck(root: QmailRoot, *args: str) -> str:
    done = qmailtui("smtpcheck", *args, root=root)
    assert done.returncode == 0, done.stderr
    assert done.stderr == b""
    return done.stdout.decode()


def test_smtpcheck_names_the_rcpthosts_lines(checked_root: QmailRoot) -> None:
    rcpts = (POSTMASTER, "user@a.example.net", "user@other.test")
    out = smtpcheck(
        checked_root, "127.0.0.1", "--helo", "client.test", "--from", SENDER, "--to", *rcpts
    )
    assert "etc/tcp.smtp:4" in out  # the catch-all `:allow`
    assert "control/rcpthosts:1" in out
    assert "control/rcpthosts:2" in out
    assert "553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)" in out
    assert "2 of 3" in out


def test_smtpcheck_names_the_relayclient_rule(checked_root: QmailRoot) -> None:
    out = smtpcheck(checked_root, "127.0.0.2", "--from", SENDER, "--to", "user@other.test")
    assert "etc/tcp.smtp:2" in out
    assert "RELAYCLIENT" in out
    assert "1 of 1" in out


def test_smtpcheck_names_the_deny_rule(checked_root: QmailRoot) -> None:
    out = smtpcheck(checked_root, "127.0.0.3", "--from", SENDER, "--to", POSTMASTER)
    assert "etc/tcp.smtp:3" in out
    assert "deny" in out


def test_smtpcheck_names_the_badmailfrom_line(checked_root: QmailRoot) -> None:
    out = smtpcheck(checked_root, "127.0.0.1", "--from", "spammer@bad.test", "--to", POSTMASTER)
    assert "control/badmailfrom:2" in out
    assert "553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)" in out
    out = smtpcheck(checked_root, "127.0.0.1", "--from", "anyone@evil.test", "--to", POSTMASTER)
    assert "control/badmailfrom:3" in out


def test_smtpcheck_json_parses(checked_root: QmailRoot) -> None:
    out = smtpcheck(
        checked_root, "127.0.0.2", "--from", SENDER, "--to", "user@other.test", "--json"
    )
    result = json.loads(out)
    assert result["ip"] == "127.0.0.2"
    replies = {r["command"]: r["reply"] for r in result["replies"]}
    assert replies["RCPT TO:<user@other.test>"] == "250 ok"
    assert {"file": "etc/tcp.smtp", "line": 2} in [
        {"file": s["file"], "line": s["line"]} for s in result["steps"]
    ]


def test_sendmail_bs_is_a_trusted_local_session(root: QmailRoot) -> None:
    """qmail's `sendmail -bs`: qmail-smtpd with RELAYCLIENT set, so a remote
    recipient is accepted; the Received line names the sendmail-bs client."""
    from tests.processes import sendmail_command

    env = {k: v for k, v in os.environ.items() if k not in ("PROTO", "RELAYCLIENT")}
    conversation = (
        b"HELO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<user@far.test>\r\n"
        b"DATA\r\nSubject: bs\r\n\r\nhello\r\n.\r\nQUIT\r\n"
    )
    done = subprocess.run(
        [*sendmail_command(), "--root", str(root.path), "-bs"],
        input=conversation,
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    replies = done.stdout.decode().splitlines()
    assert replies[3] == "250 ok"  # the remote recipient: relaying is allowed here
    assert re.fullmatch(r"250 ok \d+ qp \d+", replies[5]), replies
    [todo] = sorted((root.queue / "todo").iterdir())
    assert b"\0Tuser@far.test\0" in todo.read_bytes()
    [mess] = [p for p in (root.queue / "mess").glob("*/*") if p.name == todo.name]
    assert b"Received: from localhost (HELO client.test) (sendmail-bs@127.0.0.1)\n" in (
        mess.read_bytes()
    )


def test_a_host_rule_looks_the_client_up_in_dns_as_tcpserver_does(root: QmailRoot) -> None:
    """`=.example.net:allow,RELAYCLIENT=""`: the listener finds the client's
    name (PTR, from a DNS server on loopback), the rule matches it, a remote
    recipient is accepted, and the Received line names the host."""
    from tests.dnsserver import dns_server

    write_rules(root, '=.example.net:allow,RELAYCLIENT=""\n:allow\n')
    records = {("1.0.0.127.in-addr.arpa", "PTR"): ["client.example.net."]}
    with dns_server(records) as dns, serving(root, resolver=dns.address) as running:
        with smtp(running.port) as client:
            client.ehlo("helo.test")
            assert client.mail(SENDER) == (250, b"ok")
            assert client.rcpt("user@far.test") == (250, b"ok")
            assert client.data(b"Subject: by name\r\n\r\nhi\r\n")[0] == 250
        assert ("1.0.0.127.in-addr.arpa", "PTR") in dns.asked
        text = smtpcheck(root, "127.0.0.1", "--from", SENDER, "--to", "user@far.test")
        assert "etc/tcp.smtp:1" in text, text
        assert "its name is client.example.net" in text, text
    queued = [p for p in (root.queue / "mess").glob("*/*")]
    assert any(
        b"Received: from client.example.net (HELO helo.test)" in p.read_bytes() for p in queued
    )


def test_without_a_name_a_host_rule_does_not_match(root: QmailRoot) -> None:
    from tests.dnsserver import dns_server

    write_rules(root, '=.example.net:allow,RELAYCLIENT=""\n:allow\n')
    with (
        dns_server({}) as dns,
        serving(root, resolver=dns.address) as running,
        smtp(running.port) as client,
    ):
        client.ehlo("helo.test")
        assert client.mail(SENDER) == (250, b"ok")
        code, _ = client.rcpt("user@far.test")
        assert code == 553
