"""Group commit: one syncfs for many writers, never one that began too early."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from core.durable import FsyncEach, GroupCommit, LoopGroupCommit, ThreadGroupCommit, run_steps

pytestmark = pytest.mark.timeout(30)


class SlowSync:
    """A syncfs that each call records and that waits until the test lets it go."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self.release = threading.Event()
        self.started = threading.Event()

    def __call__(self, fd: int) -> int:
        self.calls.append(time.monotonic())
        self.started.set()
        self.release.wait(10)
        return 0


def test_a_writer_arriving_during_a_sync_waits_for_the_next_one(tmp_path: Path) -> None:
    gc = GroupCommit()
    fake = SlowSync()
    gc._syncfs = fake
    done: dict[str, float] = {}

    def writer(name: str) -> None:
        gc.sync([], [tmp_path])
        done[name] = time.monotonic()

    first = threading.Thread(target=writer, args=("first",))
    first.start()
    assert fake.started.wait(5)
    second = threading.Thread(target=writer, args=("second",))
    second.start()
    time.sleep(0.1)
    fake.release.set()
    first.join(5)
    second.join(5)
    gc.close()
    assert len(fake.calls) == 2  # the second writer's data may postdate the first sync
    assert done["second"] > fake.calls[1]


def test_writers_waiting_together_share_one_sync(tmp_path: Path) -> None:
    gc = GroupCommit()
    fake = SlowSync()
    gc._syncfs = fake
    blocker = threading.Thread(target=gc.sync, args=([], [tmp_path]))
    blocker.start()
    assert fake.started.wait(5)
    waiters = [threading.Thread(target=gc.sync, args=([], [tmp_path])) for _ in range(10)]
    for t in waiters:
        t.start()
    time.sleep(0.2)
    fake.release.set()
    for t in [blocker, *waiters]:
        t.join(5)
    gc.close()
    assert len(fake.calls) == 2  # one for the first writer, one for the ten that queued


def test_a_failed_sync_is_an_error_for_its_writers(tmp_path: Path) -> None:
    import ctypes
    import errno

    def failing(fd: int) -> int:
        ctypes.set_errno(errno.EIO)
        return -1

    gc = GroupCommit()
    gc._syncfs = failing
    with pytest.raises(OSError, match="Input/output error") as caught:
        gc.sync([], [tmp_path])
    gc.close()
    assert caught.value.errno == errno.EIO


