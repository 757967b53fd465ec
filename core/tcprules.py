"""tcp rules: tcprules' text, the cdb it compiles to, and tcpserver's look-up.

Three jobs, each matching ucspi-tcp 0.88 byte for byte (spec/tcprules.md):

- `parse_line` / `parse_rules` read the rules with tcprules' syntax (§1-3);
- `compile_cdb` / `compile_and_swap` write the cdb exactly as tcprules does;
- `Rules` answers as tcpserver and tcprulescheck do (`rules.c`, §4).

Everything is bytes, as in the C programs: a rules file may hold any byte,
and the str-facing helpers decode UTF-8 with surrogateescape so none is lost.
"""

from __future__ import annotations

import errno
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from core.durable import replace_file
from core.errors import Problem

_U64 = 2**64  # tcprules reads range bounds with scan_ulong: 64-bit, wrapping
_DIGITS = re.compile(rb"[0-9]*")
_PAIR = struct.Struct("<II")


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


# djb's error_str (ucspi-tcp 0.88 error_str.c), in its order: where two names
# share a number (EAGAIN and EWOULDBLOCK) the first one listed gives the text.
_ERROR_STR = (
    ("EINTR", "interrupted system call"),
    ("ENOMEM", "out of memory"),
    ("ENOENT", "file does not exist"),
    ("ETXTBSY", "text busy"),
    ("EIO", "input/output error"),
    ("EEXIST", "file already exists"),
    ("ETIMEDOUT", "timed out"),
    ("EINPROGRESS", "operation in progress"),
    ("EAGAIN", "temporary failure"),
    ("EWOULDBLOCK", "input/output would block"),
    ("EPIPE", "broken pipe"),
    ("EPERM", "permission denied"),
    ("EACCES", "access denied"),
    ("ENXIO", "device not configured"),
    ("EPROTO", "protocol error"),
    ("EISDIR", "is a directory"),
    ("ECONNREFUSED", "connection refused"),
    ("ENOTDIR", "not a directory"),
    ("ESRCH", "no such process"),
    ("E2BIG", "argument list too long"),
    ("ENOEXEC", "exec format error"),
    ("EBADF", "file descriptor not open"),
    ("ECHILD", "no child processes"),
    ("EDEADLK", "operation would cause deadlock"),
    ("EFAULT", "bad address"),
    ("ENOTBLK", "not a block device"),
    ("EBUSY", "device busy"),
    ("EXDEV", "cross-device link"),
    ("ENODEV", "device does not support operation"),
    ("EINVAL", "invalid argument"),
    ("ENFILE", "system cannot open more files"),
    ("EMFILE", "process cannot open more files"),
    ("ENOTTY", "not a tty"),
    ("EFBIG", "file too big"),
    ("ENOSPC", "out of disk space"),
    ("ESPIPE", "unseekable descriptor"),
    ("EROFS", "read-only file system"),
    ("EMLINK", "too many links"),
    ("EDOM", "input out of range"),
    ("ERANGE", "output out of range"),
    ("EALREADY", "operation already in progress"),
    ("ENOTSOCK", "not a socket"),
    ("EDESTADDRREQ", "destination address required"),
    ("EMSGSIZE", "message too long"),
    ("EPROTOTYPE", "incorrect protocol type"),
    ("ENOPROTOOPT", "protocol not available"),
    ("EPROTONOSUPPORT", "protocol not supported"),
    ("ESOCKTNOSUPPORT", "socket type not supported"),
    ("EOPNOTSUPP", "operation not supported"),
    ("EPFNOSUPPORT", "protocol family not supported"),
    ("EAFNOSUPPORT", "address family not supported"),
    ("EADDRINUSE", "address already used"),
    ("EADDRNOTAVAIL", "address not available"),
    ("ENETDOWN", "network down"),
    ("ENETUNREACH", "network unreachable"),
    ("ENETRESET", "network reset"),
    ("ECONNABORTED", "connection aborted"),
    ("ECONNRESET", "connection reset"),
    ("ENOBUFS", "out of buffer space"),
    ("EISCONN", "already connected"),
    ("ENOTCONN", "not connected"),
    ("ESHUTDOWN", "socket shut down"),
    ("ETOOMANYREFS", "too many references"),
    ("ELOOP", "symbolic link loop"),
    ("ENAMETOOLONG", "file name too long"),
    ("EHOSTDOWN", "host down"),
    ("EHOSTUNREACH", "host unreachable"),
    ("ENOTEMPTY", "directory not empty"),
    ("EUSERS", "too many users"),
    ("EDQUOT", "disk quota exceeded"),
    ("ESTALE", "stale NFS file handle"),
    ("EREMOTE", "too many levels of remote in path"),
    ("ENOLCK", "no locks available"),
    ("ENOSYS", "system call not available"),
    ("ENOSTR", "not a stream device"),
    ("ETIME", "timer expired"),
    ("ENOSR", "out of stream resources"),
    ("ENOMSG", "no message of desired type"),
    ("EBADMSG", "bad message type"),
    ("EIDRM", "identifier removed"),
    ("ENONET", "machine not on network"),
    ("ENOLINK", "link severed"),
    ("EADV", "advertise error"),
    ("ESRMNT", "srmount error"),
    ("ECOMM", "communication error"),
    ("EMULTIHOP", "multihop attempted"),
    ("EREMCHG", "remote address changed"),
)
_ERROR_TEXT: dict[int, str] = {0: "no error"}
for _name, _reason in _ERROR_STR:
    if hasattr(errno, _name):
        _ERROR_TEXT.setdefault(getattr(errno, _name), _reason)


