"""core.pop3d and core.popup against the real qmail-pop3d and qmail-popup (notqmail 1.09).

pop3d: the same Maildir is built twice (same names, bytes and times; the
qmail-local messages are what the real qmail-local wrote), qmail-pop3d runs
on one copy (as uid 65534 through setpriv when the tests run as root, since
it refuses uid 0) and `Pop3d` on the other, fed the same bytes. Compared: every
reply byte for byte, and afterwards every file left in new/, cur/ and tmp/
with its bytes and mtime. Each case also says what qmail answers, checked
first, so a case tests what its name says; most also say which messages
QUIT deleted, and the expected Maildir is checked on both sides.

popup: qmail-popup and `Popup` (with `run_checkpassword`) get the same
dialogue; the greeting's `<PID.TIME@` is the only thing masked (qmail's TIME
is checked to lie within the run). fd 3 is compared through a checkpassword
that copies it to a file. A whole login (popup, checkpassword-stub, pop3d)
is played turn by turn, since qmail-popup reads ahead and would swallow what
is meant for qmail-pop3d.

Where we differ on purpose (CAPA, the line length limit) the case gives our
replies too, and both are asserted exactly. The unit tests at the end need
no oracle: RETR's speed, chunk boundaries, the clock rule, Lines, STLS.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from core import pop3d
from core.checkpassword import run_checkpassword
from core.pop3d import LINE_MAX, Lines, Pop3d, prioq_order
from core.popup import Login, Popup, StartTLS

pytestmark = pytest.mark.oracle

TIMEOUT = 20.0  # seconds for one program run or one turn
T = 1_700_000_000  # the mtimes of the test messages: long past
HOST = "pop.example.org"
NOBODY = 65534
ROOT = os.geteuid() == 0
# qmail-pop3d's own choices, which ours leaves off by default (core/pop3d.py)
AS_QMAIL = {"stat_counts_deleted": True, "extra_blank_line": True}

# Replies, byte for byte.
OK = b"+OK \r\n"
END = b".\r\n"
SYNTAX = b"-ERR syntax error\r\n"
UNIMPLEMENTED = b"-ERR unimplemented\r\n"
DELETED = b"-ERR already deleted\r\n"
FROM_ONE = b"-ERR messages are counted from 1\r\n"
TOO_BIG = b"-ERR not that many messages\r\n"
NO_OPEN = b"-ERR unable to open that message\r\n"
NO_UNLINK = b"-ERR unable to unlink all deleted messages\r\n"
NO_MAILDIR = b"-ERR this user has no $HOME/Maildir\r\n"
NO_SCAN = b"-ERR unable to scan $HOME/Maildir\r\n"
USER_FIRST = b"-ERR USER first\r\n"
AUTHORIZATION_FIRST = b"-ERR authorization first\r\n"
FAILED = b"-ERR authorization failed\r\n"
CRASHED = b"-ERR aack, child crashed\r\n"
# ours only
LINE_TOO_LONG = b"-ERR line too long\r\n"
CAPA = (
    b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nPIPELINING\r\nIMPLEMENTATION qmailtui\r\n.\r\n"
)
CAPA_USER = (
    b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nUSER\r\nPIPELINING\r\n"
    b"IMPLEMENTATION qmailtui\r\n.\r\n"
)

# -- the Maildir ---------------------------------------------------------------------------

LOCAL = b"Return-Path: <sender@b.test>\nDelivered-To: alice@example.org\n"  # qmail-local's


def big_message() -> bytes:
    """About 2.5 MB: empty lines, lines of dots, lines starting with a dot."""
    lines = [b"Subject: big", b""]
    for i in range(60000):
        if i % 7 == 0:
            lines.append(b"")
        elif i % 11 == 0:
            lines.append(b"..")
        elif i % 5 == 0:
            lines.append(b".dot line %d" % i)
        else:
            lines.append(b"line %d " % i + b"x" * (i % 60))
    return b"\n".join(lines) + b"\n"


BIG = big_message()
# What qmail-local is given; it delivers LOCAL + the message (checked in `delivered`).
TO_DELIVER = {
    2: b"From: a@b.test\nSubject: two\n\nhello\nworld\n",
    4: b"Subject: partial\n\nline one\nno newline at end",
    9: BIG,
}


@dataclass(frozen=True)
class File:
    name: str  # relative to the Maildir
    data: bytes | None  # None: a directory
    mtime: int
    atime: int | None = None  # None: the mtime


# The standard maildrop, numbered as qmail numbers it (by mtime).
MESSAGES: dict[int, tuple[str, bytes]] = {
    1: ("cur/1700000001.11.host:2,", b"Subject: first\n\nbody\n"),
    2: ("new/1700000002.12.host", LOCAL + TO_DELIVER[2]),
    3: ("cur/1700000003.13.host:2,S", b"Subject: dots\n\n.\n..\n.leading\nnormal\n. \n"),
    4: ("new/1700000004.14.host", LOCAL + TO_DELIVER[4]),  # no final newline
    5: ("new/1700000005.15.host", b""),
    6: ("cur/1700000006.16.host", b"\nbody only\n.second\n"),  # no header; no info
    7: ("cur/1700000007.17.host:2,RS", b"Subject: crlf\r\n\r\nbody\r\n.dot\r\n"),
    8: ("new/1700000008.18.host", b"Subject: nobody\nX-Header: y\n"),  # no empty line
    9: ("new/1700000009.19.host", LOCAL + BIG),
    10: ("new/1700000010.20.host", b"Subject: last\n\none\ntwo\n\nfour\n.five\nsix\n"),
}
COUNT = len(MESSAGES)


def data(n: int) -> bytes:
    return MESSAGES[n][1]


def size(n: int) -> int:
    return len(data(n))


def uidl(n: int) -> bytes:
    return MESSAGES[n][0][4:].split(":")[0].encode()


TOTAL = sum(size(n) for n in MESSAGES)


NOW = int(time.time())  # once: every build of the standard box must be the same


def standard_box() -> list[File]:
    files = [File(name, body, T + n) for n, (name, body) in MESSAGES.items()]
    return [
        *files,
        File("new/.hidden", b"Subject: hidden\n\n", T),  # dot files are not listed
        File("cur/.also-hidden:2,", b"x\n", T),
        File("new/1799999999.99.host", b"Subject: future\n\n", NOW + 86400),  # mtime not past
        File("tmp/1699999999.1.host", b"old\n", T, atime=T),  # 36 hours unread: cleaned
        File("tmp/1699999999.2.host", b"fresh\n", T, atime=NOW),
        File("tmp/.1699999999.3.host", b"dot\n", T, atime=T),
    ]


def ties_box() -> list[File]:
    """Equal mtimes in new/ and cur/: the order is readdir's through qmail's heap."""
    mtimes = [5, 3, 5, 5, 1, 3, 5, 2, 5, 5, 3, 1]
    files = []
    for i, m in enumerate(mtimes):
        sub, info = ("new", "") if i % 3 else ("cur", ":2,S")
        files.append(File(f"{sub}/17000000{i:02d}.{100 + i}.tie{info}", b"n %d\n" % i, T + m))
    return files


def dir_box() -> list[File]:
    return [
        File("new/1700000001.1.host", b"Subject: a\n\n", T + 2),
        File("new/1700000000.0.dir", None, T + 1),  # a directory: stat works, read does not
    ]


BOXES: dict[str, Callable[[], list[File]]] = {
    "standard": standard_box,
    "ties": ties_box,
    "dir": dir_box,
    "empty": list,
}


def build(home: Path, files: list[File]) -> Path:
    """maildirmake's layout (mode 0700), then the files with their times."""
    home.mkdir(mode=0o700)
    maildir = home / "Maildir"
    maildir.mkdir(mode=0o700)
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(mode=0o700)
    for f in files:
        path = maildir / f.name
        if f.data is None:
            path.mkdir(mode=0o700)
        else:
            path.write_bytes(f.data)
        os.utime(path, (f.atime if f.atime is not None else f.mtime, f.mtime))
    return maildir


