"""POP3 end to end: `qmailtui serve --pop3` driven by poplib and fetchmail,
and the seed guide's chain (`qmail-popup HOST checkpassword qmail-pop3d
Maildir`) as `qmailtui popup`, `qmailtui checkpassword` and `qmailtui pop3d`
under the real tcpserver. Mail goes in over SMTP and comes out over POP3."""

from __future__ import annotations

import os
import poplib
import re
import shutil
import smtplib
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.paths import QmailRoot
from tests.processes import (
    CLI,
    add_maildir_user,
    maildir_files,
    qmailtui,
    tcpserver_port,
    wait_until,
)
from tests.processes import serving as running

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

PASSWORD = "correct horse"
LISTEN = ("--smtp", "127.0.0.1:0", "--pop3", "127.0.0.1:0")


@dataclass
class Core:
    smtp: int
    pop3: int


@contextmanager
def serving(root: QmailRoot, *extra: str) -> Iterator[Core]:
    """serve with SMTP and POP3 on free loopback ports (the later options win)."""
    with running(root, extra=(*LISTEN, *extra)) as proc:
        ports = proc.ports  # type: ignore[attr-defined]
        yield Core(ports["smtp"], ports["pop3"])


def alice(root: QmailRoot) -> Path:
    maildir = add_maildir_user(root, "alice")
    done = qmailtui(root, "passwd", "alice", "--stdin", stdin=f"{PASSWORD}\n".encode())
    assert done.returncode == 0, done.stderr
    return maildir


def send(port: int, body: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("bob@example.net", ["alice@mx.example.org"], body)


def test_a_message_in_over_smtp_comes_out_over_pop3_byte_for_byte(root: QmailRoot) -> None:
    maildir = alice(root)
    body = b"Subject: round trip\r\n\r\nfirst\r\n.dot line\r\n\r\nlast\r\n"
    with serving(root) as core:
        send(core.smtp, body)
        wait_until(lambda: len(maildir_files(maildir)) == 1, 20, "delivery to alice")
        time.sleep(1.1)  # qmail-pop3d lists only what is older than the current second
        [stored] = maildir_files(maildir)
        pop = poplib.POP3("127.0.0.1", core.pop3, timeout=30)
        assert pop.getwelcome().startswith(b"+OK <")
        pop.user("alice")
        pop.pass_(PASSWORD)
        count, size = pop.stat()
        assert (count, size) == (1, stored.stat().st_size)
        [uidl] = pop.uidl()[1]
        assert uidl == b"1 " + stored.name.split(":")[0].encode()
        _, lines, _ = pop.retr(1)
        # byte for byte (qmail-pop3d would add a blank line); poplib took the
        # dot-stuffing and the CRLFs off
        assert b"\n".join(lines) + b"\n" == stored.read_bytes()
        assert b"first\n.dot line\n\nlast\n" in stored.read_bytes()
        pop.dele(1)
        pop.quit()
        assert maildir_files(maildir) == []


def test_a_wrong_password_and_an_unknown_user_get_the_same_slow_answer(
    root: QmailRoot,
) -> None:
    alice(root)
    with serving(root) as core:
        answers = []
        for user, password in (("alice", "wrong"), ("nobody-here", PASSWORD)):
            pop = poplib.POP3("127.0.0.1", core.pop3, timeout=30)
            pop.user(user)
            started = time.monotonic()
            with pytest.raises(poplib.error_proto) as refused:
                pop.pass_(password)
            answers.append((refused.value.args[0], time.monotonic() - started))
            pop.close()
    assert [a for a, _ in answers] == [b"-ERR authorization failed"] * 2
    assert all(t >= 1.0 for _, t in answers), answers  # the second one waited longer
    assert answers[1][1] > answers[0][1]
    log = (root.log / "current").read_text()
    assert "wrong" not in log
    assert PASSWORD not in log


def test_fetchmail_downloads_the_mail_and_deletes_it(root: QmailRoot, tmp_path: Path) -> None:
    fetchmail = shutil.which("fetchmail")
    if fetchmail is None:
        pytest.skip("fetchmail is not installed (.ci/run installs the Debian package)")
    maildir = alice(root)
    with serving(root) as core:
        for n in range(3):
            send(core.smtp, b"Subject: fetch %d\r\n\r\nbody %d\r\n" % (n, n))
        wait_until(lambda: len(maildir_files(maildir)) == 3, 20, "three deliveries")
        time.sleep(1.1)  # qmail-pop3d lists only what is older than the current second
        rc = tmp_path / "fetchmailrc"
        out = tmp_path / "fetched"
        rc.write_text(
            f"poll 127.0.0.1 service {core.pop3} protocol pop3 auth password\n"
            f'  user "alice" password "{PASSWORD}" is root here\n'
            f"  mda \"/bin/sh -c 'cat >> {out}'\"\n"
        )
        rc.chmod(0o600)
        done = subprocess.run(
            [fetchmail, "-f", str(rc), "--nosslcertck", "-v", "--nokeep", "--nodetach"],
            capture_output=True,
            timeout=60,
            env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "FETCHMAILHOME": str(tmp_path)},
            check=False,
        )
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
        assert maildir_files(maildir) == []
    fetched = out.read_bytes()
    for n in range(3):
        assert b"Subject: fetch %d\n" % n in fetched
        assert b"body %d\n" % n in fetched


