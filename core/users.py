"""qmail-users: users/assign, its compiled form users/cdb, and the owner look-up.

Three jobs, each matching a qmail program byte for byte:

- `parse_assign` reads users/assign with qmail-newu's syntax (local.md §3.1);
- `compile_cdb` / `newu` write users/cdb exactly as qmail-newu does (§3.2);
- `lookup` finds the owner of a local part as qmail-lspawn does (§3.3).

Text is kept as qmail keeps it, bytes: fields are decoded UTF-8 with
surrogateescape so that any byte survives the round trip, and case folding is
qmail's `case_lowerb` (ASCII A-Z only), never `str.lower`.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import cdblib

from core.durable import replace_file
from core.errors import ExitCode, Problem, UserError, os_reason
from core.paths import QmailRoot

ID_MAX = 2**32 - 2  # uid_t/gid_t are 32 bits; (uid_t)-1 means "leave unchanged" to setuid
FIELDS = "user:uid:gid:homedir:dash:ext:"
DECIMAL = re.compile(rb"[0-9]+")

_LOWER = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")
_T = TypeVar("_T")


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _lower(data: bytes) -> bytes:
    """qmail's case_lowerb: A-Z only, so non-ASCII keys keep their case."""
    return data.translate(_LOWER)


@dataclass(frozen=True, slots=True)
class Assignment:
    """One line of users/assign: `=local:…` (simple) or `+prefix:…` (wildcard)."""

    wildcard: bool  # a '+' line
    key: str  # lower-cased local part (or prefix, for a wildcard)
    user: str
    uid: int
    gid: int
    home: str
    dash: str
    ext: str  # 'pre' for a wildcard: the matched rest of the address is appended
    line: int  # line number in users/assign
    # What qmail-newu copies as written where the fields above are normalised;
    # None when it is the same. The wildcard's last character as written (not
    # lower-cased) goes into the cdb's list of wildcard end characters.
    written_key: str | None = None
    written_uid: str | None = None  # e.g. "0507"
    written_gid: str | None = None

    @property
    def cdb_key(self) -> bytes:
        """`!` + key, and a NUL after a simple assignment's key (never after a wildcard's)."""
        return b"!" + _bytes(self.key) + (b"" if self.wildcard else b"\0")

    @property
    def cdb_value(self) -> bytes:
        """`user\\0uid\\0gid\\0homedir\\0dash\\0ext`, no trailing NUL."""
        uid = self.written_uid if self.written_uid is not None else str(self.uid)
        gid = self.written_gid if self.written_gid is not None else str(self.gid)
        fields = (self.user, uid, gid, self.home, self.dash, self.ext)
        return b"\0".join(_bytes(field) for field in fields)

    @property
    def wildchar(self) -> bytes:
        """The byte qmail-newu lists for this wildcard: the key's last, as written."""
        if not self.wildcard or not self.key:
            return b""
        return _bytes(self.written_key if self.written_key is not None else self.key)[-1:]


@dataclass(frozen=True, slots=True)
class Owner:
    """Who receives mail for a local part, and how: qmail-local's arguments."""

    user: str
    uid: int
    gid: int
    home: str
    dash: str
    ext: str
    source: str  # "users/assign:3" or "users/cdb", for the address tracer


