"""`qmailtui smtpd`: one SMTP session on file descriptors 0 and 1, as
qmail-smtpd runs under tcpserver or inetd (`tcpserver -x tcp.smtp.cdb 0 smtp
qmailtui smtpd`). Its environment comes from tcpserver: TCPREMOTEIP,
RELAYCLIENT and the rest. Each accepted message is queued as qmail-queue
would queue it, fsynced, before the 250, and the trigger wakes a running core.

Blocking I/O on purpose: one process per connection, as qmail-smtpd, so it
imports neither asyncio nor the scheduler. STARTTLS is offered when
control/servercert.pem loads, as the qmail TLS patch offers it under
tcpserver; TLS runs over the same two descriptors through memory BIOs.
"""

from __future__ import annotations

import os
import signal
import ssl
import sys
import time
from collections.abc import Mapping
from dataclasses import replace

from core import control
from core.paths import QmailRoot
from core.queue import Queue, QueueError
from core.smtpd import Client, Close, Deliver, Policy, Session, StartTLS, server_tls
from core.stdio import Descriptors, write_all

CONTROLS_FAILED = b"421 unable to read controls (#4.3.0)\r\n"


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


class _Tls:
    """TLS over the same descriptors (ssl's memory BIOs: the descriptors may be
    a socket or a pair of pipes)."""

    def __init__(self, plain: Descriptors, context: ssl.SSLContext) -> None:
        self.plain = plain
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)

    def _flush(self) -> bool:
        data = self.outgoing.read()
        return not data or self.plain.send(data)

    def _fill(self) -> bool | None:
        raw = self.plain.recv()
        if raw is None:
            return None
        if not raw:
            self.incoming.write_eof()
            return False
        self.incoming.write(raw)
        return True

    def handshake(self) -> bool:
        while True:
            try:
                self.tls.do_handshake()
                return self._flush()
            except ssl.SSLWantReadError:
                if not self._flush() or not self._fill():
                    return False
            except (ssl.SSLError, OSError):
                self._flush()
                return False

    def send(self, data: bytes | bytearray) -> bool:
        try:
            self.tls.write(bytes(data))
        except (ssl.SSLError, OSError):
            return False
        return self._flush()

    def recv(self) -> bytes | None:
        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLWantReadError:
                if not self._flush():
                    return b""
                filled = self._fill()
                if filled is None:
                    return None
                if not filled:
                    return b""
            except (ssl.SSLError, OSError):
                return b""


def serve(root: QmailRoot, env: Mapping[str, str], infd: int = 0, outfd: int = 1) -> int:
    """Run the session; exit code as qmail-smtpd's: 0 after QUIT, else 1."""
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    policy, why = policy_for(root)
    if policy is None:
        sys.stderr.write(f"qmailtui smtpd: {why}\n")
        write_all(outfd, CONTROLS_FAILED)
        return 1
    context, trouble = server_tls(root.control_file("servercert.pem"))
    if trouble is not None:
        sys.stderr.write(f"qmailtui smtpd: control/servercert.pem: {trouble}; no STARTTLS\n")
    if context is not None:
        policy = replace(policy, tls=True)
    session = Session(policy, Client.from_env(env))
    session.start()
    queue = Queue(root)
    channel: Descriptors | _Tls = Descriptors(infd, outfd, policy.timeout)
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
        if not channel.send(session.out):
            return 1
        session.out.clear()
        if isinstance(action, Close):
            return 0 if session.quit else 1
        if isinstance(action, StartTLS):
            assert context is not None
            assert isinstance(channel, Descriptors)
            channel = _Tls(channel, context)
            if not channel.handshake():
                sys.stderr.write("qmailtui smtpd: TLS handshake failed\n")
                return 1
            session.tls_started()
            continue
        data = channel.recv()
        if data is None:
            session.timed_out()
            channel.send(session.out)
            return 1
        if not data:
            return 1
        session.feed(data)
