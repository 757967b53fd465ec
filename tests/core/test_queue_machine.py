"""The queue as a state machine against a dict model (STYLE.md §4).

Rules enqueue, preprocess, mark records done, remove messages, and do each
of those again with the process dying at a chosen system call; `recover`
runs the core's start-up cleanup. Whatever happened, every committed message
(todo/N or info/S/N on disk) is there whole, and after recovery nothing else is.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from core.paths import SPLIT, QmailRoot
from core.queue import CHANNELS, Queue, encode_envelope, received_line
from core.setup import init_root
from tests.queue_faults import DEAD_PID, Crash, crash_after, queue_files

NOW = 1_700_000_000.0


def _no_line_breaks(text: str) -> bool:
    return not any(c in text for c in "\0\r\n")


# Addresses as they come off the wire: any bytes, decoded as the core decodes them.
addresses = (
    st.binary(max_size=24)
    .map(lambda b: b.decode("utf-8", "surrogateescape"))
    .filter(_no_line_breaks)
)
recipients = st.lists(st.tuples(addresses, st.sampled_from(CHANNELS)), max_size=4)
messages = st.binary(max_size=3000)


@dataclass
class Expected:
    mess: bytes
    envelope: bytes
    sender: str
    recipients: dict[str, list[str]]  # channel -> addresses, in file order
    preprocessed: bool = False
    done: set[tuple[str, int]] = field(default_factory=set)  # (channel, index)
    dropped: set[str] = field(default_factory=set)  # channel files removed when all done


class QueueMachine(RuleBasedStateMachine):
    def __init__(self, base: Path) -> None:
        super().__init__()
        self.base = base
        self.model: dict[int, Expected] = {}
        self.issued = 0  # the highest id ever handed out

    @initialize()
    def make_root(self) -> None:
        self.dir = tempfile.mkdtemp(dir=self.base)
        self.root: QmailRoot = init_root(Path(self.dir) / "qmail", me="mx.example.org")
        self.queue = Queue(self.root)

    def teardown(self) -> None:
        if hasattr(self, "dir"):
            try:
                self.recover()  # however the run ended, a restart leaves nothing stray
            finally:
                shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers -------------------------------------------------------------

    def _enqueue(self, body: bytes, sender: str, rcpts: list[tuple[str, str]], pid: int) -> None:
        self.queue.enqueue(
            body,
            sender,
            [a for a, _ in rcpts],
            uid=0,
            pid=pid,
            invoked="invoked by uid 0",
            now=NOW,
        )

    def _expect(
        self, msgid: int, body: bytes, sender: str, rcpts: list[tuple[str, str]], pid: int
    ) -> Expected:
        split: dict[str, list[str]] = {c: [] for c in CHANNELS}
        for address, channel in rcpts:
            split[channel].append(address)
        return Expected(
            mess=received_line(pid, "invoked by uid 0", NOW) + body,
            envelope=encode_envelope(0, pid, sender, [a for a, _ in rcpts]),
            sender=sender,
            recipients=split,
        )

    def _new_ids(self) -> list[int]:
        """Wrap new_id to see which id a (possibly dying) enqueue took."""
        taken: list[int] = []
        real = Queue.new_id

        def new_id() -> int:
            msgid = real(self.queue)
            taken.append(msgid)
            return msgid

        self.queue.new_id = new_id  # type: ignore[method-assign]
        return taken

    def _pick(self, data: st.DataObject, preprocessed: bool | None) -> int | None:
        ids = sorted(
            i
            for i, e in self.model.items()
            if preprocessed is None or e.preprocessed == preprocessed
        )
        return data.draw(st.sampled_from(ids)) if ids else None

    def _preprocess(self, msgid: int) -> None:
        e = self.model[msgid]
        self.queue.preprocess(msgid, e.sender, e.recipients["local"], e.recipients["remote"], NOW)

    def _committed(self, msgid: int) -> bool:
        return self.root.todo(msgid).exists() or self.root.info(msgid).exists()

    # -- rules -----------------------------------------------------------------

    @rule(body=messages, sender=addresses, rcpts=recipients)
    def enqueue(self, body: bytes, sender: str, rcpts: list[tuple[str, str]]) -> None:
        taken = self._new_ids()
        self._enqueue(body, sender, rcpts, pid=4242)
        (msgid,) = taken
        assert msgid > self.issued, "an id was handed out twice"
        self.issued = msgid
        self.model[msgid] = self._expect(msgid, body, sender, rcpts, 4242)

    @rule(body=messages, sender=addresses, rcpts=recipients, calls=st.integers(0, 24))
    def enqueue_and_die(
        self, body: bytes, sender: str, rcpts: list[tuple[str, str]], calls: int
    ) -> None:
        taken = self._new_ids()
        try:
            with crash_after(calls):
                self._enqueue(body, sender, rcpts, pid=DEAD_PID)
        except Crash:
            pass
        if taken:
            (msgid,) = taken
            assert msgid > self.issued, "an id was handed out twice"
            self.issued = msgid
            if self._committed(msgid):  # died after the commit: queued, if not acknowledged
                self.model[msgid] = self._expect(msgid, body, sender, rcpts, DEAD_PID)

    @rule(data=st.data())
    def preprocess(self, data: st.DataObject) -> None:
        msgid = self._pick(data, preprocessed=False)
        if msgid is not None:
            self._preprocess(msgid)
            self.model[msgid].preprocessed = True

    @rule(data=st.data(), calls=st.integers(0, 26))
    def preprocess_and_die(self, data: st.DataObject, calls: int) -> None:
        msgid = self._pick(data, preprocessed=False)
        if msgid is None:
            return
        try:
            with crash_after(calls):
                self._preprocess(msgid)
        except Crash:
            pass
        # todo/N goes last: while it is there the message still waits for preprocessing
        self.model[msgid].preprocessed = not self.root.todo(msgid).exists()

    @rule(data=st.data())
    def mark_done(self, data: st.DataObject) -> None:
        msgid = self._pick(data, preprocessed=True)
        if msgid is None:
            return
        e = self.model[msgid]
        pending = [
            (c, i) for c in CHANNELS for i in range(len(e.recipients[c])) if (c, i) not in e.done
        ]
        if not pending:
            return
        channel, index = data.draw(st.sampled_from(pending))
        found = self.queue.read_channel(channel, msgid)
        assert found is not None
        self.queue.mark_done(channel, msgid, found[0][index].offset)
        e.done.add((channel, index))
        if all((channel, i) in e.done for i in range(len(e.recipients[channel]))):
            self.queue.remove_channel(channel, msgid)  # as the scheduler does
            e.dropped.add(channel)

    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        msgid = self._pick(data, preprocessed=None)
        if msgid is not None:
            self.queue.remove_message(msgid)
            del self.model[msgid]

    @rule(data=st.data(), calls=st.integers(0, 9))
    def remove_and_die(self, data: st.DataObject, calls: int) -> None:
        msgid = self._pick(data, preprocessed=None)
        if msgid is None:
            return
        try:
            with crash_after(calls):
                self.queue.remove_message(msgid)
        except Crash:
            pass
        if not self._committed(msgid):
            del self.model[msgid]  # past S5 -> S2: gone, whatever is left is garbage

    @precondition(lambda self: hasattr(self, "root"))
    @rule()
    def recover(self) -> None:
        """What a starting core does (send.md: cleanup before the first scan)."""
        self.queue.cleanup_orphans(time.time())
        files = queue_files(self.root)
        present: dict[str, set[int]] = {}
        for name in files:
            kind, _, rest = name.partition("/")
            if kind == "pid":
                raise AssertionError(f"{name} outlived its dead writer")
            if kind != "lock":
                present.setdefault(kind, set()).add(int(rest.rpartition("/")[2]))
        waiting = {i for i, e in self.model.items() if not e.preprocessed}
        assert present.get("mess", set()) == set(self.model), "a message file without a message"
        assert present.get("todo", set()) == waiting
        assert present.get("intd", set()) <= waiting
        for kind in ("info", "local", "remote"):
            assert present.get(kind, set()) <= set(self.model), f"{kind}/ of a message gone"

    # -- what must always hold ------------------------------------------------

    @precondition(lambda self: hasattr(self, "root"))
    @invariant()
    def every_committed_message_is_whole(self) -> None:
        waiting = sorted(i for i, e in self.model.items() if not e.preprocessed)
        assert self.queue.todo_ids() == waiting
        assert self.queue.info_ids() == sorted(i for i, e in self.model.items() if e.preprocessed)
        for msgid, e in self.model.items():
            assert self.queue.read_message(msgid) == e.mess
            if not e.preprocessed:
                assert self.root.todo(msgid).read_bytes() == e.envelope
                continue
            assert self.queue.read_info(msgid) == (e.sender, NOW)
            for channel in CHANNELS:
                found = self.queue.read_channel(channel, msgid)
                if not e.recipients[channel] or channel in e.dropped:
                    assert found is None
                    continue
                assert found is not None
                records = found[0]
                assert [r.address for r in records] == e.recipients[channel]
                assert [r.done for r in records] == [
                    (channel, i) in e.done for i in range(len(records))
                ]

    @precondition(lambda self: hasattr(self, "root"))
    @invariant()
    def ids_come_from_the_split_directories(self) -> None:
        for msgid in self.model:
            assert self.root.mess(msgid) == self.root.queue / "mess" / str(msgid % SPLIT) / str(
                msgid
            )


@pytest.mark.timeout(300)
def test_the_queue_keeps_every_committed_message_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A dying process, not a power cut, is simulated here: fsync only costs time.
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    run_state_machine_as_test(
        lambda: QueueMachine(tmp_path),
        settings=settings(
            max_examples=int(os.environ.get("QUEUE_MACHINE_EXAMPLES", "60")),
            stateful_step_count=30,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
