"""qmail-pop3d: the POP3 transaction state on one Maildir, as a session that does no network I/O.

One `Pop3d` serves one connection once checkpassword has accepted the login.
A driver (the built-in listener, `qmailtui pop3d` on standard input and output)
uses it so:

    session = Pop3d(home / "Maildir")
    send(session.start())           # "+OK " answers PASS/APOP; "-ERR ..." closes
    for line in lines.feed(data):   # `Lines`: command lines without their LF
        reply = session.handle(line)
        for chunk in reply.chunks():
            write(chunk)
        if reply.close:             # read it after sending: a message that cannot
            break                   # be read to its end closes the session too

A connection that ends without QUIT (a drop, the TIMEOUT) needs no call: as
with qmail-pop3d nothing changes on disk, no deletion and no move to cur/.

Behaviour, reply texts and their order are qmail-pop3d's (spec/pop3.md §4-§7,
checked against notqmail 1.09's qmail-pop3d.c, maildir.c, prioq.c and
commands.c): start-up cleans tmp/ and lists new/ and cur/ (files whose mtime
is before the current second, oldest first, ties in the order of qmail's own
heap); sizes are the files' sizes on disk (LF line ends, not what RETR sends);
DELE only marks, QUIT unlinks and moves the rest of new/ to cur/NAME:2,.

Where qmail is poor the choice is a module constant, ours by default and
qmail's on request: STAT_COUNTS_DELETED, EXTRA_BLANK_LINE. Ours, not qmail's: CAPA (RFC 2449;
qmail answers `-ERR unimplemented`), LINE_MAX (qmail reads lines of any
length), and an fsync of new/ and cur/ before QUIT's `+OK` (invisible on the
wire; qmail does not sync). qmail-pop3d's refusal to run as uid 0 is the
driver's business (ROOT_REFUSED has its text).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

from core.durable import fsync_path

_T = TypeVar("_T")

TIMEOUT = 1200  # seconds for every read and write, both programs; then exit silently
LINE_MAX = 4096  # ours: octets of a command line before its LF (a CR counts)
CHUNK = 1 << 20  # octets of a message file read at a time by RETR/TOP
TMP_MAX_AGE = 129600  # maildir_clean: tmp/ files last accessed 36 hours ago go
ULONG = 2**64  # scan_ulong keeps its number in an unsigned long and wraps
INT_MAX = 2**31 - 1

# qmail-pop3d counts messages marked deleted in STAT's first number; RFC 1939
# leaves them out, and so do we (spec/pop3.md §4, §9). True: qmail's way.
STAT_COUNTS_DELETED = False
# qmail-pop3d ends every message with an extra empty line, CR LF before the
# final `.` (qmail-pop3d.8: a work-around for client bugs of its day); we send
# the message as it is stored (spec/pop3.md §6). True: qmail's way.
EXTRA_BLANK_LINE = False

# qmail-pop3d's replies, byte for byte
OK = b"+OK \r\n"
NO_MAILDIR = b"-ERR this user has no $HOME/Maildir\r\n"
NO_SCAN = b"-ERR unable to scan $HOME/Maildir\r\n"
SYNTAX = b"-ERR syntax error\r\n"
UNIMPLEMENTED = b"-ERR unimplemented\r\n"
DELETED = b"-ERR already deleted\r\n"
FROM_ONE = b"-ERR messages are counted from 1\r\n"
TOO_BIG = b"-ERR not that many messages\r\n"
NO_OPEN = b"-ERR unable to open that message\r\n"
NO_UNLINK = b"-ERR unable to unlink all deleted messages\r\n"
END = b".\r\n"
ROOT_REFUSED = b"qmail-pop3d invoked as uid 0, terminating\n"  # on fd 2, then exit 1
# ours
IN_USE = b"-ERR [IN-USE] another POP3 session has this maildir open\r\n"  # ours (RFC 2449)
LINE_TOO_LONG = b"-ERR line too long\r\n"
CAPA = b"+OK Capability list follows\r\n"


def capabilities(*, user: bool, stls: bool) -> bytes:
    """The CAPA reply (RFC 2449 §5): USER only where a login can still be made,
    STLS only in the authorization state and only with a certificate (RFC 2595
    §4). PIPELINING holds as long as the driver hands pop3d the lines popup's
    `Lines` had buffered past PASS (qmail-popup loses them)."""
    names = [b"TOP", b"UIDL"]
    if user:
        names.append(b"USER")
    names += [b"PIPELINING", b"IMPLEMENTATION qmailtui"]
    if stls:
        names.append(b"STLS")
    return CAPA + b"".join(name + b"\r\n" for name in names) + END


def split_command(line: bytes) -> tuple[bytes, bytes]:
    """commands.c: one trailing CR goes, a NUL ends the line (a C string), the
    verb runs to the first space and is lower-cased in ASCII only, the argument
    is the rest with its leading spaces (not tabs) skipped."""
    if line.endswith(b"\r"):
        line = line[:-1]
    line = line.split(b"\0", 1)[0]
    verb, _, arg = line.partition(b" ")
    return verb.lower(), arg.lstrip(b" ")


def scan_ulong(text: bytes) -> tuple[int, int]:
    """scan_ulong: (the value of the leading digits modulo 2**64, how many digits).
    10**64 is a multiple of 2**64, so the last 64 digits give the value: no
    int() of a 5000-digit string (which Python refuses past 4300)."""
    digits = len(text) - len(text.lstrip(b"0123456789"))
    return (int(text[:digits][-64:]) % ULONG if digits else 0), digits


class Lines:
    """Command lines out of what a client sends, each without its LF.

    qmail reads a line of any length into memory; a server on the Internet must
    not. At most LINE_MAX + 1 octets of a line are kept, so an overlong line
    reaches `handle` cut to that and is answered LINE_TOO_LONG there, in turn.
    One `Lines` serves the whole connection: what was read past PASS belongs to
    pop3d (pipelining), what was read past STLS is dropped (`clear`)."""

    def __init__(self, limit: int = LINE_MAX) -> None:
        self._limit = limit
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        lines: list[bytes] = []
        start = 0
        while True:
            nl = data.find(b"\n", start)
            part = data[start:] if nl < 0 else data[start:nl]
            room = self._limit + 1 - len(self._buf)
            if room > 0:
                self._buf += part[:room]
            if nl < 0:
                return lines
            lines.append(bytes(self._buf))
            self._buf.clear()
            start = nl + 1

    def clear(self) -> None:
        """STLS (RFC 2595 §4): nothing sent in the clear may count after TLS."""
        self._buf.clear()


@dataclass(slots=True, eq=False, weakref_slot=True)
class Reply:
    """What to send for one command: `data`, then each chunk of `stream` (a
    message, read from its file as it goes), then close when `close` is true.

    `close` can turn true while `stream` runs: a message that cannot be read to
    its end ends the session there, without the final `.`, as qmail-pop3d
    exits. Read it after the stream is done."""

    data: bytes
    stream: Iterator[bytes] | None = None
    close: bool = False

    def chunks(self) -> Iterator[bytes]:
        if self.data:
            yield self.data
        if self.stream is not None:
            yield from self.stream

    def join(self) -> bytes:
        """Everything at once: for tests and short replies, not for RETR of big mail."""
        return b"".join(self.chunks())


@dataclass(slots=True)
class Message:
    name: str  # relative to the maildir: "new/UNIQUE" or "cur/UNIQUE:INFO"
    size: int  # st_size at start-up: LF line ends, what LIST and STAT report
    deleted: bool = False

    @property
    def uidl(self) -> bytes:
        """printfn(): the name without new/ or cur/, up to its first `:`."""
        return os.fsencode(self.name)[4:].split(b":", 1)[0]


class Pop3d:
    """One POP3 transaction state: `start` once, then `handle` each line."""

    def __init__(
        self,
        maildir: Path,
        *,
        clock: Callable[[], float] = time.time,
        stat_counts_deleted: bool = STAT_COUNTS_DELETED,
        extra_blank_line: bool = EXTRA_BLANK_LINE,
    ) -> None:
        self.maildir = maildir
        self._clock = clock
        self._stat_counts_deleted = stat_counts_deleted
        self._terminator = b"\r\n" + END if extra_blank_line else END
        self.messages: list[Message] = []
        self.last = 0  # LAST: the highest message number deleted since start or RSET
        self.started = False
        self.closed = False
        self._lock: int | None = None  # the Maildir's flock, held for the session

    # -- start-up ---------------------------------------------------------------------

    def start(self) -> Reply:
        """main() and getlist(): the reply to PASS/APOP. A Maildir that cannot be
        entered or listed gives qmail-pop3d's `-ERR` and the end of the session
        (qmail-pop3d then exits 0)."""
        if self.started:
            raise RuntimeError("Pop3d.start called twice")
        self.started = True
        if not _can_chdir(self.maildir):
            return self._close(NO_MAILDIR)
        self._lock = _lock(self.maildir)
        if self._lock is None:
            return self._close(IN_USE)
        now = int(self._clock())
        clean_tmp(self.maildir / "tmp", now)
        try:
            self.messages = scan(self.maildir, now)
        except OSError:
            return self._close(NO_SCAN)
        return Reply(OK)

    # -- commands ---------------------------------------------------------------------

    def handle(self, line: bytes) -> Reply:
        """The reply to one command line (without its LF; a CR before it is taken off)."""
        if not self.started or self.closed:
            raise RuntimeError("Pop3d.handle outside a running session")
        if len(line) > LINE_MAX:
            return Reply(LINE_TOO_LONG)
        verb, arg = split_command(line)
        command = self._commands.get(verb)
        if command is None:
            return Reply(UNIMPLEMENTED)
        return command(self, arg)

    def _quit(self, arg: bytes) -> Reply:
        """The only commit: unlink what is marked, move what is left in new/ to cur/."""
        out = bytearray()
        changed: set[str] = set()
        for message in self.messages:
            path = self.maildir / message.name
            if message.deleted:
                try:
                    os.unlink(path)
                    changed.add(message.name[:3])
                except OSError:
                    out += NO_UNLINK  # one per failure, and +OK all the same
            elif message.name.startswith("new/"):
                with contextlib.suppress(OSError):  # "if it fails, bummer"
                    os.rename(path, self.maildir / "cur" / (message.name[4:] + ":2,"))
                    changed.update(("new", "cur"))
        for directory in sorted(changed):  # ours: QUIT's +OK promises the change
            with contextlib.suppress(OSError):
                fsync_path(self.maildir / directory)
        return self._close(bytes(out) + OK)

    def _stat(self, arg: bytes) -> Reply:
        live = [m for m in self.messages if not m.deleted]
        count = len(self.messages) if self._stat_counts_deleted else len(live)
        total = sum(m.size for m in live) % ULONG
        return Reply(b"+OK %d %d\r\n" % (count, total))

    def _list(self, arg: bytes) -> Reply:
        return self._listing(arg, lambda m: b"%d" % m.size)

    def _uidl(self, arg: bytes) -> Reply:
        return self._listing(arg, lambda m: m.uidl)

    def _listing(self, arg: bytes, column: Callable[[Message], bytes]) -> Reply:
        if arg:
            i = self._msgno(arg)
            if isinstance(i, Reply):
                return i
            return Reply(b"+OK %d %s\r\n" % (i + 1, column(self.messages[i])))
        rows = [
            b"%d %s\r\n" % (i, column(m)) for i, m in enumerate(self.messages, 1) if not m.deleted
        ]
        return Reply(OK + b"".join(rows) + END)

    def _dele(self, arg: bytes) -> Reply:
        i = self._msgno(arg)
        if isinstance(i, Reply):
            return i
        self.messages[i].deleted = True
        self.last = max(self.last, i + 1)
        return Reply(OK)

    def _rset(self, arg: bytes) -> Reply:
        for message in self.messages:
            message.deleted = False
        self.last = 0
        return Reply(OK)

    def _last(self, arg: bytes) -> Reply:
        return Reply(b"+OK %d\r\n" % self.last)

    def _noop(self, arg: bytes) -> Reply:
        return Reply(OK)

    def _capa(self, arg: bytes) -> Reply:
        return Reply(capabilities(user=False, stls=False))

    def _top(self, arg: bytes) -> Reply:
        """RETR and TOP alike: `RETR n k` is `TOP n k`, `TOP n` is `RETR n`."""
        i = self._msgno(arg)
        if isinstance(i, Reply):
            return i
        _, digits = scan_ulong(arg)
        k, given = scan_ulong(arg[digits:].lstrip(b" "))
        limit = (k + 1) % ULONG if given else 0  # 0: the whole message (so k = 2**64-1 too)
        try:
            fd = os.open(self.maildir / self.messages[i].name, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return Reply(NO_OPEN)
        reply = Reply(OK)
        sent = weakref.ref(reply)  # no cycle: a dropped reply closes its file at once

        def unreadable() -> None:
            self.closed = True
            if (unfinished := sent()) is not None:
                unfinished.close = True

        cut = _Cut(limit - 1) if limit else None
        reply.stream = _Blast(fd, cut, self._terminator, unreadable)
        return reply

    _commands: ClassVar[dict[bytes, Callable[[Pop3d, bytes], Reply]]] = {
        b"quit": _quit,
        b"stat": _stat,
        b"list": _list,
        b"uidl": _uidl,
        b"dele": _dele,
        b"retr": _top,
        b"rset": _rset,
        b"last": _last,
        b"top": _top,
        b"noop": _noop,
        b"capa": _capa,  # ours
    }

    def _msgno(self, arg: bytes) -> int | Reply:
        """msgno(): the index of message `arg`, or the error, in qmail's order."""
        n, digits = scan_ulong(arg)
        if not digits:
            return Reply(SYNTAX)
        if not n:
            return Reply(FROM_ONE)
        if n - 1 >= len(self.messages) or n - 1 >= INT_MAX:
            return Reply(TOO_BIG)
        if self.messages[n - 1].deleted:
            return Reply(DELETED)
        return n - 1

    def _close(self, data: bytes) -> Reply:
        self.closed = True
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        return Reply(data, close=True)


