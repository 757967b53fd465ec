"""The control socket run/control.sock: JSON lines in, JSON lines out.

A client that sends garbage or an over-long line gets an error reply and is
disconnected; nothing it sends can stop the core.

`subscribe` turns the connection into a stream of events, one JSON line
each: `{"v": 1, "event": KIND, "data": {...}}`. The core never waits for a
subscriber: events wait in a bounded queue, and when a slow reader lets it
fill, the oldest go and a `{"event": "lagged", "data": {"dropped": N}}` line
says so (time to read a new snapshot).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from core import protocol
from core.errors import UserError
from core.service import Service, ServiceError

SUBSCRIBER_QUEUE = 5000  # events kept for one slow subscriber before the oldest go


class ControlSocket:
    def __init__(self, path: Path, service: Service, group: int | None = None) -> None:
        self.path = path
        self.service = service
        self.group = group  # with a group: mode 0660 and that group; else 0600
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
        if self.group is not None:
            try:
                os.chown(self.path, -1, self.group)
            except OSError as e:
                raise UserError(
                    f"{self.path}: cannot give it to group {self.group}: {e.strerror}"
                ) from None
            os.chmod(self.path, 0o660)
        else:
            os.chmod(self.path, 0o600)

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
                if req.op == "subscribe":
                    await self._stream(req, writer)
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
        except Exception as e:  # our bug: this client goes, the core stays
            self.service.send.log.line(f"warning: control client dropped: {e!r}")
        finally:
            if task is not None:
                self._clients.discard(task)
            with contextlib.suppress(Exception):
                await writer.drain()
            writer.close()

    async def _stream(self, req: protocol.Request, writer: asyncio.StreamWriter) -> None:
        kinds = req.args.get("kinds")
        if kinds is not None and not (
            isinstance(kinds, list) and all(isinstance(k, str) for k in kinds)
        ):
            writer.write(protocol.error(req.id, "bad-request", "kinds must be a list of names"))
            return
        wanted = set(kinds) if kinds else None
        size = req.args.get("queue", SUBSCRIBER_QUEUE)
        if not isinstance(size, int) or isinstance(size, bool):
            size = SUBSCRIBER_QUEUE
        sub = self.service.send.events.subscribe(
            max(10, min(size, SUBSCRIBER_QUEUE)), frozenset(wanted) if wanted else None
        )
        try:
            writer.write(protocol.ok(req.id, {"subscribed": sorted(wanted) if wanted else "all"}))
            await writer.drain()
            async for event in sub.stream():
                writer.write(protocol.event(event.kind, event.data))
                if writer.transport.get_write_buffer_size() > 0:
                    await writer.drain()
        finally:
            sub.close()
