"""The control socket run/control.sock: JSON lines in, JSON lines out.

A client that sends garbage or an over-long line gets an error reply and is
disconnected; nothing it sends can stop the core.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from core import protocol
from core.service import Service, ServiceError


class ControlSocket:
    def __init__(self, path: Path, service: Service, mode: int = 0o600) -> None:
        self.path = path
        self.service = service
        self.mode = mode
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # stale: we hold the root's lock, no other core owns it
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._client, path=str(self.path), limit=protocol.MAX_LINE
            )
        finally:
            os.umask(old)
        os.chmod(self.path, self.mode)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(protocol.error(None, "too-long", "request line too long"))
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                try:
                    req = protocol.decode_request(line)
                except protocol.ProtocolError as e:
                    writer.write(protocol.error(None, "bad-request", str(e)))
                    break
                try:
                    result = await self.service.handle(req.op, req.args)
                    writer.write(protocol.ok(req.id, result))
                except ServiceError as e:
                    writer.write(protocol.error(req.id, e.code, e.message))
                except Exception as e:  # our bug: answer, log, keep serving others
                    writer.write(protocol.error(req.id, "internal", f"internal error: {e!r}"))
                    self.service.send.log.line(f"warning: control request {req.op} failed: {e!r}")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if task is not None:
                self._clients.discard(task)
            with contextlib.suppress(Exception):
                await writer.drain()
            writer.close()
