"""TERM or KILL while mail pours in: every message that got its 250 is
delivered after the core is started again (once, after a TERM); nothing
acknowledged is lost, whether it was queued or delivered before its 250."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import smtplib
import subprocess
import threading
from pathlib import Path

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


def _start(root: QmailRoot) -> tuple[subprocess.Popen[bytes], int]:
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
    return proc, ready_ports(ready)["smtp"]


class Burst:
    """SENDERS clients sending one message per connection until stopped;
    `accepted` holds the tags of the messages that got their 250."""

    def __init__(self, port: int) -> None:
        self.accepted: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._send, args=(port, n)) for n in range(SENDERS)
        ]
        for t in self._threads:
            t.start()

    def _send(self, port: int, n: int) -> None:
        for i in range(2000):  # bounded; the signal ends it much sooner
            if self._stop.is_set():
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
            with self._lock:
                self.accepted.append(tag)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def delivered_tags(maildir: Path) -> list[str]:
    subjects = [
        re.search(rb"^Subject: (\S+)$", p.read_bytes(), re.M) for p in maildir_files(maildir)
    ]
    return [m[1].decode() for m in subjects if m]


def test_term_during_a_burst_loses_nothing_that_was_accepted(root: QmailRoot) -> None:
    maildir = add_maildir_user(root, "alice")
    no_world(root)
    proc, port = _start(root)
    burst = Burst(port)
    wait_until(lambda: len(burst.accepted) >= 40, 30, "forty messages accepted")
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(60) == 0
    finally:
        burst.stop()
        assert proc.stdout is not None
        proc.stdout.close()
    accepted = burst.accepted
    assert len(accepted) >= 40
    with serving(root):  # a new core finishes what the old one left queued
        wait_until(
            lambda: len(maildir_files(maildir)) >= len(accepted), 60, "every accepted message"
        )
        wait_until(lambda: not qmailtui(root, "queue", "list").stdout.strip(), 30, "no queue")
    delivered = delivered_tags(maildir)
    assert sorted(set(accepted) - set(delivered)) == []  # nothing acknowledged was lost
    assert len(delivered) == len(set(delivered))  # and nothing came twice
    assert "status: exiting" in (root.log / "current").read_text()


def _family(pid: int) -> list[int]:
    """pid and every process below it, from /proc (lspawn is in a session of its own)."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parents[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    family, added = [pid], True
    while added:
        found = [p for p, parent in parents.items() if parent in family and p not in family]
        family += found
        added = bool(found)
    return family


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux's /proc")
def test_kill_during_a_burst_loses_nothing_that_was_accepted(root: QmailRoot) -> None:
    """Every process of the core killed at once, mid-burst: a message got its
    250 only once it was in the queue or in the Maildir, so each is there
    after a restart (a delivery cut short may come again: at least once),
    and the drafts of direct deliveries cut short are cleaned away."""
    maildir = add_maildir_user(root, "alice")
    no_world(root)
    proc, port = _start(root)
    burst = Burst(port)
    wait_until(lambda: len(burst.accepted) >= 40, 30, "forty messages accepted")
    for pid in _family(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    try:
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        burst.stop()
        assert proc.stdout is not None
        proc.stdout.close()
    accepted = burst.accepted
    with serving(root):
        wait_until(
            lambda: set(accepted) <= set(delivered_tags(maildir)), 60, "every accepted message"
        )
        wait_until(lambda: not qmailtui(root, "queue", "list").stdout.strip(), 30, "no queue")
        assert [n for n in os.listdir(root.queue / "pid") if n.endswith(".direct")] == []
