"""One way to ask the core, whichever door: over its control socket when a
core runs (`SocketClient`), in-process on the files under the root's lock
when none does (`connect`), or in-process with a core this program runs
itself (`embedded`, the console's default). All answer with the same
dictionaries, because all end in core.service.Service, and `events()`
gives the same stream of `{"event": KIND, "data": {...}}` items."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from core import protocol
from core.controlsock import SUBSCRIBER_QUEUE
from core.daemon import offline, running_pid
from core.errors import UserError
from core.paths import QmailRoot
from core.service import Service, ServiceError

TIMEOUT = 60.0


class CoreClient(Protocol):
    async def call(self, op: str, **args: Any) -> Any: ...

    def events(self, kinds: list[str] | None = None) -> AsyncIterator[dict[str, Any]]: ...


class RequestFailed(UserError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.error_code = code


class SocketClient:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: Path
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._next = 0
        self._path = path  # for events(), which takes a connection of its own

    @classmethod
    async def connect(cls, root: QmailRoot) -> SocketClient | None:
        try:
            reader, writer = await asyncio.open_unix_connection(
                str(root.control_socket), limit=protocol.MAX_LINE * 64
            )
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except PermissionError:
            raise UserError(
                f"{root.control_socket}: access denied (only root and the core's user may"
                " talk to the core)"
            ) from None
        return cls(reader, writer, root.control_socket)

    async def call(self, op: str, **args: Any) -> Any:
        self._next += 1
        self._writer.write(protocol.request(self._next, op, args))
        await self._writer.drain()
        line = await asyncio.wait_for(self._reader.readline(), TIMEOUT)
        if not line:
            raise UserError("the core closed the control socket")
        reply = protocol.decode_reply(line)
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise RequestFailed(str(error.get("code")), str(error.get("message")))
        return reply.get("result")

    async def events(self, kinds: list[str] | None = None) -> AsyncIterator[dict[str, Any]]:
        """The core's events, on a connection of their own."""
        reader, writer = await asyncio.open_unix_connection(
            str(self._path), limit=protocol.MAX_LINE * 64
        )
        try:
            writer.write(protocol.request(1, "subscribe", {"kinds": kinds} if kinds else {}))
            await writer.drain()
            reply = protocol.decode_reply(await reader.readline())
            if not reply.get("ok"):
                error = reply.get("error") or {}
                raise RequestFailed(str(error.get("code")), str(error.get("message")))
            while line := await reader.readline():
                item = protocol.decode_reply(line)
                yield {"event": item.get("event"), "data": item.get("data") or {}}
        finally:
            writer.close()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


class InProcessClient:
    def __init__(self, service: Service) -> None:
        self.service = service

    async def call(self, op: str, **args: Any) -> Any:
        if op == "subscribe":
            raise RequestFailed("bad-request", "use events() to subscribe")
        try:
            return await self.service.handle(op, args)
        except ServiceError as e:
            raise RequestFailed(e.code, e.message) from None

    async def events(self, kinds: list[str] | None = None) -> AsyncIterator[dict[str, Any]]:
        """As the socket's stream: a lagged item when this reader fell behind."""
        sub = self.service.send.events.subscribe(
            SUBSCRIBER_QUEUE, frozenset(kinds) if kinds else None
        )
        try:
            async for event in sub.stream():
                yield {"event": event.kind, "data": event.data}
        finally:
            sub.close()


@contextlib.asynccontextmanager
async def embedded(root: QmailRoot, **options: Any) -> AsyncIterator[InProcessClient]:
    """A core run by this program (the console's embedded default), and a
    client on it. `options` are Core's (smtp=, pop3=, ...). The core serves
    its control socket too, so other programs can attach meanwhile."""
    from core.daemon import Core

    core = Core(root, **options)
    task = asyncio.ensure_future(core.run())
    started = asyncio.ensure_future(core.started.wait())
    await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        started.cancel()
        task.result()  # raises why it could not start (UserError: the root is locked...)
        raise UserError("the core stopped as it started")
    assert core.service is not None
    try:
        yield InProcessClient(core.service)
    finally:
        core.stop()
        await task


@contextlib.asynccontextmanager
async def connect(root: QmailRoot) -> AsyncIterator[CoreClient]:
    """The running core if there is one, else the same code in-process."""
    client = await SocketClient.connect(root)
    if client is not None:
        try:
            yield client
        finally:
            await client.close()
        return
    try:
        async with offline(root) as service:
            yield InProcessClient(service)
    except UserError as e:
        if "another core is running" in e.message:
            pid = running_pid(root)
            raise UserError(
                f"a core is running (pid {pid or '?'}) but {root.control_socket} does not answer"
            ) from None
        raise