class _Cut:
    """Where TOP stops: after the header, the first empty line and `lines` more.

    blast() counts lines as qmail's getln sees them: an empty line is nothing
    between two LFs, so a header ended by CR LF CR LF never ends and TOP sends
    the whole message."""

    __slots__ = ("in_header", "lines")

    def __init__(self, lines: int) -> None:
        self.in_header = True
        self.lines = lines

    def end(self, chunk: bytes, line_start: bool) -> int | None:
        """The offset in `chunk` after which nothing is sent, None if not in it."""
        pos = 0
        if self.in_header:
            if line_start and chunk.startswith(b"\n"):
                pos = 1
            else:
                empty = chunk.find(b"\n\n")
                if empty < 0:
                    return None
                pos = empty + 2
            self.in_header = False
        if not self.lines:
            return pos
        found = chunk.count(b"\n", pos)
        if found < self.lines:
            self.lines -= found
            return None
        rest = chunk[pos:].split(b"\n", self.lines)[-1]
        self.lines = 0
        return len(chunk) - len(rest)


class _Blast:
    """blast(): the message on the wire, CHUNK octets of file at a time.

    Each line gets CR LF, a leading `.` is doubled, a last line without LF is
    sent with CR LF all the same, then the terminator. Done with bytes.replace
    over large blocks rather than line by line: RETR runs at memory speed."""

    __slots__ = ("_cut", "_fd", "_line_start", "_terminator", "_unreadable")

    def __init__(
        self, fd: int, cut: _Cut | None, terminator: bytes, unreadable: Callable[[], None]
    ) -> None:
        self._fd = fd
        self._cut = cut
        self._terminator: bytes | None = terminator
        self._unreadable = unreadable
        self._line_start = True

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        while self._fd >= 0:
            try:
                chunk = os.read(self._fd, CHUNK)
            except OSError:  # qmail-pop3d exits here, without the final "."
                self.close()
                self._terminator = None
                self._unreadable()
                break
            if not chunk:
                self.close()
                break
            if self._cut is not None:
                end = self._cut.end(chunk, self._line_start)
                if end is not None:
                    chunk = chunk[:end]
                    self.close()
            if chunk:
                out = chunk.replace(b"\n.", b"\n..")
                if self._line_start and chunk.startswith(b"."):
                    out = b"." + out
                self._line_start = chunk.endswith(b"\n")
                return out.replace(b"\n", b"\r\n")
        if self._terminator is None:
            raise StopIteration
        end_of_message = self._terminator if self._line_start else b"\r\n" + self._terminator
        self._terminator = None
        return end_of_message

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __del__(self) -> None:  # a driver that stops reading must not leak the file
        self.close()


