"""Remote SMTP servers for delivery tests: aiosmtpd sinks on 127.0.0.x
addresses, all on one port (as MX hosts all listen on 25), run by one event
loop in a background thread.

Each address has its own behaviour: answer at once, stall before the
greeting until released, answer RCPT or DATA with a given reply, hang up
after the greeting, or offer STARTTLS with a given certificate. Every
message that a sink accepted is kept with the address it came to and
whether it came over TLS.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class Behaviour:
    rcpt: dict[str, str] = field(default_factory=dict)  # recipient -> reply
    rcpt_default: str = "250 OK"
    data: str = "250 ok 1795746082 qp 4242"
    stall: bool = False  # no greeting until release()
    hang_up: bool = False  # greet, then close at the first command
    tls: ssl.SSLContext | None = None  # offer STARTTLS with this context


@dataclass(frozen=True)
class Arrival:
    sink: str  # the address the message came to
    sender: str
    recipients: tuple[str, ...]
    data: bytes
    tls: bool
    when: float


class _Handler:
    def __init__(self, owner: Sinks, ip: str) -> None:
        self.owner, self.ip = owner, ip

    @property
    def behaviour(self) -> Behaviour:
        return self.owner.behaviours[self.ip]

    async def handle_RCPT(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        reply = self.behaviour.rcpt.get(address, self.behaviour.rcpt_default)
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        reply = self.behaviour.data
        if reply.startswith("2"):
            arrival = Arrival(
                self.ip,
                str(envelope.mail_from),
                tuple(envelope.rcpt_tos),
                envelope.original_content or b"",
                session.ssl is not None,
                time.monotonic(),
            )
            with self.owner.lock:
                self.owner.arrivals.append(arrival)
        return reply


class _Smtp(SMTP):
    def __init__(self, owner: Sinks, ip: str, **options: Any) -> None:
        super().__init__(_Handler(owner, ip), hostname=f"sink-{ip}", **options)
        self._owner, self._ip = owner, ip

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        with self._owner.lock:
            self._owner.connections[self._ip] = self._owner.connections.get(self._ip, 0) + 1
        super().connection_made(transport)

    async def _handle_client(self) -> None:  # aiosmtpd greets first thing here
        if self._owner.behaviours[self._ip].stall:
            await asyncio.wait_for(self._owner.released.wait(), 60)
        await super()._handle_client()


class _HangUp(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(b"220 sink ready\r\n")

    def data_received(self, data: bytes) -> None:
        self.transport.close()


class Sinks:
    def __init__(self, behaviours: dict[str, Behaviour]) -> None:
        self.behaviours = behaviours
        self.lock = threading.Lock()
        self.arrivals: list[Arrival] = []
        self.connections: dict[str, int] = {}
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self.released = asyncio.Event()
        self._servers: list[asyncio.base_events.Server] = []
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> Sinks:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(30)
        asyncio.run_coroutine_threadsafe(self._end_sessions(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    async def _start(self) -> None:
        self.released = asyncio.Event()
        first = next(iter(self.behaviours))
        for _ in range(20):  # a port free on every address
            with socket.socket() as probe:
                probe.bind((first, 0))
                port = int(probe.getsockname()[1])
            try:
                for ip in self.behaviours:
                    self._servers.append(await self.loop.create_server(self._factory(ip), ip, port))
            except OSError:
                await self._stop()
                continue
            self.port = port
            return
        raise RuntimeError("no port free on every sink address")

    def _factory(self, ip: str) -> Callable[[], asyncio.BaseProtocol]:
        def make() -> asyncio.BaseProtocol:
            behaviour = self.behaviours[ip]
            if behaviour.hang_up:
                return _HangUp()
            options: dict[str, Any] = {}
            if behaviour.tls is not None:
                options = {"tls_context": behaviour.tls, "require_starttls": False}
            return _Smtp(self, ip, **options)

        return make

    async def _stop(self) -> None:
        for server in self._servers:
            server.close()
        self._servers = []

    async def _end_sessions(self) -> None:
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def release(self) -> None:
        """Let stalled greetings go (and every later one)."""
        self.loop.call_soon_threadsafe(self.released.set)

    def got(self, recipient: str) -> list[Arrival]:
        with self.lock:
            return [a for a in self.arrivals if recipient in a.recipients]

    def wait_for(self, recipients: list[str], timeout: float) -> list[Arrival]:
        """The arrivals of `recipients`, once all are in; AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                found = [a for a in self.arrivals if set(a.recipients) & set(recipients)]
                have = {r for a in found for r in a.recipients}
            if set(recipients) <= have:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"not arrived within {timeout} s: {set(recipients) - have}")
            time.sleep(0.02)
