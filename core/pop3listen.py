"""The POP3 listener: tcpserver and qmail-popup in the core, checkpassword
and qmail-pop3d in a child, as the classic chain runs them.

Per connection: tcp rules from etc/tcp.pop3.cdb when etc/tcp.pop3 exists (a
deny closes the connection without a word), the connection limits, then
qmail-popup's dialogue (core/popup.py) here, on the event loop. A complete
login starts `CHECKER... qmailtui pop3d Maildir` with the login on fd 3:
CHECKER is `serve --checkpassword PROG`, or our own `qmailtui checkpassword`
on users/passwd. The checker becomes the user and runs pop3d, so the core
never opens a user's Maildir itself; a symlink in it cannot show anything
its owner could not read.

The child talks through a socket pair that the core relays to the client.
That costs a copy, but lets STLS work (the TLS state lives here) and lets
the lines a client pipelined behind PASS reach pop3d, which qmail loses.

A login that fails is answered after FAIL_DELAY seconds, doubled for every
recent failure from the same address (up to FAIL_DELAY_MAX), with the same
text whether the user exists or not. Passwords are never logged.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from core import checkpassword
from core.control import Config
from core.listener import Connection, Limits, Listening, client_env, compiled_rules, plain_ip
from core.paths import QmailRoot
from core.pop3d import TIMEOUT, Lines
from core.pop3stdio import TIMEOUT_VARIABLE
from core.popup import Login, Popup, StartTLS
from core.smtpd import server_tls
from core.tcprules import RulesFile

FAIL_DELAY = 1.0  # seconds before a failed login is answered
FAIL_DELAY_MAX = 16.0
FAIL_MEMORY = 600.0  # seconds a failure from an address counts toward its next delay
MAILDIR = "./Maildir/"  # what pop3d serves, relative to the home checkpassword enters
POP3_TOO_MANY = b"-ERR too many connections, try again later\r\n"


@dataclass
class Pop3Settings:
    local: str  # this host's name: TCPLOCALHOST and the greeting's
    checker: list[str]  # the checkpassword program and its own arguments
    limits: Limits
    rules: RulesFile | None
    tls: ssl.SSLContext | None
    env: dict[str, str]  # PATH and the like, for the checker
    timeout: float = TIMEOUT  # control/timeoutpop3: idle seconds, here and in pop3d


def pop3_settings(
    root: QmailRoot,
    config: Config,
    log: Callable[[str], None],
    checker: list[str] | None = None,
) -> Pop3Settings:
    """From the configuration: rules from etc/tcp.pop3 when it exists (compiled
    now), STLS with control/servercert.pem, the SMTP listener's limits."""
    tls, _ = server_tls(root.control_file("servercert.pem"))  # the SMTP side says why not
    rules = None
    if root.tcp_pop3.exists() or root.tcp_pop3.with_name("tcp.pop3.cdb").exists():
        rules = compiled_rules(root, root.tcp_pop3, log)
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ")}
    env[TIMEOUT_VARIABLE] = str(config.timeoutpop3)  # pop3d's, through the checker
    return Pop3Settings(
        config.me or "unknown",
        checker or builtin_checker(str(root.path)),
        Limits(config.concurrencyincoming, config.concurrencyperip),
        rules,
        tls,
        env,
        float(config.timeoutpop3),
    )


def builtin_checker(root: str) -> list[str]:
    """Our checkpassword on users/passwd, run by this interpreter."""
    return [sys.executable, "-m", "qmailtui", "checkpassword", "--root", root]


class Pop3Server(Listening["Pop3Connection"]):
    too_many = too_many_from_you = POP3_TOO_MANY
    backlog = 128

    def __init__(self, settings: Pop3Settings, log: Callable[[str], None]) -> None:
        super().__init__()
        self.settings = settings
        self.log = log
        self.failures: dict[str, tuple[int, float]] = {}  # ip -> (recent failures, last)

    def limits(self) -> Limits:
        return self.settings.limits

    def connection(self) -> Pop3Connection:
        return Pop3Connection(self)

    def failed(self, ip: str) -> float:
        """Count a failed login; the delay before saying so."""
        now = time.monotonic()
        count, last = self.failures.get(ip, (0, 0.0))
        if now - last > FAIL_MEMORY:
            count = 0
        self.failures[ip] = (count + 1, now)
        if len(self.failures) > 10000:  # forget the quiet ones
            self.failures = {a: v for a, v in self.failures.items() if now - v[1] <= FAIL_MEMORY}
        return min(FAIL_DELAY * float(1 << min(count, 16)), FAIL_DELAY_MAX)

    def succeeded(self, ip: str) -> None:
        self.failures.pop(ip, None)