def test_the_real_syncfs_and_fsync_each_run(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x")
    gc = GroupCommit()
    assert gc.is_grouped
    gc.sync([f], [tmp_path])
    assert gc.syncs == 1
    gc.close()
    FsyncEach().sync([f], [tmp_path])


def test_thread_writers_are_called_back_together_by_the_syncer(tmp_path: Path) -> None:
    """The delivery workers' group commit: writers that ask while a sync runs
    are called back in one batch on the syncer thread after the next one, and
    a writer that asks again from its callback waits for a sync after that."""
    gc = GroupCommit()
    fake = SlowSync()
    gc._syncfs = fake
    syncer = ThreadGroupCommit(gc)
    heard: list[tuple[str, int, str]] = []
    all_heard = threading.Event()

    def waiter(name: str, again: bool = False):  # type: ignore[no-untyped-def]
        def synced(error: OSError | None) -> None:
            assert error is None
            heard.append((name, len(fake.calls), threading.current_thread().name))
            if again:
                syncer.then([], [tmp_path], waiter(name + " again"))
            if len(heard) == 12:
                all_heard.set()

        return synced

    try:
        syncer.then([], [tmp_path], waiter("first"))
        assert fake.started.wait(5)
        for i in range(10):
            syncer.then([], [tmp_path], waiter(f"w{i}", again=i == 0))
        time.sleep(0.1)
        assert [h[0] for h in heard] == []
        fake.release.set()
        assert all_heard.wait(5)
    finally:
        fake.release.set()
        syncer.close()
        gc.close()
    assert heard[0][:2] == ("first", 1)
    assert {h[1] for h in heard[1:11]} == {2}  # the ten shared the second sync
    assert heard[11][:2] == ("w0 again", 3)
    assert {h[2] for h in heard} == {"syncer"}


def test_steps_get_the_sync_error_thrown_in_where_they_asked(tmp_path: Path) -> None:
    import errno

    class Failing:
        def sync(self, files: object, dirs: object) -> None:
            raise OSError(errno.EIO, "Input/output error")

    def steps():  # type: ignore[no-untyped-def]
        yield None  # "may block": nothing to sync
        try:
            yield [], [tmp_path]
        except OSError as e:
            return f"undone after {e.strerror}"
        return "durable"

    assert run_steps(steps(), FsyncEach()) == "durable"
    assert run_steps(steps(), Failing()) == "undone after Input/output error"


async def synced(syncer: LoopGroupCommit, files: list[Path], dirs: list[Path]) -> None:
    """A writer on the loop waiting for the group commit, as the core's are
    called back (`then`): done on the loop, or the sync's error raised."""
    import asyncio

    future = asyncio.get_running_loop().create_future()

    def done(error: OSError | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(OSError(error.errno, error.strerror))

    syncer.then(files, dirs, done)
    await future


async def test_loop_writers_waiting_together_share_one_sync(tmp_path: Path) -> None:
    """The core's group commit on the event loop: ten writers that ask while a
    sync runs are all covered by the next one, and are woken together."""
    import asyncio

    gc = GroupCommit()
    fake = SlowSync()
    gc._syncfs = fake
    syncer = LoopGroupCommit(asyncio.get_running_loop(), gc)
    try:
        first = asyncio.ensure_future(synced(syncer, [], [tmp_path]))
        deadline = time.monotonic() + 5
        while not fake.started.is_set():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(synced(syncer, [], [tmp_path])) for _ in range(10)]
        await asyncio.sleep(0.1)
        assert not any(f.done() for f in [first, *rest])
        fake.release.set()
        await asyncio.wait_for(asyncio.gather(first, *rest), 5)
    finally:
        fake.release.set()
        syncer.close()
        gc.close()
    assert len(fake.calls) == 2


async def test_a_failed_loop_sync_is_an_error_for_each_writer_and_undoes_the_message(
    tmp_path: Path,
) -> None:
    """A sync that fails while a message is being queued: the writer gets
    qmail-queue's write error, and nothing of the message stays in the queue."""
    import asyncio
    import ctypes
    import errno

    from core.paths import QmailRoot
    from core.queue import Queue, QueueError
    from core.setup import init_root

    def failing(fd: int) -> int:
        ctypes.set_errno(errno.ENOSPC)
        return -1

    root = init_root(tmp_path / "qmail", me="mx.example.org")
    gc = GroupCommit()
    gc._syncfs = failing
    syncer = LoopGroupCommit(asyncio.get_running_loop(), gc)
    queue = Queue(QmailRoot(root.path), durability=gc)

    def messages() -> list[Path]:  # lock/nextid counts ids, which are never reused
        files = (p.relative_to(root.queue) for p in root.queue.rglob("*") if p.is_file())
        return sorted(p for p in files if p.parts[0] != "lock")

    before = messages()
    steps = queue.enqueue_routed_steps(
        b"Subject: x\n\nbody\n",
        "a@b.test",
        ["u@mx.example.org"],
        [],
        uid=0,
        pid=1,
        invoked="invoked from network",
        now=time.time(),
        qp_is_id=True,
    )
    files, dirs = next(steps)
    try:
        with pytest.raises(OSError, match="No space left") as caught:
            await asyncio.wait_for(synced(syncer, files, dirs), 5)
        assert caught.value.errno == errno.ENOSPC
        with pytest.raises(QueueError, match="qq write error or disk full"):
            steps.throw(caught.value)
    finally:
        syncer.close()
        gc.close()
    assert messages() == before