def error_str(number: int | None) -> str:
    """The reason ucspi-tcp prints after `: ` for an errno (djb's table, not strerror)."""
    return _ERROR_TEXT.get(number, "unknown error") if number is not None else "unknown error"


# ---------------------------------------------------------------- the text


class RuleSyntaxError(ValueError):
    """A line tcprules refuses with `unable to parse this line: SHOWN`.

    `shown` is the line as tcprules prints it: trailing blanks removed and cut
    at the first NUL (it is printed as a C string). `reason` says what is
    wrong, which tcprules does not.
    """

    def __init__(self, shown: bytes, reason: str) -> None:
        super().__init__(reason)
        self.shown = shown
        self.reason = reason

    @property
    def message(self) -> str:
        return f"unable to parse this line: {_text(self.shown)}"


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule line: the address as written, the cdb keys and value it becomes."""

    line: int  # 1-based line number in the rules file
    address: bytes  # everything before the first ':'
    keys: tuple[bytes, ...]  # the address, or one key per number of a range (maybe none)
    data: bytes  # b"D\\0" for deny (else nothing), then b"+VAR=VALUE\\0" per setting

    @property
    def is_deny(self) -> bool:
        return self.data.startswith(b"D\0")

    @property
    def env(self) -> tuple[tuple[str, str], ...]:
        return _settings(self.data)


def parse_line(raw: bytes, number: int = 0) -> Rule | None:
    """One line of input (without its LF) as tcprules 0.88 reads it.

    None for what tcprules skips: an empty line, a comment (`#` in column 0
    only) and a line without `:`. Raises `RuleSyntaxError` for what it
    refuses. CR is not white space to tcprules, so a CRLF file fails here.
    """
    if not raw or raw.startswith(b"#"):
        return None
    text = raw.rstrip(b" \t")
    colon = text.find(b":")
    if colon == -1:
        return None

    def bad(reason: str) -> RuleSyntaxError:
        return RuleSyntaxError(text.split(b"\0", 1)[0], reason)

    address, rest = text[:colon], text[colon + 1 :]
    if rest.startswith(b"deny"):
        data, rest = bytearray(b"D\0"), rest[4:]
    elif rest.startswith(b"allow"):
        data, rest = bytearray(), rest[5:]
    else:
        reason = "after the first ':' comes allow or deny"
        if b":" in rest:
            reason += "; the address ends at the first ':' (tcprules 0.88 knows no IPv6)"
        if b"\r" in rest:
            reason += "; the line ends in a carriage return (a CRLF file?)"
        raise bad(reason)
    while rest:
        if not rest.startswith(b","):
            if b"\r" in rest:
                raise bad("the line ends in a carriage return (a CRLF file?)")
            if rest[:1] in (b" ", b"\t"):
                raise bad("no spaces are allowed in a rule")
            raise bad('after allow or deny only ,VAR="value" settings may follow')
        equals = rest.find(b"=")
        if equals == -1:
            raise bad("a setting after ',' is VAR=\"value\", and this one has no '='")
        name, rest = rest[1:equals], rest[equals + 1 :]
        if not rest:
            raise bad(f'{_text(name)}= has no value: write {_text(name)}="" for an empty one')
        quote, rest = rest[:1], rest[1:]
        end = rest.find(quote)
        if end == -1:
            raise bad(f"the value of {_text(name)} has no closing {_text(quote)}")
        data += b"+" + name + b"=" + rest[:end] + b"\0"
        rest = rest[end + 1 :]
    try:
        keys = _keys(address)
    except ValueError as error:
        raise bad(str(error)) from None
    return Rule(number, address, keys, bytes(data))


def _keys(address: bytes) -> tuple[bytes, ...]:
    """tcprules' doaddressdata: a range `a.b.c.X-Y` (or `a.X-Y.`) becomes one key per number."""
    if b"=" in address or b"@" in address or b"-" not in address:
        return (address,)
    dash = address.index(b"-")
    left = address.rfind(b".", 0, dash) + 1
    right = address.find(b".", dash + 1)
    if right == -1:
        right = len(address)
    bottom = _scan_ulong(address[left:dash])
    top = min(_scan_ulong(address[dash + 1 : right]), 255)
    head, tail = address[:left], address[right:]
    return tuple(head + b"%d" % n + tail for n in range(bottom, top + 1))


