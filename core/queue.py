"""The on-disk queue, in qmail's layout: the only writer under queue/.

A message N lives in these files (spec/queue.md §4; S = N mod 23):

    pid/P.T.N      the message while it is being written (P = writer's pid)
    mess/S/N       the message: our Received line + the caller's bytes
    intd/N         the envelope while it is being written
    todo/N         the envelope, complete: `u`uid `p`pid `F`sender `T`rcpt..., NUL-separated
    info/S/N       `F`sender, after preprocessing; its mtime is the birth time
    local/S/N      `T`addr (to do) or `D`addr (done) records, NUL-terminated
    remote/S/N     the same for remote recipients
    bounce/N       the permanent-failure reports gathered for the bounce
    hold/N         [ours] present while an administrator holds the message
    state/N        [ours] attempts and last replies (JSON), for "why is it stuck"
    spare/*        [ours] files of finished messages, kept to be written over

Why spare/: on ext4 without a journal, creating a file after many recent
deletions costs about 0.5 ms of CPU (the allocator skips every recently
deleted inode), twenty times a rename; a queue creates and deletes several
files per message. So a finished message's files are renamed into spare/,
and a new file is a spare renamed into place, truncated and written. A
spare is renamed to a name that does not exist yet and its old bytes are
truncated away before anything reads it. A mess/ file goes to spare/ only
when the scheduler knows no delivery is reading it; any other reader checks,
after reading, that the name still leads to the inode it read (`read_message`).

States, each reached by one atomic filesystem step (INTERNALS.md):

    S1  nothing
    S2  mess                      pid/ and intd/N written and made durable, then
    S3  mess intd                 pid/ -> link mess/S/N
    S4  mess intd? todo           link intd/N -> todo/N: THE COMMIT, made durable
    S5  mess info local? remote?  preprocessed: info and channel files durable,
                                  then todo/N and intd/N unlinked
    then back to S1: info unlinked, then mess.

"Made durable" is one `Durability.sync` (durable.py): every file's content
before any name that points at it, and the commit's names before the
caller hears "queued". A file system that orders nothing (ext4 without a
journal) can then lose the mess link but keep the todo link after a crash:
such a todo/N never was acknowledged, and cleanup_orphans removes it.

A crash leaves S2/S3 leftovers (mess or intd without todo/info), which
`cleanup_orphans` removes: such a message was never acknowledged, and its
writer, which held an flock on the mess file, is gone. It also removes the
channel files a crash in the middle of a removal leaves. A crash during
preprocessing leaves info beside todo: todo wins, the message is still S4. Message ids come from
`lock/nextid` and are never reused within a root (qmail reuses inode numbers).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from core import procid
from core.durable import Durability, FsyncEach, Steps, StrPath, run_steps
from core.paths import FLAT_DIRS, QMAIL_FLAT_DIRS, SPLIT, SPLIT_DIRS, QmailRoot, is_same_file
from core.timefmt import date822

CHANNELS = ("local", "remote")
ADDRESS_MAX = 1002  # qmail-queue: a longer address is "envelope address too long" (exit 11)
_OWN_FILES = ("hold", "state", "bounce")  # per-message files beside qmail's
SPARE_MAX = 4096  # files kept in spare/ at most
ORPHAN_AGE = 3600.0  # seconds before an unlocked leftover may be removed while a core runs


class QueueError(Exception):
    """Queueing failed; `text` is qmail's wording, `permanent` its D/Z letter."""

    def __init__(self, text: str, permanent: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.permanent = permanent


WRITE_ERROR = "qq write error or disk full (#4.3.0)"
TOO_LONG = "envelope address too long for qq (#5.1.3)"
BAD_ADDRESS = "envelope address contains a NUL or line break (#5.1.3)"
NO_QUEUE = "qq trouble creating files in queue (#4.3.0)"


def _read_small(path: str) -> tuple[bytes, float]:
    """A queue file's bytes and mtime, with the fewest system calls (a big
    queue is read file by file when the core starts)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            if len(chunk) < 65536:
                break
        return b"".join(chunks), os.fstat(fd).st_mtime
    finally:
        os.close(fd)


def fsync_directory(path: Path) -> None:
    """Make a create, link, rename or unlink in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _write_new_bytes(fd: int, parts: list[bytes]) -> None:
    """Write `parts` from the start of a new or reused file and end it there
    (see Queue._open_new): one writev for all of them when it takes them all,
    and no lseek, since the length is known."""
    total = sum(len(p) for p in parts)
    written = os.writev(fd, parts)
    if written < total:
        _write_all(fd, memoryview(b"".join(parts))[written:])
    os.ftruncate(fd, total)


def received_line(pid: int, invoked: str, when: float) -> bytes:
    """qmail-queue's own line: `Received: (qmail 123 invoked by uid 1000); DATE`."""
    return f"Received: (qmail {pid} {invoked}); {date822(when)}\n".encode()


def encode_envelope(uid: int, pid: int, sender: str, recipients: Iterable[str]) -> bytes:
    parts = [b"u%d\0p%d\0F" % (uid, pid), sender.encode("utf-8", "surrogateescape"), b"\0"]
    for rcpt in recipients:
        parts += [b"T", rcpt.encode("utf-8", "surrogateescape"), b"\0"]
    return b"".join(parts)


def check_address(address: str) -> None:
    if len(address.encode("utf-8", "surrogateescape")) > ADDRESS_MAX:
        raise QueueError(TOO_LONG, permanent=True)
    if "\0" in address or "\n" in address or "\r" in address:
        raise QueueError(BAD_ADDRESS, permanent=True)


class Envelope:
    """A todo/N file: who queued it, the sender and the recipients."""

    __slots__ = ("pid", "recipients", "sender", "uid")

    def __init__(self, uid: int, pid: int, sender: str, recipients: list[str]) -> None:
        self.uid = uid
        self.pid = pid
        self.sender = sender
        self.recipients = recipients


def decode_envelope(data: bytes) -> Envelope:
    """Parse todo/N; raise ValueError on anything qmail-send would not accept."""
    uid = pid = 0
    sender: str | None = None
    recipients: list[str] = []
    if data and not data.endswith(b"\0"):
        raise ValueError("truncated envelope")
    for record in data.split(b"\0")[:-1]:
        kind, value = record[:1], record[1:].decode("utf-8", "surrogateescape")
        if kind == b"u" and value.isdigit():
            uid = int(value)
        elif kind == b"p" and value.isdigit():
            pid = int(value)
        elif kind == b"F" and sender is None:
            sender = value
        elif kind == b"T" and sender is not None:
            recipients.append(value)
        else:
            raise ValueError(f"unknown record {record[:20]!r}")
    if sender is None:
        raise ValueError("no sender record")
    return Envelope(uid, pid, sender, recipients)


class Record:
    """One recipient in local/S/N or remote/S/N."""

    __slots__ = ("address", "done", "offset")

    def __init__(self, offset: int, address: str, done: bool) -> None:
        self.offset = offset
        self.address = address
        self.done = done


P = TypeVar("P", str, Path)


class _Draft:
    """A message being queued: its id, its pid/ file, and every file made so far."""

    __slots__ = ("made", "msgid", "qp", "temp")

    def __init__(self, msgid: int, temp: Path) -> None:
        self.msgid = msgid
        self.temp = temp
        self.qp = 0  # the number in the Received line and the `p` record
        self.made: list[StrPath] = []


class Queue:
    """Synchronous, thread-safe operations on one root's queue/ directory.

    The core calls these from worker threads so that fsyncs of different
    messages overlap (the file system then commits them together); inject
    calls them directly, without asyncio.
    """

    def __init__(
        self, root: QmailRoot, id_block: int = 1, durability: Durability | None = None
    ) -> None:
        self.root = root
        self.durable: Durability = durability or FsyncEach()
        self.dir = root.queue
        self._id_block = id_block
        self._ids: Iterator[int] = iter(())
        self._id_lock = threading.Lock()
        self._spares: list[str] = []
        self._spare_dir = os.path.join(str(root.queue), "spare") + "/"
        self._spare_lock = threading.Lock()
        self._spare_count = -1  # unknown until spare/ is first listed
        self._spare_listed = 0.0
        self._spare_seq = 0

    # -- layout ----------------------------------------------------------

    def create_layout(self) -> None:
        self.dir.mkdir(mode=0o750, exist_ok=True)
        for name in SPLIT_DIRS:
            for i in range(SPLIT):
                (self.dir / name / str(i)).mkdir(mode=0o750, parents=True, exist_ok=True)
        for name in FLAT_DIRS:
            (self.dir / name).mkdir(mode=0o750, exist_ok=True)
        if not self.root.trigger.exists():
            os.mkfifo(self.root.trigger, 0o622)
        fsync_directory(self.dir)

    def missing_layout(self) -> list[Path]:
        """qmail's own directories that are missing (ours are made when needed)."""
        wanted = [self.dir / n for n in QMAIL_FLAT_DIRS]
        wanted += [self.dir / n / str(i) for n in SPLIT_DIRS for i in range(SPLIT)]
        return [p for p in wanted if not p.is_dir()]

    # -- ids ---------------------------------------------------------------

    def new_id(self) -> int:
        """A message id no message of this root has had, nor ever will."""
        with self._id_lock:
            for msgid in self._ids:
                return msgid
            block = self._reserve(self._id_block)
            self._ids = iter(block)
            return next(self._ids)

    def _reserve(self, count: int) -> range:
        path = self.root.nextid
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            text = os.pread(fd, 32, 0).strip(b"\0 \n")
            first = int(text) if text.isdigit() else self._highest_id() + 1
            # A fixed-width write at offset 0 lies in one sector: it is atomic.
            os.pwrite(fd, b"%020d\n" % (first + count), 0)
            os.fsync(fd)
            return range(first, first + count)
        finally:
            os.close(fd)

    def _highest_id(self) -> int:
        highest = 0
        for kind in ("mess", "info"):
            for i in range(SPLIT):
                with contextlib.suppress(OSError):
                    for name in os.listdir(self.dir / kind / str(i)):
                        if name.isdigit():
                            highest = max(highest, int(name))
        for flat in ("todo", "intd"):
            with contextlib.suppress(OSError):
                for name in os.listdir(self.dir / flat):
                    if name.isdigit():
                        highest = max(highest, int(name))
        with contextlib.suppress(OSError):  # writers at work: pid/PID.TIME.ID
            for name in os.listdir(self.dir / "pid"):
                last = name.rpartition(".")[2]
                if last.isdigit():
                    highest = max(highest, int(last))
        return highest

    # -- enqueue (qmail-queue) -----------------------------------------------

    def enqueue(
        self,
        message: bytes,
        sender: str,
        recipients: list[str],
        *,
        uid: int,
        pid: int,
        invoked: str,
        now: float,
        qp_is_id: bool = False,
    ) -> int:
        """Queue a message durably and return its id; S1 -> S4 (queue.md §6.1).

        Raises QueueError with qmail-queue's wording. On a write error
        everything made so far is removed again: nothing half-written stays.
        With `qp_is_id` the Received line and the `p` record carry the message
        id instead of the pid (qmail's qp, which one SMTP session's several
        messages each need their own of).
        """
        with self._writing(message, [sender, *recipients], pid, invoked, now, qp_is_id) as draft:
            envelope = encode_envelope(uid, draft.qp, sender, recipients)
            intd = self.root.intd(draft.msgid)
            efd = self._open_new(intd)
            draft.made.append(intd)
            try:
                _write_new_bytes(efd, [envelope])
            finally:
                os.close(efd)
            self.durable.sync([draft.temp, intd], [])  # contents before any name for them
            mess = self.root.mess(draft.msgid)
            os.link(draft.temp, mess)
            draft.made.append(mess)
            os.unlink(draft.temp)
            draft.made.remove(draft.temp)
            os.link(intd, self.root.todo(draft.msgid))  # S4: the commit point
            draft.made.append(self.root.todo(draft.msgid))
            self.durable.sync([], [mess.parent, self.dir / "todo"])
        msgid = draft.msgid
        self.pull_trigger()
        return msgid

    # -- recycled files (spare/) -------------------------------------------

    def _open_new(self, path: StrPath) -> int:
        """A file descriptor for writing a new file at `path` (a name no file
        has), reusing a spare inode when there is one. A reused file is not
        emptied here: the writer writes from the start and then cuts the file
        at its end (`_write_new_bytes`), so blocks of about the same size are written over
        rather than freed and allocated again (O_TRUNC cost more than the write)."""
        while True:
            name = self._pop_spare()
            if name is None:
                return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                os.rename(self._spare_dir + name, path)
            except FileNotFoundError:
                continue  # another process took it first
            try:
                return os.open(path, os.O_WRONLY)
            except PermissionError:  # another user's spare: use a fresh file instead
                os.unlink(path)
                return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)

    def _pop_spare(self) -> str | None:
        with self._spare_lock:
            if not self._spares and time.monotonic() - self._spare_listed > 1.0:
                self._list_spares()
            if not self._spares:
                return None
            self._spare_count -= 1
            return self._spares.pop()

    def _list_spares(self) -> None:
        """Read a few names from spare/ (lazily: inject needs two at most)."""
        self._spare_listed = time.monotonic()
        try:
            with os.scandir(self.dir / "spare") as entries:
                for entry in entries:
                    self._spares.append(entry.name)
                    if len(self._spares) >= 64:
                        break
        except FileNotFoundError:
            return

    def _retire(self, path: StrPath) -> None:
        """Remove a finished message's file, keeping its inode in spare/ if room."""
        with self._spare_lock:
            if self._spare_count < 0:
                try:
                    self._spare_count = len(os.listdir(self.dir / "spare"))
                except FileNotFoundError:
                    self._spare_count = SPARE_MAX
            keep = self._spare_count < SPARE_MAX
            if keep:
                self._spare_seq += 1
                name = f"{procid.pid()}.{threading.get_ident()}.{self._spare_seq}"
                self._spare_count += 1
        try:
            if keep:
                os.rename(path, self._spare_dir + name)
                with self._spare_lock:
                    self._spares.append(name)
            else:
                os.unlink(path)
        except FileNotFoundError:
            if keep:
                with self._spare_lock:
                    self._spare_count -= 1

    @contextlib.contextmanager
    def _writing(
        self,
        message: bytes,
        addresses: list[str],
        pid: int,
        invoked: str,
        now: float,
        qp_is_id: bool = False,
        msgid: int | None = None,
    ) -> Iterator[_Draft]:
        """A new message's id (or `msgid`, one new_id gave) and its file in
        pid/, written (not yet durable) and flocked; on any error, everything
        the block made is removed again."""
        for address in addresses:
            check_address(address)
        if msgid is None:
            try:
                msgid = self.new_id()
            except OSError as e:
                raise _queue_error(e) from e
        draft = _Draft(msgid, self.dir / "pid" / f"{pid}.{int(now)}.{msgid}")
        draft.qp = msgid if qp_is_id else pid
        fd = -1
        try:
            fd = self._open_new(draft.temp)
            draft.made.append(draft.temp)
            # Held until we are done: cleanup_orphans never takes a file being written.
            fcntl.flock(fd, fcntl.LOCK_EX)
            _write_new_bytes(fd, [received_line(draft.qp, invoked, now), message])
            yield draft
        except QueueError:
            self._undo(draft.made)
            raise
        except OSError as e:
            self._undo(draft.made)
            raise _queue_error(e) from e
        finally:
            if fd >= 0:
                os.close(fd)

    def write_draft(
        self, message: bytes, pid: int, invoked: str, now: float
    ) -> tuple[int, str, int]:
        """A message to deliver at once (Send's direct delivery): a new id and
        the file a queued message would have as mess/, with its Received line,
        in pid/ and never synced; returns (id, path, size). Nothing refers to
        it: a crash leaves a pid/ leftover that cleanup_orphans removes. Give it
        back with discard_draft once no delivery reads it any more."""
        try:
            msgid = self.new_id()
            path = f"{self.root.queue}/pid/{pid}.{int(now)}.{msgid}.direct"
            fd = self._open_new(path)
        except OSError as e:
            raise _queue_error(e) from e
        try:
            head = received_line(msgid, invoked, now)
            _write_new_bytes(fd, [head, message])
        except OSError as e:
            os.close(fd)
            self._undo([path])
            raise _queue_error(e) from e
        os.close(fd)
        return msgid, path, len(head) + len(message)

    def discard_draft(self, path: str) -> None:
        """Give a draft's file back (to spare/). Never fails: a draft that
        stays is only a leftover, removed when the core starts next."""
        with contextlib.suppress(OSError):
            self._retire(path)

    def _undo(self, made: list[StrPath]) -> None:
        for path in reversed(made):
            with contextlib.suppress(OSError):
                os.unlink(path)

    def pull_trigger(self) -> None:
        """Wake a running core at once (qmail's lock/trigger FIFO); fine if none runs."""
        try:
            fd = os.open(self.root.trigger, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return  # ENXIO: nobody is listening; the core scans todo/ when it starts
        try:
            os.write(fd, b"\0")
        except OSError:
            pass  # the pipe is full: the core has been woken already
        finally:
            os.close(fd)

    # -- reading -----------------------------------------------------------

    def todo_ids(self) -> list[int]:
        return sorted(int(n) for n in os.listdir(self.dir / "todo") if n.isdigit())

    def read_todo(self, msgid: int) -> Envelope:
        return decode_envelope(self.root.todo(msgid).read_bytes())

    def info_ids(self) -> list[int]:
        """Preprocessed messages (S5). An info file beside a todo file is what an
        interrupted preprocessing left: that message is still S4, and its
        preprocessing is redone from todo (queue.md §6.2), never trusted."""
        todo = set(self.todo_ids())
        return [i for i in self._info_files() if i not in todo]

    def _info_files(self) -> list[int]:
        return sorted(self._split_ids("info"))

    def present(self) -> dict[str, set[int]]:
        """Which ids have a local, remote, state and bounce file: one listing of
        each directory, so that loading a big queue opens only what exists."""
        found = {channel: self._split_ids(channel) for channel in CHANNELS}
        for flat in ("state", "bounce"):
            found[flat] = set()
            with contextlib.suppress(FileNotFoundError):
                found[flat] = self._ids_in(flat)
        return found

    def read_info(self, msgid: int) -> tuple[str, float]:
        """(sender, birth time) of a preprocessed message."""
        path = self.root.split_name("info", msgid)
        data, birth = _read_small(path)
        if not data.startswith(b"F"):
            raise ValueError(f"{path}: not an info file")
        return data[1:].split(b"\0", 1)[0].decode("utf-8", "surrogateescape"), birth

    def read_channel(self, channel: str, msgid: int) -> tuple[list[Record], float] | None:
        """The records and the due time (the file's mtime), or None if absent."""
        try:
            data, due = _read_small(self.root.split_name(channel, msgid))
        except FileNotFoundError:
            return None
        records, offset = [], 0
        for chunk in data.split(b"\0")[:-1]:
            kind = chunk[:1]
            if kind in (b"T", b"D"):
                address = chunk[1:].decode("utf-8", "surrogateescape")
                records.append(Record(offset, address, kind == b"D"))
            offset += len(chunk) + 1
        return records, due

    def message_size(self, msgid: int) -> int:
        return os.stat(self.root.split_name("mess", msgid)).st_size

    def read_message(self, msgid: int, limit: int = -1) -> bytes:
        """The message file's bytes, checked to be this message's after reading
        (its inode may be reused once the message is gone: see spare/)."""
        path = self.root.mess(msgid)
        with open(path, "rb") as f:
            data = f.read(limit)
            still_ours = is_same_file(path, f.fileno())
        if not still_ours:
            raise FileNotFoundError(errno.ENOENT, "message removed while being read", str(path))
        return data

    # -- the running core's own enqueue: S1 -> S5 directly ---------------------

    def enqueue_routed(
        self,
        message: bytes,
        sender: str,
        local: list[str],
        remote: list[str],
        *,
        uid: int,
        pid: int,
        invoked: str,
        now: float,
        qp_is_id: bool = False,
    ) -> int:
        """Queue a message already split into channels (the core preprocesses what
        it receives itself, so todo/ is skipped); return its id once durable."""
        steps = self.enqueue_routed_steps(
            message,
            sender,
            local,
            remote,
            uid=uid,
            pid=pid,
            invoked=invoked,
            now=now,
            qp_is_id=qp_is_id,
        )
        return self.run_steps(steps)

    def run_steps(self, steps: Steps[int]) -> int:
        """Drive queue-writing steps here, with this queue's durability at each
        sync point (durable.drive_steps is the same without blocking)."""
        return run_steps(steps, self.durable)

    def enqueue_routed_steps(
        self,
        message: bytes,
        sender: str,
        local: list[str],
        remote: list[str],
        *,
        uid: int,
        pid: int,
        invoked: str,
        now: float,
        qp_is_id: bool = False,
        msgid: int | None = None,
    ) -> Steps[int]:
        """enqueue_routed as steps: each yield asks for (files, dirs) to be made
        durable before going on, so that a caller on an event loop can wait for
        its group commit without a thread of its own (an OSError from the sync
        is thrown back in, and undoes everything, as in enqueue_routed).
        `msgid`: the id to queue it under, from new_id (a draft's, say).

        Contents first: the message (in pid/), the channel files at their names,
        the info file (in pid/); then the names mess/S/N and info/S/N. info is
        the commit. After a crash, info without mess was never acknowledged and
        cleanup_orphans removes it, as it removes mess or channel files without
        info.
        """
        addresses = [sender, *local, *remote]
        with self._writing(message, addresses, pid, invoked, now, qp_is_id, msgid) as draft:
            msgid = draft.msgid
            channels: list[StrPath] = []
            for channel, rcpts in zip(CHANNELS, (local, remote), strict=True):
                if rcpts:
                    path = self.root.split_name(channel, msgid)
                    draft.made.append(path)
                    channels.append(
                        self._write_new(path, b"".join(b"T" + _b(r) + b"\0" for r in rcpts))
                    )
            info_temp = f"{self.root.queue}/pid/{pid}.{int(now)}.{msgid}.info"
            draft.made.append(info_temp)
            self._write_new(info_temp, b"F" + _b(sender) + b"\0")
            if abs(now - time.time()) >= 1.0:  # else writing it gave it that mtime
                os.utime(info_temp, (now, now))  # info's mtime is the birth time
            yield [draft.temp, *channels, info_temp], [os.path.dirname(p) for p in channels]
            mess, info = self.root.split_name("mess", msgid), self.root.split_name("info", msgid)
            # Renamed, not linked and unlinked: one system call each. The writer
            # stays named in pid/ (the .info file) until the commit, and the
            # flock stays on the message's inode under its new name.
            os.rename(draft.temp, mess)
            draft.made.remove(draft.temp)
            draft.made.append(mess)
            os.rename(info_temp, info)  # S5: the commit point
            draft.made.remove(info_temp)
            draft.made.append(info)
            yield [], [os.path.dirname(mess), os.path.dirname(info)]
        return msgid

    # -- preprocessing (qmail-send, S4 -> S5) ------------------------------

    def preprocess(
        self, msgid: int, sender: str, local: list[str], remote: list[str], now: float
    ) -> None:
        """Write info and channel files durably, then drop todo: S4 -> S5."""
        for path in (self.root.info(msgid), *(self.root.channel(c, msgid) for c in CHANNELS)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # leftovers of an earlier, interrupted attempt
        written = [self._write_new(self.root.info(msgid), b"F" + _b(sender) + b"\0")]
        for channel, rcpts in zip(CHANNELS, (local, remote), strict=True):
            if rcpts:
                data = b"".join(b"T" + _b(r) + b"\0" for r in rcpts)
                written.append(self._write_new(self.root.channel(channel, msgid), data))
        for path in written:
            os.utime(path, (now, now))
        self.durable.sync(written, [p.parent for p in written])
        with contextlib.suppress(FileNotFoundError):
            self.root.intd(msgid).unlink()
        self._retire(self.root.todo(msgid))  # its last name: the inode is free to reuse

    def _write_new(self, path: P, data: bytes) -> P:
        """Write a new file; the caller makes it durable (with its siblings)."""
        fd = self._open_new(path)
        try:
            _write_new_bytes(fd, [data])
        finally:
            os.close(fd)
        return path

    # -- delivery bookkeeping ---------------------------------------------

    def mark_done(self, channel: str, msgid: int, offset: int) -> None:
        """Overwrite a record's T with D, as qmail-send does (not fsynced: at worst
        a crash makes the recipient get the message twice, never zero times)."""
        fd = os.open(self.root.split_name(channel, msgid), os.O_WRONLY)
        try:
            os.pwrite(fd, b"D", offset)
        finally:
            os.close(fd)

    def set_due(self, channel: str, msgid: int, when: float) -> None:
        """Remember the next attempt in the channel file's mtime (qmail does it at exit)."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.root.split_name(channel, msgid), (when, when))

    def remove_channel(self, channel: str, msgid: int) -> None:
        self._retire(self.root.split_name(channel, msgid))

    def append_bounce(self, msgid: int, recipient: str, report: str) -> None:
        """Add one failure to bounce/N in qmail's format (send.md §6.1), durably:
        it is written before the record is marked done."""
        fd = os.open(self.root.bounce(msgid), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            _write_all(fd, bounce_entry(recipient, report))
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_bounce(self, msgid: int) -> bytes | None:
        try:
            return self.root.bounce(msgid).read_bytes()
        except FileNotFoundError:
            return None

    def remove_bounce(self, msgid: int) -> None:
        self._retire(self.root.bounce(msgid))

    def remove_message(self, msgid: int, reuse_mess: bool = False, plain: bool = False) -> None:
        """Finish a message: info first (S5 -> S2), then the rest (S2 -> S1).

        The small files go to spare/. mess goes there only with `reuse_mess`,
        which the caller may pass only when nothing reads the message (no
        delivery running); otherwise it is unlinked, and an open descriptor
        keeps reading the old bytes. `plain`: only info and mess are left (the
        caller knows that no other file was ever made for the message, and has
        removed its channel files).
        """
        root = self.root
        self._retire(root.split_name("info", msgid))
        if not plain:
            for channel in CHANNELS:
                self._retire(root.split_name(channel, msgid))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(root.flat_name("intd", msgid))  # todo's other name: before reuse
            for kind in ("todo", "bounce", "state"):
                self._retire(root.flat_name(kind, msgid))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(root.flat_name("hold", msgid))
        if reuse_mess:
            self._retire(root.split_name("mess", msgid))
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(root.split_name("mess", msgid))

    # -- hold and state (ours) ---------------------------------------------

    def set_held(self, msgid: int, held: bool) -> None:
        path = self.root.hold(msgid)
        if held:
            self._write_replace(path, b"")
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            fsync_directory(path.parent)

    def held_ids(self) -> set[int]:
        return {int(n) for n in os.listdir(self.dir / "hold") if n.isdigit()}

    def write_state(self, msgid: int, data: bytes) -> None:
        """Attempts and replies: informative, so written without fsync."""
        path = self.root.state(msgid)
        temp = path.with_name(f".{msgid}.{threading.get_ident()}")
        temp.write_bytes(data)
        os.replace(temp, path)

    def read_state(self, msgid: int) -> bytes | None:
        try:
            return self.root.state(msgid).read_bytes()
        except FileNotFoundError:
            return None

    def _write_replace(self, path: Path, data: bytes) -> None:
        temp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
        fsync_directory(path.parent)

    # -- maintenance -------------------------------------------------------

    def count(self) -> tuple[int, int]:
        """(messages in queue, not yet preprocessed): qmail-qstat's two numbers."""
        messages = sum(len(os.listdir(self.dir / "mess" / str(i))) for i in range(SPLIT))
        return messages, len(os.listdir(self.dir / "todo"))

    def cleanup_orphans(self, now: float, min_age: float = 0.0) -> list[Path]:
        """Remove what a crash left behind, never a message that is queued or still
        being written; return what was removed.

        Safe beside live writers: the candidates are listed first, the live
        writers second (a writer names itself in pid/ before it makes any other
        file, and keeps that name until its message is committed), and each
        candidate is checked again just before it goes.
        """
        removed: list[Path] = []
        candidates = {kind: self._ids_in(kind) for kind in ("todo", "intd", *_OWN_FILES)}
        for kind in ("mess", "info", *CHANNELS):
            candidates[kind] = self._split_ids(kind)
        writing: set[int] = set()  # ids that live writers are queueing: pid/PID.TIME.ID
        for name in os.listdir(self.dir / "pid"):
            parts = name.split(".")  # PID.TIME.ID, or PID.TIME.ID.info
            if parts[0].isdigit() and _alive(int(parts[0])):
                if len(parts) > 2 and parts[2].isdigit():
                    writing.add(int(parts[2]))
                continue
            if self._unlink_unlocked(self.dir / "pid" / name, now, min_age):
                removed.append(self.dir / "pid" / name)

        def gone(path: Path) -> None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)

        def has(kind: str, msgid: int) -> bool:
            # Listed: it was there (one gone since only leaves an orphan for the
            # next start). Not listed: look again, a live writer may have made it.
            return msgid in candidates[kind] or self._path(kind, msgid).exists()

        # todo/N or info/N without mess: the crash kept the commit's link but not
        # the mess link made just before it. Never acknowledged.
        for kind in ("todo", "info"):
            for msgid in candidates[kind] - writing:
                if not has("mess", msgid):
                    gone(self._path(kind, msgid))
                    if kind == "todo":
                        gone(self.root.intd(msgid))
        # mess/N of no message: a writer died before its commit.
        for msgid in candidates["mess"] - writing:
            if not has("info", msgid) and not has("todo", msgid):
                path = self.root.mess(msgid)
                if self._unlink_unlocked(path, now, min_age, recheck=msgid):
                    removed.append(path)
                    gone(self.root.intd(msgid))
        # Channel files of no message: remove_message retires info first, and
        # enqueue_routed writes them before info exists.
        for channel in CHANNELS:
            for msgid in candidates[channel] - writing:
                if not (has("info", msgid) and has("mess", msgid)) and not has("todo", msgid):
                    gone(self.root.channel(channel, msgid))
        for kind in ("intd", *_OWN_FILES):
            for msgid in candidates[kind] - writing:
                if not has("mess", msgid) and self._old(self._path(kind, msgid), now, min_age):
                    gone(self._path(kind, msgid))
        return removed

    def _path(self, kind: str, msgid: int) -> Path:
        if kind in ("mess", "info", *CHANNELS):
            return self.root.split(kind, msgid)
        return self.dir / kind / str(msgid)

    def _ids_in(self, kind: str) -> set[int]:
        return {int(n) for n in os.listdir(self.dir / kind) if n.isdigit()}

    def _split_ids(self, kind: str) -> set[int]:
        ids: set[int] = set()
        for i in range(SPLIT):
            with contextlib.suppress(FileNotFoundError):
                ids.update(int(n) for n in os.listdir(self.dir / kind / str(i)) if n.isdigit())
        return ids

    def _old(self, path: Path, now: float, min_age: float) -> bool:
        try:
            return now - path.stat().st_mtime >= min_age
        except FileNotFoundError:
            return False

    def _unlink_unlocked(
        self, path: Path, now: float, min_age: float, recheck: int | None = None
    ) -> bool:
        if not self._old(path, now, min_age):
            return False
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # its writer is alive and still working
            if recheck is not None and (
                self.root.todo(recheck).exists() or self.root.info(recheck).exists()
            ):
                return False  # committed between our listing and the lock
            path.unlink()
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(fd)


def _queue_error(e: OSError) -> QueueError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG):
        return QueueError(WRITE_ERROR)
    return QueueError(NO_QUEUE)


def _b(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _alive(pid: int) -> bool:
    if pid == procid.pid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def bounce_entry(recipient: str, report: str) -> bytes:
    """`<rcpt>:` NL report NL, with qmail-send's addbounce() rules: newlines in the
    address become `_`, and inside the entry a newline after a newline becomes
    `/`, so that the report holds no blank line (send.md §6.1)."""
    text = bytearray(_b("<" + recipient.replace("\n", "_") + ">:\n" + report))
    if report and not report.endswith("\n"):
        text += b"\n"
    # From the end backwards, as addbounce() does: three newlines become "\n//",
    # not "\n/\n" (which a forward walk would give).
    for pos in range(len(text) - 2, 0, -1):
        if text[pos] == 0x0A and text[pos - 1] == 0x0A:
            text[pos] = 0x2F
    return bytes(text + b"\n")


def now() -> float:
    return time.time()
