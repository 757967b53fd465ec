"""The SMTP listener: tcpserver and qmail-smtpd in one asyncio server.

Per connection, as `tcpserver -x etc/tcp.smtp.cdb` would: the tcp rules
decide (a deny closes the connection without a word), the rule's variables
(RELAYCLIENT, DATABYTES...) become the session's environment, and a
connection over the limits (`concurrencyincoming`, tcpserver's -c, and
`concurrencyperip`) gets a 421. The session itself is core/smtpd.py; here
are only bytes in and out, timeouts, TLS and the hand-over of each message
to the queue, whose 250 waits until the message is on disk.

A plain asyncio.Protocol: the per-connection cost is what bounds messages
per second on loopback, and streams would add a task and a buffer copy per
command.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from core.control import Config
from core.paths import QmailRoot
from core.smtpd import Client, Close, Deliver, Policy, Session, StartTLS, server_tls
from core.tcprules import Decision, Rules, RulesError, RulesFile, compile_and_swap

TOO_MANY = b"421 too many connections, try again later (#4.3.2)\r\n"
TOO_MANY_FROM_YOU = b"421 too many connections from your address (#4.7.0)\r\n"
PAUSE_AT = 1 << 20  # stop reading from a client whose unprocessed input passes this


class Connection(asyncio.BufferedProtocol):
    """A listener's connection: a protocol that can be told to end (TERM).

    Buffered: asyncio's plain Protocol reads into a fresh 256 KiB bytes object
    per recv, which glibc maps and unmaps each time (three system calls and a
    TLB flush per SMTP command); recv_into one buffer per connection does not.
    """

    READ_SIZE = 65536
    _inbox: bytearray | None = None

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._inbox is None:
            self._inbox = bytearray(self.READ_SIZE)
        return memoryview(self._inbox)

    def buffer_updated(self, nbytes: int) -> None:
        assert self._inbox is not None
        self.data_received(memoryview(self._inbox)[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError


C = TypeVar("C", bound=Connection)


BUSIEST = 5  # client addresses a listener's status names


@dataclass(frozen=True, slots=True)
class Limits:
    connections: int = 40
    per_ip: int = 20


Enqueue = Callable[[bytes, str, list[str]], Awaitable[int]]


class Settings:
    """What a new connection reads; replaced whole on reload."""

    def __init__(
        self,
        policy: Policy,
        rules: RulesFile | None,
        limits: Limits,
        local: str,
        tls: ssl.SSLContext | None,
        resolver: Any = None,
    ) -> None:
        self.policy = policy
        self.rules = rules
        self.limits = limits
        self.local = local
        self.tls = tls
        self.resolver = resolver  # dnspython's, for TCPREMOTEHOST when a rule names hosts


class Listening(Generic[C]):
    """What every listener does alike: accept, count connections in and out
    against the limits (tcpserver's -c, and per address), and on close stop
    accepting and tell each open connection to end."""

    too_many = TOO_MANY
    too_many_from_you = TOO_MANY_FROM_YOU
    backlog = 512

    def __init__(self) -> None:
        self.sessions = 0
        self.per_ip: dict[str, int] = {}
        self.address = ""  # HOST:PORT, once listening
        self.accepted = 0  # connections counted in since the start
        self.refused = 0  # connections turned away by the limits
        self._server: asyncio.Server | None = None
        self._connections: set[C] = set()

    def limits(self) -> Limits:
        raise NotImplementedError

    def connection(self) -> C:
        raise NotImplementedError

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.connection, host, port, backlog=self.backlog, reuse_address=True
        )
        sockname = self._server.sockets[0].getsockname()
        self.address = f"{sockname[0]}:{sockname[1]}"
        return str(sockname[0]), int(sockname[1])

    def status(self) -> dict[str, Any]:
        """What the console shows of this listener: its sessions against the
        limits, and the addresses holding the most of them."""
        limits = self.limits()
        busiest = sorted(self.per_ip.items(), key=lambda item: (-item[1], item[0]))[:BUSIEST]
        return {
            "address": self.address,
            "sessions": self.sessions,
            "max": limits.connections,
            "per_ip_max": limits.per_ip,
            "accepted": self.accepted,
            "refused": self.refused,
            "busiest": [{"ip": ip, "sessions": n} for ip, n in busiest],
        }

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.shutdown()
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def admit(self, connection: C, ip: str) -> bytes | None:
        """Count the connection in, or the reply that says why not."""
        refusal = self.count_in(ip)
        if refusal is None:
            self._connections.add(connection)
        return refusal

    def leave(self, connection: C, ip: str) -> None:
        self._connections.discard(connection)
        self.count_out(ip)

    def full_for(self, ip: str) -> bool:
        """Would count_in refuse `ip` now? (It counts nothing.)"""
        limits = self.limits()
        return self.sessions >= limits.connections or self.per_ip.get(ip, 0) >= limits.per_ip

    def count_in(self, ip: str) -> bytes | None:
        limits = self.limits()
        if self.sessions >= limits.connections:
            self.refused += 1
            return self.too_many
        if self.per_ip.get(ip, 0) >= limits.per_ip:
            self.refused += 1
            return self.too_many_from_you
        self.accepted += 1
        self.sessions += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return None

    def turned_away(self, ip: str) -> None:
        """A connection counted in, then refused after all (no worker took it)."""
        self.count_out(ip)
        self.accepted -= 1
        self.refused += 1

    def count_out(self, ip: str) -> None:
        self.sessions -= 1
        left = self.per_ip[ip] - 1
        if left:
            self.per_ip[ip] = left
        else:
            del self.per_ip[ip]


class SmtpServer(Listening["SmtpConnection"]):
    def __init__(
        self,
        settings: Settings,
        enqueue: Enqueue,
        log: Callable[[str], None],
        queue_error: Callable[[BaseException], str],
    ) -> None:
        super().__init__()
        self.settings = settings
        self.enqueue = enqueue
        self.log = log
        self.queue_error = queue_error  # an exception -> qmail-queue's "Dtext"/"Ztext"

    def limits(self) -> Limits:
        return self.settings.limits

    def connection(self) -> SmtpConnection:
        return SmtpConnection(self)

    def rules_for(self, ip: str) -> tuple[Rules | None, bool] | None:
        """tcpserver's first look at a new connection: the rules in force (one
        read of the cdb), and whether they need the client's name from DNS
        first; None, and an alert, when the rules cannot be read."""
        rules_file = self.settings.rules
        if rules_file is None:
            return None, False
        try:
            rules = rules_file.current()
        except OSError as e:
            self.log(f"alert: unable to read etc/tcp.smtp.cdb: {e}; dropped {ip}")
            return None
        return rules, self.settings.resolver is not None and rules_file.names_hosts

    async def client_name(self, ip: str) -> str | None:
        """TCPREMOTEHOST: the client's name, as tcpserver finds it."""
        from core.rdns import remote_host

        return await remote_host(ip, self.settings.resolver)

    def screen(
        self,
        owner: SmtpConnection | None,
        ip: str,
        peer: Any,
        sock: Any,
        host: str | None,
        rules: Rules | None,
    ) -> tuple[dict[str, str] | None, bytes]:
        """tcpserver's part for a new connection: its environment, admitted and
        counted against the limits (as `owner`'s, when it is in this process); or
        None and the reply that refuses it (b"": close without a word, as for a
        deny rule or unreadable rules)."""
        try:
            env, decision = client_env(
                self.settings, ip, int(peer[1]), plain_ip(str(sock[0])), int(sock[1]), host, rules
            )
        except (RulesError, OSError) as e:
            self.log(f"alert: unable to read etc/tcp.smtp.cdb: {e}; dropped {ip}")
            return None, b""
        if decision is not None and not decision.allow:
            self.log(f"tcpserver: deny {ip} by rule {decision.key!r}")
            return None, b""
        refusal = self.count_in(ip) if owner is None else self.admit(owner, ip)
        if refusal is not None:
            self.log(f"tcpserver: {refusal[4:-2].decode()}: {ip}")
            return None, refusal
        return env, b""