def _scan_ulong(text: bytes) -> int:
    # The C code copies the number into a C string: a NUL ends it early.
    digits = text.split(b"\0", 1)[0]
    if not _DIGITS.fullmatch(digits):
        raise ValueError(f"{_text(text)!r} in a range is not a decimal number")
    return int(digits or b"0") % _U64  # an empty bound reads as 0


def _lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Lines as getln gives them to tcprules: split at LF, an unterminated last line too."""
    pieces = data.split(b"\n")
    if pieces[-1] == b"":
        pieces.pop()
    return enumerate(pieces, 1)


def parse_rules(data: bytes, path: Path) -> tuple[list[Rule], list[Problem]]:
    """Every rule of a rules file and every problem, each with its line.

    tcprules stops at the first bad line; this goes on so that `check` and
    the editor can show them all. Warnings flag what tcprules accepts but
    cannot be meant: a line it ignores, a rule shadowed by an earlier one
    for the same key, a host name with capitals (TCPREMOTEHOST is lower
    case), a range with no numbers in it.
    """
    rules: list[Rule] = []
    problems: list[Problem] = []
    first: dict[bytes, int] = {}
    for number, raw in _lines(data):
        try:
            rule = parse_line(raw, number)
        except RuleSyntaxError as error:
            problems.append(Problem(path, number, error.message, hint=error.reason))
            continue
        if rule is None:
            if raw and not raw.startswith(b"#") and raw.strip(b" \t"):
                problems.append(
                    Problem(path, number, "no ':': tcprules ignores this line", "warning")
                )
            continue
        rules.append(rule)
        problems.extend(_warnings(rule, first, path))
    return rules, problems


def _warnings(rule: Rule, first: dict[bytes, int], path: Path) -> Iterator[Problem]:
    shadowed = sorted({first[key] for key in rule.keys if key in first})
    for key in rule.keys:
        first.setdefault(key, rule.line)
    if len(shadowed) == 1:
        message = f"same address as line {shadowed[0]}, which wins"
        yield Problem(path, rule.line, message, "warning")
    elif shadowed:
        lines = ", ".join(str(n) for n in shadowed)
        yield Problem(path, rule.line, f"same addresses as lines {lines}, which win", "warning")
    host = rule.address.partition(b"=")[2] if b"=" in rule.address else b""
    if host != host.lower():
        yield Problem(
            path,
            rule.line,
            f"host {_text(host)!r} has capitals: TCPREMOTEHOST is lower case, so it never matches",
            "warning",
        )
    if not rule.keys:
        yield Problem(path, rule.line, "the range is empty: no rule is written", "warning")


def find_line(rules_text: str, key: str | None) -> int | None:
    """The line of `rules_text` that wrote cdb key `key`, so a caller can say which
    rule decided (the first such line: at look-up the first record wins)."""
    if key is None:
        return None
    wanted = _bytes(key)
    for number, raw in _lines(_bytes(rules_text)):
        try:
            rule = parse_line(raw, number)
        except RuleSyntaxError:
            continue
        if rule is not None and wanted in rule.keys:
            return number
    return None


# ---------------------------------------------------------------- the cdb


def _hash(key: bytes) -> int:
    h = 5381
    for c in key:
        h = ((h * 33) & 0xFFFFFFFF) ^ c
    return h


def compile_cdb(rules: Iterable[Rule]) -> bytes:
    """The cdb tcprules writes for these rules, byte for byte.

    Written here rather than with cdblib.Writer: cdblib takes a slot whose
    *hash* is 0 for empty where cdb_make looks at the position, so a key
    hashing to 0 (`'O>!)1j` is one) would drop out of its index.
    """
    return _cdb_make((key, rule.data) for rule in rules for key in rule.keys)


def _cdb_make(records: Iterable[tuple[bytes, bytes]]) -> bytes:
    """djb's cdb_make: records in order after a 2048-byte header, then 256 tables."""
    out = bytearray(2048)
    tables: list[list[tuple[int, int]]] = [[] for _ in range(256)]
    for key, value in records:
        h = _hash(key)
        tables[h & 255].append((h, len(out)))
        out += _PAIR.pack(len(key), len(value)) + key + value
    header = bytearray()
    for entries in tables:
        slots = 2 * len(entries)
        table = [(0, 0)] * slots
        for h, position in entries:
            where = (h >> 8) % slots
            while table[where][1]:
                where = (where + 1) % slots
            table[where] = (h, position)
        header += _PAIR.pack(len(out), slots)
        for pair in table:
            out += _PAIR.pack(*pair)
    if len(out) > 0xFFFFFFFF:
        raise OSError(errno.ENOMEM, "a cdb is at most 4 GiB")  # cdb_make's posplus
    out[:2048] = header
    return bytes(out)