def test_a_tcp_pop3_rule_denies_an_address(root: QmailRoot) -> None:
    import socket

    alice(root)
    (root.etc / "tcp.pop3").write_text("127.0.0.1:deny\n:allow\n")
    with (
        serving(root) as core,
        socket.create_connection(("127.0.0.1", core.pop3), timeout=10) as raw,
    ):
        assert raw.recv(100) == b""  # closed without a word, as tcpserver does
    assert (root.etc / "tcp.pop3.cdb").exists()
    assert "tcpserver: deny 127.0.0.1 (pop3)" in (root.log / "current").read_text()


def test_the_seed_guides_chain_under_tcpserver(root: QmailRoot) -> None:
    """tcpserver ... qmailtui popup HOST qmailtui checkpassword qmailtui pop3d Maildir"""
    program = shutil.which("tcpserver")
    if program is None:
        pytest.skip("ucspi-tcp is not installed (.ci/run installs the Debian package)")
    maildir = alice(root)
    message = maildir / "new" / "1700000000.1.test"
    message.write_bytes(b"Subject: chain\n\n.hello\n")
    os.utime(message, (time.time() - 60, time.time() - 60))
    if root.path.stat().st_uid == 0:
        shutil.chown(message, 65534, 65534)
    chain = (
        *CLI,
        "popup",
        "pop.example.org",
        *CLI,
        "checkpassword",
        "--root",
        str(root.path),
        *CLI,
        "pop3d",
        "Maildir",
    )
    errors = root.path.parent / "tcpserver.stderr"
    argv = [program, "-1", "-HR", "-l", "pop.example.org", "127.0.0.1", "0", *chain]
    with tcpserver_port(argv, errors) as (_, port):
        pop = poplib.POP3("127.0.0.1", port, timeout=30)
        assert re.fullmatch(rb"\+OK <\d+\.\d+@pop\.example\.org>", pop.getwelcome())
        pop.user("alice")
        pop.pass_(PASSWORD)
        assert pop.stat() == (1, len(b"Subject: chain\n\n.hello\n"))
        _, lines, _ = pop.retr(1)
        assert lines[:3] == [b"Subject: chain", b"", b".hello"]
        pop.quit()
        # QUIT moved the message to cur/, as qmail-pop3d does
        assert [p.name for p in (maildir / "cur").iterdir()] == ["1700000000.1.test:2,"]


def test_a_second_session_on_the_same_maildir_is_refused(root: QmailRoot) -> None:
    maildir = alice(root)
    (maildir / "new" / "1700000000.2.test").write_bytes(b"Subject: once\n\nhi\n")
    os.utime(maildir / "new" / "1700000000.2.test", (time.time() - 60, time.time() - 60))
    with serving(root) as core:
        first = poplib.POP3("127.0.0.1", core.pop3, timeout=30)
        first.user("alice")
        first.pass_(PASSWORD)
        second = poplib.POP3("127.0.0.1", core.pop3, timeout=30)
        second.user("alice")
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            second.pass_(PASSWORD)
        second.close()
        first.dele(1)
        first.quit()
        third = poplib.POP3("127.0.0.1", core.pop3, timeout=30)  # the lock went with QUIT
        third.user("alice")
        third.pass_(PASSWORD)
        assert third.stat() == (0, 0)
        third.quit()


CHECKER = """\
import os, sys
user, password = os.read(3, 512).split(b"\\0")[:2]
if (user, password) != (b"carol", b"open sesame"):
    sys.exit(1)
home = {home!r}
if os.geteuid() == 0:
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
os.environ.update(USER="carol", HOME=home)
os.chdir(home)
os.execvp(sys.argv[1], sys.argv[1:])
"""


