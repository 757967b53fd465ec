"""Direct delivery: local mail delivered before its 250, the rest queued.

Driven through Send.enqueue, the SMTP receiver's call, with the real lspawn
child doing the deliveries (and its uid workers, when the tests run as root).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core import control
from core.local import Result
from core.paths import QmailRoot
from tests.core.test_send import Harness, running
from tests.e2e.conftest import make_user
from tests.processes import maildir_files

pytestmark = pytest.mark.timeout(60)
BODY = b"Subject: hi\n\nhello\n"
SENDER = "bob@example.com"


@pytest.fixture
async def harness(root: QmailRoot) -> AsyncIterator[Harness]:
    async with running(root, direct=True) as h:
        yield h


def receive(harness: Harness, rcpts: list[str]) -> asyncio.Future[int]:
    """What the SMTP receiver does at the end of DATA: its 250 waits for this."""
    return asyncio.ensure_future(
        harness.send.enqueue(BODY, SENDER, rcpts, invoked="invoked from network")
    )


def in_queue(root: QmailRoot) -> list[Path]:
    return [p for p in (root.queue / "mess").glob("*/*")]


def drafts(root: QmailRoot) -> list[str]:
    return [name for name in os.listdir(root.queue / "pid") if name.endswith(".direct")]


def program_user(root: QmailRoot, name: str) -> Path:
    """A user whose .qmail writes the Maildir and runs a program that counts its runs."""
    home = make_user(root, name)
    dot = home / ".qmail"
    dot.write_text("./Maildir/\n|echo ran >> ran\n")
    if os.getuid() == 0:
        os.chown(dot, 65534, 65534)
    return home


async def test_a_message_for_a_maildir_is_in_it_when_the_250_is_given_and_never_queued(
    harness: Harness, root: QmailRoot
) -> None:
    home = make_user(root, "alice")
    msgid = await receive(harness, ["alice@mx.example.org"])
    # At the 250: in the Maildir, durably, and nothing of it in the queue.
    [path] = maildir_files(home / "Maildir")
    assert in_queue(root) == []
    assert drafts(root) == []
    data = path.read_bytes()
    assert data.startswith(
        b"Return-Path: <bob@example.com>\nDelivered-To: alice@mx.example.org\n"
        b"Received: (qmail %d invoked from network); " % msgid
    )
    assert data.endswith(BODY)
    size = len(data) - len(b"Return-Path: <bob@example.com>\nDelivered-To: alice@mx.example.org\n")
    # The lines qmail-send logs for a message delivered at once, in its order.
    lines = [line for line in harness.log() if not line.startswith("status: local 0/")]
    assert lines == [
        f"new msg {msgid}",
        f"info msg {msgid}: bytes {size} from <{SENDER}> qp {msgid} uid {os.getuid()}",
        f"starting delivery 1: msg {msgid} to local alice@mx.example.org",
        "status: local 1/10 remote 0/20",
        "delivery 1: success: did_1+0+0/",
        f"end msg {msgid}",
    ]
    assert msgid not in harness.send.messages


async def test_a_dot_qmail_that_runs_a_program_is_queued_and_the_program_runs_once(
    harness: Harness, root: QmailRoot
) -> None:
    home = program_user(root, "carol")
    msgid = await receive(harness, ["carol@mx.example.org"])
    await harness.wait_end(msgid)
    assert len(maildir_files(home / "Maildir")) == 1
    assert (home / "ran").read_text() == "ran\n"
    log = harness.log()
    assert log.count(f"new msg {msgid}") == 1
    assert "delivery 1: success: did_1+0+1/" in log  # the queue's, the only one logged
    assert not any("Not only Maildir" in line for line in log)
    assert drafts(root) == []


async def test_local_recipients_delivered_at_once_and_queued_share_one_message(
    harness: Harness, root: QmailRoot
) -> None:
    alice = make_user(root, "alice")
    carol = program_user(root, "carol")
    msgid = await receive(harness, ["alice@mx.example.org", "carol@mx.example.org"])
    assert len(maildir_files(alice / "Maildir")) == 1  # before the 250
    assert root.mess(msgid).exists() or f"end msg {msgid}" in harness.log()
    await harness.wait_end(msgid)
    assert len(maildir_files(carol / "Maildir")) == 1
    assert (carol / "ran").read_text() == "ran\n"
    log = harness.log()
    assert log.count(f"new msg {msgid}") == 1
    assert log.count(f"end msg {msgid}") == 1
    starts = [line for line in log if line.startswith("starting delivery")]
    assert [s.rsplit(" ", 1)[1] for s in starts] == [
        "alice@mx.example.org",
        "carol@mx.example.org",
    ]
    assert log.index(f"end msg {msgid}") == len(log) - 1 or all(
        line.startswith("status:") for line in log[log.index(f"end msg {msgid}") + 1 :]
    )


async def test_a_direct_delivery_that_fails_leaves_the_message_queued_and_tried_once(
    harness: Harness, root: QmailRoot
) -> None:
    make_user(root, "dave", maildir=False)
    msgid = await receive(harness, ["dave@mx.example.org"])
    assert root.mess(msgid).exists()  # queued, durably, before the 250
    await harness.wait_for(lambda: any("deferral" in line for line in harness.log()))
    await asyncio.sleep(0.2)
    log = harness.log()
    deferrals = [line for line in log if " deferral: " in line]
    assert deferrals == ["delivery 1: deferral: Unable_to_chdir_to_maildir._(#4.2.1)/"]
    assert log.count(f"new msg {msgid}") == 1
    assert f"end msg {msgid}" not in log
    assert [m.id for m in harness.send.messages.values()] == [msgid]
    assert drafts(root) == []


async def test_direct_deliveries_keep_to_concurrencylocal(
    harness: Harness, root: QmailRoot
) -> None:
    (root.control / "concurrencylocal").write_text("1\n")
    harness.config[0] = control.load(root)  # type: ignore[attr-defined]
    homes = [make_user(root, name) for name in ("alice", "erin")]
    ids = await asyncio.gather(
        receive(harness, ["alice@mx.example.org", "erin@mx.example.org"]),
        receive(harness, ["alice@mx.example.org"]),
        receive(harness, ["erin@mx.example.org"]),
    )
    for msgid in ids:
        await harness.wait_end(msgid)
    assert [len(maildir_files(h / "Maildir")) for h in homes] == [2, 2]
    log = harness.log()
    statuses = {line.split()[2] for line in log if line.startswith("status: local")}
    assert statuses <= {"0/10", "0/1", "1/1"}, statuses  # 0/10: before the change


async def test_a_direct_delivery_without_an_answer_in_time_is_queued_and_its_draft_kept(
    harness: Harness, root: QmailRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past DIRECT_WAIT the recipient is queued and the 250 goes out; the late
    delivery keeps its slot and its draft until it answers. (It may then have
    delivered too: at least once, never lost.)"""
    import core.send

    monkeypatch.setattr(core.send, "DIRECT_WAIT", 0.2)
    home = make_user(root, "alice")
    spawner_deliver = harness.send.direct
    assert spawner_deliver is not None
    release = asyncio.Event()

    async def stuck(rcpt: str, sender: str, msgid: int, now: float, draft: str) -> Result:
        await release.wait()
        return await spawner_deliver(rcpt, sender, msgid, now, draft)

    harness.send.direct = stuck
    msgid = await asyncio.wait_for(receive(harness, ["alice@mx.example.org"]), 5)
    assert root.mess(msgid).exists() or f"end msg {msgid}" in harness.log()
    await harness.wait_end(msgid)  # the queue delivered it
    assert len(drafts(root)) == 1  # the late one still reads it
    assert harness.send.active["local"] == 1
    release.set()
    await harness.wait_for(lambda: not drafts(root))
    assert harness.send.active["local"] == 0
    assert len(maildir_files(home / "Maildir")) == 2
    assert harness.log().count(f"new msg {msgid}") == 1
