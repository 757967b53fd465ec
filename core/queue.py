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

States, each reached by one atomic filesystem step (INTERNALS.md):

    S1  nothing
    S2  mess                      pid/ -> link mess/S/N (complete, fsynced)
    S3  mess intd                 intd/N written and fsynced
    S4  mess intd? todo           link intd/N -> todo/N: THE COMMIT; fsync todo/
    S5  mess info local? remote?  preprocessed: info and channel files fsynced,
                                  then todo/N and intd/N unlinked
    then back to S1: info unlinked, then mess.

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

from core.paths import FLAT_DIRS, SPLIT, SPLIT_DIRS, QmailRoot
from core.timefmt import date822

CHANNELS = ("local", "remote")
ADDRESS_MAX = 1002  # qmail-queue: a longer address is "envelope address too long" (exit 11)
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


class Queue:
    """Synchronous, thread-safe operations on one root's queue/ directory.

    The core calls these from worker threads so that fsyncs of different
    messages overlap (the file system then commits them together); inject
    calls them directly, without asyncio.
    """

    def __init__(self, root: QmailRoot, id_block: int = 1) -> None:
        self.root = root
        self.dir = root.queue
        self._id_block = id_block
        self._ids: Iterator[int] = iter(())
        self._id_lock = threading.Lock()

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
        wanted = [self.dir / n for n in FLAT_DIRS]
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
    ) -> int:
        """Queue a message durably and return its id; S1 -> S4 (queue.md §6.1).

        Raises QueueError with qmail-queue's wording. On a write error
        everything made so far is removed again: nothing half-written stays.
        """
        check_address(sender)
        for rcpt in recipients:
            check_address(rcpt)
        envelope = encode_envelope(uid, pid, sender, recipients)
        try:
            msgid = self.new_id()
        except OSError as e:
            raise _queue_error(e) from e
        made: list[Path] = []
        fd = -1
        try:
            temp = self.dir / "pid" / f"{pid}.{int(now)}.{msgid}"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            made.append(temp)
            # Held until we exit: cleanup_orphans never takes a file being written.
            fcntl.flock(fd, fcntl.LOCK_EX)
            _write_all(fd, received_line(pid, invoked, now))
            _write_all(fd, message)
            os.fsync(fd)
            mess = self.root.mess(msgid)
            os.link(temp, mess)
            made.append(mess)
            os.unlink(temp)
            made.remove(temp)
            fsync_directory(mess.parent)  # S2
            intd = self.root.intd(msgid)
            efd = os.open(intd, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            made.append(intd)
            try:
                _write_all(efd, envelope)
                os.fsync(efd)
            finally:
                os.close(efd)
            os.link(intd, self.root.todo(msgid))  # S4: the commit point
            made.append(self.root.todo(msgid))
            fsync_directory(self.dir / "todo")
        except QueueError:
            self._undo(made)
            raise
        except OSError as e:
            self._undo(made)
            raise _queue_error(e) from e
        finally:
            if fd >= 0:
                os.close(fd)
        self.pull_trigger()
        return msgid

    def _undo(self, made: list[Path]) -> None:
        for path in reversed(made):
            with contextlib.suppress(OSError):
                path.unlink()

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
        ids: list[int] = []
        for i in range(SPLIT):
            with contextlib.suppress(FileNotFoundError):
                ids += (int(n) for n in os.listdir(self.dir / "info" / str(i)) if n.isdigit())
        return sorted(ids)

    def read_info(self, msgid: int) -> tuple[str, float]:
        """(sender, birth time) of a preprocessed message."""
        path = self.root.info(msgid)
        with open(path, "rb") as f:
            data = f.read()
            birth = os.fstat(f.fileno()).st_mtime
        if not data.startswith(b"F"):
            raise ValueError(f"{path}: not an info file")
        return data[1:].split(b"\0", 1)[0].decode("utf-8", "surrogateescape"), birth

    def read_channel(self, channel: str, msgid: int) -> tuple[list[Record], float] | None:
        """The records and the due time (the file's mtime), or None if absent."""
        try:
            with open(self.root.channel(channel, msgid), "rb") as f:
                data = f.read()
                due = os.fstat(f.fileno()).st_mtime
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
        return self.root.mess(msgid).stat().st_size

    def read_message(self, msgid: int) -> bytes:
        return self.root.mess(msgid).read_bytes()

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
        for directory in {p.parent for p in written}:
            fsync_directory(directory)
        for path in (self.root.intd(msgid), self.root.todo(msgid)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _write_new(self, path: Path, data: bytes) -> Path:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    # -- delivery bookkeeping ---------------------------------------------

    def mark_done(self, channel: str, msgid: int, offset: int) -> None:
        """Overwrite a record's T with D, as qmail-send does (not fsynced: at worst
        a crash makes the recipient get the message twice, never zero times)."""
        fd = os.open(self.root.channel(channel, msgid), os.O_WRONLY)
        try:
            os.pwrite(fd, b"D", offset)
        finally:
            os.close(fd)

    def set_due(self, channel: str, msgid: int, when: float) -> None:
        """Remember the next attempt in the channel file's mtime (qmail does it at exit)."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.root.channel(channel, msgid), (when, when))

    def remove_channel(self, channel: str, msgid: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.root.channel(channel, msgid).unlink()

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
        with contextlib.suppress(FileNotFoundError):
            self.root.bounce(msgid).unlink()

    def remove_message(self, msgid: int) -> None:
        """Finish a message: info first (S5 -> S2), then the rest (S2 -> S1)."""
        paths = [
            self.root.info(msgid),
            *(self.root.channel(c, msgid) for c in CHANNELS),
            self.root.todo(msgid),
            self.root.bounce(msgid),
            self.root.hold(msgid),
            self.root.state(msgid),
            self.root.intd(msgid),
            self.root.mess(msgid),
        ]
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

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
        """Remove what a crash left behind (S2/S3, stray pid/ files), never a
        message that is queued or still being written; return what was removed."""
        removed: list[Path] = []
        for name in os.listdir(self.dir / "pid"):
            path = self.dir / "pid" / name
            owner = name.split(".", 1)[0]
            if owner.isdigit() and _alive(int(owner)):
                continue
            if self._unlink_unlocked(path, now, min_age):
                removed.append(path)
        info = set(self._info_files())
        todo = set(self.todo_ids())
        for i in range(SPLIT):
            for name in os.listdir(self.dir / "mess" / str(i)):
                if not name.isdigit():
                    continue
                msgid = int(name)
                if msgid in info or msgid in todo:
                    continue
                path = self.root.mess(msgid)
                if self._unlink_unlocked(path, now, min_age, recheck=msgid):
                    removed.append(path)
                    intd = self.root.intd(msgid)
                    with contextlib.suppress(FileNotFoundError):
                        intd.unlink()
                        removed.append(intd)
        for kind in ("intd", "hold", "state", "bounce"):
            for name in os.listdir(self.dir / kind):
                if name.isdigit() and not self.root.mess(int(name)).exists():
                    path = self.dir / kind / name
                    if kind != "intd" or self._old(path, now, min_age):
                        with contextlib.suppress(FileNotFoundError):
                            path.unlink()
                            removed.append(path)
        # remove_message unlinks info first: a crash right after leaves these.
        # Only preprocessing writes them, and only for a message in mess/.
        for channel in CHANNELS:
            for i in range(SPLIT):
                for name in os.listdir(self.dir / channel / str(i)):
                    if name.isdigit() and not self.root.mess(int(name)).exists():
                        path = self.root.channel(channel, int(name))
                        with contextlib.suppress(FileNotFoundError):
                            path.unlink()
                            removed.append(path)
        return removed

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
    if pid == os.getpid():
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
