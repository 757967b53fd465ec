"""The scheduler (qmail-send): preprocessing, passes, deliveries, bounces, removal.

Each message has one record per recipient in local/S/N or remote/S/N. When a
channel of a message is due, a *pass* starts: its retry time is computed
(retry.py), and a job for every pending recipient joins that channel's FIFO.
At most `concurrencylocal` / `concurrencyremote` jobs run at once, each its own
task, so a slow delivery holds one slot and nothing else. When every job of a
pass has reported, the channel file is removed (all done) or the message is
due again at the retry time. A message with no channel left is finished: its
bounce (if any) is queued, then its files are removed.

All file work is done by queue.py in worker threads: the event loop never
blocks on a disk, and fsyncs of different messages overlap.

Admin operations (retry, hold, release, bounce, delete) are methods here, so
that the command line with no core running (`offline`) and a running core
call the very same code.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import json
import os
import re
from collections.abc import Awaitable, Callable, Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from core import bounce as bounces
from core import procid, retry
from core.clock import Clock
from core.control import Config
from core.durable import LoopGroupCommit, Steps, drive_steps
from core.events import Events
from core.local import Result
from core.log import Log, safe
from core.queue import CHANNELS, Queue, QueueError
from core.rewrite import route, unvirtual

T = TypeVar("T")
Deliverer = Callable[[str, str, int, float], Awaitable[Result]]
LocalDeliverer = Callable[[str, str, int, float], Result]  # runs in a worker thread
# A direct delivery of a draft file (LocalSpawner.deliver with draft=)
DirectDeliverer = Callable[[str, str, int, float, str], Awaitable[Result]]
# one message's recipients of one domain, one result each, in order
RemoteDeliverer = Callable[[list[str], str, int, float], Awaitable[list[Result]]]
BATCH_MAX = 100  # recipients in one SMTP transaction: every server must take 100
TODO_SCAN = 60.0  # seconds between scans of todo/ besides the trigger (qmail: 1500)
REMOTE_GRACE = 10.0  # seconds TERM waits for remote transactions before it drops them
SYSFAIL = 123.0  # qmail-send's retry delay after a system error
PREPROCESS_AT_ONCE = 8
LOAD_AT_ONCE = 2000  # messages read per worker-thread hop when the core starts
FORWARDED = re.compile(r"^qp (\d+)$", re.MULTILINE)  # qmail-local's report of a forward
DROPPED = "Stopped while delivering; the recipient stays queued. (#4.3.0)\n"
ADMIN_BOUNCE = "Sorry, the postmaster gave up on this message. (#5.0.0)\n"
DIRECT_WAIT = 60.0  # seconds a 250 waits for direct deliveries before queueing the message


@dataclass
class Recipient:
    """One record of a channel file, plus what we know of its attempts."""

    channel: str
    address: str
    offset: int
    done: bool = False
    bounced: bool = False
    attempts: int = 0
    last_reply: str | None = None
    last_attempt: float | None = None
    busy: bool = False


@dataclass
class Message:
    id: int
    sender: str
    birth: float
    size: int
    uid: int = 0
    qp: int = 0
    held: bool = False
    preprocessed: bool = True
    recipients: list[Recipient] = field(default_factory=list)
    due: dict[str, float] = field(default_factory=dict)  # channel -> next pass
    passes: dict[str, Pass] = field(default_factory=dict)
    giving_up: bool = False  # bounce requested: deferrals become failures
    removed: bool = False
    finishing: bool = False
    # Written by this core's enqueue, and no file made for it since but mess,
    # info and its channel files (no todo, intd, state, bounce or hold): its
    # removal need not try names that cannot exist (a failed rename or unlink
    # costs a path walk each; a finished message tried eight).
    plain: bool = False

    def pending(self, channel: str | None = None) -> list[Recipient]:
        return [
            r for r in self.recipients if not r.done and (channel is None or r.channel == channel)
        ]

    def channels(self) -> list[str]:
        return [c for c in CHANNELS if any(r.channel == c for r in self.recipients)]


@dataclass
class Pass:
    message: Message
    channel: str
    started: float
    next_due: float
    dying: bool
    outstanding: int = 0


@dataclass
class Job:
    """One delivery slot's work: a local recipient, or a message's remote
    recipients of one domain, which share an SMTP transaction."""

    message: Message
    recipients: list[Recipient]
    pass_: Pass


@dataclass(frozen=True, slots=True)
class ActionResult:
    action: str
    ids: list[int]
    done: list[int]
    failed: dict[int, str]
    dry_run: bool
    skipped: dict[int, str] = field(default_factory=dict)  # e.g. held, for retry

    @property
    def summary(self) -> str:
        verb = {"retry": "retried", "hold": "held", "release": "released"}.get(
            self.action, self.action + "d" if self.action.endswith("e") else self.action + "ed"
        )
        if self.dry_run:
            return f"would act on {len(self.ids)} message(s)"
        text = f"{verb} {len(self.done)} message(s)"
        if self.skipped:
            text += f", skipped {len(self.skipped)}"
        if self.failed:
            text += f", {len(self.failed)} failed"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "ids": self.ids,
            "done": self.done,
            "failed": {str(k): v for k, v in self.failed.items()},
            "dry_run": self.dry_run,
            "skipped": {str(k): v for k, v in self.skipped.items()},
            "summary": self.summary,
        }


async def _no_remote(recipients: list[str], sender: str, msgid: int, now: float) -> list[Result]:
    text = "Sorry, remote delivery is not available here. (#4.3.0)\n"
    return [Result("Z", text) for _ in recipients]


Written = Callable[[int | None, BaseException | None], None]


class _Slots:
    """The local delivery slots a direct delivery holds: all taken when it is
    chosen, each given back when its delivery answers."""

    def __init__(self, active: dict[str, int], count: int) -> None:
        self._active = active
        self.held = count

    def give_back(self, count: int = 1) -> None:
        self.held -= count
        self._active["local"] -= count

    def hand_over(self, count: int) -> _Slots:
        """`count` of these slots, to be given back by someone else."""
        self.held -= count
        return _Slots(self._active, count)


def _direct_result(task: asyncio.Future[Result]) -> Result | None:
    """A direct delivery's answer; None (queue the recipient) if it raised."""
    if task.cancelled() or task.exception() is not None:
        return None
    return task.result()