class Listens(Protocol):
    """What client_env needs of a listener's settings (SMTP's or POP3's)."""

    local: str  # TCPLOCALHOST
    rules: RulesFile | None


def client_env(
    settings: Listens,
    ip: str,
    port: int,
    local_ip: str,
    local_port: int,
    host: str | None = None,
    rules: Rules | None = None,
) -> tuple[dict[str, str], Decision | None]:
    """tcpserver's environment for a connection, and the rule that shaped it
    (from `rules` when the caller has read them already)."""
    env = {
        "PROTO": "TCP",
        "TCPREMOTEIP": ip,
        "TCPREMOTEPORT": str(port),
        "TCPLOCALIP": local_ip,
        "TCPLOCALPORT": str(local_port),
        "TCPLOCALHOST": settings.local,
    }
    if host is not None:
        env["TCPREMOTEHOST"] = host
    if rules is None and settings.rules is not None:
        rules = settings.rules.current()
    decision = rules.lookup(ip, host) if rules is not None else None
    if decision is not None:
        env.update(decision.env)
    return env, decision


class SmtpConnection(Connection):
    def __init__(self, server: SmtpServer) -> None:
        self.server = server
        self.settings = server.settings
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.ip = ""
        self.counted = False
        self.busy = False  # a message is being queued, or TLS is starting
        self.paused = False
        self.last = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Future[None] | None = None  # a delivery or TLS start in progress

    # -- asyncio's side ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("unknown", 0)
        sock = transport.get_extra_info("sockname") or ("unknown", 0)
        self.ip = plain_ip(str(peer[0]))
        looked = self.server.rules_for(self.ip)
        if looked is None:
            transport.abort()  # tcpserver drops the connection when it cannot read its rules
            return
        rules, named = looked
        if named:  # tcpserver finds the client's name before it consults the rules
            transport.pause_reading()
            self.task = asyncio.ensure_future(self._named(peer, sock, rules))
            return
        self._open(peer, sock, None, rules)

    async def _named(self, peer: Any, sock: Any, rules: Rules | None) -> None:
        host = await self.server.client_name(self.ip)
        if self.transport is None or self.transport.is_closing():
            return
        self.task = None
        self._open(peer, sock, host, rules)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _open(self, peer: Any, sock: Any, host: str | None, rules: Rules | None) -> None:
        transport = self.transport
        assert transport is not None
        env, refusal = self.server.screen(self, self.ip, peer, sock, host, rules)
        if env is None:
            if refusal:
                transport.write(refusal)
                transport.close()
            else:
                transport.abort()
            return
        self.begin(env)

    def begin(self, env: dict[str, str]) -> None:
        """The client is admitted (counted against the limits): greet it."""
        self.counted = True
        policy = self.settings.policy
        if self.settings.tls is None and policy.tls:
            policy = _without_tls(policy)
        self.session = Session(policy, Client.from_env(env))
        self.session.start()
        self._flush()
        loop = asyncio.get_running_loop()
        self.last = loop.time()
        self.timer = loop.call_later(policy.timeout, self._idle)

    def data_received(self, data: bytes | memoryview) -> None:
        session = self.session
        if session is None or session.closed:
            return
        if self.busy and isinstance(self._pending, StartTLS):
            return  # sent in the clear after STARTTLS: never read as a command
        self.last = asyncio.get_running_loop().time()
        session.feed(data)
        if self.busy:
            if len(session.buf) > PAUSE_AT and not self.paused and self.transport is not None:
                self.transport.pause_reading()
                self.paused = True
            return
        self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.counted:
            self.counted = False
            self.server.leave(self, self.ip)
        if self.session is not None:
            self.session.closed = True

    def shutdown(self) -> None:
        """The core is stopping: tell a client that is not mid-message, and go."""
        if self.transport is None or self.session is None or self.busy:
            return
        greeting = self.settings.policy.greeting.encode("utf-8", "surrogateescape")
        self.transport.write(b"421 " + greeting + b" closing connection\r\n")
        self.transport.close()

    # -- the session's side ----------------------------------------------------------

    _pending: object = None

    def _pump(self) -> None:
        session = self.session
        assert session is not None
        action = session.step()
        if isinstance(action, Deliver):
            self.busy = True
            self._pending = action
            self.task = asyncio.ensure_future(self._deliver(action))
            return
        self._flush()
        if isinstance(action, Close) or session.closed:
            if self.transport is not None:
                self.transport.close()
            return
        if isinstance(action, StartTLS):
            self.busy = True
            self._pending = action
            self.task = asyncio.ensure_future(self._start_tls())

    def _flush(self) -> None:
        session = self.session
        if session is not None and session.out and self.transport is not None:
            self.transport.write(bytes(session.out))
            session.out.clear()

    async def _deliver(self, action: Deliver) -> None:
        session = self.session
        assert session is not None
        try:
            msgid = await self.server.enqueue(action.message, action.sender, action.recipients)
        except Exception as e:  # a failure to queue is a 451 (or 554), never a lost message
            session.queued(None, self.server.queue_error(e))
        else:
            session.queued(msgid)
        self._resume()

    async def _start_tls(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None
        assert self.settings.tls is not None
        try:
            transport = await loop.start_tls(
                self.transport,
                self,
                self.settings.tls,
                server_side=True,
                ssl_handshake_timeout=min(self.settings.policy.timeout, 60),
            )
        except (TimeoutError, OSError, ssl.SSLError) as e:
            self.server.log(f"tcpserver: TLS handshake with {self.ip} failed: {e}")
            if self.transport is not None:
                self.transport.abort()
            return
        if transport is None:
            return
        self.transport = transport
        assert self.session is not None
        self.session.tls_started()
        self._resume()

    def _resume(self) -> None:
        self.busy = False
        self._pending = None
        self.last = asyncio.get_running_loop().time()
        if self.session is None or self.transport is None or self.transport.is_closing():
            return
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        self._pump()

    def _idle(self) -> None:
        """qmail-smtpd's timeoutsmtpd: a client silent for that long gets a 451."""
        loop = asyncio.get_running_loop()
        timeout = self.settings.policy.timeout
        if self.session is None or self.transport is None or self.transport.is_closing():
            return
        waited = loop.time() - self.last
        if self.busy or waited < timeout:
            self.timer = loop.call_later(timeout - waited if not self.busy else timeout, self._idle)
            return
        self.session.timed_out()
        self._flush()
        self.transport.close()


def plain_ip(text: str) -> str:
    """IPv4 as tcpserver writes it, also when it came as ::ffff:a.b.c.d."""
    return text[7:] if text.startswith("::ffff:") and "." in text else text


def _without_tls(policy: Policy) -> Policy:
    from dataclasses import replace

    return replace(policy, tls=False)


def smtp_rules(root: QmailRoot, log: Callable[[str], None]) -> RulesFile:
    return compiled_rules(root, root.tcp_smtp, log)


def compiled_rules(root: QmailRoot, source: Path, log: Callable[[str], None]) -> RulesFile:
    """Compile etc/tcp.NAME into etc/tcp.NAME.cdb, as the admin's `tcprules`
    would; a file with errors leaves the last good cdb in force, and says why."""
    cdb = source.with_name(source.name + ".cdb")
    for problem in compile_and_swap(source, cdb):
        if problem.is_error:
            log(f"alert: {problem.format(root.path)}; keeping the last good etc/{cdb.name}")
        else:
            log(f"warning: {problem.format(root.path)}")
    return RulesFile(cdb)


def settings_for(
    root: QmailRoot,
    config: Config,
    log: Callable[[str], None],
    compile_rules: bool = True,
    resolver: Any = None,
) -> Settings | None:
    """The listener's settings from a configuration; None (and an alert) when
    it must not listen: without rcpthosts qmail relays for every domain."""
    if config.rcpthosts is None:
        log(
            "alert: control/rcpthosts is missing: qmail would relay for every domain;"
            " not listening for SMTP until it exists"
        )
        return None
    tls, why = server_tls(root.control_file("servercert.pem"))
    if why is not None:
        log(f"alert: control/servercert.pem: {why}; STARTTLS not offered")
    if compile_rules:
        rules = smtp_rules(root, log)
    else:
        rules = RulesFile(root.tcp_smtp.with_name("tcp.smtp.cdb"))
    return Settings(
        Policy.from_config(config, tls=tls is not None),
        rules,
        Limits(config.concurrencyincoming, config.concurrencyperip),
        config.me or "unknown",
        tls,
        resolver,
    )
