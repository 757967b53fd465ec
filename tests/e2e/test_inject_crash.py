"""Inject processes killed at random moments lose nothing they acknowledged,
and the core delivers exactly what was committed, each message whole.

spec/queue.md §6: exit 0 only once todo/N is linked and fsynced; a writer
killed earlier leaves S2/S3 leftovers that the core removes when it starts;
a message killed after the commit is queued though never acknowledged.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.paths import QmailRoot
from core.queue import Queue
from tests.processes import (
    CLI,
    add_maildir_user,
    maildir_files,
    qmailtui,
    qstat,
    sendmail_command,
    serving,
    wait_until,
)
from tests.queue_faults import queue_files

pytestmark = pytest.mark.slow

ITERATIONS = 150
WALL_CLOCK = 60.0  # seconds for the whole kill loop
PARALLEL = 3  # writers at once: the id counter and the directories are shared
SENDER = "s@b.test"
RCPT = "u@mx.example.org"
RECEIVED = re.compile(rb"Received: \(qmail (\d+) invoked by uid (\d+)\); [^\n]+\n")


def prepared(token: str, size: int) -> bytes:
    """A message inject leaves as it is (all of From, Date, Message-ID given)."""
    head = (
        f"From: {SENDER}\nTo: {RCPT}\nDate: Mon, 1 Jan 2024 00:00:00 -0000\n"
        f"Message-ID: <{token}@b.test>\nSubject: {token}\n\n"
    ).encode()
    lines = []
    total = len(head)
    number = 0
    while total < size:
        line = f"{token} line {number:06d} " + "x" * 40 + "\n"
        lines.append(line.encode())
        total += len(line)
        number += 1
    return head + b"".join(lines)


@dataclass
class Writer:
    token: str
    message: bytes
    proc: subprocess.Popen[bytes]
    kill_after: float
    returncode: int | None = None


def reading_stdin(pid: int) -> bool | None:
    """Is the process blocked in read(0, ...)? None if /proc cannot say."""
    try:
        fields = Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:
        return None
    return len(fields) > 1 and fields[0] == "0" and fields[1] == "0x0"


def start(root: QmailRoot, n: int, rng: random.Random) -> Writer:
    token = f"tok{n:04d}x{rng.randrange(16**6):06x}"
    message = prepared(token, rng.randint(100, 300_000))
    tail = ["-f", SENDER, RCPT]
    if n % 2:
        command = [*sendmail_command(), "--root", str(root.path), *tail]
    else:
        command = [*CLI, "inject", "--root", str(root.path), *tail]
    proc = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return Writer(token, message, proc, rng.uniform(0.0, 0.040))


def feed(writer: Writer) -> None:
    """Hand over the message once the writer waits for it, so that the kill
    lands in its queueing rather than in Python's start-up."""
    deadline = time.monotonic() + 10
    while reading_stdin(writer.proc.pid) is False and time.monotonic() < deadline:
        time.sleep(0.002)
    assert writer.proc.stdin is not None
    try:
        writer.proc.stdin.write(writer.message)
        writer.proc.stdin.close()
    except BrokenPipeError:
        pass


def kill_loop(root: QmailRoot, rng: random.Random) -> list[Writer]:
    writers: list[Writer] = []
    began = time.monotonic()
    n = 0
    while n < ITERATIONS and time.monotonic() - began < WALL_CLOCK:
        batch = [start(root, n + i, rng) for i in range(PARALLEL)]
        n += PARALLEL
        try:
            for w in batch:
                feed(w)
            fed = time.monotonic()
            for w in sorted(batch, key=lambda w: w.kill_after):
                time.sleep(max(0.0, fed + w.kill_after - time.monotonic()))
                w.proc.send_signal(signal.SIGKILL)  # ours, not yet reaped: still its pid
        finally:
            for w in batch:
                if w.proc.poll() is None:
                    w.proc.kill()
                w.returncode = w.proc.wait(30)
        writers += batch
    return writers


def alive(pid_file: str) -> bool:
    """Is the pid in pid/PID.TIME.ID a live process (a killed writer's pid, reused)?"""
    try:
        os.kill(int(pid_file.split("/")[1].split(".")[0]), 0)
    except ProcessLookupError:
        return False
    return True