def parse_assign(data: bytes, path: Path) -> tuple[list[Assignment], list[Problem]]:
    """users/assign as qmail-newu reads it, every problem with its line.

    Errors are what qmail-newu calls "bad format" (blank lines, NUL bytes, no
    `:` or one first, fewer than six fields, no final `.` line), plus what it
    accepts but cannot work: a comment line, a uid or gid that is not a
    decimal number (qmail-lspawn would read junk as 0), uid 0 (refused as
    root). Every valid line is returned, duplicates included, because the cdb
    holds them all; the first line for a key is the one that counts.
    """
    assignments: list[Assignment] = []
    problems: list[Problem] = []
    first_line: dict[bytes, int] = {}
    pieces = data.split(b"\n")
    for number, text in enumerate(pieces, 1):
        is_last = number == len(pieces)  # the text after the final newline
        if text.startswith(b"."):
            ignored = [n for n, rest in enumerate(pieces[number:], number + 1) if rest.strip()]
            if ignored:
                message = f"ignored: it follows the '.' line ({number})"
                problems.append(Problem(path, ignored[0], message, "warning"))
            break
        if is_last:
            message = (
                "no '.' line at the end"
                if not text
                else "the last line has no newline and no '.' line follows it"
            )
            problems.append(Problem(path, None if not text else number, message))
            break
        found = _parse_line(text, path, number, problems)
        if found is None:
            continue
        if found.cdb_key in first_line:
            problems.append(
                Problem(
                    path,
                    number,
                    f"same {'prefix' if found.wildcard else 'address'} as line "
                    f"{first_line[found.cdb_key]}, which wins",
                    "warning",
                )
            )
        else:
            first_line[found.cdb_key] = number
        assignments.append(found)
    problems.extend(_unreachable_wildcards(assignments, path))
    problems.sort(key=lambda problem: (problem.line is None, problem.line or 0))
    return assignments, problems


def _parse_line(text: bytes, path: Path, number: int, problems: list[Problem]) -> Assignment | None:
    def error(message: str) -> None:
        problems.append(Problem(path, number, message))

    if not text:
        error("blank line: users/assign allows none")
        return None
    if text.startswith(b"#"):
        error("comment line: users/assign allows none")
        return None
    if b"\0" in text:
        error("NUL byte in the line")
        return None
    colon = text.find(b":")
    if colon == -1:
        error(f"no ':' in the line; expected =local:{FIELDS} or +prefix:{FIELDS}")
        return None
    if colon == 0:
        error("the line starts with ':'; expected '=' or '+' and the local part first")
        return None
    fields = text[colon + 1 :].split(b":", 6)
    if len(fields) < 7:
        error(
            f"{len(fields) - 1} of the 6 fields after the local part; "
            f"expected {FIELDS} (each ending in ':')"
        )
        return None
    kind = text[:1]
    if kind not in (b"=", b"+"):
        problems.append(
            Problem(path, number, f"starts with {_text(kind)!r}: read as '='", "warning")
        )
    written = text[1:colon]
    user, uid_text, gid_text, home, dash, ext = fields[:6]
    uid = _decimal_id("uid", uid_text, error)
    gid = _decimal_id("gid", gid_text, error)
    if uid == 0:
        error("uid 0: qmail-lspawn never delivers as root")
    if uid is None or uid == 0 or gid is None:
        return None
    if not home.startswith(b"/"):
        problems.append(
            Problem(
                path,
                number,
                f"home directory {_text(home)!r} is not absolute: qmail-local refuses it",
                "warning",
            )
        )
    key = _lower(written)
    return Assignment(
        wildcard=kind == b"+",
        key=_text(key),
        user=_text(user),
        uid=uid,
        gid=gid,
        home=_text(home),
        dash=_text(dash),
        ext=_text(ext),
        line=number,
        written_key=_text(written) if written != key else None,
        written_uid=_text(uid_text) if uid_text != b"%d" % uid else None,
        written_gid=_text(gid_text) if gid_text != b"%d" % gid else None,
    )


def _decimal_id(name: str, text: bytes, error: Callable[[str], None]) -> int | None:
    if not DECIMAL.fullmatch(text):
        error(f"{name} {_text(text)!r} is not a decimal number (qmail would read 0, root)")
        return None
    value = int(text)
    if value > ID_MAX:
        error(f"{name} {value} is out of range (at most {ID_MAX})")
        return None
    return value


