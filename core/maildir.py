"""Durable Maildir delivery (maildir.5) and mbox appends: the only writer of mailboxes.

Maildir: write tmp/NAME, fsync, link to new/NAME, fsync new/. The link is the
delivery; a reader never sees a partial file. Names follow the modern unique
form `TIME.M<usec>P<pid>Q<n>.HOST` (spec/maildir.md §1.4).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import socket
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from core import procid
from core.dotqmail import TEMPORARY_ERRNOS
from core.durable import Steps
from core.paths import is_same_file

_deliveries = itertools.count(1)
_HOST = socket.gethostname().replace("/", "\\057").replace(":", "\\072")[:64] or "localhost"
COPY_CHUNK = 1 << 16
MBOX_LOCK_WAIT = 30.0


class MailboxError(Exception):
    """A failed delivery; `text` in qmail-local's words, `permanent` its exit 100."""

    def __init__(self, text: str, permanent: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.permanent = permanent


def unique_name(now: float) -> str:
    seconds = int(now)
    usec = int((now - seconds) * 1_000_000)
    return f"{seconds}.M{usec}P{procid.pid()}Q{next(_deliveries)}.{_HOST}"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


Message = Path | int  # the queued message file, or an open descriptor of it (qmail-local's fd 0)


def open_message(source: Message) -> BinaryIO:
    """The message from its start; a descriptor is rewound and left open for the caller."""
    if isinstance(source, Path):
        return open(source, "rb")
    os.lseek(source, 0, os.SEEK_SET)
    return os.fdopen(os.dup(source), "rb")


def _copy(
    fd: int, source: Message, transform: Callable[[BinaryIO], Iterable[bytes]] | None = None
) -> None:
    """Copy the queued message; fail if it was removed (and its inode reused) meanwhile."""
    if transform is None and isinstance(source, int):
        _copy_descriptor(fd, source)
        return
    with open_message(source) as f:
        if transform is not None:
            for chunk in transform(f):
                _write_all(fd, chunk)
        else:
            while chunk := f.read(COPY_CHUNK):
                _write_all(fd, chunk)
        if isinstance(source, Path) and not is_same_file(source, f.fileno()):
            raise FileNotFoundError(errno.ENOENT, "message removed during delivery", str(source))


def _copy_descriptor(fd: int, source: int) -> None:
    """Copy an open message in the kernel (copy_file_range: no buffer here, and
    no file object to set up), from its start whatever its offset; across file
    systems where the kernel will not, through pread."""
    offset = 0
    try:
        while copied := os.copy_file_range(source, fd, COPY_CHUNK, offset):
            offset += copied
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    while chunk := os.pread(source, COPY_CHUNK, offset):
        _write_all(fd, chunk)
        offset += len(chunk)


def header_of(source: Message) -> bytes | None:
    """The message's header lines, blank line included, when they lie within
    its first COPY_CHUNK bytes of an open descriptor (one pread); else None."""
    if not isinstance(source, int):
        return None
    start = os.pread(source, COPY_CHUNK, 0)
    if start.startswith(b"\n"):
        return b"\n"
    end = start.find(b"\n\n")
    if end < 0:
        return start if len(start) < COPY_CHUNK else None  # all header, or too long
    return start[: end + 2]


def maildir_steps(maildir: Path, header: bytes, message: Message) -> Steps[str]:
    """Deliver header + the message file into `maildir` as steps (durable.Steps),
    returning the new/ name: two sync points, the file and then its name in new/."""
    # qmail-local's child chdirs to the maildir: only that failing is "Unable to
    # chdir" (a temporary errno excepted); a missing tmp/ or new/ fails later, as a
    # temporary error on maildir delivery.
    try:
        st = os.stat(maildir)
    except OSError as e:
        if e.errno in TEMPORARY_ERRNOS:
            raise MailboxError("Temporary error on maildir delivery. (#4.3.0)") from e
        raise MailboxError("Unable to chdir to maildir. (#4.2.1)") from e
    if not stat.S_ISDIR(st.st_mode) or not os.access(maildir, os.X_OK):
        raise MailboxError("Unable to chdir to maildir. (#4.2.1)")
    for _ in range(3):
        name = unique_name(time.time())
        tmp = maildir / "tmp" / name
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise MailboxError("Temporary error on maildir delivery. (#4.3.0)") from e
    else:
        raise MailboxError("Temporary error on maildir delivery. (#4.3.0)")
    try:
        try:
            _write_all(fd, header)
            _copy(fd, message)
        finally:
            os.close(fd)
        yield [tmp], []
        os.link(tmp, maildir / "new" / name)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, FileNotFoundError) and e.filename == str(message):
            raise MailboxError("Unable to read message. (#4.3.0)") from e
        raise MailboxError("Temporary error on maildir delivery. (#4.3.0)") from e
    # The link is the delivery: make it durable before saying so.
    try:
        yield [], [maildir / "new"]
    except OSError as e:
        raise MailboxError("Temporary error on maildir delivery. (#4.3.0)") from e
    with contextlib.suppress(OSError):
        tmp.unlink()
    return name


def _mboxrd(f: BinaryIO) -> Iterable[bytes]:
    """The message with `>*From ` lines quoted one level deeper, ending in NL + blank."""
    last = b"\n"
    for line in f:
        if line.lstrip(b">").startswith(b"From "):
            line = b">" + line
        last = line
        yield line
    yield b"\n" if last.endswith(b"\n") else b"\n\n"


def deliver_mbox(
    path: Path,
    header: bytes,
    message: Message,
    ufline: bytes,
    name: str | None = None,
) -> None:
    """Append UFLINE + header + the message (mboxrd) under an exclusive flock;
    on error truncate back. `name` is how errors call the file (the .qmail line).

    The fsync of this one file happens under the lock, as qmail's does: a
    reader never sees a message a crash could take back, and a failed sync can
    still be truncated away. Not the group commit: a syncfs flushes the whole
    file system, and held under the lock it made every delivery to a busy
    mailbox wait for everyone's writes (under load, past the 30 s lock wait)."""
    name = name or str(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as e:
        raise MailboxError(f"Unable to open {name}: {_reason(e)}. (#4.2.1)") from e
    try:
        locked = _lock(fd)
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            _write_all(fd, ufline + header)
            _copy(fd, message, _mboxrd)
            os.fsync(fd)
        except OSError as e:
            if locked:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
            raise MailboxError(f"Unable to write {name}: {_reason(e)}. (#4.3.0)") from e
    finally:
        os.close(fd)


def _lock(fd: int) -> bool:
    deadline = time.monotonic() + MBOX_LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise MailboxError(
                    "File has been locked for 30 seconds straight. (#4.3.0)"
                ) from None
            time.sleep(0.1)
        except OSError:
            return False  # locking impossible here: deliver unlocked, as qmail does


def _reason(e: OSError) -> str:
    from core.errors import os_reason

    return os_reason(e) if e.errno != errno.EEXIST else "file already exists"
