"""`qmailtui tcprules` and `qmailtui tcprulescheck`: ucspi-tcp's two programs.

Same arguments, output bytes, messages and exit codes as ucspi-tcp 0.88
(spec/tcprules.md §5, §7), so scripts written for them keep working. Two
additions, from INTERFACE.md: `--help` alone prints help, and tcprulescheck
takes the IP and the host name as optional arguments before the environment.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Iterator, Mapping
from typing import BinaryIO

from core.tcprules import (
    Rule,
    Rules,
    RulesError,
    RuleSyntaxError,
    compile_cdb,
    error_str,
    parse_line,
)

PERMANENT = 100  # ucspi-tcp: bad usage, bad input
TEMPORARY = 111  # ucspi-tcp: an I/O failure, try again

TCPRULES_HELP = """\
usage: qmailtui tcprules CDB TMP < RULES

Compile tcpserver access rules read from standard input, as ucspi-tcp's
tcprules: write TMP, fsync it, then rename it to CDB. On a bad line nothing
is renamed and CDB stays as it was (exit 100).
"""

TCPRULESCHECK_HELP = """\
usage: qmailtui tcprulescheck CDB [IP [HOST]]

Show which rule of CDB applies to a connection, as ucspi-tcp's tcprulescheck.
IP and HOST default to $TCPREMOTEIP (else 0.0.0.0) and $TCPREMOTEHOST;
$TCPREMOTEINFO is used as the ident user name.
"""


class _Exit(Exception):
    def __init__(self, code: int, message: bytes) -> None:
        super().__init__(code)
        self.code = code
        self.message = message


def _put(stream: BinaryIO | None, fd: int, data: bytes) -> None:
    """Write as djb's buffer_1/buffer_2 do: errors are ignored, the exit code stands.

    Without a stream the bytes go straight to the file descriptor, so that a
    closed or full standard output cannot come back at interpreter exit.
    """
    with contextlib.suppress(OSError, ValueError):
        if stream is not None:
            stream.write(data)
            stream.flush()
            return
        for pending in (sys.stdout, sys.stderr):
            if pending is not None:
                pending.flush()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]


def _die(stderr: BinaryIO | None, code: int, message: bytes) -> int:
    _put(stderr, 2, message + b"\n")
    return code


def _input_lines(stdin: BinaryIO | None) -> Iterator[bytes]:
    if stdin is None:  # fd 0 was closed when we started
        raise OSError(errno.EBADF, "Bad file descriptor")  # what read(2) on it would say
    for line in stdin:
        yield line[:-1] if line.endswith(b"\n") else line


def tcprules_main(
    argv: list[str],
    *,
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
) -> int:
    """tcprules CDB TMP < RULES; argv is what follows the sub-command."""
    if argv == ["--help"]:
        _put(stdout, 1, TCPRULES_HELP.encode())
        return 0
    if stdin is None and sys.stdin is not None:
        stdin = sys.stdin.buffer
    try:
        _tcprules(argv, stdin)
    except _Exit as done:
        return _die(stderr, done.code, done.message)
    return 0


def _tcprules(argv: list[str], stdin: BinaryIO | None) -> None:
    if len(argv) < 2:
        raise _Exit(PERMANENT, b"tcprules: usage: tcprules rules.cdb rules.tmp")
    cdb, tmp = os.fsencode(argv[0]), os.fsencode(argv[1])
    fatal = b"tcprules: fatal: "
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_NONBLOCK | os.O_TRUNC | os.O_CREAT, 0o644)
    except OSError as error:
        reason = error_str(error.errno).encode()
        raise _Exit(TEMPORARY, fatal + b"unable to create " + tmp + b": " + reason) from None
    try:
        rules = _read_rules(stdin, fatal)
    except _Exit:
        os.close(fd)  # like tcprules, leave TMP behind and CDB as it was
        raise
    _write(fd, compile_cdb(rules), fatal + b"unable to write to " + tmp + b": ")
    try:
        os.rename(tmp, cdb)
    except OSError as error:
        reason = error_str(error.errno).encode()
        raise _Exit(
            TEMPORARY, fatal + b"unable to move " + tmp + b" to " + cdb + b": " + reason
        ) from None
    # tcprules stops at the rename; a sync of the directory makes the rename last.
    with contextlib.suppress(OSError):
        directory = os.open(os.path.dirname(cdb) or b".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _read_rules(stdin: BinaryIO | None, fatal: bytes) -> list[Rule]:
    rules: list[Rule] = []
    try:
        for number, raw in enumerate(_input_lines(stdin), 1):
            try:
                rule = parse_line(raw, number)
            except RuleSyntaxError as error:
                raise _Exit(
                    PERMANENT, fatal + b"unable to parse this line: " + error.shown
                ) from None
            if rule is not None:
                rules.append(rule)
    except OSError as error:
        reason = error_str(error.errno).encode()
        raise _Exit(TEMPORARY, fatal + b"unable to read input: " + reason) from None
    return rules


def _write(fd: int, data: bytes, failure: bytes) -> None:
    """Write, fsync and close `fd` (closed whatever happens), as tcprules ends."""
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        os.close(fd)  # NFS reports some write errors only here
    except OSError as error:
        raise _Exit(TEMPORARY, failure + error_str(error.errno).encode()) from None


def tcprulescheck_main(
    argv: list[str],
    *,
    environ: Mapping[bytes, bytes] | None = None,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
) -> int:
    """tcprulescheck CDB [IP [HOST]]; argv is what follows the sub-command."""
    env = os.environb if environ is None else environ
    if argv == ["--help"]:
        _put(stdout, 1, TCPRULESCHECK_HELP.encode())
        return 0
    if not argv:
        return _die(stderr, PERMANENT, b"tcprulescheck: usage: tcprulescheck rules.cdb")
    path = os.fsencode(argv[0])
    ip = os.fsencode(argv[1]) if len(argv) > 1 else env.get(b"TCPREMOTEIP", b"0.0.0.0")
    host = os.fsencode(argv[2]) if len(argv) > 2 else env.get(b"TCPREMOTEHOST")
    info = env.get(b"TCPREMOTEINFO")
    try:
        with open(path, "rb") as f:
            rules = Rules(f.read())
        found = rules.match(ip, host, info)
    except (OSError, RulesError) as error:
        reason = error_str(error.errno).encode()
        message = b"tcprulescheck: fatal: unable to read " + path + b": " + reason
        return _die(stderr, TEMPORARY, message)
    report = b"default:\nallow connection\n" if found is None else _report(*found)
    _put(stdout, 1, report)
    return 0


def _report(key: bytes, data: bytes) -> bytes:
    """tcprulescheck's `found`: it stops at the first `D`, as the connection would."""
    lines = [b"rule " + key + b":"]
    for entry in data.split(b"\0")[:-1]:
        if entry.startswith(b"D"):
            lines.append(b"deny connection")
            return b"\n".join(lines) + b"\n"
        if entry.startswith(b"+"):
            lines.append(b"set environment variable " + entry[1:])
    lines.append(b"allow connection")
    return b"\n".join(lines) + b"\n"


def _main() -> int:
    """`python -m qmailtui.tcprulescmd tcprules|tcprulescheck ...`, until cli.py wires them."""
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "tcprules":
        return tcprules_main(sys.argv[2:])
    if command == "tcprulescheck":
        return tcprulescheck_main(sys.argv[2:])
    sys.stderr.write("usage: python -m qmailtui.tcprulescmd tcprules|tcprulescheck ...\n")
    return 2


if __name__ == "__main__":
    sys.exit(_main())
