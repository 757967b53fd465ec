"""The scheduler (qmail-send) driven through its API with a fake clock."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from core import control, retry
from core.durable import GroupCommit, LoopGroupCommit
from core.events import Events
from core.local import Result
from core.log import Log
from core.lspawn import LocalSpawner
from core.paths import QmailRoot
from core.queue import Queue
from core.send import Send
from tests.e2e.conftest import make_user
from tests.fakes import FakeClock

pytestmark = pytest.mark.timeout(60)


class Harness:
    def __init__(self, root: QmailRoot, send: Send, clock: FakeClock, events: Events) -> None:
        self.root = root
        self.send = send
        self.clock = clock
        self.sub = events.subscribe(maxsize=100_000)
        self.seen: list[dict[str, object]] = []

    async def wait_for(self, predicate: Callable[[], bool], limit: float = 10.0) -> None:
        deadline = time.monotonic() + limit
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting; log:\n" + "\n".join(self.log()))
            self.send.wake()
            await asyncio.sleep(0.01)

    async def inject(self, body: bytes, sender: str, rcpts: list[str]) -> int:
        return await self.send.enqueue(body, sender, rcpts, invoked="invoked by uid 0")

    async def wait_end(self, msgid: int) -> None:
        await self.wait_for(lambda: f"end msg {msgid}" in self.log())

    def log(self) -> list[str]:
        self.send.log.flush()
        path = self.root.log / "current"
        return (
            [line.split(" ", 1)[1] for line in path.read_text().splitlines()]
            if path.exists()
            else []
        )

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.send.wake()
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(root: QmailRoot, direct: bool = False) -> AsyncIterator[Harness]:
    """Send as the running core has it, lspawn delivering; `direct`: with
    its direct deliveries too (the core's), else every message queued."""
    clock = FakeClock()
    events = Events()
    events.bind(asyncio.get_running_loop())
    log = Log(root.log, clock=clock, events=events)
    queue = Queue(root, id_block=16)
    executor = ThreadPoolExecutor(16)
    config = [control.load(root)]

    spawner = LocalSpawner(root, lambda why: None)  # deliveries in qmail-lspawn's process

    send = Send(
        queue,
        lambda: config[0],
        clock=clock,
        log=log,
        events=events,
        local=spawner.deliver,
        executor=executor,
        direct=spawner.deliver if direct else None,
    )
    durability = GroupCommit()
    send.syncer = LoopGroupCommit(asyncio.get_running_loop(), durability)  # as the core runs
    h = Harness(root, send, clock, events)
    h.config = config  # type: ignore[attr-defined]
    stopping = asyncio.Event()
    task = asyncio.create_task(send.run(stopping))
    await asyncio.sleep(0.05)
    try:
        yield h
    finally:
        stopping.set()
        await asyncio.wait_for(task, 10)
        await spawner.close()
        executor.shutdown()
        send.syncer.close()
        durability.close()
        log.close()


@pytest.fixture
async def harness(root: QmailRoot) -> AsyncIterator[Harness]:
    async with running(root) as h:
        yield h


async def test_message_for_an_assigned_user_lands_in_maildir_and_is_removed(
    harness: Harness, root: QmailRoot
) -> None:
    home = make_user(root, "alice")
    msgid = await harness.inject(
        b"Subject: hi\n\nhello\n", "bob@example.com", ["alice@mx.example.org"]
    )
    await harness.wait_end(msgid)
    files = list((home / "Maildir" / "new").iterdir())
    assert len(files) == 1
    data = files[0].read_bytes()
    assert data.startswith(
        b"Return-Path: <bob@example.com>\nDelivered-To: alice@mx.example.org\nReceived: (qmail "
    )
    assert data.endswith(b"Subject: hi\n\nhello\n")
    log = harness.log()
    assert f"new msg {msgid}" in log
    size = len(data) - 66  # Return-Path and Delivered-To are not in the queued message
    info = f"info msg {msgid}: bytes {size} from <bob@example.com> qp {msgid}"
    assert f"{info} uid {os.getuid()}" in log
    assert any(
        line.startswith("starting delivery ")
        and line.endswith(f"msg {msgid} to local alice@mx.example.org")
        for line in log
    )
    assert "delivery 1: success: did_1+0+0/" in log
    assert f"end msg {msgid}" in log
    assert not root.info(msgid).exists()
    assert not root.mess(msgid).exists()
    assert not root.todo(msgid).exists()


async def test_unknown_local_user_bounces_to_sender_with_qmail_text(
    harness: Harness, root: QmailRoot
) -> None:
    sender_home = make_user(root, "carol")
    msgid = await harness.inject(
        b"Subject: x\n\nbody\n", "carol@mx.example.org", ["nobody@mx.example.org"]
    )
    await harness.wait_for(lambda: len(list((sender_home / "Maildir/new").iterdir())) == 1)
    bounce = next((sender_home / "Maildir/new").iterdir()).read_text()
    assert "Return-Path: <>\n" in bounce
    assert (
        "From: MAILER-DAEMON@mx.example.org\nTo: carol@mx.example.org\nSubject: failure notice\n\n"
        in bounce
    )
    assert (
        "Hi. This is the qmail-send program at mx.example.org.\n"
        "I'm afraid I wasn't able to deliver your message to the following addresses.\n"
        "This is a permanent error; I've given up. Sorry it didn't work out.\n\n"
        "<nobody@mx.example.org>:\nSorry, no mailbox here by that name. (#5.1.1)\n\n"
        "--- Below this line is a copy of the message.\n\n"
        "Return-Path: <carol@mx.example.org>\nReceived: (qmail "
    ) in bounce
    assert bounce.endswith("Subject: x\n\nbody\n")
    assert any(line.startswith(f"bounce msg {msgid} qp ") for line in harness.log())


async def test_a_bounce_that_bounces_goes_to_postmaster_and_a_triple_is_discarded(
    harness: Harness, root: QmailRoot
) -> None:
    msgid = await harness.inject(b"Subject: x\n\nbody\n", "", ["nobody@mx.example.org"])
    alias_new = root.alias / "Maildir" / "new"
    await harness.wait_for(lambda: len(list(alias_new.iterdir())) == 1)
    text = next(alias_new.iterdir()).read_text()
    assert "Return-Path: <#@[]>" in text
    assert "I tried to deliver a bounce message to this address, but the bounce bounced!" in text
    assert "--- Below this line is the original bounce.\n\nReturn-Path: <>\n" in text
    # A double bounce that fails is dropped, never sent again.
    (root.alias / ".qmail-postmaster").write_text("./NoSuchMaildir/\n")
    (root.alias / ".qmail-postmaster").chmod(0o644)
    msgid = await harness.inject(b"Subject: y\n\n", "#@[]", ["nobody@mx.example.org"])
    await harness.wait_end(msgid)
    assert f"triple bounce: discarding bounce/{msgid}" in harness.log()


async def test_deferral_follows_qmail_retry_schedule_then_bounces_past_lifetime(
    harness: Harness, root: QmailRoot
) -> None:
    home = make_user(root, "dave", maildir=False)  # no Maildir: qmail-local defers
    make_user(root, "erin")
    msgid = await harness.inject(b"Subject: z\n\n", "erin@mx.example.org", ["dave@mx.example.org"])
    birth = harness.clock.now()
    await harness.wait_for(
        lambda: any("deferral: Unable_to_chdir_to_maildir" in line for line in harness.log())
    )
    message = harness.send.messages[msgid]
    await harness.wait_for(lambda: "local" not in message.passes)
    assert message.due["local"] == retry.next_attempt(birth, birth, "local") == birth + 100
    assert message.recipients[0].attempts == 1
    # Not due yet: nothing happens.
    await harness.advance(99)
    assert message.recipients[0].attempts == 1
    await harness.advance(1)
    await harness.wait_for(lambda: message.recipients[0].attempts == 2)
    await harness.wait_for(lambda: "local" not in message.passes)
    assert message.due["local"] == birth + 400  # (10 + 10)^2
    # Past the lifetime: one more attempt, then a bounce quoting qmail's words.
    harness.clock.t = birth + 604801
    harness.send.retry_all()
    await harness.wait_end(msgid)
    inbox = root.path.parent / "home/erin/Maildir/new"
    await harness.wait_for(lambda: any(inbox.iterdir()))  # the bounce is a message too
    bounce = next(inbox.iterdir()).read_text()
    assert "Unable to chdir to maildir. (#4.2.1)\n" + retry.EXPIRED_TEXT in bounce
    assert not (home / "Maildir").exists()


async def test_concurrencylocal_bounds_parallel_deliveries(root: QmailRoot) -> None:
    (root.control / "concurrencylocal").write_text("3\n")
    clock = FakeClock()
    config = control.load(root)
    queue = Queue(root, id_block=64)
    running = 0
    peak = 0
    import threading

    lock = threading.Lock()

    def slow(rcpt: str, sender: str, msgid: int, now: float) -> Result:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return Result("K", "did 1+0+0\n")

    log = Log(root.log, clock=clock)
    send = Send(
        queue, lambda: config, clock=clock, log=log, local=slow, executor=ThreadPoolExecutor(32)
    )
    stopping = asyncio.Event()
    task = asyncio.create_task(send.run(stopping))
    rcpts = [f"u{i}@mx.example.org" for i in range(12)]
    await send.enqueue(b"Subject: list\n\n", "list@example.com", rcpts, invoked="invoked by uid 0")
    deadline = time.monotonic() + 10
    while send.messages or send._preprocessing:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    stopping.set()
    await asyncio.wait_for(task, 10)
    log.close()
    assert peak == 3
    log_lines = (root.log / "current").read_text()
    assert "status: local 3/3 remote 0/20" in log_lines
    assert "status: local 4/3" not in log_lines
    # As qmail-send: each start is followed by a status that counts it and not
    # the deliveries started after it.
    lines = [line.split(" ", 1)[1] for line in log_lines.splitlines()]
    starts = [i for i, line in enumerate(lines) if line.startswith("starting delivery")]
    assert [lines[i + 1] for i in starts[:3]] == [
        f"status: local {n}/3 remote 0/20" for n in (1, 2, 3)
    ]


async def test_held_message_stays_held_through_retry_all_until_released(
    harness: Harness, root: QmailRoot
) -> None:
    make_user(root, "frank", maildir=False)
    msgid = await harness.inject(b"Subject: h\n\n", "x@example.com", ["frank@mx.example.org"])
    await harness.wait_for(
        lambda: (
            msgid in harness.send.messages
            and harness.send.messages[msgid].recipients[0].attempts == 1
        )
    )
    result = await harness.send.act("hold", [msgid])
    assert result.done == [msgid]
    assert root.hold(msgid).exists()
    message = harness.send.messages[msgid]
    harness.send.retry_all()
    await harness.advance(10_000)
    assert message.recipients[0].attempts == 1
    retried = await harness.send.act("retry", [msgid])
    assert retried.done == []
    assert msgid in retried.skipped
    await harness.send.act("release", [msgid])
    assert not root.hold(msgid).exists()
    await harness.wait_for(lambda: message.recipients[0].attempts == 2)


async def test_bounce_now_gives_up_and_delete_removes_without_bounce(
    harness: Harness, root: QmailRoot
) -> None:
    make_user(root, "gina", maildir=False)
    sender_home = make_user(root, "hank")
    first = await harness.inject(b"Subject: 1\n\n", "hank@mx.example.org", ["gina@mx.example.org"])
    second = await harness.inject(b"Subject: 2\n\n", "hank@mx.example.org", ["gina@mx.example.org"])
    await harness.wait_for(
        lambda: all(
            m in harness.send.messages
            and harness.send.messages[m].recipients[0].attempts >= 1
            and not harness.send.messages[m].passes
            for m in (first, second)
        )
    )
    await harness.send.act("bounce", [first])
    await harness.send.act("delete", [second])
    await harness.wait_end(first)
    await harness.wait_end(second)
    await harness.wait_for(lambda: len(list((sender_home / "Maildir/new").iterdir())) == 1)
    inbox = list((sender_home / "Maildir/new").iterdir())
    text = inbox[0].read_text()
    assert "Sorry, the postmaster gave up on this message." in text
    assert "Subject: 1" in text
    assert not root.mess(second).exists()
    assert f"info msg {second}: deleted by the postmaster" in harness.log()


async def test_every_way_a_message_ends_leaves_no_file_in_the_queue(
    harness: Harness, root: QmailRoot
) -> None:
    """A message the core wrote itself is removed by trying only the names it
    can have (Message.plain); once a deferral, a hold or a bounce has made
    state/, hold/ or bounce/ files, its removal must still take them all."""
    from core.setup import maildirmake
    from tests.queue_faults import queue_files

    make_user(root, "ivy")
    late = make_user(root, "jack", maildir=False)  # defers until its Maildir exists
    rcpt = "ivy@mx.example.org"
    at_once = await harness.inject(b"Subject: 1\n\n", rcpt, ["ivy@mx.example.org"])
    deferred = await harness.inject(b"Subject: 2\n\n", rcpt, ["jack@mx.example.org"])
    held = await harness.inject(b"Subject: 3\n\n", rcpt, ["jack@mx.example.org"])
    bounced = await harness.inject(b"Subject: 4\n\n", rcpt, ["nobody-here@mx.example.org"])
    mixed = await harness.inject(
        b"Subject: 5\n\n", rcpt, ["ivy@mx.example.org", "jack@mx.example.org"]
    )
    await harness.wait_end(at_once)
    await harness.wait_end(bounced)
    messages = harness.send.messages
    waiting = (deferred, held, mixed)
    await harness.wait_for(
        lambda: all(
            any(r.attempts for r in messages[m].recipients) and not messages[m].passes
            for m in waiting
        )
    )
    assert root.state(deferred).exists()
    await harness.send.act("hold", [held])
    assert root.hold(held).exists()
    maildirmake(late / "Maildir")
    if os.getuid() == 0:
        for directory, _, _ in os.walk(late / "Maildir"):
            os.chown(directory, 65534, 65534)
    await harness.send.act("release", [held])
    harness.send.retry_all()
    for msgid in waiting:
        await harness.wait_end(msgid)
    inbox = root.path.parent / "home/ivy/Maildir/new"
    await harness.wait_for(lambda: len(list(inbox.iterdir())) == 3)  # 1, 5 and 4's bounce
    await harness.wait_for(lambda: not harness.send.messages)
    left = {k: v for k, v in queue_files(root).items() if k != "lock/nextid"}
    assert left == {}
    assert not list((root.queue / "pid").iterdir())