def compile_and_swap(source: Path, cdb: Path) -> list[Problem]:
    """Compile `source` (etc/tcp.smtp) into `cdb` (etc/tcp.smtp.cdb), or write nothing.

    As `tcprules CDB TMP < SOURCE`: TMP is `cdb` with the suffix `.tmp`,
    fsynced and renamed over `cdb`, so a server sees the old rules or the new
    ones, never a mixture; then the directory is fsynced so the rename lasts.
    On any error the old cdb is left as it was. A missing source is nothing
    to do (no rules); the returned list may still hold warnings.
    """
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as error:
        return [Problem(source, None, f"unable to read: {error_str(error.errno)}")]
    rules, problems = parse_rules(data, source)
    if any(problem.is_error for problem in problems):
        return problems
    tmp = cdb.with_suffix(".tmp")
    try:
        replace_file(tmp, cdb, compile_cdb(rules))
    except OSError as error:
        problems.append(Problem(tmp, None, f"unable to write: {error_str(error.errno)}"))
    return problems


# ---------------------------------------------------------------- the look-up


class RulesError(Exception):
    """The cdb cannot be read; tcpserver drops the connection, tcprulescheck exits 111."""

    def __init__(self, number: int) -> None:
        self.errno = number
        super().__init__(error_str(number))