def _wildchars(assignments: Iterable[Assignment]) -> bytes:
    """The empty key's value: each wildcard's last byte as written, first appearance first."""
    found = bytearray()
    for assignment in assignments:
        char = assignment.wildchar
        if char and char not in found:
            found += char
    return bytes(found)


def _unreachable_wildcards(assignments: list[Assignment], path: Path) -> list[Problem]:
    # qmail-newu lists a wildcard's last character as written, qmail-lspawn
    # looks for the lower-cased address's character: `+Joe-X:` is never tried
    # unless some other wildcard ends in a lower-case `x`.
    wildchars = _wildchars(assignments)
    return [
        Problem(
            path,
            a.line,
            f"wildcard {a.written_key or a.key!r} never matches: qmail-lspawn only tries prefixes "
            "ending in a character some wildcard ends in as written, and addresses are "
            "lower-cased; write the prefix in lower case",
            "warning",
        )
        for a in assignments
        if a.wildcard and a.key and _bytes(a.key)[-1:] not in wildchars
    ]


def compile_cdb(assignments: Iterable[Assignment]) -> bytes:
    """users/cdb, byte-identical to qmail-newu's for the same lines in the same order."""
    assignments = list(assignments)
    out = io.BytesIO()
    writer = cdblib.Writer(out, strict=True)
    for assignment in assignments:
        writer.put(assignment.cdb_key, assignment.cdb_value)
    writer.put(b"", _wildchars(assignments))
    writer.finalize()
    return out.getvalue()


def newu(root: QmailRoot) -> list[Problem]:
    """qmail-newu: compile users/assign into users/cdb, or write nothing.

    Returns every problem found; on an error users/cdb is left as it was.
    Like qmail-newu it writes users/cdb.tmp (mode 0644) and renames it into
    place, so look-ups see the old file or the new one, never a mixture; two
    runs at once are not guarded against, as in qmail.
    """
    path = root.assign
    try:
        data = path.read_bytes()
    except OSError as error:
        return [Problem(path, None, f"unable to read: {os_reason(error)}")]
    assignments, problems = parse_assign(data, path)
    if any(problem.is_error for problem in problems):
        return problems
    tmp = root.users / "cdb.tmp"
    try:
        replace_file(tmp, root.users_cdb, compile_cdb(assignments), 0o644)  # newu's umask 033
    except OSError as error:
        problems.append(Problem(tmp, None, f"unable to write: {os_reason(error)}"))
    return problems


def lookup(root: QmailRoot, local: str) -> Owner | None:
    """The owner of `local` from users/cdb or users/assign, or None for qmail-getpw.

    `local` is the address's local part (split at the last `@`); qmail-lspawn
    never looks up an empty one (it is a trash address), and neither does
    this. users/cdb is used when it is not older than users/assign, else
    users/assign itself, so an edit counts before `newu` runs. If that edit
    has errors, qmail-newu would refuse it and qmail keep using users/cdb, so
    this does too; with no users/cdb to fall back on it raises `UserError`
    (temporary), as qmail-lspawn fails on a users/cdb it cannot read, rather
    than guess where the mail goes.
    """
    name = _bytes(local).split(b"\0", 1)[0]  # qmail-lspawn gets a C string
    if not name:
        return None
    cdb_mtime = _mtime(root.users_cdb)
    assign_mtime = _mtime(root.assign)
    if cdb_mtime is not None and (assign_mtime is None or cdb_mtime >= assign_mtime):
        return _lookup_cdb(root.users_cdb, name)
    if assign_mtime is None:
        return None
    try:
        data = root.assign.read_bytes()
    except OSError as error:
        raise _trouble(root.assign, f"unable to read: {os_reason(error)}") from error
    assignments, problems = parse_assign(data, root.assign)
    errors = [problem for problem in problems if problem.is_error]
    if errors:
        if cdb_mtime is not None:
            return _lookup_cdb(root.users_cdb, name)
        first = errors[0]
        raise UserError(first.message, path=first.path, line=first.line, code=ExitCode.TEMPORARY)
    table: dict[bytes, Assignment] = {}
    for assignment in assignments:
        table.setdefault(assignment.cdb_key, assignment)  # the first line wins
    found = _search(name, _wildchars(assignments), table.get)
    if found is None:
        return None
    hit, rest = found
    return Owner(
        user=hit.user,
        uid=hit.uid,
        gid=hit.gid,
        home=hit.home,
        dash=hit.dash,
        ext=hit.ext + _text(rest),
        source=f"users/assign:{hit.line}",
    )