# -- the Maildir at start-up ---------------------------------------------------------------


def _lock(maildir: Path) -> int | None:
    """Ours: one session per Maildir at a time, by an flock on the directory
    itself (nothing is written into the Maildir). qmail has none: a second
    session sees messages the first moves or deletes, and its DELE fails."""
    try:
        fd = os.open(maildir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _can_chdir(path: Path) -> bool:
    """chdir(argv[1]) succeeds: a directory we may search."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and os.access(path, os.X_OK, effective_ids=True)


def clean_tmp(tmp: Path, now: int) -> None:
    """maildir_clean(): unlink tmp/ files not accessed for 36 hours, silently."""
    try:
        entries = list(os.scandir(tmp))
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        with contextlib.suppress(OSError):
            if now > int(entry.stat().st_atime) + TMP_MAX_AGE:
                os.unlink(entry.path)


def scan(maildir: Path, now: int) -> list[Message]:
    """maildir_scan(): new/ then cur/, names not starting with `.`, mtime before
    the second `now` (so the order cannot change under the reader), oldest first;
    an OSError means "unable to scan". Sizes are st_size, following symlinks."""
    entries: list[tuple[int, Message]] = []
    for sub in ("new", "cur"):
        with os.scandir(maildir / sub) as directory:
            for entry in directory:
                if entry.name.startswith("."):
                    continue
                try:
                    st = entry.stat()
                except OSError:
                    continue
                mtime = st.st_mtime_ns // 1_000_000_000
                if mtime < now:
                    entries.append((mtime, Message(f"{sub}/{entry.name}", st.st_size)))
    return prioq_order(entries)


def prioq_order(entries: list[tuple[int, _T]]) -> list[_T]:
    """prioq.c's binary heap, insert all then take the minimum until empty: the
    order qmail numbers messages in, including among equal mtimes, which
    depends on readdir's order and on this exact heap."""
    heap: list[tuple[int, _T]] = []
    for element in entries:  # prioq_insert
        j = len(heap)
        heap.append(element)
        while j:
            i = (j - 1) // 2
            if heap[i][0] <= element[0]:
                break
            heap[j] = heap[i]
            j = i
        heap[j] = element
    order: list[_T] = []
    while heap:  # prioq_min, prioq_delmin
        order.append(heap[0][1])
        n = len(heap) - 1
        i = 0
        while True:
            j = i + i + 2
            if j > n:
                break
            if heap[j - 1][0] <= heap[j][0]:
                j -= 1
            if heap[n][0] <= heap[j][0]:
                break
            heap[i] = heap[j]
            i = j
        heap[i] = heap[n]
        heap.pop()
    return order
