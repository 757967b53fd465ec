"""`qmailtui popup HOST PROG...` and `qmailtui pop3d MAILDIR` on standard
input and output: qmail-popup's and qmail-pop3d's interfaces, for tcpserver
or inetd, and the programs the built-in listener runs after a login.

Both give up silently after TIMEOUT seconds without input or progress on
output, as qmail's programs do.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from core.checkpassword import run_checkpassword
from core.pop3d import ROOT_REFUSED, TIMEOUT, Lines, Pop3d
from core.popup import Login, Popup, StartTLS
from core.stdio import Descriptors, write_all

TIMEOUT_VARIABLE = "POP3TIMEOUT"  # seconds, from serve's control/timeoutpop3


def _timeout() -> float:
    text = os.environ.get(TIMEOUT_VARIABLE, "")
    return float(text) if text.isdigit() and int(text) > 0 else float(TIMEOUT)


class _Gone(Exception):
    """The client went away or was silent too long."""


def _read(fd: int) -> bytes:
    data = Descriptors(fd, -1, _timeout()).recv()
    if not data:  # the end, an error, or silence past the timeout
        raise _Gone
    return data


def _write(fd: int, chunks: Iterable[bytes]) -> None:
    for chunk in chunks:
        if not write_all(fd, chunk, _timeout()):
            raise _Gone


def pop3d(maildir: str, infd: int = 0, outfd: int = 1) -> int:
    """qmail-pop3d: serve MAILDIR (relative to the home checkpassword entered)."""
    if os.geteuid() == 0:
        os.write(2, ROOT_REFUSED)
        return 1
    for fd in (infd, outfd):
        os.set_blocking(fd, True)
    session = Pop3d(Path(maildir))
    lines = Lines()
    try:
        reply = session.start()
        _write(outfd, reply.chunks())
        while not reply.close:
            for line in lines.feed(_read(infd)):
                reply = session.handle(line)
                _write(outfd, reply.chunks())
                if reply.close:
                    break
    except _Gone:
        pass
    return 0


def popup(hostname: str, argv: list[str], infd: int = 0, outfd: int = 1) -> int:
    """qmail-popup: USER/PASS or APOP, then PROG with the login on fd 3 and
    this session's descriptors; the program's child serves the rest."""
    if not hostname or not argv:
        from core.popup import USAGE

        os.write(outfd, USAGE)
        return 1
    session = Popup(hostname, pid=os.getpid(), now=int(time.time()))
    lines = Lines()
    try:
        _write(outfd, session.greeting().chunks())
        while True:
            for line in lines.feed(_read(infd)):
                result = session.handle(line)
                if isinstance(result, Login):
                    code = run_checkpassword(
                        argv,
                        result.user,
                        result.password,
                        result.timestamp,
                        os.environ,
                        stdin=infd,
                        stdout=outfd,
                    )
                    if code == 0:
                        return 1  # qmail-popup exits 1 whatever happened
                    result = session.refused(code)
                if isinstance(result, StartTLS):  # not offered on a plain descriptor
                    continue
                _write(outfd, result.chunks())
                if result.close:
                    return 1
    except _Gone:
        return 1


def main_pop3d(argv: list[str]) -> int:
    if len(argv) != 1:
        print("qmailtui pop3d: usage: pop3d MAILDIR", file=sys.stderr)
        return 2
    return pop3d(argv[0])