class Send:
    def __init__(
        self,
        queue: Queue,
        config: Callable[[], Config],
        *,
        clock: Clock,
        log: Log,
        events: Events | None = None,
        local: LocalDeliverer | Deliverer,
        remote: RemoteDeliverer = _no_remote,
        executor: ThreadPoolExecutor | None = None,
        direct: DirectDeliverer | None = None,
    ) -> None:
        self.queue = queue
        self.direct = direct  # None: every message goes through the queue
        self.config = config
        self.clock = clock
        self.log = log
        self.events = events or Events()
        self.local = local
        self._local_is_async = asyncio.iscoroutinefunction(local)
        self.remote = remote
        self.executor = executor or ThreadPoolExecutor(64, thread_name_prefix="queue")
        # The running core's group commit on the loop; None: queue writes in threads.
        self.syncer: LoopGroupCommit | None = None
        self._uid = os.getuid()  # a system call each time
        self.messages: dict[int, Message] = {}
        self.jobs: dict[str, collections.deque[Job]] = {c: collections.deque() for c in CHANNELS}
        self.active = dict.fromkeys(CHANNELS, 0)
        self._heap: list[tuple[float, int, str]] = []
        self._delivery_numbers = 0
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_transaction: set[asyncio.Task[Any]] = set()  # remote, not yet recorded
        self._preprocessing: set[int] = set()
        self._todo_slots = asyncio.Semaphore(PREPROCESS_AT_ONCE)
        self._stopping = False
        self._scan_now = False
        self.loaded = asyncio.Event()

    # -- plumbing ---------------------------------------------------------

    async def io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def quick_io(self, fn: Callable[..., T], *args: Any) -> T:
        """File work that never waits for a sync (a pwrite, a rename, a few
        unlinks): on the loop itself in the running core, where a thread hop
        costs more than the work; in a thread otherwise."""
        if self.syncer is not None:
            return fn(*args)
        return await self.io(fn, *args)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.log.line(f"alert: internal error: {exc!r}")

    def wake(self) -> None:
        """Something changed (slot freed, admin action): look again."""
        self._wake.set()

    def wake_todo(self) -> None:
        """The trigger was pulled: a new message is in todo/."""
        self._scan_now = True
        self._wake.set()

    def limit(self, channel: str) -> int:
        config = self.config()
        return config.concurrencylocal if channel == "local" else config.concurrencyremote

    def status(self) -> str:
        text = (
            f"status: local {self.active['local']}/{self.limit('local')}"
            f" remote {self.active['remote']}/{self.limit('remote')}"
        )
        return text + (" exitasap" if self._stopping else "")

    def _log_status(self) -> None:
        self.log.line(self.status())
        self.events.publish(
            "concurrency",
            local=self.active["local"],
            local_max=self.limit("local"),
            remote=self.active["remote"],
            remote_max=self.limit("remote"),
        )

    def _schedule(self, message: Message, channel: str, when: float) -> None:
        message.due[channel] = when
        heapq.heappush(self._heap, (when, message.id, channel))

    # -- loading ------------------------------------------------------------

    async def load(self, cleanup: bool = False) -> None:
        """Rebuild the schedule from info/ (send.md §4.2), then note todo/; with
        `cleanup`, first remove what a crash left behind (a starting core)."""
        if cleanup:
            removed = await self.io(self.queue.cleanup_orphans, self.clock.now())
            for path in removed:
                self.log.line(
                    f"warning: removed {path.relative_to(self.queue.dir)} left by a crash"
                )
        ids = await self.io(self.queue.info_ids)
        held = await self.io(self.queue.held_ids)
        present = await self.io(self.queue.present)
        # A thread hop per batch, not per message; one batch at a time, since
        # the work is mostly Python's and threads would only pass the GIL around.
        for start in range(0, len(ids), LOAD_AT_ONCE):
            batch = ids[start : start + LOAD_AT_ONCE]
            for message in await self.io(self._load_batch, batch, present):
                message.held = message.id in held
                self.messages[message.id] = message
                for channel in message.channels():
                    if message.pending(channel):
                        self._schedule(message, channel, message.due[channel])
        for msgid in await self.io(self.queue.todo_ids):
            if msgid not in self.messages:
                waiting = await self.io(self._load_todo, msgid)
                if waiting is not None:
                    waiting.held = msgid in held
                    self.messages[msgid] = waiting
        self.loaded.set()

    def _load_batch(self, ids: list[int], present: dict[str, set[int]]) -> list[Message]:
        config = self.config()
        loaded = (self._load_message(msgid, present, config) for msgid in ids)
        return [m for m in loaded if m is not None]

    def _load_message(
        self, msgid: int, present: dict[str, set[int]] | None = None, config: Config | None = None
    ) -> Message | None:
        try:
            sender, birth = self.queue.read_info(msgid)
            size = self.queue.message_size(msgid)
        except (OSError, ValueError) as e:
            self.log.line(f"warning: trouble with #{msgid}: {e}")
            return None
        message = Message(msgid, sender, birth, size)
        for channel in CHANNELS:
            if present is not None and msgid not in present[channel]:
                continue
            found = self.queue.read_channel(channel, msgid)
            if found is None:
                continue
            records, due = found
            message.due[channel] = due
            message.recipients += (
                Recipient(channel, r.address, r.offset, done=r.done) for r in records
            )
        self._apply_state(message, present, config)
        return message

    def _apply_state(
        self,
        message: Message,
        present: dict[str, set[int]] | None = None,
        config: Config | None = None,
    ) -> None:
        """Attempts and replies from state/N; failures from bounce/N."""
        raw = None
        if present is None or message.id in present["state"]:
            raw = self.queue.read_state(message.id)
        known: dict[str, dict[str, Any]] = {}
        if raw:
            with contextlib.suppress(ValueError):
                known = json.loads(raw).get("recipients", {})
        failed = set()
        text = None
        if present is None or message.id in present["bounce"]:
            text = self.queue.read_bounce(message.id)
        if text:
            for line in text.split(b"\n"):
                if line.startswith(b"<") and line.endswith(b">:"):
                    failed.add(line[1:-2].decode("utf-8", "surrogateescape"))
        config = config or self.config()
        for r in message.recipients:
            info = known.get(f"{r.channel}:{r.address}", {})
            r.attempts = int(info.get("attempts", 0))
            r.last_reply = info.get("last_reply")
            r.last_attempt = info.get("last_attempt")
            r.bounced = bool(info.get("bounced")) or (
                r.done and unvirtual(config, r.address) in failed
            )

    def _load_todo(self, msgid: int) -> Message | None:
        """A queued but not yet preprocessed message, shown with its routed recipients."""
        try:
            envelope = self.queue.read_todo(msgid)
            path = self.queue.root.todo(msgid)
            birth = path.stat().st_mtime
            size = self.queue.message_size(msgid)
        except (OSError, ValueError):
            return None
        config = self.config()
        message = Message(
            msgid, envelope.sender, birth, size, envelope.uid, envelope.pid, preprocessed=False
        )
        for rcpt in envelope.recipients:
            routed = route(config, rcpt)
            message.recipients.append(Recipient(routed.channel, routed.address, -1))
        return message

    # -- the main loop ------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        if not self.loaded.is_set():
            await self.load(cleanup=True)
        self._log_status()
        for message in list(self.messages.values()):
            if not message.preprocessed:
                self.messages.pop(message.id)
            elif not message.channels() or not message.pending():
                self._spawn(self._finish(message))
        stop_task = asyncio.ensure_future(stopping.wait())
        next_scan = 0.0
        try:
            while not stopping.is_set():
                now = self.clock.now()
                if now >= next_scan or self._scan_now:
                    self._scan_now = False
                    await self.scan_todo()
                    next_scan = now + TODO_SCAN
                self._start_due_passes(now)
                self._fill()
                timeout = min(next_scan, self._next_due()) - self.clock.now()
                self._wake.clear()
                if timeout > 0:
                    wake_task = asyncio.ensure_future(self._wake.wait())
                    await asyncio.wait(
                        {wake_task, stop_task},
                        timeout=min(timeout + 0.01, 86400.0),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    wake_task.cancel()
        finally:
            stop_task.cancel()
        await self._drain()

    async def _drain(self) -> None:
        """TERM: start nothing new; let running deliveries finish and be recorded."""
        self._stopping = True
        for channel in CHANNELS:
            for job in self.jobs[channel]:
                job.pass_.outstanding -= 1
            self.jobs[channel].clear()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=REMOTE_GRACE)
        for task in list(self._in_transaction):
            # A far host may keep a transaction for timeoutremote (20 min): past
            # the grace it is dropped, its recipients still pending, tried again.
            task.cancel()
        while self._tasks:
            await asyncio.wait(set(self._tasks))
        for message in list(self.messages.values()):  # SMTP may still be adding
            for channel, when in message.due.items():
                if message.pending(channel):
                    await self.io(self.queue.set_due, channel, message.id, when)
        self.log.line("status: exiting")

    def _next_due(self) -> float:
        while self._heap:
            when, msgid, channel = self._heap[0]
            message = self.messages.get(msgid)
            if (
                message is None
                or message.removed
                or message.due.get(channel) != when
                or channel in message.passes
            ):
                heapq.heappop(self._heap)
                continue
            if message.held:
                heapq.heappop(self._heap)  # release() schedules it again
                continue
            return when
        return float("inf")

    # -- todo: preprocessing ---------------------------------------------

    async def enqueue(
        self, message: bytes, sender: str, recipients: list[str], *, invoked: str
    ) -> int:
        """Queue a message durably (the SMTP receiver's 250) and start on it at once.

        The core preprocesses what it queues itself as it writes it, so such a
        message never waits in todo/.
        """
        if self.syncer is None:  # no core running: the writes and syncs in a thread
            steps, adopt = self._routed(message, sender, self._split(recipients), invoked)
            msgid = await self.io(self.queue.run_steps, steps)
            adopt(msgid)
            return msgid
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def written(msgid: int | None, error: BaseException | None) -> None:
            if future.done():
                return
            if error is None:
                assert msgid is not None
                future.set_result(msgid)
            else:
                future.set_exception(error)

        self.enqueue_then(message, sender, recipients, invoked=invoked, done=written)
        return await future

    def enqueue_then(
        self,
        message: bytes,
        sender: str,
        recipients: list[str],
        *,
        invoked: str,
        done: Written,
    ) -> None:
        """enqueue for the running core, calling `done(msgid, error)` back instead
        of returning: no task, and no loop iteration lost per sync point.

        A message for local recipients only, with delivery slots free for
        them, is first delivered directly (see _direct)."""
        try:
            split = self._split(recipients)
        except Exception as e:
            done(None, e)
            return
        if self._may_deliver_directly(split):
            self.active["local"] += len(split["local"])  # taken now: see _direct
            self._spawn(self._direct(message, sender, split["local"], invoked, done))
            return
        self._enqueue_split(message, sender, split, invoked, done)

    def _enqueue_split(
        self,
        message: bytes,
        sender: str,
        split: dict[str, list[str]],
        invoked: str,
        done: Written,
        msgid: int | None = None,
        announced: bool = False,
    ) -> None:
        assert self.syncer is not None
        try:
            steps, adopt = self._routed(message, sender, split, invoked, msgid, announced)
        except Exception as e:
            done(None, e)
            return

        def written(msgid: int | None, error: BaseException | None) -> None:
            if msgid is not None:
                try:
                    adopt(msgid)
                except Exception:  # our bug; the message is queued all the same
                    done(msgid, None)
                    raise
            done(msgid, error)

        # File operations take microseconds: on the loop, going on at each sync
        # point when the group commit calls back (no task: no loop iteration
        # lost per sync point, nor a hop to a worker thread and back).
        drive_steps(steps, self.syncer, written)

    def _split(self, recipients: list[str]) -> dict[str, list[str]]:
        """The recipients by channel, rewritten as qmail-send's preprocessing does."""
        config = self.config()
        split: dict[str, list[str]] = {c: [] for c in CHANNELS}
        for rcpt in recipients:
            routed = route(config, rcpt)
            split[routed.channel].append(routed.address)
        return split

    def _routed(
        self,
        message: bytes,
        sender: str,
        split: dict[str, list[str]],
        invoked: str,
        msgid: int | None = None,
        announced: bool = False,
    ) -> tuple[Steps[int], Callable[[int], None]]:
        """The queue's writing steps for a message, and what schedules it after
        (`announced`: its new msg and info msg lines are in the log already)."""
        now = self.clock.now()
        uid = self._uid
        steps = self.queue.enqueue_routed_steps(
            message,
            sender,
            split["local"],
            split["remote"],
            uid=uid,
            pid=procid.pid(),
            invoked=invoked,
            now=now,
            qp_is_id=True,
            msgid=msgid,
        )

        def adopt(msgid: int) -> None:
            size = self.queue.message_size(msgid)
            # qp: qmail logs qmail-queue's pid, the number its 250 gives; ours gives the id
            self.adopt(msgid, sender, now, size, uid, split["local"], split["remote"], announced)

        return steps, adopt

    # -- direct delivery: local mail delivered before its 250 -----------------

    def _may_deliver_directly(self, split: dict[str, list[str]]) -> bool:
        """Only local recipients, each with a free slot now, and nothing
        waiting for one (a direct delivery never overtakes the queue)."""
        local = split["local"]
        return (
            self.direct is not None
            and bool(local)
            and not split["remote"]
            and not self._stopping
            and not self.jobs["local"]
            and self.active["local"] + len(local) <= self.limit("local")
        )

    async def _direct(
        self, message: bytes, sender: str, local: list[str], invoked: str, done: Written
    ) -> None:
        """Deliver a message received for local recipients before it is
        acknowledged, and queue only what that did not deliver.

        The message is written to a draft in pid/ (never synced) and each
        recipient's delivery reads it, as a queued message's does; a Maildir
        delivery is durable when it answers K. Recipients delivered so are
        logged as qmail-send logs a delivery; every other one (a .qmail that
        does more than write Maildirs declines at once, a deferral, a failure,
        no answer within DIRECT_WAIT) is queued under the same id, durably,
        before `done`, where the queue tries it again from the start. Queueing
        and then delivering a message cost twice the files, renames, syncs and
        scheduling of delivering it: measured, about 30% of the CPU per
        message of SMTP ingest to a Maildir.

        Each recipient holds a local slot from enqueue_then's choice (so that
        messages chosen in one loop turn cannot overbook concurrencylocal)
        until its delivery answers; whatever goes wrong here, every slot is
        given back and the message is queued if `done` has not been called.
        """
        slots = _Slots(self.active, len(local))
        answered: list[bool] = []

        def reply(msgid: int | None, error: BaseException | None) -> None:
            answered.append(True)
            done(msgid, error)

        try:
            await self._direct_slots(message, sender, local, invoked, reply, slots)
        except Exception:
            if not answered:  # our bug: queued all the same
                self._enqueue_split(message, sender, {"local": local, "remote": []}, invoked, done)
            raise
        finally:
            if slots.held:
                slots.give_back(slots.held)
                self._fill()

    async def _direct_slots(
        self,
        message: bytes,
        sender: str,
        local: list[str],
        invoked: str,
        done: Written,
        slots: _Slots,
    ) -> None:
        assert self.direct is not None
        now = self.clock.now()
        try:
            msgid, draft, size = self.queue.write_draft(message, procid.pid(), invoked, now)
        except QueueError:
            slots.give_back(len(local))
            self._enqueue_split(message, sender, {"local": local, "remote": []}, invoked, done)
            return
        tasks = [asyncio.ensure_future(self.direct(a, sender, msgid, now, draft)) for a in local]
        answered, late = await asyncio.wait(tasks, timeout=DIRECT_WAIT)
        delivered = Message(msgid, sender, now, size, self._uid, qp=msgid)
        rest: list[str] = []
        for address, task in zip(local, tasks, strict=True):
            result = _direct_result(task) if task in answered else None
            if result is None or not result.ok:
                rest.append(address)
                if task in answered:
                    slots.give_back()
                continue
            if not delivered.recipients:
                self._log_new(delivered)
            recipient = Recipient("local", address, 0)
            delivered.recipients.append(recipient)
            number = self._log_start(delivered, "local", address)
            self._log_status()
            slots.give_back()
            self._recorded(number, delivered, recipient, "K", result.text)
            self._log_status()
        if late:  # still reading the draft: it goes when the last of them answers
            self._after_late(late, slots, draft)
        else:
            self.queue.discard_draft(draft)
        self._fill()
        if rest:
            local_rest = {"local": rest, "remote": []}
            announced = bool(delivered.recipients)
            self._enqueue_split(message, sender, local_rest, invoked, done, msgid, announced)
            return
        self.log.line(f"end msg {msgid}")
        self.events.publish("removed", id=msgid)
        done(msgid, None)

    def _after_late(
        self, late: Collection[asyncio.Future[Result]], slots: _Slots, draft: str
    ) -> None:
        """Direct deliveries past DIRECT_WAIT keep their slots and the draft
        until they answer; what they say no longer matters (their recipients
        are queued)."""
        theirs = slots.hand_over(len(late))

        def answered(task: asyncio.Future[Result]) -> None:
            _direct_result(task)  # retrieved, so that asyncio does not report it
            theirs.give_back()
            if not theirs.held:
                self.queue.discard_draft(draft)
            self._fill()

        for task in late:
            task.add_done_callback(answered)

    def adopt(
        self,
        msgid: int,
        sender: str,
        now: float,
        size: int,
        uid: int,
        local: list[str],
        remote: list[str],
        announced: bool = False,
    ) -> None:
        """Schedule a message queued already routed, as enqueue has written it."""
        message = Message(msgid, sender, now, size, uid, qp=msgid, plain=True)
        for channel, addresses in zip(CHANNELS, (local, remote), strict=True):
            offset = 0
            for address in addresses:
                message.recipients.append(Recipient(channel, address, offset))
                offset += len(address.encode("utf-8", "surrogateescape")) + 2
        self._accepted(message, now, announced)

    def _log_new(self, message: Message) -> None:
        self.log.line(f"new msg {message.id}")
        self.log.line(
            f"info msg {message.id}: bytes {message.size} from <{safe(message.sender)}>"
            f" qp {message.qp} uid {message.uid}"
        )
        self.events.publish("queued", id=message.id, sender=message.sender, size=message.size)

    def _accepted(self, message: Message, now: float, announced: bool = False) -> None:
        """A message is preprocessed: log it as qmail-send does (unless
        `announced` already) and schedule it."""
        if not announced:
            self._log_new(message)
        self.messages[message.id] = message
        if not message.recipients:
            self._spawn(self._finish(message))
            return
        for channel in message.channels():
            self._schedule(message, channel, now)
        self.wake()

    def _new_todo(self, msgid: int) -> None:
        """Preprocess a message we queued ourselves, without waiting for a todo/ scan."""
        if msgid not in self._preprocessing and msgid not in self.messages:
            self._preprocessing.add(msgid)
            self._spawn(self._preprocess(msgid))

    async def scan_todo(self) -> None:
        ids = await self.io(self.queue.todo_ids)
        for msgid in ids:
            if msgid not in self._preprocessing and msgid not in self.messages:
                self._preprocessing.add(msgid)
                self._spawn(self._preprocess(msgid))

    async def _preprocess(self, msgid: int) -> None:
        try:
            async with self._todo_slots:
                await self._preprocess_one(msgid)
        finally:
            self._preprocessing.discard(msgid)
        self.wake()

    async def _preprocess_one(self, msgid: int) -> None:
        now = self.clock.now()
        try:
            message = await self.io(self._preprocess_sync, msgid, now, self.config())
        except FileNotFoundError:
            return  # deleted meanwhile
        except (OSError, ValueError) as e:
            self.log.line(f"warning: trouble preprocessing todo/{msgid}: {e}")
            return
        self._accepted(message, now)

    def _preprocess_sync(self, msgid: int, now: float, config: Config) -> Message:
        """todo/N -> info and channel files (one worker-thread hop)."""
        envelope = self.queue.read_todo(msgid)
        size = self.queue.message_size(msgid)
        split: dict[str, list[str]] = {c: [] for c in CHANNELS}
        for rcpt in envelope.recipients:
            routed = route(config, rcpt)
            split[routed.channel].append(routed.address)
        self.queue.preprocess(msgid, envelope.sender, split["local"], split["remote"], now)
        message = Message(msgid, envelope.sender, now, size, envelope.uid, envelope.pid)
        for channel in CHANNELS:
            offset = 0
            for address in split[channel]:
                message.recipients.append(Recipient(channel, address, offset))
                offset += len(address.encode("utf-8", "surrogateescape")) + 2
        message.held = self.queue.root.hold(msgid).exists()
        return message

    # -- passes and jobs ------------------------------------------------------

    def _start_due_passes(self, now: float) -> None:
        while self._heap and self._next_due() <= now:
            _, msgid, channel = heapq.heappop(self._heap)
            message = self.messages[msgid]
            self._start_pass(message, channel, now)

    def _start_pass(self, message: Message, channel: str, now: float) -> None:
        pending = [r for r in message.pending(channel) if not r.busy]
        if not pending or channel in message.passes or message.held:
            return
        lifetime = self.config().queuelifetime
        p = Pass(
            message,
            channel,
            now,
            retry.next_attempt(message.birth, now, channel),
            retry.is_expired(message.birth, now, lifetime),
        )
        message.passes[channel] = p
        message.due.pop(channel, None)
        for recipient in pending:
            recipient.busy = True
        for group in _batches(channel, pending):
            p.outstanding += 1
            self.jobs[channel].append(Job(message, group, p))

    def _fill(self) -> None:
        for channel in CHANNELS:
            queue = self.jobs[channel]
            while queue and self.active[channel] < self.limit(channel) and not self._stopping:
                job = queue.popleft()
                self.active[channel] += 1
                numbers = None if job.message.removed else self._announce(job)
                self._spawn(self._run_job(job, numbers))

    def _announce(self, job: Job) -> list[int]:
        """Number the job's deliveries and log their start, each job's with the
        status that counts it and not the ones started after it, as qmail-send's
        `status: local 1/10` follows its first `starting delivery`."""
        message, channel = job.message, job.pass_.channel
        numbers = [self._log_start(message, channel, r.address) for r in job.recipients]
        self._log_status()
        return numbers

    def _log_start(self, message: Message, channel: str, address: str) -> int:
        """Number a delivery and log its start; returns its number."""
        self._delivery_numbers += 1
        number = self._delivery_numbers
        self.log.line(f"starting delivery {number}: msg {message.id} to {channel} {safe(address)}")
        self.events.publish(
            "delivery-started", number=number, id=message.id, channel=channel, recipient=address
        )
        return number

    async def _run_job(self, job: Job, numbers: list[int] | None) -> None:
        message, channel = job.message, job.pass_.channel
        try:
            if numbers is None:  # removed while it waited for a slot
                return
            try:
                outcomes = await self._attempt(job, self.clock.now())
            except asyncio.CancelledError:  # TERM's grace ran out: pending, tried again
                for number in numbers:
                    self.log.line(f"delivery {number}: deferral: {safe(DROPPED)}")
                raise
            for number, recipient, (status, text) in zip(
                numbers, job.recipients, outcomes, strict=True
            ):
                forwarded = FORWARDED.search(text) if channel == "local" and status == "K" else None
                if forwarded:
                    self._new_todo(int(forwarded.group(1)))
                self._recorded(number, message, recipient, status, text)
        finally:
            self.active[channel] -= 1
            for recipient in job.recipients:
                recipient.busy = False
            job.pass_.outstanding -= 1
            if job.pass_.outstanding == 0:
                await self._end_pass(job.pass_)
            self._log_status()
            self._fill()

    async def _attempt(self, job: Job, now: float) -> list[tuple[str, str]]:
        """Deliver, then record each result in the channel file (and bounce/N)."""
        message = job.message
        if job.pass_.channel == "local" and not self._local_is_async:
            return [await self.io(self._deliver_local_sync, job, now)]
        results = await self._deliver(job, now)
        # a failure appends to bounce/N with an fsync: that goes to a thread
        fails = any(
            r.status == "D" or (r.status == "Z" and (job.pass_.dying or message.giving_up))
            for r in results
        )
        record = self.io if fails else self.quick_io
        return await record(self._record_all, job, results)

    async def _deliver(self, job: Job, now: float) -> list[Result]:
        """The deliverer's results, one per recipient whatever happens: a bug
        in a deliverer must not lose the message."""
        message = job.message
        addresses = [r.address for r in job.recipients]
        try:
            if job.pass_.channel == "local":
                local = cast(Deliverer, self.local)
                results = [await local(addresses[0], message.sender, message.id, now)]
            else:
                task = asyncio.current_task()
                assert task is not None
                self._in_transaction.add(task)
                try:
                    results = await self.remote(addresses, message.sender, message.id, now)
                finally:
                    self._in_transaction.discard(task)
            if len(results) != len(addresses):
                raise ValueError(f"{len(results)} results for {len(addresses)} recipients")
        except Exception as e:
            return [Result("Z", f"Internal error in delivery: {e!r} (#4.3.0)\n") for _ in addresses]
        return results

    def _deliver_local_sync(self, job: Job, now: float) -> tuple[str, str]:
        """Deliver and record the result in the same worker-thread hop."""
        message, recipient = job.message, job.recipients[0]
        deliver = cast(LocalDeliverer, self.local)
        try:
            result = deliver(recipient.address, message.sender, message.id, now)
        except Exception as e:  # a bug in local delivery must not lose the message
            result = Result("Z", f"Internal error in delivery: {e!r} (#4.3.0)\n")
        return self._record_sync(job, recipient, result)

    def _record_all(self, job: Job, results: list[Result]) -> list[tuple[str, str]]:
        return [
            self._record_sync(job, r, result)
            for r, result in zip(job.recipients, results, strict=True)
        ]

    def _record_sync(self, job: Job, recipient: Recipient, result: Result) -> tuple[str, str]:
        """Turn a result into the channel file's D mark and the bounce report.

        A deferral in a pass past the lifetime, or of a message the postmaster
        bounced, is a failure (send.md §5). Returns the final (status, text).
        """
        message = job.message
        status, text = result.status, result.text
        if status == "Z" and (job.pass_.dying or message.giving_up):
            status = "D"
            text = (text if text.endswith("\n") else text + "\n") + (
                retry.EXPIRED_TEXT if job.pass_.dying else ADMIN_BOUNCE
            )
        if status not in ("K", "Z", "D"):
            return "?", text
        if message.removed:
            return status, text
        try:
            if status == "D":
                address = unvirtual(self.config(), recipient.address)
                message.plain = False
                self.queue.append_bounce(message.id, address, text)
            if status in ("K", "D"):
                self.queue.mark_done(recipient.channel, message.id, recipient.offset)
        except OSError as e:
            # qmail-send's words: the record stays T, so the recipient is tried again.
            path = f"{recipient.channel}/{message.id}"
            self.log.line(f"warning: trouble marking {path}; message will be delivered twice!")
            self.log.line(f"warning: {path}: {e.strerror or e}")
            return "Z", text
        return status, text

    def _recorded(
        self, number: int, message: Message, recipient: Recipient, status: str, text: str
    ) -> None:
        word = {"K": "success", "Z": "deferral", "D": "failure"}.get(status)
        if word is None:
            self.log.line(f"delivery {number}: report mangled, will defer")
            status = "Z"
        else:
            self.log.line(f"delivery {number}: {word}: {safe(text)}")
        recipient.attempts += 1
        recipient.last_reply = text.rstrip("\n")
        recipient.last_attempt = self.clock.now()
        if status in ("K", "D") and not message.removed:
            recipient.done = True
            recipient.bounced = status == "D"
        self.events.publish(
            "delivery-finished",
            number=number,
            id=message.id,
            channel=recipient.channel,
            recipient=recipient.address,
            result=status,
            text=text,
        )

    async def _end_pass(self, p: Pass) -> None:
        message, channel = p.message, p.channel
        if message.passes.get(channel) is p:
            del message.passes[channel]
        if message.removed:
            return
        if not message.pending(channel):
            if not message.pending() and not message.passes:
                await self._finish(message)
                return
            await self.quick_io(self.queue.remove_channel, channel, message.id)
        else:
            when = p.next_due
            if message.giving_up:
                when = self.clock.now()
            self._schedule(message, channel, when)
            await self.io(self._reschedule_sync, message, channel, when)

    def _reschedule_sync(self, message: Message, channel: str, when: float) -> None:
        self.queue.set_due(channel, message.id, when)
        self._save_state(message)

    def _save_state(self, message: Message) -> None:
        message.plain = False
        data = {
            "recipients": {
                f"{r.channel}:{r.address}": {
                    "attempts": r.attempts,
                    "last_reply": r.last_reply,
                    "last_attempt": r.last_attempt,
                    "bounced": r.bounced,
                }
                for r in message.recipients
                if r.attempts or r.bounced
            }
        }
        with contextlib.suppress(OSError):
            self.queue.write_state(message.id, json.dumps(data).encode())

    # -- finishing: bounce, then removal (queue.md §6.3) ---------------------

    async def _finish(self, message: Message) -> None:
        if message.finishing or message.removed:
            return
        message.finishing = True
        try:
            bounce = self.queue.root.flat_name("bounce", message.id)
            # One stat is cheaper than a hop; a plain message has no bounce/N.
            bouncing = not message.plain and os.path.exists(bounce)  # noqa: ASYNC240
            if bouncing:  # a bounce to queue: it syncs, so in a thread
                outcome = await self.io(self._finish_sync, message, self.config(), True)
            else:
                outcome = await self.quick_io(self._finish_sync, message, self.config(), False)
        except (OSError, QueueError) as e:
            message.finishing = False
            text = e.text if isinstance(e, QueueError) else str(e)
            self.log.line(f"warning: trouble injecting bounce message, will try later ({text})")
            self._retry_finish_later(message)
            return
        if outcome == "triple":
            self.log.line(f"triple bounce: discarding bounce/{message.id}")
        elif isinstance(outcome, int):
            self.log.line(f"bounce msg {message.id} qp {outcome}")
            self._new_todo(outcome)
        self.log.line(f"end msg {message.id}")
        message.removed = True
        self.messages.pop(message.id, None)
        self.events.publish("removed", id=message.id)

    def _finish_sync(
        self, message: Message, config: Config, bouncing: bool = True
    ) -> int | str | None:
        """Queue the bounce, if any, then remove the message (queue.md §6.3).

        Returns the bounce's id, "triple" for a discarded triple bounce, or None.
        """
        for channel in message.channels() if message.plain else CHANNELS:
            self.queue.remove_channel(channel, message.id)
        outcome: int | str | None = None
        reports = self.queue.read_bounce(message.id) if bouncing else None
        if reports is not None:
            made = bounces.make_bounce(
                sender=message.sender,
                reports=reports,
                original=self.queue.read_message(message.id),
                bouncefrom=config.bouncefrom,
                bouncehost=config.bouncehost,
                doublebounce_recipient=f"{config.doublebounceto}@{config.doublebouncehost}",
                now=self.clock.now(),
                max_bytes=config.bouncemaxbytes,
            )
            if made is None:
                outcome = "triple"
            else:
                outcome = self.queue.enqueue(
                    made.message,
                    made.sender,
                    [made.recipient],
                    uid=os.getuid(),
                    pid=os.getpid(),
                    invoked="invoked for bounce",
                    now=self.clock.now(),
                )
            self.queue.remove_bounce(message.id)
        # reuse_mess: every delivery has ended
        self.queue.remove_message(message.id, reuse_mess=True, plain=message.plain)
        return outcome

    def _retry_finish_later(self, message: Message) -> None:
        async def later() -> None:
            await asyncio.sleep(SYSFAIL)
            await self._finish(message)

        self._spawn(later())

    # -- admin operations ---------------------------------------------------

    def retry_all(self) -> None:
        """ALRM: every pending message not held is due now (send.md §4.3)."""
        self._act_retry(list(self.messages.values()))

    def _act_retry(self, messages: Iterable[Message]) -> list[int]:
        now = self.clock.now()
        done = []
        for message in messages:
            if message.held or message.removed:
                continue
            for channel in message.channels():
                if message.pending(channel) and channel not in message.passes:
                    self._schedule(message, channel, now)
            done.append(message.id)
        self.wake()
        return done

    async def act(self, action: str, ids: list[int], dry_run: bool = False) -> ActionResult:
        """retry | hold | release | bounce | delete, on messages by id."""
        failed: dict[int, str] = {}
        targets = []
        for msgid in ids:
            message = self.messages.get(msgid)
            if message is None or message.removed:
                failed[msgid] = "no such message in the queue"
            else:
                targets.append(message)
        if dry_run:
            return ActionResult(action, [m.id for m in targets], [], failed, True)
        done: list[int] = []
        skipped: dict[int, str] = {}
        for message in targets:
            try:
                if await self._act_one(action, message):
                    done.append(message.id)
                else:
                    skipped[message.id] = "held: release it first"
            except OSError as e:
                failed[message.id] = f"{e.strerror or e}"
        self.wake()
        return ActionResult(action, [m.id for m in targets], done, failed, False, skipped)

    async def _act_one(self, action: str, message: Message) -> bool:
        if action == "retry":
            if message.held:
                return False
            if not message.preprocessed:
                self.wake()  # it is in todo/: it will start as soon as it is preprocessed
                return True
            self._act_retry([message])
            for channel, when in list(message.due.items()):
                await self.io(self.queue.set_due, channel, message.id, when)
            self.log.line(f"info msg {message.id}: retry requested")
        elif action in ("hold", "release"):
            held = action == "hold"
            message.plain = False
            await self.io(self.queue.set_held, message.id, held)
            message.held = held
            self.log.line(f"info msg {message.id}: {'held' if held else 'released'}")
            if not held:
                now = self.clock.now()
                for channel in message.channels():
                    if message.pending(channel) and channel not in message.passes:
                        self._schedule(message, channel, now)
                        await self.io(self.queue.set_due, channel, message.id, now)
            self.events.publish("changed", id=message.id, held=held)
        elif action == "bounce":
            await self._give_up(message)
        elif action == "delete":
            await self._delete(message)
        else:
            raise ValueError(action)
        return True

    async def _give_up(self, message: Message) -> None:
        if not message.preprocessed:
            await self._preprocess_one(message.id)
            message = self.messages.get(message.id, message)
        message.giving_up = True
        message.held = False
        message.plain = False
        await self.io(self.queue.set_held, message.id, False)
        self.log.line(f"info msg {message.id}: bounce requested")
        config = self.config()
        for recipient in message.pending():
            if recipient.busy:
                continue  # its delivery is running; a deferral will become a failure
            await self.io(
                self.queue.append_bounce,
                message.id,
                unvirtual(config, recipient.address),
                ADMIN_BOUNCE,
            )
            await self.io(self.queue.mark_done, recipient.channel, message.id, recipient.offset)
            recipient.done = recipient.bounced = True
            recipient.last_reply = ADMIN_BOUNCE.rstrip("\n")
        if not message.passes:
            await self._finish(message)

    async def _delete(self, message: Message) -> None:
        message.removed = True
        self.messages.pop(message.id, None)
        for channel in CHANNELS:
            self.jobs[channel] = collections.deque(
                j for j in self.jobs[channel] if j.message is not message
            )
        reading = any(r.busy for r in message.recipients)  # a delivery may hold it open
        await self.io(self.queue.remove_message, message.id, not reading)
        self.log.line(f"info msg {message.id}: deleted by the postmaster")
        self.log.line(f"end msg {message.id}")
        self.events.publish("removed", id=message.id)


def _batches(channel: str, pending: list[Recipient]) -> list[list[Recipient]]:
    """Local: one recipient each. Remote: a domain's recipients together (the
    domain compared without case), at most BATCH_MAX to a transaction, in the
    order the domains first appear."""
    if channel == "local":
        return [[r] for r in pending]
    groups: dict[str, list[Recipient]] = {}
    for r in pending:
        groups.setdefault(r.address.rpartition("@")[2].lower(), []).append(r)
    return [
        group[i : i + BATCH_MAX]
        for group in groups.values()
        for i in range(0, len(group), BATCH_MAX)
    ]
