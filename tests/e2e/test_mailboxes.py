"""What local delivery writes, read back by real mailbox readers (Python's mailbox)."""

from __future__ import annotations

import mailbox
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.paths import QmailRoot
from tests.e2e.conftest import Server, make_user, qmailtui

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
AS_ROOT = os.getuid() == 0


def own(path: Path) -> None:
    if AS_ROOT:
        os.chown(path, 65534, 65534)


def wait_until(predicate, limit: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_maildir_deliveries_read_back_with_mailbox_maildir(root: QmailRoot, server: Server) -> None:
    home = make_user(root, "alice")
    for i in range(5):
        body = f"Subject: number {i}\nX-Seq: {i}\n\nFrom the body {i}\n".encode()
        assert (
            qmailtui(
                "inject", "-f", "s@client.test", "alice@mx.example.org", root=root, stdin=body
            ).returncode
            == 0
        )
    box = mailbox.Maildir(str(home / "Maildir"), create=False)
    tmp = home / "Maildir/tmp"
    # A delivery's tmp/ name goes after the sync that makes its new/ link
    # durable: the last one's may still be there when the fifth is in new/.
    wait_until(lambda: len(box) == 5 and not list(tmp.iterdir()))
    seen = sorted(int(m["X-Seq"]) for m in box)
    assert seen == [0, 1, 2, 3, 4]
    for message in box:
        assert message["Return-Path"] == "<s@client.test>"
        assert message["Delivered-To"] == "alice@mx.example.org"
        assert message.get_payload() == f"From the body {message['X-Seq']}\n"  # never quoted
    assert not list((home / "Maildir/tmp").iterdir())


def test_concurrent_deliveries_to_one_mbox_never_interleave(
    root: QmailRoot, server: Server
) -> None:
    home = make_user(root, "bob")
    (home / ".qmail").write_text("./Mailbox\n")
    own(home / ".qmail")
    count = 30
    big = "line of text that makes each message long enough to take a while\n" * 2000
    for i in range(count):
        body = f"Subject: m{i}\nX-Seq: {i}\n\nFrom me\n{big}end {i}\n".encode()
        assert (
            qmailtui(
                "inject", "-f", "s@client.test", "bob@mx.example.org", root=root, stdin=body
            ).returncode
            == 0
        )
    server.wait_log(f"end msg {count}", limit=60)
    wait_until(lambda: server.log().count("success: did_1+0+0/") >= count, 60)
    box = mailbox.mbox(str(home / "Mailbox"), create=False)
    try:
        messages = list(box)
    finally:
        box.close()
    assert len(messages) == count
    for message in messages:
        seq = message["X-Seq"]
        payload = message.get_payload()
        assert payload.startswith(">From me\n")  # quoted on the way in, mboxrd
        assert payload.endswith(f"end {seq}\n\n") or payload.endswith(f"end {seq}\n")
        assert payload.count("line of text") == 2000
        assert message.get_from().startswith("s@client.test ")


def test_a_mailbox_locked_by_a_reader_defers_then_delivers(root: QmailRoot, server: Server) -> None:
    import fcntl

    home = make_user(root, "carol")
    (home / ".qmail").write_text("./Mailbox\n")
    own(home / ".qmail")
    fd = os.open(home / "Mailbox", os.O_WRONLY | os.O_CREAT, 0o600)
    own(home / "Mailbox")
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert (
            qmailtui(
                "inject", "carol@mx.example.org", root=root, stdin=b"Subject: wait\n\n"
            ).returncode
            == 0
        )
        time.sleep(2)
        assert (home / "Mailbox").stat().st_size == 0  # nothing half-written meanwhile
    finally:
        os.close(fd)
    server.wait_log("success: did_1+0+0/", limit=60)
    box = mailbox.mbox(str(home / "Mailbox"), create=False)
    try:
        assert len(box) == 1
    finally:
        box.close()


def test_a_full_disk_during_maildir_delivery_defers_and_leaves_nothing(tmp_path: Path) -> None:
    """qmail-local's interface (python -m core.local) with a file size limit: the
    write fails, the delivery is temporary, and no file is left in tmp/ or new/."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    maildir = home / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, mode=0o700)
    message = tmp_path / "msg"
    message.write_bytes(b"Subject: big\n\n" + b"x" * 200_000)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    with open(message, "rb") as stdin:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "core.local",
                "u",
                str(home),
                "u",
                "",
                "",
                "example.org",
                "s@client.test",
                "./Maildir/\n",
            ],
            stdin=stdin,
            capture_output=True,
            timeout=60,
            preexec_fn=limit,
            check=False,
            cwd=Path(__file__).resolve().parents[2],
        )
    assert done.returncode == 111, done
    assert done.stderr == b"Temporary error on maildir delivery. (#4.3.0)\n"
    assert not list((maildir / "tmp").iterdir())
    assert not list((maildir / "new").iterdir())