def give_to_nobody(home: Path) -> None:
    if ROOT:
        for path in (home, *home.rglob("*")):
            os.chown(path, NOBODY, NOBODY, follow_symlinks=False)


def state(maildir: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every entry of tmp/, new/ and cur/: bytes (None for a directory) and mtime."""
    found: dict[str, tuple[bytes | None, int]] = {}
    for sub in ("tmp", "new", "cur"):
        if not (maildir / sub).is_dir():
            continue
        for path in (maildir / sub).iterdir():
            content = None if path.is_dir() else path.read_bytes()
            found[f"{sub}/{path.name}"] = (content, int(path.stat().st_mtime))
    return found


def after(deleted: tuple[int, ...], committed: bool) -> dict[str, tuple[bytes | None, int]]:
    """The standard Maildir after a session: tmp/ cleaned at start; with QUIT,
    `deleted` gone and the rest of new/ in cur/ as NAME:2,."""
    expected = {f.name: (f.data, f.mtime) for f in standard_box()}
    del expected["tmp/1699999999.1.host"]
    if committed:
        for n, (name, body) in MESSAGES.items():
            if n in deleted or name.startswith("new/"):
                del expected[name]
            if n not in deleted and name.startswith("new/"):
                expected[f"cur/{name[4:]}:2,"] = (body, T + n)
    return expected


# -- expectations --------------------------------------------------------------------------


def wire(message: bytes, k: int | None = None) -> bytes:
    """qmail-pop3d's blast(), line by line as the C does: the expected RETR/TOP body."""
    out = []
    lines = message.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    in_header, left = True, k
    for line in lines:
        if left is not None and not in_header:
            if left == 0:
                break
            left -= 1
        if line == b"":
            in_header = False
        out.append((b"." if line.startswith(b".") else b"") + line + b"\r\n")
    return b"".join(out) + b"\r\n.\r\n"


def retr(n: int, k: int | None = None) -> bytes:
    return OK + wire(data(n), k)


def listing(rows: list[bytes]) -> bytes:
    return OK + b"".join(rows) + END


def sizes(*skip: int) -> bytes:
    return listing([b"%d %d\r\n" % (n, size(n)) for n in MESSAGES if n not in skip])


def uidls(*skip: int) -> bytes:
    return listing([b"%d %s\r\n" % (n, uidl(n)) for n in MESSAGES if n not in skip])


def stat(*deleted: int) -> bytes:
    return b"+OK %d %d\r\n" % (COUNT, TOTAL - sum(size(n) for n in deleted))


def lines(*commands: str | bytes) -> bytes:
    return b"".join((c.encode("latin-1") if isinstance(c, str) else c) + b"\r\n" for c in commands)


# -- running both --------------------------------------------------------------------------


def as_nobody(command: list[str]) -> list[str]:
    if not ROOT:
        return command
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]