def mess_by_token(root: QmailRoot) -> dict[str, tuple[int, bytes]]:
    found: dict[str, tuple[int, bytes]] = {}
    for name, data in queue_files(root).items():
        if name.startswith("mess/"):
            token = re.search(rb"\nSubject: (tok\w+)\n", data)
            assert token is not None, f"{name} is not one of our messages: {data[:200]!r}"
            assert token.group(1).decode() not in found, f"{token.group(1)!r} queued twice"
            found[token.group(1).decode()] = (int(name.rsplit("/", 1)[1]), data)
    return found


@pytest.mark.timeout(300)
def test_killed_injects_lose_nothing_acknowledged_and_deliver_only_whole_messages(
    root: QmailRoot,
) -> None:
    rng = random.Random(os.environ.get("CRASH_SEED", "20240101"))
    writers = kill_loop(root, rng)
    by_token = {w.token: w for w in writers}
    acknowledged = {w.token for w in writers if w.returncode == 0}
    assert {w.returncode for w in writers} <= {0, -signal.SIGKILL}, "an inject failed"

    # What a starting core does first (qmailtui serve, then Send.run).
    Queue(root).cleanup_orphans(time.time())
    files = queue_files(root)
    stray = [n for n in files if n.startswith("pid/") and not alive(n)]
    assert not stray, "pid/ files of dead writers"
    queued = mess_by_token(root)
    todo = {int(n.split("/")[1]) for n in files if n.startswith("todo/")}
    intd = {int(n.split("/")[1]) for n in files if n.startswith("intd/")}
    assert {msgid for msgid, _ in queued.values()} == todo, "mess without todo, or todo alone"
    assert intd <= todo, "intd/ without todo/: an uncommitted envelope stayed"
    assert acknowledged <= set(queued), "an acknowledged message is not in the queue"
    for token, (msgid, data) in queued.items():
        writer = by_token[token]
        head = RECEIVED.match(data)
        assert head is not None, data[:200]
        assert int(head.group(1)) == writer.proc.pid  # the qp is the writer's own pid
        assert data[head.end() :] == writer.message, f"{token}: message not whole"
        envelope = files[f"todo/{msgid}"]
        assert envelope == b"u%d\0p%d\0F%s\0T%s\0" % (
            int(head.group(2)),
            writer.proc.pid,
            SENDER.encode(),
            RCPT.encode(),
        )
    # The kill loop must have hit both sides of the commit, or it proved little.
    killed = [w for w in writers if w.returncode != 0]
    assert acknowledged, "no inject finished: the kills all came too early"
    assert killed, "no inject was killed"

    maildir = add_maildir_user(root, "u")
    with serving(root) as core:
        wait_until(lambda: qstat(root) == (0, 0), 120, "the queue to empty")
        listing = qmailtui(root, "queue", "list")
        assert listing.stdout == "", listing.stdout
        core.send_signal(signal.SIGTERM)
        assert core.wait(30) == 0

    delivered: dict[str, bytes] = {}
    for path in maildir_files(maildir):
        data = path.read_bytes()
        token = re.search(rb"\nSubject: (tok\w+)\n", data)
        assert token is not None, f"{path.name}: not a message of ours: {data[:200]!r}"
        name = token.group(1).decode()
        assert name not in delivered, f"{name} delivered twice"
        delivered[name] = data
    assert set(delivered) == set(queued), "delivered and committed differ"
    for name, data in delivered.items():
        assert data.startswith(f"Return-Path: <{SENDER}>\n".encode())
        assert data.endswith(queued[name][1]), f"{name}: delivered message not whole"


@pytest.mark.parametrize("left", ["info", "info and local"])
def test_a_message_whose_preprocessing_was_interrupted_is_delivered_once(
    root: QmailRoot, left: str
) -> None:
    """A crash between info/ and the removal of todo/ (queue.md §6.2): todo
    wins, preprocessing is redone. The core used to take info/ for the whole
    truth, find no recipients and drop the message without a word."""
    message = prepared("tokinterrupted", 500)
    result = qmailtui(root, "inject", "-f", SENDER, RCPT, stdin=message)
    assert result.returncode == 0, result.stderr
    (msgid,) = Queue(root).todo_ids()
    root.info(msgid).write_bytes(f"F{SENDER}\0".encode())
    if left == "info and local":
        root.channel("local", msgid).write_bytes(f"T{RCPT}\0".encode())
    maildir = add_maildir_user(root, "u")
    with serving(root):
        wait_until(lambda: qstat(root) == (0, 0), 30, "the queue to empty")
    delivered = maildir_files(maildir)
    assert len(delivered) == 1
    assert delivered[0].read_bytes().endswith(message)
