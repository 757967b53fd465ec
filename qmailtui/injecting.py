"""Queue one message from standard input: `qmailtui inject` and `qmailtui-sendmail`.

This is what cron jobs and web applications run once per message, so it
imports only the cheap core modules (no asyncio, no console): it writes the
queue itself, durably, and pulls the trigger so that a running core starts
delivering at once.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence

from core import control
from core.errors import ExitCode, Problem
from core.inject import InjectError, prepare, settings_from
from core.paths import QmailRoot
from core.queue import Queue, QueueError

INJECT_CONTROLS = ("defaulthost", "defaultdomain", "plusdomain", "idhost")


def fatal(prog: str, text: str, code: int) -> int:
    sys.stderr.write(f"{prog}: fatal: {text}\n")
    return code


def inject(
    root: QmailRoot,
    raw: bytes,
    *,
    mode: str,
    args: Sequence[str],
    sender: str | None,
    env: Mapping[str, str],
    prog: str,
    print_only: bool = False,
) -> int:
    """Prepare and queue one message; return the exit code (0 only once it is durable)."""
    if not root.queue.is_dir():
        return fatal(prog, f"{root.path}: no queue here (is it a qmail root?)", ExitCode.TEMPORARY)
    problems: list[Problem] = []
    me = control.read_me(root, problems)
    values = {}
    for name in INJECT_CONTROLS:
        value = control.line_value(root, name, me, problems)
        values[name] = value if value is not None else name
    if problems:
        return fatal(prog, f"unable to read controls: {problems[0].format(root.path)}", 111)
    now = time.time()
    try:
        prepared = prepare(
            raw,
            mode=mode,
            args=args,
            sender=sender,
            env=env,
            settings=settings_from(values, env),
            now=now,
            pid=os.getpid(),
        )
    except InjectError as e:
        return fatal(prog, e.message, e.code)
    if print_only:
        out = sys.stdout.buffer
        out.write(f"Return-Path: <{prepared.sender}>\n".encode("utf-8", "surrogateescape"))
        out.write(prepared.message)
        out.flush()
        return 0
    uid = os.getuid()
    try:
        Queue(root).enqueue(
            prepared.message,
            prepared.sender,
            prepared.recipients,
            uid=uid,
            pid=os.getpid(),
            invoked=f"invoked by uid {uid}",
            now=now,
        )
    except QueueError as e:
        return fatal(prog, e.text, ExitCode.PERMANENT if e.permanent else ExitCode.TEMPORARY)
    return 0


def read_stdin() -> bytes:
    return sys.stdin.buffer.read()
