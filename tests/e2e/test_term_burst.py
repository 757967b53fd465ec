"""TERM while mail pours in: every message that got its 250 is delivered,
once, after the core is started again; nothing acknowledged is lost."""

from __future__ import annotations

import re
import signal
import smtplib
import subprocess
import threading
import time

import pytest

from core.paths import QmailRoot
from tests.processes import (
    CLI,
    add_maildir_user,
    maildir_files,
    no_world,
    qmailtui,
    read_line,
    ready_ports,
    serve_options,
    serving,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SENDERS = 4


def test_term_during_a_burst_loses_nothing_that_was_accepted(root: QmailRoot) -> None:
    maildir = add_maildir_user(root, "alice")
    no_world(root)
    errors = root.path.parent / "serve.stderr"
    with open(errors, "ab") as err:
        proc = subprocess.Popen(
            [*CLI, "serve", "--root", str(root.path), *serve_options(), "--smtp", "127.0.0.1:0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
        )
    assert proc.stdout is not None
    ready = read_line(proc.stdout, 30).decode()
    assert ready.startswith("ready "), (ready, errors.read_text())
    port = ready_ports(ready)["smtp"]
    accepted: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def sender(n: int) -> None:
        for i in range(2000):  # bounded; TERM ends it much sooner
            if stop.is_set():
                return
            tag = f"burst-{n}-{i}"
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
                    client.sendmail(
                        "bob@example.net",
                        ["alice@mx.example.org"],
                        f"Subject: {tag}\r\n\r\n{tag}\r\n".encode(),
                    )
            except (smtplib.SMTPException, OSError):
                return  # refused or cut off: not acknowledged, so not promised
            with lock:
                accepted.append(tag)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(SENDERS)]
    for t in threads:
        t.start()
    wait_until(lambda: len(accepted) >= 40, 30, "forty messages accepted")
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(60) == 0, errors.read_text()
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        proc.stdout.close()
    assert len(accepted) >= 40
    with serving(root):  # a new core finishes what the old one left queued
        wait_until(
            lambda: len(maildir_files(maildir)) >= len(accepted), 60, "every accepted message"
        )
        wait_until(lambda: not qmailtui(root, "queue", "list").stdout.strip(), 30, "no queue")
    subjects = [
        re.search(rb"^Subject: (\S+)$", p.read_bytes(), re.M) for p in maildir_files(maildir)
    ]
    delivered = [m[1].decode() for m in subjects if m]
    assert sorted(set(accepted) - set(delivered)) == []  # nothing acknowledged was lost
    assert len(delivered) == len(set(delivered))  # and nothing came twice
    assert "status: exiting" in (root.log / "current").read_text()
    time.sleep(0)  # (the threads are joined; nothing left running)