class _Child(asyncio.Protocol):
    """The pop3d end of the relay."""

    def __init__(self, owner: Pop3Connection) -> None:
        self.owner = owner
        self.done = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.owner.from_child(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


class Pop3Connection(Connection):
    def __init__(self, server: Pop3Server) -> None:
        self.server = server
        self.settings = server.settings
        self.transport: asyncio.Transport | None = None
        self.ip = ""
        self.counted = False
        self.popup: Popup | None = None
        self.lines = Lines()
        self.pending: list[bytes] = []  # whole lines not yet handled
        self.busy = False  # a login or a TLS handshake is under way
        self.child: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.tcp: dict[str, str] = {}
        self.task: asyncio.Future[None] | None = None  # a login or TLS start under way

    # -- asyncio's side ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("unknown", 0)
        local = transport.get_extra_info("sockname") or ("unknown", 0)
        self.ip = plain_ip(str(peer[0]))
        try:  # as tcpserver -x: the rule decides, its variables join the environment
            self.tcp, decision = client_env(
                self.settings, self.ip, int(peer[1]), plain_ip(str(local[0])), int(local[1])
            )
        except OSError as e:
            self.server.log(f"alert: unable to read etc/tcp.pop3.cdb: {e}; dropped {self.ip}")
            transport.abort()
            return
        if decision is not None and not decision.allow:
            self.server.log(f"tcpserver: deny {self.ip} (pop3)")
            transport.close()
            return
        refusal = self.server.admit(self, self.ip)
        if refusal is not None:
            transport.write(refusal)
            transport.close()
            return
        self.counted = True
        self.popup = Popup(
            self.settings.local,
            pid=os.getpid(),
            now=int(time.time()),
            tls_available=self.settings.tls is not None,
        )
        transport.write(self.popup.greeting().join())
        self._idle()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.child is not None:
            self.child.close()  # pop3d sees the end of its input: nothing changes
        if self.counted:
            self.counted = False
            self.server.leave(self, self.ip)
        self.transport = None

    def data_received(self, data: bytes | memoryview) -> None:
        data = bytes(data)  # the view is of a buffer the next read overwrites
        if self.child is not None:
            self.child.write(data)
            return
        self._idle()
        self.pending += self.lines.feed(data)
        self._work()

    def pause_writing(self) -> None:
        if self.child is not None:
            self.child.pause_reading()

    def resume_writing(self) -> None:
        if self.child is not None:
            self.child.resume_reading()

    # -- the dialogue -----------------------------------------------------------------

    def _idle(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(self.settings.timeout, self.hang_up)

    def hang_up(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def shutdown(self) -> None:
        """TERM: hang up; a session without QUIT changes nothing."""
        self.hang_up()

    def _work(self) -> None:
        while self.pending and not self.busy and self.transport is not None:
            assert self.popup is not None
            line = self.pending.pop(0)
            result = self.popup.handle(line)
            if isinstance(result, Login):
                self.busy = True
                rest, self.pending = self.pending, []
                self.transport.pause_reading()
                self.task = asyncio.ensure_future(self._login(result, rest))
                return
            if isinstance(result, StartTLS):
                self.transport.write(result.data)
                self.pending = []
                self.lines.clear()
                self.busy = True
                self.task = asyncio.ensure_future(self._start_tls())
                return
            self.transport.write(result.join())
            if result.close:
                self.transport.close()
                return

    async def _start_tls(self) -> None:
        assert self.transport is not None
        assert self.settings.tls is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                self.transport, self, self.settings.tls, server_side=True
            )
        except (OSError, ssl.SSLError, ConnectionError):
            self.hang_up()
            return
        if transport is None:
            return
        self.transport = transport
        assert self.popup is not None
        self.popup.tls_started()
        self.busy = False
        self._work()

    async def _login(self, login: Login, rest: list[bytes]) -> None:
        """Run the checker with pop3d behind it, relaying; then, if it said no,
        qmail-popup's answer after the delay."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        code: int | None = None
        try:
            child, relay = await loop.create_connection(lambda: _Child(self), sock=ours)
            pid = checkpassword.spawn_checkpassword(
                [*self.settings.checker, sys.executable, "-m", "qmailtui", "pop3d", MAILDIR],
                login.fd3(),
                {**self.settings.env, **self.tcp},
                theirs.fileno(),
            )
        except OSError as e:
            self.server.log(f"alert: pop3: unable to run the checkpassword program: {e}")
            pid = None
        finally:
            theirs.close()
        user = login.user.decode("utf-8", "backslashreplace")
        if pid is not None:
            self.child = child
            for line in rest:  # what the client pipelined behind PASS is pop3d's
                child.write(line + b"\n")
            if self.transport is not None:
                self.transport.resume_reading()
            if self.timer is not None:
                self.timer.cancel()  # pop3d keeps its own time
            code = await checkpassword.wait_exit(pid)
            await relay.done
            self.child = None
        if code == 0:
            self.server.succeeded(self.ip)
            self.server.log(f"pop3: {user} logged in from {self.ip}; session ended")
            if self.transport is not None:
                self.transport.close()
            return
        delay = self.server.failed(self.ip)
        self.server.log(f"pop3: login refused: {user} from {self.ip} (exit {code})")
        await asyncio.sleep(delay)
        if self.transport is None or self.transport.is_closing():
            return
        assert self.popup is not None
        reply = self.popup.refused(code if code is not None else 111)
        self.transport.write(reply.join())
        if reply.close:
            self.transport.close()
        else:
            self.busy = False
            self._idle()
            self._work()

    def from_child(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)