def test_an_external_checkpassword_program_decides(root: QmailRoot, tmp_path: Path) -> None:
    """serve --checkpassword PROG: fd 3 in, the program runs pop3d as the user."""
    import sys

    maildir = add_maildir_user(root, "carol")
    message = maildir / "new" / "1700000000.3.test"
    message.write_bytes(b"Subject: external\n\nvia checkpassword\n")
    os.utime(message, (time.time() - 60, time.time() - 60))
    if os.geteuid() == 0:
        shutil.chown(message, 65534, 65534)
    checker = tmp_path / "checker.py"
    checker.write_text(CHECKER.format(home=str(maildir.parent)))
    with serving(root, "--checkpassword", f"{sys.executable} {checker}") as core:
        pop = poplib.POP3("127.0.0.1", core.pop3, timeout=30)
        pop.user("carol")
        pop.pass_("open sesame")
        assert pop.stat() == (1, message.stat().st_size)
        pop.quit()
        refused = poplib.POP3("127.0.0.1", core.pop3, timeout=30)
        refused.user("carol")
        with pytest.raises(poplib.error_proto, match="authorization failed"):
            refused.pass_("wrong")
        refused.close()


def test_stls_then_login(root: QmailRoot) -> None:
    import ssl

    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("mx.example.org")
    pem = root.control_file("servercert.pem")
    pem.write_bytes(cert.private_key_and_cert_chain_pem.bytes())
    pem.chmod(0o600)
    alice(root)
    with serving(root) as core:
        pop = poplib.POP3("127.0.0.1", core.pop3, timeout=30)
        assert "STLS" in pop.capa()
        context = ssl.create_default_context()
        ca.configure_trust(context)
        context.check_hostname = False
        pop.stls(context)
        assert "STLS" not in pop.capa()
        pop.user("alice")
        pop.pass_(PASSWORD)
        assert pop.stat() == (0, 0)
        pop.quit()


def test_an_idle_client_is_dropped_after_timeoutpop3(root: QmailRoot) -> None:
    import socket

    maildir = alice(root)
    kept = maildir / "new" / "1700000000.4.test"
    kept.write_bytes(b"Subject: kept\n\nhi\n")
    os.utime(kept, (time.time() - 60, time.time() - 60))
    root.control_file("timeoutpop3").write_text("1\n")
    with serving(root) as core:
        with socket.create_connection(("127.0.0.1", core.pop3), timeout=10) as silent:
            assert silent.recv(100).startswith(b"+OK <")
            started = time.monotonic()
            assert silent.recv(100) == b""  # the popup phase: closed by the core
            assert time.monotonic() - started < 5
        pop = poplib.POP3("127.0.0.1", core.pop3, timeout=10)
        pop.user("alice")
        pop.pass_(PASSWORD)
        pop.dele(1)  # and then silence: pop3d gives up, nothing is deleted
        time.sleep(2.5)
        with pytest.raises((poplib.error_proto, EOFError, OSError)):
            pop.noop()
        pop.close()
    assert [p.name for p in maildir_files(maildir)] == ["1700000000.4.test"]


def test_a_session_runs_as_its_user_and_cannot_read_past_its_maildir(root: QmailRoot) -> None:
    """As root, pop3d runs as the user (nobody here): a symlink in the Maildir
    to a file only root may read cannot be retrieved."""
    if os.geteuid() != 0:
        pytest.skip("needs root: without it every session runs as the core's own user")
    maildir = alice(root)
    secret = root.path.parent / "secret"
    secret.write_bytes(b"Subject: root only\n\nsecret\n")
    secret.chmod(0o600)
    link = maildir / "cur" / "1700000000.5.test:2,"
    link.symlink_to(secret)
    os.utime(secret, (time.time() - 60, time.time() - 60))
    with serving(root) as core:
        pop = poplib.POP3("127.0.0.1", core.pop3, timeout=10)
        pop.user("alice")
        pop.pass_(PASSWORD)
        with pytest.raises(poplib.error_proto, match="unable to open that message"):
            pop.retr(1)
        pop.quit()


def test_malformed_input_gets_pop3_errors_and_the_session_goes_on(root: QmailRoot) -> None:
    import socket

    alice(root)
    with (
        serving(root) as core,
        socket.create_connection(("127.0.0.1", core.pop3), timeout=10) as raw,
    ):
        stream = raw.makefile("rb")
        assert stream.readline().startswith(b"+OK <")
        for line, reply in (
            (b"\r\n", b"-ERR authorization first\r\n"),
            (b"PASS early\r\n", b"-ERR USER first\r\n"),
            (b"USER\r\n", b"-ERR syntax error\r\n"),
            (b"RETR 1\r\n", b"-ERR authorization first\r\n"),
            (b"US\x00ER alice\r\n", b"-ERR authorization first\r\n"),
            (b"X" * 5000 + b"\r\n", b"-ERR line too long\r\n"),
            (b"\xff\xfe\r\n", b"-ERR authorization first\r\n"),
            (b"NOOP\r\n", b"+OK \r\n"),
        ):
            raw.sendall(line)
            assert stream.readline() == reply, line[:20]
        raw.sendall(b"QUIT\r\n")
        assert stream.readline() == b"+OK \r\n"
        assert stream.readline() == b""
        stream.close()
