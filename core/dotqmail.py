""".qmail files: which one applies to an address, and what its lines say (dot-qmail.5).

Pure reading, no delivery: qmail-local's file search (local.md §5.4), its
line types (§5.3) and forward-only mode (§5.5), shared by delivery and by the
address tracer so that both always agree.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

PATRN = stat.S_IWOTH  # conf-patrn 002: a world-writable .qmail or home is refused
# qmail's error_temp(): the errors that mean "try again later". Any other error
# opening a .qmail file (ELOOP, ENAMETOOLONG, ENOTDIR...) means "no such file".
_TEMPORARY = (
    "EINTR ENOMEM ETXTBSY EIO ETIMEDOUT EWOULDBLOCK EAGAIN EDEADLK EBUSY ENFILE EMFILE EFBIG"
    " ENOSPC ENETDOWN ENETUNREACH ENETRESET ECONNABORTED ECONNRESET ENOBUFS ETOOMANYREFS"
    " ECONNREFUSED EHOSTDOWN EHOSTUNREACH EPROCLIM EUSERS EDQUOT ESTALE ENOLCK"
)
TEMPORARY_ERRNOS = frozenset(
    getattr(errno, name) for name in _TEMPORARY.split() if hasattr(errno, name)
)


@dataclass(frozen=True, slots=True)
class Instruction:
    kind: str  # "maildir", "mbox", "program", "forward", or "fail"
    value: str  # the path, the command, the address, or the failure text
    line: int
    source: str  # the .qmail file name, or "control/defaultdelivery"


@dataclass
class Search:
    """The outcome of qmail-local's search for the .qmail file."""

    tried: list[str] = field(default_factory=list)
    found: str | None = None  # the file name used, relative to the home
    default: str | None = None  # $DEFAULT, when a -default file (or an ext ending in it) matched
    forward_only: bool = False  # the file has the owner-execute bit
    text: bytes = b""
    error: str | None = None  # a temporary failure, in qmail-local's words


class Failure(Exception):
    """qmail-local stops: `permanent` is its exit 100, else 111."""

    def __init__(self, text: str, permanent: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.permanent = permanent


def safe_ext(ext: str) -> str:
    """qmail's safeext: ASCII letters lowered (case_lowerb) and every '.' made ':'."""
    lowered = "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in ext)
    return lowered.replace(".", ":")


def candidates(dash: str, ext: str) -> list[tuple[str, int | None]]:
    """(file name, where $DEFAULT starts in ext) in qmail-local's order."""
    safe = safe_ext(ext)
    names: list[tuple[str, int | None]] = [(f".qmail{dash}{safe}", None)]
    for i in range(len(safe), -1, -1):
        if i == 0 or safe[i - 1] == "-":
            names.append((f".qmail{dash}{safe[:i]}default", i))
    return names


def search(home: Path, dash: str, ext: str) -> Search:
    """Find the .qmail file: open it as qmail-local does (a directory is skipped,
    an unreadable file is a temporary failure, a world-writable one too)."""
    result = Search()
    for name, default_at in candidates(dash, ext):
        result.tried.append(name)
        path = home / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            # qmeexists(): temporary errors and permission problems defer
            if e.errno in TEMPORARY_ERRNOS or e.errno in (errno.EACCES, errno.EPERM):
                result.error = f"Unable to open {name}: {_reason(e)}. (#4.3.0)"
                return result
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                continue
            if st.st_mode & PATRN:
                result.error = "Uh-oh: .qmail file is writable. (#4.7.0)"
                result.found = name
                return result
            result.found = name
            result.forward_only = bool(st.st_mode & stat.S_IXUSR)
            with os.fdopen(os.dup(fd), "rb") as f:
                result.text = f.read()
        finally:
            os.close(fd)
        if default_at is not None:
            result.default = ext[default_at:] if default_at <= len(ext) else None
        elif len(ext) >= 7 and safe_ext(ext).endswith("default"):
            result.default = ext[-7:]
        return result
    return result


def owner_exists(home: Path, dash: str, ext: str, suffix: str) -> bool:
    """qmeox(): does .qmail-EXT-owner (or -owner-default) exist? (for NEWSENDER)"""
    name = f".qmail{dash}{safe_ext(ext)}{suffix}"
    try:
        os.stat(home / name)
    except OSError as e:
        if e.errno in TEMPORARY_ERRNOS:
            raise Failure(f"Unable to open {name}: {_reason(e)}. (#4.3.0)") from e
        return False  # any other error, permissions too, is "no such file" for qmeox
    return True


def parse(text: bytes, source: str, forward_only: bool) -> list[Instruction]:
    """The instructions of a .qmail file in order, as qmail-local executes them.

    A blank first line raises Failure. A file or program line in forward-only
    mode becomes a "fail" instruction: qmail-local stops there, after running
    the lines before it. Values keep any NUL byte, as `qmail-local -n` prints
    them; delivery stops each at the NUL, as qmail-local's C strings do.
    """
    if not text:
        return []  # an empty file means "the default delivery" (local.md §5.6)
    decoded = text.decode("utf-8", "surrogateescape")
    if not decoded.endswith("\n"):
        decoded += "\n"
    out: list[Instruction] = []
    for number, raw in enumerate(decoded.split("\n")[:-1], 1):
        line = raw.rstrip(" \t")
        if not line or line[0] == "\0":  # a C string: a line that starts with NUL is empty
            if number == 1:
                raise Failure("Uh-oh: first line of .qmail file is blank. (#4.2.1)")
            continue
        first = line[0]
        if first == "#":
            continue
        if first in "./":
            if forward_only:
                why = "Uh-oh: .qmail has file delivery but has x bit set. (#4.7.0)"
                out.append(Instruction("fail", why, number, source))
                continue
            kind = "maildir" if line.endswith("/") else "mbox"
            out.append(Instruction(kind, line, number, source))
        elif first == "|":
            if forward_only:
                why = "Uh-oh: .qmail has prog delivery but has x bit set. (#4.7.0)"
                out.append(Instruction("fail", why, number, source))
                continue
            out.append(Instruction("program", line[1:], number, source))
        elif first == "+":
            if line[1:] == "list":
                forward_only = True
        elif first == "&":
            out.append(Instruction("forward", line[1:], number, source))
        else:
            out.append(Instruction("forward", line, number, source))
    return out


def _reason(e: OSError) -> str:
    from core.errors import os_reason

    return os_reason(e)
