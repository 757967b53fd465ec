"""One way to ask the core: over its control socket when a core runs, else
in-process on the files under the root's lock. Both answer with the same
dictionaries, because both end in core.service.Service."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Protocol

from core import protocol
from core.daemon import offline, running_pid
from core.errors import UserError
from core.paths import QmailRoot
from core.service import Service, ServiceError

TIMEOUT = 60.0


class CoreClient(Protocol):
    async def call(self, op: str, **args: Any) -> Any: ...


class RequestFailed(UserError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.error_code = code


class SocketClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._next = 0

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
        return cls(reader, writer)

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

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


class InProcessClient:
    def __init__(self, service: Service) -> None:
        self.service = service

    async def call(self, op: str, **args: Any) -> Any:
        try:
            return await self.service.handle(op, args)
        except ServiceError as e:
            raise RequestFailed(e.code, e.message) from None


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