@dataclass(frozen=True, slots=True)
class Decision:
    """What tcpserver does with a connection.

    `env` holds the settings in rule order; a later one for the same name
    wins, and "" is set-but-empty (how RELAYCLIENT="" works): rules cannot
    unset a variable. A denied connection keeps its settings here, though
    tcpserver closes it before they matter. `key` is the cdb key that
    decided, None when none matched (allowed, nothing set).
    """

    allow: bool
    env: tuple[tuple[str, str], ...]
    key: str | None


ALLOW = Decision(allow=True, env=(), key=None)


def _entries(data: bytes) -> list[bytes]:
    """The NUL-terminated entries of a rule's data; trailing bytes without a NUL don't count."""
    return data.split(b"\0")[:-1]


def _settings(data: bytes) -> tuple[tuple[str, str], ...]:
    found: list[tuple[str, str]] = []
    for entry in _entries(data):
        if entry.startswith(b"+"):
            name, equals, value = entry[1:].partition(b"=")
            if equals:  # tcpserver skips `+NAME` without '='
                found.append((_text(name), _text(value)))
    return tuple(found)


def decide(key: bytes, data: bytes) -> Decision:
    """tcpserver's `found`: any `D` entry denies, `+VAR=VALUE` entries set variables."""
    deny = any(entry.startswith(b"D") for entry in _entries(data))
    return Decision(allow=not deny, env=_settings(data), key=_text(key))


def candidates(ip: bytes, host: bytes | None, info: bytes | None) -> Iterator[bytes]:
    """The keys rules.c tries, in its order; the first one present decides.

    INFO@IP, INFO@=HOST, IP, =HOST, the IP's prefixes ending in '.' (longest
    first), =.suffixes of HOST (longest first) then '=', the empty key. Note
    the exact =HOST comes before the IP prefixes, the suffixes after them.
    """
    if info is not None:
        yield info + b"@" + ip
        if host is not None:
            yield info + b"@=" + host
    yield ip
    if host is not None:
        yield b"=" + host
    for end in range(len(ip), 0, -1):
        if ip[end - 1 : end] == b".":
            yield ip[:end]
    if host is not None:
        for start, byte in enumerate(host):
            if byte == ord("."):
                yield b"=" + host[start:]
        yield b"="
    yield b""


def _c_string(value: str) -> bytes:
    """An argument as the C programs get it: a NUL ends it."""
    return _bytes(value).split(b"\0", 1)[0]


class Rules:
    """A tcprules cdb held in memory, looked up as tcpserver does.

    Look-ups follow cdb.c step by step over the bytes, so a damaged file
    fails for the same connections as it would under tcpserver (`RulesError`,
    "protocol error") and answers the same for the others.
    """

    __slots__ = ("_data",)

    def __init__(self, data: bytes | None) -> None:
        self._data = data  # None: no rules file, everything is allowed

    @classmethod
    def load(cls, cdb_path: Path) -> Rules:
        """The rules in `cdb_path`; a missing file is no rules (tcpserver -X).

        Other read errors raise OSError: tcpserver drops the connection then.
        """
        try:
            return cls(cdb_path.read_bytes())
        except FileNotFoundError:
            return cls(None)

    @property
    def exists(self) -> bool:
        return self._data is not None

    def match(
        self, ip: bytes, host: bytes | None = None, info: bytes | None = None
    ) -> tuple[bytes, bytes] | None:
        """The key that decides and its data, as rules.c finds them; None if none does."""
        if self._data is None:
            return None
        if not self._data:
            # mmap(2) of an empty file fails, but the compiled cdb.c keeps MAP_FAILED
            # as its map (gcc drops the `x + 1` test: pointer overflow is undefined),
            # every read fails, and the munmap at the end leaves EINVAL in errno:
            # tcprulescheck says "unable to read FILE: invalid argument".
            raise RulesError(errno.EINVAL)
        for key in candidates(ip, host, info):
            data = _cdb_find(self._data, key)
            if data is not None:
                return key, data
        return None

    def lookup(self, ip: str, host: str | None = None, info: str | None = None) -> Decision:
        """tcpserver's decision for a connection from `ip` (TCPREMOTEIP text).

        `host` is TCPREMOTEHOST when tcpserver found one, `info` is
        TCPREMOTEINFO when ident answered; "" is not None for either.
        """
        found = self.match(
            _c_string(ip),
            None if host is None else _c_string(host),
            None if info is None else _c_string(info),
        )
        return ALLOW if found is None else decide(*found)


