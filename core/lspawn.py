"""qmail-lspawn: local deliveries in a process of their own.

The scheduler hands each local delivery to this process over a pipe and gets
qmail-local's K/Z/D report back. As in qmail, the delivering code runs apart
from the scheduler: here that lets deliveries use the second CPU (Python runs
one thread at a time per process), and it is where deliveries as another user
will switch uid.

Protocol, one JSON object a line each way:
    core -> lspawn  {"n": 7, "rcpt": "...", "sender": "...", "id": 123, "now": 1.5}
                    {"reload": true}        re-read control/* before the next delivery
    lspawn -> core  {"n": 7, "status": "K", "text": "did 1+0+0\\n"}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from core import control, local
from core.durable import GroupCommit
from core.local import Result
from core.paths import QmailRoot
from core.queue import Queue

LINE_MAX = 1 << 20
PROJECT = str(Path(__file__).resolve().parent.parent)  # so that `-m core.lspawn` imports us
CRASHED = Result("Z", "qmail-local crashed. (#4.3.0)\n")


def serve(root: QmailRoot, requests: BinaryIO, replies: BinaryIO, threads: int = 64) -> None:
    """The child's side: deliver each request in a thread, answer as each ends."""
    durability = GroupCommit()
    queue = Queue(root, durability=durability)  # forwards are queued through todo/
    config = [control.load(root)]
    write_lock = threading.Lock()

    def deliver(request: dict[str, Any]) -> None:
        try:
            result = local.deliver(
                root,
                config[0],
                queue,
                str(request["rcpt"]),
                str(request["sender"]),
                int(request["id"]),
                float(request["now"]),
            )
        except Exception as e:  # our bug: defer the delivery, never lose it
            result = Result("Z", f"Internal error in local delivery: {e!r} (#4.3.0)\n")
        line = json.dumps({"n": request["n"], "status": result.status, "text": result.text})
        with write_lock:
            replies.write(line.encode() + b"\n")
            replies.flush()

    with ThreadPoolExecutor(threads, thread_name_prefix="lspawn") as pool:
        for raw in requests:
            request = json.loads(raw)
            if request.get("reload"):
                config[0] = control.load(root)
                continue
            pool.submit(deliver, request)
    durability.close()


class LocalSpawner:
    """The scheduler's side: one child process, requests matched to replies."""

    def __init__(self, root: QmailRoot, on_lost: Callable[[str], None]) -> None:
        self.root = root
        self._on_lost = on_lost
        self._proc: asyncio.subprocess.Process | None = None
        self._pending: dict[int, asyncio.Future[Result]] = {}
        self._next = 0
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "core.lspawn",
            str(self.root.path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=LINE_MAX,
            cwd=PROJECT,
        )
        self._reader = asyncio.ensure_future(self._read(self._proc))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            try:
                line = await proc.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                line = b""
            if not line:
                break
            reply = json.loads(line)
            future = self._pending.pop(int(reply["n"]), None)
            if future is not None and not future.done():
                future.set_result(Result(str(reply["status"]), str(reply["text"])))
        # The child is gone: every delivery it held is deferred, as qmail-lspawn's
        # "crashed" report; a new child takes the next ones.
        for future in self._pending.values():
            if not future.done():
                future.set_result(CRASHED)
        self._pending.clear()
        if self._proc is proc and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
        if self._proc is proc:
            self._proc = None
            self._on_lost(f"lspawn exited with status {proc.returncode}")

    async def deliver(self, rcpt: str, sender: str, msgid: int, now: float) -> Result:
        async with self._lock:
            if self._proc is None:
                await self.start()
            proc = self._proc
        assert proc is not None
        assert proc.stdin is not None
        self._next += 1
        n = self._next
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending[n] = future
        request = {"n": n, "rcpt": rcpt, "sender": sender, "id": msgid, "now": now}
        try:
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            await proc.stdin.drain()
        except (ConnectionError, RuntimeError):
            self._pending.pop(n, None)
            return CRASHED
        return await future

    def reload(self) -> None:
        if self._proc is not None and self._proc.stdin is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                self._proc.stdin.write(b'{"reload": true}\n')

    async def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()  # EOF: the child finishes what it holds, then exits
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            await self._reader


def main() -> int:
    root = QmailRoot(sys.argv[1])
    os.umask(0o077)
    serve(root, sys.stdin.buffer, sys.stdout.buffer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
