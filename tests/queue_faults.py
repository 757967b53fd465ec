"""Faults for core.queue: a system call that fails, or a process that dies at
a chosen system call; and a listing of every file under queue/."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import core.durable
import core.queue
from core.paths import QmailRoot

# Above Linux's PID_MAX_LIMIT (2**22): no process ever has it, so kill() says ESRCH.
DEAD_PID = 4_194_305

# The calls through which queue.py changes the disk.
CRASH_POINTS = frozenset(
    {"open", "write", "writev", "ftruncate", "pwrite", "fsync", "link", "unlink", "utime", "rename"}
)


class Crash(BaseException):
    """The process died at this call: no `except OSError` in the queue sees it,
    only `finally` clauses run (closing a file drops its flock, as death does)."""


class _Os:
    """core.queue's view of `os`, with a hook before the calls that matter."""

    def __init__(self, before: Callable[[str, tuple[Any, ...]], None]) -> None:
        self._before = before

    def __getattr__(self, name: str) -> Any:
        attr = getattr(os, name)
        if name not in CRASH_POINTS:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self._before(name, args)
            return attr(*args, **kwargs)

        return call


@contextlib.contextmanager
def failing(call: str, code: int, nth: int = 1) -> Iterator[None]:
    """The `nth` call of os.`call` made by core.queue (or the fsyncs it asks of
    core.durable) fails with errno `code`."""
    seen = 0

    def before(name: str, args: tuple[Any, ...]) -> None:
        nonlocal seen
        if name == call:
            seen += 1
            if seen == nth:
                raise OSError(code, os.strerror(code))

    faulty = _Os(before)
    with mock.patch.object(core.queue, "os", faulty), mock.patch.object(core.durable, "os", faulty):
        yield


@contextlib.contextmanager
def crash_after(calls: int) -> Iterator[None]:
    """core.queue dies at its (calls+1)-th disk-changing call (Path.unlink included)."""
    left = calls

    def tick() -> None:
        nonlocal left
        if left == 0:
            raise Crash
        left -= 1

    real_unlink = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        tick()
        real_unlink(self, missing_ok)

    dying = _Os(lambda name, args: tick())
    with (
        mock.patch.object(core.queue, "os", dying),
        mock.patch.object(core.durable, "os", dying),
        mock.patch.object(Path, "unlink", unlink),
    ):
        yield


def queue_files(root: QmailRoot) -> dict[str, bytes]:
    """Every regular file under queue/ (relative path -> content); the FIFO is not
    one, and neither are spare/ files, kept only to be written over."""
    found: dict[str, bytes] = {}
    for directory, _, names in os.walk(root.queue):
        if Path(directory) == root.queue / "spare":
            continue
        for name in names:
            path = Path(directory) / name
            if stat.S_ISREG(path.lstat().st_mode):
                found[path.relative_to(root.queue).as_posix()] = path.read_bytes()
    return found
