"""Making writes durable: fsync each file, or one group commit for many writers.

Every promise the core makes (inject's exit 0, SMTP's 250, a Maildir
delivery) waits on `Durability.sync(files, dirs)`: when it returns, those
files and directory entries survive a crash.

- `FsyncEach` fsyncs exactly what it is given: right for one writer, such as
  `qmailtui inject`, which must not flush the rest of the file system.
- `GroupCommit` is the running core's: threads that need a sync at the same
  time share one `syncfs(2)` of the file system holding their files. On the
  machines we measured (ext4 without a journal) a file with write + fsync +
  rename + directory fsync cost ~400 us of CPU with ten writers; batches under
  one syncfs cost ~60 us a file. A writer whose sync is asked for while
  another is running waits for the next one, which starts after its writes:
  nobody is told "durable" by a sync that began before its write.
- `ThreadGroupCommit` (and `LoopGroupCommit`, its event-loop form) calls
  writers back instead of waking a blocked thread each. A writer is then a
  generator of sync points (`Steps`: the queue's enqueue, a Maildir
  delivery), which `drive_steps` runs with no thread of its own and
  `run_steps` runs blocking: the same code either way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

StrPath = str | os.PathLike[str]  # the queue's hot paths pass plain strings


class Durability(Protocol):
    def sync(self, files: Sequence[StrPath], dirs: Sequence[StrPath]) -> None: ...


def fsync_path(path: StrPath) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(tmp: Path, target: Path, data: bytes, mode: int | None = None) -> None:
    """Write `data` to `tmp`, fsync it, rename it onto `target`, fsync the
    directory: readers see the old file or the new one, and the new one lasts.
    `tmp` is removed again on failure. As tcprules and qmail-newu end: 0644
    less the umask, or `mode` whatever the umask (O_NONBLOCK: a FIFO at `tmp`
    never hangs us)."""
    fd = os.open(tmp, os.O_WRONLY | os.O_NONBLOCK | os.O_TRUNC | os.O_CREAT, 0o644)
    try:
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(target.parent)  # the rename must reach the disk too


class FsyncEach:
    def sync(self, files: Sequence[StrPath], dirs: Sequence[StrPath]) -> None:
        for path in files:
            fsync_path(path)
        for path in dict.fromkeys(dirs):
            fsync_path(path)


T = TypeVar("T")
Sync = tuple[Sequence[StrPath], Sequence[StrPath]]
# Writing as steps: each yield asks for (files, dirs) to be made durable before
# going on, or is None: "what comes next may block for long (a lock, a program)".
# A caller with a group commit of its own drives them without a thread per
# writer; an OSError from a sync is thrown back in at the yield.
Steps = Generator[Sync | None, None, T]


def run_steps(steps: Steps[T], durable: Durability) -> T:
    """Drive `steps` to their end here, blocking at each sync point."""
    error: OSError | None = None
    while True:
        try:
            step = steps.send(None) if error is None else steps.throw(error)
        except StopIteration as done:
            return cast(T, done.value)
        error = None
        if step is not None:
            try:
                durable.sync(*step)
            except OSError as e:
                error = e


SyncFs = Callable[[int], int]
Synced = Callable[[OSError | None], None]


def _load_syncfs() -> SyncFs | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        func = libc.syncfs
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int]
    func.restype = ctypes.c_int
    syncfs: SyncFs = func
    return syncfs


class _Device:
    """Leader/follower state for one file system."""

    def __init__(self, anchor: StrPath) -> None:
        self.fd = os.open(anchor, os.O_RDONLY | os.O_DIRECTORY)
        self.cond = threading.Condition()
        self.started = 0  # generations of syncfs begun
        self.finished = 0  # generations completed
        self.running = False
        self.error: OSError | None = None


class GroupCommit:
    def __init__(self) -> None:
        self._syncfs = _load_syncfs()
        self._fallback = FsyncEach()
        self._devices: dict[int, _Device] = {}
        self._anchors: dict[str, _Device] = {}  # a directory's device, found once
        self._lock = threading.Lock()
        self.syncs = 0  # how many syncfs calls were made (for the benchmark)

    @property
    def is_grouped(self) -> bool:
        return self._syncfs is not None

    def _device(self, anchor: StrPath) -> _Device:
        name = os.fspath(anchor)
        known = self._anchors.get(name)
        if known is not None:
            return known
        dev = os.stat(name).st_dev
        with self._lock:
            device = self._devices.get(dev)
            if device is None:
                device = self._devices[dev] = _Device(name)
            if len(self._anchors) < 4096:
                self._anchors[name] = device
            return device

    def sync(self, files: Sequence[StrPath], dirs: Sequence[StrPath]) -> None:
        if self._syncfs is None:
            self._fallback.sync(files, dirs)
            return
        anchors = list(dict.fromkeys(dirs or [os.path.dirname(os.fspath(p)) for p in files]))
        for anchor in dict.fromkeys(self._device(a) for a in anchors):
            self._sync_device(anchor)

    def _sync_device(self, device: _Device) -> None:
        with device.cond:
            # Our writes are done: any syncfs that *starts* from now on covers them.
            wanted = device.started + 1
            while device.finished < wanted:
                if not device.running:
                    device.running = True
                    device.started += 1
                    generation = device.started
                    device.cond.release()
                    try:
                        error = self._run(device)
                    finally:
                        device.cond.acquire()
                    device.running = False
                    device.finished = generation
                    device.error = error
                    device.cond.notify_all()
                    if error is not None:
                        raise error
                    if generation >= wanted:
                        return
                else:
                    device.cond.wait()
            if device.error is not None:
                raise device.error

    def _run(self, device: _Device) -> OSError | None:
        assert self._syncfs is not None
        self.syncs += 1
        if self._syncfs(device.fd) != 0:
            err = ctypes.get_errno()
            return OSError(err, os.strerror(err))
        return None

    def close(self) -> None:
        with self._lock:
            for device in self._devices.values():
                os.close(device.fd)
            self._devices.clear()
            self._anchors.clear()


Waiter = tuple[Sequence[StrPath], Sequence[StrPath], Synced]


class ThreadGroupCommit:
    """Group commit for writers that go on in a callback: one thread runs one
    syncfs for every writer waiting at that moment, then calls the whole batch
    back (`wake`). A waiter asks after its writes are done; the batch it joins
    is taken, and its syncfs begun, after that: nobody is told "durable" by a
    sync that began before its write.

    Writers that each block in `GroupCommit.sync` wake one by one after every
    syncfs (a futex hand-off and a turn at the GIL each); called back in one
    batch, they cost one hand-off per sync. Without `wake` the callbacks run on
    the syncer thread itself.
    """

    def __init__(
        self,
        fallback: GroupCommit,
        wake: Callable[[list[Waiter], OSError | None], None] | None = None,
    ) -> None:
        self._fallback = fallback  # no syncfs here: fsync each file, in the thread
        self.durable: Durability = fallback  # for a writer that syncs on its own thread
        self._wake = wake or _call_back
        self._cond = threading.Condition()
        self._waiting: list[Waiter] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="syncer", daemon=True)
        self._thread.start()

    def then(self, files: Sequence[StrPath], dirs: Sequence[StrPath], synced: Synced) -> None:
        """Call `synced(None)` once files and dirs are durable, or `synced(error)`
        if the sync failed."""
        with self._cond:
            self._waiting.append((files, dirs, synced))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if not self._waiting:
                    return
                batch, self._waiting = self._waiting, []
            error: OSError | None = None
            try:
                if self._fallback.is_grouped:
                    anchors: dict[StrPath, None] = {}
                    for files, dirs, _ in batch:
                        for anchor in dirs or [os.path.dirname(os.fspath(p)) for p in files]:
                            anchors[anchor] = None
                    self._fallback.sync([], list(anchors))  # one syncfs per file system
                else:
                    for files, dirs, _ in batch:
                        self._fallback.sync(files, dirs)
            except OSError as e:
                error = e
            self._wake(batch, error)

    def close(self) -> None:
        """Let the waiting writers finish, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(60)


