"""This process's id, read once per process: glibc does not cache getpid(),
so every os.getpid() is a system call, and the queue and Maildir names use it
for every file. A fork reads it again."""

from __future__ import annotations

import os

_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def pid() -> int:
    return _pid