def names_hosts(data: bytes | None) -> bool:
    """Does any rule in this cdb name a host (`=host`, `=.domain`, `info@=host`)?
    Only then must a server find the client's name before it looks up."""
    if not data or len(data) < 2048:
        return False
    end = min(
        (position for position, _ in (_PAIR.unpack_from(data, i) for i in range(0, 2048, 8))),
        default=2048,
    )
    position = 2048
    while position + 8 <= min(end, len(data)):
        klen, dlen = _PAIR.unpack_from(data, position)
        key = data[position + 8 : position + 8 + klen]
        if key.startswith(b"=") or b"@=" in key:
            return True
        position += 8 + klen + dlen
    return False


class RulesFile:
    """A rules cdb re-read only when it changes: tcpserver opens it per connection,
    and tcprules replaces it by rename, so a new inode or size means new rules."""

    __slots__ = ("_hosts", "_path", "_rules", "_stamp")

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        self._rules = Rules(None)
        self._hosts = False

    @property
    def names_hosts(self) -> bool:
        """Whether the rules last read name hosts (see names_hosts())."""
        return self._hosts

    def current(self) -> Rules:
        try:
            st = self._path.stat()
        except FileNotFoundError:
            self._stamp, self._rules, self._hosts = None, Rules(None), False
            return self._rules
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self._stamp:
            self._rules = Rules.load(self._path)
            self._hosts = names_hosts(self._rules._data)
            self._stamp = stamp
        return self._rules


def _read(data: bytes, position: int, length: int) -> bytes:
    if position > len(data) or len(data) - position < length:
        raise RulesError(errno.EPROTO)  # cdb_read's "FORMAT"
    return data[position : position + length]


def _cdb_find(data: bytes, key: bytes) -> bytes | None:
    """cdb_find then cdb_read of the data, as cdb.c does them, uint32 arithmetic included."""
    h = _hash(key)
    table, slots = _PAIR.unpack(_read(data, (h << 3) & 2047, 8))
    if not slots:
        return None
    span = (slots << 3) & 0xFFFFFFFF
    end = (table + span) & 0xFFFFFFFF
    position = (table + (((h >> 8) % slots) << 3)) & 0xFFFFFFFF
    # Each probe reads 8 bytes inside the file or fails, so more probes than
    # the file has 8-byte places (in two alignments) means we are going round
    # a cycle that has no match: cdb.c would go round it until `slots` runs out.
    for _ in range(min(slots, 2 * (len(data) // 8 + 2))):
        slot_hash, record = _PAIR.unpack(_read(data, position, 8))
        if not record:
            return None
        position = (position + 8) & 0xFFFFFFFF
        if position == end:
            position = table
        if slot_hash == h:
            key_length, data_length = _PAIR.unpack(_read(data, record, 8))
            if key_length == len(key) and _match(data, key, (record + 8) & 0xFFFFFFFF):
                return _read(data, (record + 8 + key_length) & 0xFFFFFFFF, data_length)
    return None


def _match(data: bytes, key: bytes, position: int) -> bool:
    """cdb.c's match: 32 bytes at a time, so a key cut off by the end of the
    file is an error only if its first pieces agree."""
    for start in range(0, len(key), 32):
        piece = key[start : start + 32]
        if _read(data, (position + start) & 0xFFFFFFFF, len(piece)) != piece:
            return False
    return True