Done = Callable[[Any, BaseException | None], None]


def drive_steps(
    steps: Steps[Any],
    syncer: ThreadGroupCommit | None,
    done: Done,
    blocking: Callable[[Callable[[], None]], object] | None = None,
    durable: Durability | None = None,
) -> None:
    """Run `steps` to their end without a thread of their own: up to each sync
    point here, and on from it wherever `syncer` calls back. A step that may
    block for long (None) goes on through `blocking` (a thread pool's submit),
    syncing there as run_steps does. `done(value, None)` at the end, or
    `done(None, error)` with what the steps raised. Without a syncer, all of
    it goes through `blocking`, with `durable` (a caller with no group commit
    thread: the command line).

    A thread per writer, blocked in GroupCommit.sync, costs a futex hand-off
    and a turn at the GIL per writer after every syncfs; this costs one per
    batch."""

    def advance(error: OSError | None) -> None:
        try:
            step = steps.send(None) if error is None else steps.throw(error)
        except StopIteration as stop:
            done(stop.value, None)
            return
        except Exception as e:
            done(None, e)
            return
        if step is not None:
            assert syncer is not None
            syncer.then(*step, advance)
        elif blocking is None:
            advance(None)
        else:
            blocking(in_thread)

    on_thread = syncer.durable if syncer is not None else durable or FsyncEach()

    def in_thread() -> None:
        try:
            value = run_steps(steps, on_thread)
        except Exception as e:
            done(None, e)
            return
        done(value, None)

    if syncer is not None:
        advance(None)
    elif blocking is not None:
        blocking(in_thread)
    else:
        in_thread()


def _call_back(
    batch: list[Waiter], error: OSError | None, bug: Callable[[Exception], None] | None = None
) -> None:
    """Tell each waiter of the batch; a waiter that raises is our bug, told to
    `bug` (else printed), and the other waiters must still hear."""
    for _, _, synced in batch:
        try:
            synced(error)
        except Exception as e:
            if bug is not None:
                bug(e)
            else:
                import traceback

                traceback.print_exc()


class LoopGroupCommit(ThreadGroupCommit):
    """ThreadGroupCommit for writers on an event loop: the batch is called back
    on the loop, with one hand-off.

    The running core writes queue files on its event loop (each file op takes
    microseconds) and only the sync blocks; handing every message's writes to
    a worker thread cost more in thread switches (futex and GIL hand-offs, a
    third of the core's CPU) than the writes themselves.

    `then` calls the waiter back on the loop in the iteration that learns of the
    sync: awaiting a future costs one more loop iteration per sync, and under
    load an iteration is most of the wait.
    """

    def __init__(self, loop: Any, fallback: GroupCommit) -> None:
        self._loop = loop
        super().__init__(fallback, self._to_loop)

    def _to_loop(self, batch: list[Waiter], error: OSError | None) -> None:
        self._loop.call_soon_threadsafe(_call_back, batch, error, self._bug)

    def _bug(self, e: Exception) -> None:
        self._loop.call_exception_handler(
            {"message": "a group commit's waiter failed", "exception": e}
        )
