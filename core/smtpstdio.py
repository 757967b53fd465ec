"""`qmailtui smtpd`: one SMTP session on file descriptors 0 and 1, as
qmail-smtpd runs under tcpserver or inetd (`tcpserver -x tcp.smtp.cdb 0 smtp
qmailtui smtpd`). Its environment comes from tcpserver: TCPREMOTEIP,
RELAYCLIENT and the rest. Each accepted message is queued as qmail-queue
would queue it, fsynced, before the 250, and the trigger wakes a running core.

Blocking I/O on purpose: one process per connection, as qmail-smtpd, so it
imports neither asyncio nor the scheduler.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from collections.abc import Mapping

from core import control
from core.paths import QmailRoot
from core.queue import Queue, QueueError
from core.smtpd import Client, Close, Deliver, Policy, Session, StartTLS

CONTROLS_FAILED = b"421 unable to read controls (#4.3.0)\r\n"


def _write(fd: int, data: bytes | bytearray) -> bool:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except OSError:
            return False
    return True


def policy_for(root: QmailRoot) -> tuple[Policy | None, str]:
    """The policy, or None and why not (one line, naming the file)."""
    config = control.load(root)
    errors = config.errors
    if config.smtpgreeting is not None:  # qmail-smtpd needs me only for the greeting
        errors = [p for p in errors if p.path != root.control_file("me")]
    if errors:
        return None, errors[0].format(root.path)
    if config.rcpthosts is None:
        return None, (
            "control/rcpthosts is missing: qmail would accept mail for every domain"
            " (an open relay); list this host's domains in it"
        )
    if config.me is None and config.smtpgreeting is None:
        return None, "control/me is missing"
    return Policy.from_config(config, tls=False), ""


def serve(root: QmailRoot, env: Mapping[str, str], infd: int = 0, outfd: int = 1) -> int:
    """Run the session; exit code as qmail-smtpd's: 0 after QUIT, else 1."""
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    policy, why = policy_for(root)
    if policy is None:
        sys.stderr.write(f"qmailtui smtpd: {why}\n")
        _write(outfd, CONTROLS_FAILED)
        return 1
    session = Session(policy, Client.from_env(env))
    session.start()
    queue = Queue(root)
    while True:
        action = session.step()
        if isinstance(action, Deliver):
            try:
                msgid = queue.enqueue(
                    action.message,
                    action.sender,
                    action.recipients,
                    uid=os.getuid(),
                    pid=os.getpid(),
                    invoked="invoked from network",
                    now=time.time(),
                    qp_is_id=True,
                )
            except QueueError as e:
                session.queued(None, ("D" if e.permanent else "Z") + e.text)
            else:
                queue.pull_trigger()
                session.queued(msgid)
            continue
        if isinstance(action, StartTLS):  # never offered here: policy.tls is False
            return 1
        if not _write(outfd, session.out):
            return 1
        session.out.clear()
        if isinstance(action, Close):
            return 0 if session.quit else 1
        try:
            ready, _, _ = select.select([infd], [], [], policy.timeout)
        except InterruptedError:  # pragma: no cover - SIGPIPE is ignored, no handlers
            continue
        if not ready:
            session.timed_out()
            _write(outfd, session.out)
            return 1
        try:
            data = os.read(infd, 65536)
        except OSError:
            return 1
        if not data:
            return 1
        session.feed(data)