def lookup_assign_line(root: QmailRoot, local: str) -> int | None:
    """The users/assign line that gives `local` its owner (for the address tracer,
    when the answer came from users/cdb); None if the file has no such line."""
    try:
        assignments, _ = parse_assign(root.assign.read_bytes(), root.assign)
    except OSError:
        return None
    table: dict[bytes, Assignment] = {}
    for assignment in assignments:
        table.setdefault(assignment.cdb_key, assignment)
    found = _search(_bytes(local).split(b"\0", 1)[0], _wildchars(assignments), table.get)
    return found[0].line if found else None


def _search(
    name: bytes, wildchars: bytes, get: Callable[[bytes], _T | None]
) -> tuple[_T, bytes] | None:
    """qmail-lspawn's nughde_get: the exact key, then wildcard prefixes, longest first.

    Returns the hit and the rest of `name` after the matched prefix (original
    case; empty for an exact hit). A prefix is tried only if it is empty or
    its last byte is one some wildcard ends in.
    """
    lower = b"!" + _lower(name)
    hit = get(lower + b"\0")
    if hit is not None:
        return hit, b""
    for end in range(len(lower), 0, -1):
        if end == 1 or lower[end - 1 : end] in wildchars:
            hit = get(lower[:end])
            if hit is not None:
                return hit, name[end - 1 :]
    return None


_readers: dict[Path, tuple[tuple[int, int, int], cdblib.Reader]] = {}


def _reader(path: Path) -> cdblib.Reader:
    """users/cdb, parsed once per version of the file (every delivery looks it up)."""
    st = path.stat()
    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    cached = _readers.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    reader = cdblib.Reader(data=path.read_bytes(), strict=True)
    _readers[path] = (stamp, reader)
    return reader


def _lookup_cdb(path: Path, name: bytes) -> Owner | None:
    try:
        reader = _reader(path)
        wildchars = reader.get(b"")
        if wildchars is None:
            raise _trouble(path, "no wildcard record (the empty key): not written by newu")
        found = _search(name, wildchars, reader.get)
    except (OSError, struct.error) as error:
        reason = os_reason(error) if isinstance(error, OSError) else "truncated or corrupt"
        raise _trouble(path, reason) from error
    if found is None:
        return None
    value, rest = found
    fields = value.split(b"\0", 5)
    if len(fields) < 6:
        raise _trouble(path, f"a record has {len(fields)} of 6 fields")
    user, uid, gid, home, dash, ext = fields
    return Owner(
        user=_text(user),
        uid=_scan_id(uid),
        gid=_scan_id(gid),
        home=_text(home),
        dash=_text(dash),
        ext=_text((ext + rest).split(b"\0", 1)[0]),  # qmail-local gets a C string
        source="users/cdb",
    )


def _scan_id(text: bytes) -> int:
    """qmail's scan_ulong then a cast to uid_t: leading digits, junk reads as 0."""
    digits = re.match(rb"[0-9]*", text)
    number = digits.group() if digits else b""
    return int(number) % 2**32 if number else 0


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None
    except OSError as error:
        raise _trouble(path, os_reason(error)) from error


def _trouble(path: Path, reason: str) -> UserError:
    """qmail-lspawn's "Trouble reading users/cdb": a temporary failure."""
    return UserError(f"trouble reading: {reason}", path=path, code=ExitCode.TEMPORARY)