def qmail_pop3d(oracle: Path, home: Path, send: bytes) -> bytes:
    give_to_nobody(home)
    result = subprocess.run(
        as_nobody([str(oracle / "qmail-pop3d"), "Maildir"]),
        cwd=home,
        input=send,
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def our_pop3d(maildir: Path, send: bytes) -> bytes:
    session = Pop3d(maildir, **AS_QMAIL)
    out = bytearray(session.start().join())
    for line in Lines().feed(send):
        if session.closed:
            break
        reply = session.handle(line)
        out += reply.join()
        if reply.close:
            break
    return bytes(out)


@dataclass(frozen=True)
class Case:
    """One pop3d session. `expect`: qmail's replies after its first `+OK `
    (None: not written down, only ours against qmail). `deleted`/`committed`:
    the standard Maildir afterwards. `ours`: our replies where we differ on purpose."""

    send: bytes
    expect: tuple[bytes, ...] | None
    deleted: tuple[int, ...] = ()
    committed: bool = True
    box: str = "standard"
    ours: tuple[bytes, ...] | None = None


ALL = range(1, COUNT + 1)

CASES: dict[str, Case] = {
    # -- listing -------------------------------------------------------------------------
    "STAT LIST UIDL on a fresh maildrop": Case(
        lines("STAT", "LIST", "UIDL", "QUIT"), (stat(), sizes(), uidls(), OK)
    ),
    "LIST n: the size on disk, LF line ends": Case(
        lines(*(f"LIST {n}" for n in ALL), "QUIT"),
        (*(b"+OK %d %d\r\n" % (n, size(n)) for n in ALL), OK),
    ),
    "UIDL n: the name without new/, cur/ and the info": Case(
        lines(*(f"UIDL {n}" for n in ALL), "QUIT"),
        (*(b"+OK %d %s\r\n" % (n, uidl(n)) for n in ALL), OK),
    ),
    "LIST and UIDL past the end, at zero, not numbers": Case(
        lines("LIST 11", "LIST 0", "LIST x", "LIST -1", "UIDL 11", "UIDL 0", "UIDL abc", "QUIT"),
        (TOO_BIG, FROM_ONE, SYNTAX, SYNTAX, TOO_BIG, FROM_ONE, SYNTAX, OK),
    ),
    "a message number wraps at 2**64, as scan_ulong's unsigned long": Case(
        lines(
            "LIST 18446744073709551617",
            "DELE 18446744073709551618",
            "LIST 2",
            "LIST 18446744073709551616",
            "LIST 99999999999999999999",
            "QUIT",
        ),
        (b"+OK 1 %d\r\n" % size(1), OK, DELETED, FROM_ONE, TOO_BIG, OK),
        deleted=(2,),
    ),
    "what follows the number is ignored": Case(
        lines("LIST 3abc", "UIDL 3 4", "RETR 1x", "DELE 5 6", "QUIT"),
        (b"+OK 3 %d\r\n" % size(3), b"+OK 3 %s\r\n" % uidl(3), retr(1), OK, OK),
        deleted=(5,),
    ),
    "several spaces before an argument are skipped": Case(
        lines("LIST    3", "TOP  10   2", "QUIT"),
        (b"+OK 3 %d\r\n" % size(3), retr(10, 2), OK),
    ),
    # -- RETR ------------------------------------------------------------------------------
    "RETR: CR LF, dots doubled, an extra empty line, a final line without LF": Case(
        lines(*(f"RETR {n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 10)), "QUIT"),
        (*(retr(n) for n in (1, 2, 3, 4, 5, 6, 7, 8, 10)), OK),
    ),
    "RETR of a big message": Case(lines("RETR 9", "QUIT"), (retr(9), OK)),
    "RETR without a number, with a bad one, past the end": Case(
        lines("RETR", "RETR ", "RETR x", "RETR 0", "RETR 11", "QUIT"),
        (SYNTAX, SYNTAX, SYNTAX, FROM_ONE, TOO_BIG, OK),
    ),
    "RETR n k is TOP n k": Case(
        lines("RETR 10 1", "RETR 2 0", "QUIT"), (retr(10, 1), retr(2, 0), OK)
    ),
    # -- TOP ---------------------------------------------------------------------------------
    "TOP n 0: the header and its empty line": Case(
        lines("TOP 1 0", "TOP 2 0", "TOP 3 0", "TOP 4 0", "TOP 10 0", "TOP 9 0", "QUIT"),
        (retr(1, 0), retr(2, 0), retr(3, 0), retr(4, 0), retr(10, 0), retr(9, 0), OK),
    ),
    "TOP n k counts body lines, empty ones too": Case(
        lines(*(f"TOP 10 {k}" for k in range(8)), "TOP 4 1", "TOP 4 2", "TOP 3 3", "QUIT"),
        (*(retr(10, k) for k in range(8)), retr(4, 1), retr(4, 2), retr(3, 3), OK),
    ),
    "TOP with a large k sends the whole message": Case(
        lines("TOP 10 100", "TOP 9 1000000", "QUIT"), (retr(10, 100), retr(9), OK)
    ),
    "TOP without k, or with k not a number, or k = 2**64-1, sends everything": Case(
        lines(
            "TOP 10",
            "TOP 10 x",
            "TOP 10 -1",
            "TOP 10 18446744073709551615",
            "TOP 10 18446744073709551616",
            "QUIT",
        ),
        (retr(10), retr(10), retr(10), retr(10), retr(10, 0), OK),
    ),
    "TOP of a message without an empty line sends it all": Case(
        lines("TOP 8 0", "TOP 8 1", "QUIT"), (retr(8), retr(8), OK)
    ),
    "TOP of a CR LF message never finds the end of the header": Case(
        lines("TOP 7 0", "QUIT"),
        (OK + b"Subject: crlf\r\r\n\r\r\nbody\r\r\n..dot\r\r\n\r\n.\r\n", OK),
    ),
    "TOP of a message that starts with its empty line": Case(
        lines("TOP 6 0", "TOP 6 1", "TOP 6 2", "QUIT"),
        (OK + b"\r\n\r\n.\r\n", OK + b"\r\nbody only\r\n\r\n.\r\n", retr(6), OK),
    ),
    "TOP and RETR of an empty message": Case(
        lines("TOP 5 0", "RETR 5", "LIST 5", "QUIT"),
        (OK + b"\r\n.\r\n", OK + b"\r\n.\r\n", b"+OK 5 0\r\n", OK),
    ),
    "TOP of the big message stops early": Case(
        lines("TOP 9 3", "TOP 9 50", "QUIT"), (retr(9, 3), retr(9, 50), OK)
    ),
    "TOP errors": Case(
        lines("TOP", "TOP x 1", "TOP 0 1", "TOP 11 1", "QUIT"),
        (SYNTAX, SYNTAX, FROM_ONE, TOO_BIG, OK),
    ),
    # -- DELE, RSET, LAST, QUIT -------------------------------------------------------------
    "a deleted message is gone for every command, but STAT still counts it": Case(
        lines("DELE 2", "RETR 2", "TOP 2 0", "LIST 2", "UIDL 2", "DELE 2", "STAT", "LIST", "UIDL")
        + lines("QUIT"),
        (OK, DELETED, DELETED, DELETED, DELETED, DELETED, stat(2), sizes(2), uidls(2), OK),
        deleted=(2,),
    ),
    "DELE errors": Case(
        lines("DELE", "DELE x", "DELE 0", "DELE 11", "DELE -1", "QUIT"),
        (SYNTAX, SYNTAX, FROM_ONE, TOO_BIG, SYNTAX, OK),
    ),
    "RSET undeletes everything and LAST goes back to 0": Case(
        lines("DELE 1", "DELE 3", "LAST", "RSET", "LAST", "STAT", "LIST 1", "RETR 3", "QUIT"),
        (OK, OK, b"+OK 3\r\n", OK, b"+OK 0\r\n", stat(), b"+OK 1 %d\r\n" % size(1), retr(3), OK),
    ),
    "LAST is the highest number deleted": Case(
        lines("LAST", "DELE 5", "LAST", "DELE 2", "LAST", "DELE 9", "LAST", "QUIT"),
        (b"+OK 0\r\n", OK, b"+OK 5\r\n", OK, b"+OK 5\r\n", OK, b"+OK 9\r\n", OK),
        deleted=(2, 5, 9),
    ),
    "everything deleted: STAT counts all, LIST and UIDL are empty": Case(
        lines(*(f"DELE {n}" for n in ALL), "STAT", "LIST", "UIDL", "LAST", "QUIT"),
        (*(OK for _ in ALL), stat(*ALL), OK + END, OK + END, b"+OK 10\r\n", OK),
        deleted=tuple(ALL),
    ),
    "QUIT unlinks what is marked and moves the rest of new/ to cur/": Case(
        lines("DELE 2", "DELE 4", "DELE 7", "QUIT"), (OK, OK, OK, OK), deleted=(2, 4, 7)
    ),
    "no QUIT: nothing deleted, nothing moved": Case(
        lines("DELE 1", "DELE 2", "RETR 3"), (OK, OK, retr(3)), committed=False
    ),
    "end of input inside a line: no reply to it": Case(
        lines("STAT") + b"DELE 1", (stat(),), committed=False
    ),
    "nothing after QUIT is read": Case(lines("QUIT", "DELE 1", "STAT"), (OK,)),
    "QUIT with an argument": Case(lines("DELE 3", "QUIT now"), (OK, OK), deleted=(3,)),
    # -- the command reader -------------------------------------------------------------------
    "NOOP with and without an argument": Case(
        lines("NOOP", "NOOP x y", "noop", "QUIT"), (OK, OK, OK, OK)
    ),
    "verbs in any case": Case(
        lines("stat", "LiSt 1", "uidl 1", "Retr 1", "tOp 1 0", "dele 1", "rset", "Last", "qUiT"),
        (
            stat(),
            b"+OK 1 %d\r\n" % size(1),
            b"+OK 1 %s\r\n" % uidl(1),
            retr(1),
            retr(1, 0),
            OK,
            OK,
            b"+OK 0\r\n",
            OK,
        ),
    ),
    "unknown verbs and the extensions qmail lacks": Case(
        lines("USER alice", "PASS x", "APOP a b", "STLS", "AUTH PLAIN", "XYZZY", "STATX", "QUIT"),
        (*(UNIMPLEMENTED for _ in range(7)), OK),
    ),
    "CAPA: qmail has none, ours lists TOP UIDL PIPELINING": Case(
        lines("CAPA", "capa x", "QUIT"),
        (UNIMPLEMENTED, UNIMPLEMENTED, OK),
        ours=(CAPA, CAPA, OK),
    ),
    "an empty line, a space before the verb, a tab after it": Case(
        lines("", " STAT", "STAT\t", "LIST\t1", "\tSTAT", "QUIT"),
        (*(UNIMPLEMENTED for _ in range(5)), OK),
    ),
    "bare LF ends a line; only one CR is taken off": Case(
        b"STAT\nSTAT\r\r\nLIST 1\r\r\nQUIT\n",
        (stat(), UNIMPLEMENTED, b"+OK 1 %d\r\n" % size(1), OK),
    ),
    "a NUL ends the command line": Case(
        lines(b"STAT\0junk", b"LIST 1\0 2", b"DELE\0 1", b"QUIT\0x"),
        (stat(), b"+OK 1 %d\r\n" % size(1), SYNTAX, OK),
    ),
    "bytes outside ASCII": Case(
        lines(b"ST\xc4T", b"LIST \xff", b"QUIT"), (UNIMPLEMENTED, SYNTAX, OK)
    ),
    "an overlong line: qmail reads it, we refuse it": Case(
        lines(b"NOOP " + b"x" * 10000, b"LIST 1" + b" " * LINE_MAX, "STAT", "QUIT"),
        (OK, b"+OK 1 %d\r\n" % size(1), stat(), OK),
        ours=(LINE_TOO_LONG, LINE_TOO_LONG, stat(), OK),
    ),
    "a line of LINE_MAX octets, its CR included, is still read": Case(
        lines(b"NOOP " + b"x" * (LINE_MAX - 6), b"NOOP " + b"x" * (LINE_MAX - 5), "QUIT"),
        (OK, OK, OK),
        ours=(OK, LINE_TOO_LONG, OK),
    ),
    # -- other maildrops ------------------------------------------------------------------------
    "the empty maildrop": Case(
        lines("STAT", "LIST", "UIDL", "LAST", "RETR 1", "TOP 1 0", "DELE 1", "LIST 1", "QUIT"),
        (b"+OK 0 0\r\n", OK + END, OK + END, b"+OK 0\r\n", *(TOO_BIG for _ in range(4)), OK),
        box="empty",
    ),
    "equal mtimes come in the order of qmail's heap": Case(
        lines("LIST", "UIDL", "DELE 3", "DELE 8", "QUIT"), None, box="ties"
    ),
    "a directory in new/ is listed; RETR of it ends the session": Case(
        lines("LIST", "UIDL", "RETR 1", "STAT", "QUIT"), None, box="dir"
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_pop3d_answers_like_qmail_pop3d(oracle: Path, tmp_path: Path, name: str) -> None:
    case = CASES[name]
    files = BOXES[case.box]()
    theirs_box = build(tmp_path / "qmail", files)
    ours_box = build(tmp_path / "ours", files)
    before = state(ours_box) if case.box == "dir" else {}  # reading sets atimes: not with tmp/

    theirs = qmail_pop3d(oracle, tmp_path / "qmail", case.send)
    ours = our_pop3d(ours_box, case.send)

    if case.expect is not None:
        assert theirs == OK + b"".join(case.expect)
    if case.ours is not None:
        assert ours == OK + b"".join(case.ours)
    else:
        assert ours == theirs
    assert state(ours_box) == state(theirs_box)
    if case.box == "standard":
        assert state(ours_box) == after(case.deleted, case.committed)
    elif case.box == "dir":  # the session ended at RETR: nothing moved
        assert state(ours_box) == before
        assert ours.endswith(b"\r\n.\r\n+OK \r\n")
    elif case.box == "ties":
        assert sorted(re.findall(rb"\d+ (17\S+)\r\n", ours)) == sorted(
            f.name[4:].split(":")[0].encode() for f in files
        )


def test_the_ties_box_tells_qmails_heap_from_a_stable_sort(tmp_path: Path) -> None:
    """The ties case is worth something only if, for this readdir order, qmail's
    heap numbers the messages otherwise than a stable sort by mtime would."""
    maildir = build(tmp_path / "home", ties_box())
    entries = [
        (int(entry.stat().st_mtime), entry.name)
        for sub in ("new", "cur")
        for entry in os.scandir(maildir / sub)
    ]
    assert prioq_order(entries) != [name for _, name in sorted(entries, key=lambda e: e[0])]
    # worked by hand through prioq_insert and prioq_delmin
    assert prioq_order([(1, "a"), (1, "b"), (1, "c"), (0, "d")]) == ["d", "b", "c", "a"]


# -- start-up failures ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "make", "reply"),
    [
        ("no Maildir", lambda m: shutil.rmtree(m), NO_MAILDIR),
        ("Maildir is a file", lambda m: (shutil.rmtree(m), m.write_bytes(b"x")), NO_MAILDIR),
        ("no cur/", lambda m: shutil.rmtree(m / "cur"), NO_SCAN),
        ("no new/", lambda m: (m / "new").rmdir(), NO_SCAN),
        ("new/ is a file", lambda m: ((m / "new").rmdir(), (m / "new").write_bytes(b"")), NO_SCAN),
    ],
)
def test_a_maildir_that_cannot_be_read_ends_the_session(
    oracle: Path, tmp_path: Path, name: str, make: Callable[[Path], object], reply: bytes
) -> None:
    files = [File("tmp/old", b"old\n", T, atime=T), File("cur/1700000001.1.h:2,", b"x\n", T)]
    theirs_box, ours_box = build(tmp_path / "qmail", files), build(tmp_path / "ours", files)
    make(theirs_box)
    make(ours_box)

    theirs = qmail_pop3d(oracle, tmp_path / "qmail", lines("STAT", "QUIT"))
    session = Pop3d(ours_box, **AS_QMAIL)
    start = session.start()

    assert theirs == reply
    assert (start.join(), start.close, session.closed) == (reply, True, True)
    assert state(ours_box) == state(theirs_box)  # tmp/ is cleaned before the scan fails


# -- turn by turn ----------------------------------------------------------------------------


def read_reply(proc: subprocess.Popen[bytes], multiline: bool | None = False) -> bytes:
    """One reply from the program (QUIT's: all up to its exit), or what came
    before TIMEOUT or its exit."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    got = b""
    deadline = time.monotonic() + TIMEOUT
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while not _complete(got, multiline):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            got += chunk
    return got


def _complete(got: bytes, multiline: bool | None) -> bool:
    if multiline is None:  # QUIT: -ERR lines may come before its +OK
        return got.endswith(OK)
    if not got.endswith(b"\r\n"):
        return False
    if multiline and got.startswith(b"+OK"):
        return got.endswith(b"\r\n.\r\n") or got == OK + END
    return True


def say(proc: subprocess.Popen[bytes], line: bytes, multiline: bool | None = False) -> bytes:
    assert proc.stdin is not None
    if line == b"QUIT":
        multiline = None
    proc.stdin.write(line + b"\r\n")
    proc.stdin.flush()
    return read_reply(proc, multiline)


def finish(proc: subprocess.Popen[bytes]) -> int:
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        return proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        assert proc.stdout is not None
        proc.stdout.close()


def start_pop3d(oracle: Path, home: Path) -> subprocess.Popen[bytes]:
    give_to_nobody(home)
    return subprocess.Popen(
        as_nobody([str(oracle / "qmail-pop3d"), "Maildir"]),
        cwd=home,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def test_a_message_gone_since_the_start_cannot_be_opened(oracle: Path, tmp_path: Path) -> None:
    files = standard_box()
    theirs_box, ours_box = build(tmp_path / "qmail", files), build(tmp_path / "ours", files)
    gone = MESSAGES[3][0]

    proc = start_pop3d(oracle, tmp_path / "qmail")
    theirs = [read_reply(proc)]
    (theirs_box / gone).unlink()
    theirs += [say(proc, b"RETR 3", True), say(proc, b"LIST 3"), say(proc, b"DELE 3")]
    theirs += [say(proc, b"QUIT")]
    assert finish(proc) == 0

    session = Pop3d(ours_box, **AS_QMAIL)
    ours = [session.start().join()]
    (ours_box / gone).unlink()
    ours += [session.handle(line).join() for line in (b"RETR 3", b"LIST 3", b"DELE 3", b"QUIT")]

    assert theirs == [OK, NO_OPEN, b"+OK 3 %d\r\n" % size(3), OK, NO_UNLINK + OK]
    assert ours == theirs
    assert state(ours_box) == state(theirs_box)


def test_a_failed_unlink_at_quit_is_reported_then_ok(oracle: Path, tmp_path: Path) -> None:
    files = standard_box()
    theirs_box, ours_box = build(tmp_path / "qmail", files), build(tmp_path / "ours", files)

    proc = start_pop3d(oracle, tmp_path / "qmail")
    theirs = [read_reply(proc), say(proc, b"DELE 1"), say(proc, b"DELE 2"), say(proc, b"DELE 4")]
    for n in (1, 4):
        (theirs_box / MESSAGES[n][0]).unlink()
    theirs.append(say(proc, b"QUIT"))
    assert finish(proc) == 0

    session = Pop3d(ours_box, **AS_QMAIL)
    ours = [session.start().join()] + [session.handle(b"DELE %d" % n).join() for n in (1, 2, 4)]
    for n in (1, 4):
        (ours_box / MESSAGES[n][0]).unlink()
    ours.append(session.handle(b"QUIT").join())

    assert theirs == [OK, OK, OK, OK, NO_UNLINK + NO_UNLINK + OK]
    assert ours == theirs
    assert state(ours_box) == state(theirs_box) == after((1, 2, 4), committed=True)


# -- qmail-popup --------------------------------------------------------------------------------

PID = 4242
MASK = re.compile(rb"<\d+\.\d+@")


@dataclass
class Checker:
    """A checkpassword for both popups, and what qmail-popup runs after it."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def make_checker(kind: str, oracle: Path, tmp_path: Path) -> Checker:
    pop3d_argv = [str(oracle / "qmail-pop3d"), "Maildir"]
    if kind == "stub":
        home = tmp_path / "home-stub"
        if not home.exists():
            build(home, [])
            give_to_nobody(home)
        env = {"CHECKPW_USER": "alice", "CHECKPW_PASS": "secret", "CHECKPW_HOME": str(home)}
        return Checker([str(oracle / "checkpassword-stub"), *pop3d_argv], env)
    if kind == "missing":
        return Checker([str(tmp_path / "no-such-checkpassword"), *pop3d_argv])
    # Each reads fd 3 to its end first, as every checkpassword does: one that
    # exits without reading races qmail-popup's write of the login, which then
    # says "unable to write pipe" instead, now and then.
    script = {
        "crash": "#!/bin/sh\ncat <&3 >/dev/null\nkill -9 $$\n",
        "tempfail": "#!/bin/sh\ncat <&3 >/dev/null\nexit 111\n",
        "dump": '#!/bin/sh\ncat <&3 > "$DUMP"\nexit 1\n',
    }[kind]
    path = tmp_path / f"checkpassword-{kind}"
    path.write_text(script)
    path.chmod(0o755)
    return Checker([str(path), *pop3d_argv])


def qmail_popup(oracle: Path, checker: Checker, send: bytes) -> bytes:
    begun = int(time.time())
    result = subprocess.run(
        [str(oracle / "qmail-popup"), HOST, *checker.argv],
        input=send,
        capture_output=True,
        timeout=TIMEOUT,
        env={**os.environ, **checker.env},
        check=False,
    )
    assert result.returncode == 1  # qmail-popup always exits 1
    greeting = re.match(rb"\+OK <(\d+)\.(\d+)@" + HOST.encode() + rb">\r\n", result.stdout)
    assert greeting is not None, result.stdout
    # qmail-popup's time(2) reads the kernel's coarse clock, which may still
    # show the last second for a few milliseconds after time.time() turned.
    assert begun - 1 <= int(greeting[2]) <= int(time.time())
    return MASK.sub(b"<PID.TIME@", result.stdout)


def our_popup(checker: Checker, send: bytes) -> bytes:
    popup = Popup(HOST, pid=PID, now=T)
    out = bytearray(popup.greeting().join())
    assert out == b"+OK <4242.1700000000@pop.example.org>\r\n"
    for line in Lines().feed(send):
        result = popup.handle(line)
        assert not isinstance(result, StartTLS)
        if isinstance(result, Login):
            code = run_checkpassword(
                checker.argv,
                result.user,
                result.password,
                result.timestamp,
                {**os.environ, **checker.env},
                timeout=TIMEOUT,
            )
            assert code != 0, "these dialogues never log in"
            result = popup.refused(code)
        out += result.join()
        if result.close:
            break
    return MASK.sub(b"<PID.TIME@", bytes(out))


GREETING = b"+OK <PID.TIME@pop.example.org>\r\n"


@dataclass(frozen=True)
class PopupCase:
    send: bytes
    expect: tuple[bytes, ...]  # qmail-popup's replies after the greeting
    checker: str = "stub"
    ours: tuple[bytes, ...] | None = None


POPUP_CASES: dict[str, PopupCase] = {
    "QUIT right away": PopupCase(lines("QUIT", "NOOP"), (OK,)),
    "NOOP, with an argument, in lower case": PopupCase(
        lines("NOOP", "NOOP x", "noop", "QUIT"), (OK, OK, OK, OK)
    ),
    "USER without a name": PopupCase(
        lines("USER", "USER ", "USER    ", "QUIT"), (SYNTAX, SYNTAX, SYNTAX, OK)
    ),
    "PASS before USER": PopupCase(lines("PASS secret", "QUIT"), (USER_FIRST, OK)),
    "PASS without a password": PopupCase(
        lines("USER alice", "PASS", "PASS ", "QUIT"), (OK, SYNTAX, SYNTAX, OK)
    ),
    "PASS before USER, then a wrong password": PopupCase(
        lines("PASS x", "USER alice", "PASS wrong", "NOOP"), (USER_FIRST, OK, FAILED)
    ),
    "a wrong password ends the session": PopupCase(
        lines("USER alice", "PASS wrong", "NOOP", "QUIT"), (OK, FAILED)
    ),
    "an unknown user ends it the same way": PopupCase(
        lines("USER bob", "PASS secret", "QUIT"), (OK, FAILED)
    ),
    "USER twice: the last name counts": PopupCase(
        lines("USER alice", "USER bob", "PASS secret"), (OK, OK, FAILED)
    ),
    "transaction commands need authorization first": PopupCase(
        lines("STAT", "LIST", "UIDL", "RETR 1", "TOP 1 0", "DELE 1", "RSET", "LAST", "XYZZY")
        + lines("QUIT"),
        (*(AUTHORIZATION_FIRST for _ in range(9)), OK),
    ),
    "STLS without a certificate is an unknown command": PopupCase(
        lines("STLS", "QUIT"), (AUTHORIZATION_FIRST, OK)
    ),
    "CAPA: qmail has none, ours lists USER too": PopupCase(
        lines("CAPA", "QUIT"), (AUTHORIZATION_FIRST, OK), ours=(CAPA_USER, OK)
    ),
    "an empty line, a space before the verb, a tab after it": PopupCase(
        lines("", " USER alice", "USER\talice", "QUIT"),
        (*(AUTHORIZATION_FIRST for _ in range(3)), OK),
    ),
    "APOP without a digest": PopupCase(
        lines("APOP", "APOP alice", "APOP  alice", "APOP ", "QUIT"), (SYNTAX,) * 4 + (OK,)
    ),
    "APOP with a wrong digest": PopupCase(
        lines("APOP alice c4c9334bac560ecc979e58001b3e22fb"), (FAILED,)
    ),
    "APOP needs no USER and ignores it": PopupCase(lines("USER bob", "APOP alice x"), (OK, FAILED)),
    "verbs in any case": PopupCase(lines("uSeR alice", "pass wrong"), (OK, FAILED)),
    "bare LF ends a line; only one CR is taken off": PopupCase(
        b"NOOP\nNOOP\r\r\nQUIT\n", (OK, AUTHORIZATION_FIRST, OK)
    ),
    "a NUL ends the command line": PopupCase(
        lines(b"NOOP\0x", b"USER\0alice", b"QUIT"), (OK, SYNTAX, OK)
    ),
    "a checkpassword killed by a signal": PopupCase(
        lines("USER alice", "PASS secret", "QUIT"), (OK, CRASHED), checker="crash"
    ),
    "a checkpassword in temporary trouble": PopupCase(
        lines("USER alice", "PASS secret", "QUIT"), (OK, FAILED), checker="tempfail"
    ),
    "a checkpassword that cannot be run": PopupCase(
        lines("USER alice", "PASS secret", "QUIT"), (OK, FAILED), checker="missing"
    ),
    "end of input without QUIT": PopupCase(lines("USER alice"), (OK,)),
    "end of input inside a line": PopupCase(lines("NOOP") + b"USER al", (OK,)),
    "an overlong line: qmail reads it, we refuse it": PopupCase(
        lines(b"USER " + b"a" * 10000, "QUIT"), (OK, OK), ours=(LINE_TOO_LONG, OK)
    ),
}


@pytest.mark.parametrize("name", list(POPUP_CASES))
def test_popup_answers_like_qmail_popup(oracle: Path, tmp_path: Path, name: str) -> None:
    case = POPUP_CASES[name]
    checker = make_checker(case.checker, oracle, tmp_path)

    theirs = qmail_popup(oracle, checker, case.send)
    ours = our_popup(checker, case.send)

    assert theirs == GREETING + b"".join(case.expect)
    if case.ours is not None:
        assert ours == GREETING + b"".join(case.ours)
    else:
        assert ours == theirs


@pytest.mark.parametrize(
    "dialogue",
    [
        lines("USER alice", "PASS secret"),
        lines("USER a b  c", "PASS  p w "),
        lines("USER first", "USER second", "PASS x"),
        lines("APOP alice  digest with spaces"),
        lines(b"USER al\0ice", b"PASS pa\0ss"),
        lines("APOP alice c4c9334bac560ecc979e58001b3e22fb"),
    ],
)
def test_checkpassword_gets_on_fd_3_what_qmail_popup_writes(
    oracle: Path, tmp_path: Path, dialogue: bytes
) -> None:
    checker = make_checker("dump", oracle, tmp_path)
    checker.env["DUMP"] = str(tmp_path / "theirs")
    qmail_popup(oracle, checker, dialogue)
    checker.env["DUMP"] = str(tmp_path / "ours")
    our_popup(checker, dialogue)

    theirs = (tmp_path / "theirs").read_bytes()
    ours = (tmp_path / "ours").read_bytes()
    assert (theirs.count(b"\0"), theirs[-2:]) == (3, b">\0")
    assert ours.split(b"\0")[2] == b"<4242.1700000000@pop.example.org>"
    assert MASK.sub(b"<PID.TIME@", theirs) == MASK.sub(b"<PID.TIME@", ours)


def test_a_whole_login_then_a_pop3d_session(oracle: Path, tmp_path: Path) -> None:
    """popup, checkpassword-stub, pop3d: turn by turn on both sides."""
    files = standard_box()
    theirs_box, ours_box = build(tmp_path / "qmail", files), build(tmp_path / "ours", files)
    give_to_nobody(tmp_path / "qmail")
    stub = str(oracle / "checkpassword-stub")
    env = {**os.environ, "CHECKPW_USER": "alice", "CHECKPW_PASS": "secret"}
    script = [
        (b"USER alice", False),
        (b"PASS secret", False),
        (b"STAT", False),
        (b"UIDL", True),
        (b"RETR 3", True),
        (b"DELE 1", False),
        (b"QUIT", False),
    ]

    proc = subprocess.Popen(
        [str(oracle / "qmail-popup"), HOST, stub, str(oracle / "qmail-pop3d"), "Maildir"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**env, "CHECKPW_HOME": str(tmp_path / "qmail")},
    )
    theirs = [MASK.sub(b"<PID.TIME@", read_reply(proc))]
    theirs += [say(proc, line, multiline) for line, multiline in script]
    finish(proc)

    popup = Popup(HOST, pid=PID, now=T)
    ours = [MASK.sub(b"<PID.TIME@", popup.greeting().join())]
    ours.append(popup.handle(b"USER alice").join())
    login = popup.handle(b"PASS secret")
    assert isinstance(login, Login)
    code = run_checkpassword(
        [stub, "true"],
        login.user,
        login.password,
        login.timestamp,
        {**env, "CHECKPW_HOME": str(tmp_path / "ours")},
        timeout=TIMEOUT,
    )
    assert code == 0
    session = Pop3d(ours_box, **AS_QMAIL)
    ours.append(session.start().join())
    ours += [session.handle(line).join() for line, _ in script[2:]]

    assert theirs == [GREETING, OK, OK, stat(), uidls(), retr(3), OK, OK]
    assert ours == theirs
    assert state(ours_box) == state(theirs_box) == after((1,), committed=True)


# -- no oracle needed ------------------------------------------------------------------------


def test_retr_streams_faster_than_50_mb_per_second(tmp_path: Path) -> None:
    line = b"x" * 70 + b"\n"
    body = (line * 1000 + b".dot\n" + b"\n") * 900  # 64 MB, dots and empty lines included
    maildir = build(tmp_path / "home", [File("new/1700000000.1.big", b"S: x\n\n" + body, T)])
    session = Pop3d(maildir, **AS_QMAIL)
    session.start()
    best = float("inf")
    sent = 0
    for _ in range(3):
        began = time.perf_counter()
        sent = sum(len(chunk) for chunk in session.handle(b"RETR 1").chunks())
        best = min(best, time.perf_counter() - began)
    assert sent == len(OK) + len(wire(b"S: x\n\n" + body))
    assert len(body) / best > 50e6, f"{len(body) / best / 1e6:.0f} MB/s"


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64])
def test_chunk_boundaries_change_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(pop3d, "CHUNK", chunk)
    small = [n for n in MESSAGES if n != 9]
    maildir = build(tmp_path / "home", [f for f in standard_box() if f.name != MESSAGES[9][0]])
    session = Pop3d(maildir, **AS_QMAIL)
    session.start()
    for number, n in enumerate(small, 1):
        assert session.handle(b"RETR %d" % number).join() == retr(n)
        for k in range(6):
            assert session.handle(b"TOP %d %d" % (number, k)).join() == retr(n, k)


def test_by_default_stat_leaves_deleted_out_and_retr_adds_no_line(tmp_path: Path) -> None:
    maildir = build(tmp_path / "home", [f for f in standard_box() if not f.name.startswith("tmp")])
    session = Pop3d(maildir)
    session.start()
    assert session.handle(b"DELE 1").join() == OK
    assert session.handle(b"STAT").join() == b"+OK 9 %d\r\n" % (TOTAL - size(1))
    assert session.handle(b"RETR 2").join() == OK + wire(data(2))[:-5] + b".\r\n"
    assert session.handle(b"RETR 4").join() == OK + wire(data(4))[:-5] + b".\r\n"
    assert session.handle(b"RETR 5").join() == OK + b".\r\n"


def test_only_mtimes_before_the_current_second_are_listed(tmp_path: Path) -> None:
    files = [File(f"new/17000000{i:02d}.1.h", b"m\n", T + i) for i in range(1, 4)]
    maildir = build(tmp_path / "home", files)
    session = Pop3d(maildir, clock=lambda: T + 2.999, **AS_QMAIL)
    assert session.start().join() == OK
    assert session.handle(b"UIDL").join() == listing([b"1 1700000001.1.h\r\n"])
    assert session.handle(b"QUIT").join() == OK
    assert sorted(p.name for p in (maildir / "new").iterdir()) == [
        "1700000002.1.h",
        "1700000003.1.h",
    ]


def test_a_stream_left_unread_closes_its_file(tmp_path: Path) -> None:
    maildir = build(tmp_path / "home", [File("new/1700000000.1.h", b"m\n", T)])
    session = Pop3d(maildir, **AS_QMAIL)
    session.start()
    fds = len(os.listdir("/proc/self/fd"))
    reply = session.handle(b"RETR 1")
    assert len(os.listdir("/proc/self/fd")) == fds + 1
    del reply
    assert len(os.listdir("/proc/self/fd")) == fds


def test_lines_keeps_at_most_line_max_plus_one_octets() -> None:
    lines_ = Lines()
    assert lines_.feed(b"NOOP\r\nST") == [b"NOOP\r"]
    assert lines_.feed(b"AT\n" + b"x" * 3 * LINE_MAX) == [b"STAT"]
    assert lines_.feed(b"y" * LINE_MAX + b"\nQUIT") == [b"x" * (LINE_MAX + 1)]
    lines_.clear()
    assert lines_.feed(b"\n") == [b""]


def test_stls_gives_a_fresh_authorization_state() -> None:
    popup = Popup(HOST, pid=1, now=2, tls_available=True, tls_required=True)
    assert popup.handle(b"CAPA").join() == (
        b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nPIPELINING\r\n"
        b"IMPLEMENTATION qmailtui\r\nSTLS\r\n.\r\n"
    )
    assert popup.handle(b"USER alice").join() == b"-ERR STLS first\r\n"
    assert popup.handle(b"STLS now").join() == SYNTAX
    assert popup.handle(b"STLS") == StartTLS(b"+OK Begin TLS negotiation\r\n")
    popup.tls_started()
    assert popup.handle(b"CAPA").join() == CAPA_USER
    assert popup.handle(b"STLS").join() == AUTHORIZATION_FIRST
    assert popup.handle(b"PASS x").join() == USER_FIRST
    assert popup.handle(b"USER alice").join() == OK
    login = popup.handle(b"PASS se cret")
    assert login == Login(b"alice", b"se cret", b"<1.2@pop.example.org>", apop=False)
    assert "se cret" not in repr(login)
    assert login.fd3() == b"alice\0se cret\0<1.2@pop.example.org>\0"


def test_more_attempts_start_over_from_user() -> None:
    popup = Popup(HOST, pid=1, now=2, attempts=2)
    popup.handle(b"USER alice")
    assert isinstance(popup.handle(b"PASS wrong"), Login)
    first = popup.refused(1)
    assert (first.data, first.close) == (FAILED, False)
    assert popup.handle(b"PASS again").join() == USER_FIRST
    assert isinstance(popup.handle(b"APOP alice digest"), Login)
    second = popup.refused(-9)
    assert (second.data, second.close, popup.closed) == (CRASHED, True, True)
