"""Deliveries as another user: one worker process per uid, for a core run as root.

qmail-lspawn forks qmail-local under the recipient's uid and gid (no
supplementary groups) for every delivery. We keep one worker per uid instead,
forked on the first delivery for that uid and stopped when idle, because a
fresh Python process costs tens of milliseconds. The worker never opens the
queue: lspawn passes it the message as an open descriptor (SCM_RIGHTS), and it
hands forwards back for lspawn to queue, as qmail-queue's setuid did for
qmail-local. uid 0 is never used.

Each request and reply is one SOCK_SEQPACKET record of JSON; a request carries
the message descriptor.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from core.durable import GroupCommit, ThreadGroupCommit, drive_steps
from core.fdpass import Records
from core.local import (
    PROGRAM_TIMEOUT,
    Result,
    Rules,
    Target,
    internal_error,
    qmail_local_steps,
)
from core.privileges import become

RECORD_MAX = 1 << 20
SWEEP = 60.0  # seconds between looks for deliveries a worker has held too long
IDLE_EXIT = 300.0  # a worker without work this long is told to exit
CRASHED = Result("Z", "qmail-local crashed. (#4.3.0)\n")
HUNG = PROGRAM_TIMEOUT + 600.0  # seconds a worker may hold a delivery
TIMED_OUT = Result("Z", "Timeout waiting for the delivery process. (#4.3.0)\n")


class ForkServer:
    """A process forked before any thread exists, that forks the workers.

    Forking a process with threads can leave the child holding locks that no
    thread will ever release, and exec'ing a new interpreter would need the
    recipient's uid to be able to read Python and our code (often under
    /root). So lspawn forks this server first thing, and each worker is a fork
    of it that drops to the recipient's uid and gid, with no other groups.
    """

    def __init__(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's coverage is not collected
            parent.close()
            # Let go of lspawn's pipes: the core must see them close when lspawn dies.
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 1)
            os.close(null)
            try:
                _fork_loop(child)
            finally:
                os._exit(0)
        child.close()
        self.sock = parent
        self.pid = pid
        self._lock = threading.Lock()

    def spawn(self, uid: int, gid: int) -> tuple[socket.socket, int]:
        """A new worker running as uid/gid: lspawn's end of its channel, its pid."""
        if uid == 0:
            raise ValueError("never deliver as root")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with self._lock:
                socket.send_fds(self.sock, [json.dumps([uid, gid]).encode()], [theirs.fileno()])
                reply = json.loads(self.sock.recv(RECORD_MAX) or b'{"error": "gone"}')
        finally:
            theirs.close()
        if "pid" not in reply:
            ours.close()
            raise OSError(f"unable to start a delivery process: {reply.get('error')}")
        return ours, int(reply["pid"])

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _fork_loop(sock: socket.socket) -> None:  # pragma: no cover - runs in the fork server
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped by the kernel
    while True:
        data, fds, _, _ = socket.recv_fds(sock, RECORD_MAX, 1)
        if not data:
            return
        uid, gid = json.loads(data)
        try:
            pid = os.fork()
        except OSError as e:
            for fd in fds:
                os.close(fd)
            sock.send(json.dumps({"error": e.strerror}).encode())
            continue
        if pid == 0:
            code = 111
            try:
                sock.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                become(uid, gid)
                os.umask(0o077)
                serve(socket.socket(fileno=fds[0]))
                code = 0
            finally:
                os._exit(code)
        for fd in fds:
            os.close(fd)
        sock.send(json.dumps({"pid": pid}).encode())


Replied = Callable[[Result], None]


class InFlight:
    """Deliveries handed on and not answered yet, counted so that a server at
    the end of its input answers every one it holds before it goes (one
    between two sync points is in no thread and no queue)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._count = 0

    def start(self) -> None:
        with self._cond:
            self._count += 1

    def end(self) -> None:
        with self._cond:
            self._count -= 1
            self._cond.notify_all()

    def wait_all(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._count == 0)


class Worker:
    """lspawn's handle on one worker process."""

    def __init__(self, uid: int, gid: int, forks: ForkServer, on_exit: Any) -> None:
        self.uid, self.gid = uid, gid
        self.sock, self.pid = forks.spawn(uid, gid)
        self._send_lock = threading.Lock()
        self._pending: dict[int, tuple[Replied, float]] = {}  # n -> (callback, deadline)
        self._numbers = itertools.count(1)
        self._on_exit = on_exit
        self.busy = 0
        self.used = time.monotonic()
        self.alive = True
        self._records = Records(self.sock, RECORD_MAX)
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"asuser-{uid}")
        self._reader.start()

    def send(self, request: dict[str, Any], message_fd: int, replied: Replied) -> None:
        """Hand a delivery over; `replied(result)` runs on this worker's reader
        thread when it is done (CRASHED if the worker dies first)."""
        n = next(self._numbers)
        self._pending[n] = (replied, time.monotonic() + HUNG)
        try:
            with self._send_lock:
                socket.send_fds(self.sock, [json.dumps({**request, "n": n}).encode()], [message_fd])
        except OSError:
            if self._pending.pop(n, None) is not None:
                replied(CRASHED)

    def _read(self) -> None:
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        while True:
            if not poller.poll(SWEEP * 1000):
                self._sweep()
                continue
            try:
                data = self._records.recv()
            except OSError:
                data = b""
            if not data:
                break
            reply = json.loads(data)
            entry = self._pending.pop(int(reply["n"]), None)
            if entry is not None:
                forward = reply.get("forward")
                entry[0](
                    Result(
                        str(reply["status"]),
                        str(reply["text"]),
                        (str(forward[0]), tuple(forward[1])) if forward else None,
                    )
                )
        self.alive = False
        while self._pending:
            _, (replied, _) = self._pending.popitem()
            replied(CRASHED)
        self.sock.close()
        self._on_exit(self)

    def _sweep(self) -> None:
        """Defer what a worker has held past any program's time limit (stuck on a
        dead NFS mount, say): its slot is given back; a late answer is dropped."""
        now = time.monotonic()
        for n, (replied, deadline) in list(self._pending.items()):
            if deadline < now and self._pending.pop(n, None) is not None:
                replied(TIMED_OUT)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)


class UserWorkers:
    """The workers of one lspawn, by (uid, gid)."""

    def __init__(self, forks: ForkServer | None) -> None:
        self._forks = forks
        self._workers: dict[tuple[int, int], Worker] = {}
        self._lock = threading.Lock()

    def send(
        self, uid: int, gid: int, request: dict[str, Any], message_fd: int, replied: Replied
    ) -> None:
        """Deliver as uid/gid; `replied(result)` runs on a reader thread when done.
        The caller keeps `message_fd` open until then."""
        if self._forks is None:
            raise OSError("deliveries as another user need a core run as root")
        now = time.monotonic()
        with self._lock:
            worker = self._workers.get((uid, gid))
            if worker is None or not worker.alive:
                worker = self._workers[(uid, gid)] = Worker(uid, gid, self._forks, self._gone)
            worker.used = now
            idle = [w for w in self._workers.values() if w.busy == 0 and now - w.used > IDLE_EXIT]
            worker.busy += 1
        for other in idle:
            other.close()  # EOF: it finishes what it holds (nothing) and exits

        def done(result: Result) -> None:
            with self._lock:
                worker.busy -= 1
                worker.used = time.monotonic()
            replied(result)

        worker.send(request, message_fd, done)

    def _gone(self, worker: Worker) -> None:
        with self._lock:
            if self._workers.get((worker.uid, worker.gid)) is worker:
                del self._workers[(worker.uid, worker.gid)]

    def close(self) -> None:
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.close()
        for worker in workers:
            worker._reader.join(60)
        if self._forks is not None:
            self._forks.close()


# -- the worker process --------------------------------------------------------


def serve(sock: socket.socket) -> None:
    """Deliver each request, as this process's uid, until lspawn hangs up.

    A delivery runs as steps (local.qmail_local_steps, durable.drive_steps):
    this thread takes each up to its first sync point, and the syncer thread
    takes it on after each syncfs, for the whole batch at once. A step that may
    block for long (an mbox lock, a program, both up to qmail's limits) goes on
    in a pool thread. One thread per delivery, each waking on its own after
    every syncfs, cost about 200 futex calls a delivery in GIL hand-offs.
    """
    durable = GroupCommit()
    syncer = ThreadGroupCommit(durable)
    pool = ThreadPoolExecutor(64, thread_name_prefix="deliver")
    send_lock = threading.Lock()
    in_flight = InFlight()  # deliveries handed on and not answered yet

    def finish(request: dict[str, Any], fd: int, result: Result) -> None:
        os.close(fd)
        reply = {"n": request["n"], "status": result.status, "text": result.text}
        if result.forward is not None:
            reply["forward"] = [result.forward[0], list(result.forward[1])]
        with send_lock, contextlib.suppress(OSError):
            sock.send(json.dumps(reply).encode())
        in_flight.end()

    def delivered(request: dict[str, Any], fd: int, result: Result | None, error: object) -> None:
        finish(request, fd, result if result is not None else internal_error(error))

    records = Records(sock, RECORD_MAX)
    while True:
        data, fds = records.recv_fds(1)
        if not data:
            for fd in fds:
                os.close(fd)
            break
        if not fds:
            continue
        in_flight.start()
        request: dict[str, Any] = {"n": 0}
        try:
            request = json.loads(data)
            target = Target(
                str(request["user"]),
                Path(str(request["home"])),
                str(request["local"]),
                str(request["dash"]),
                str(request["ext"]),
                str(request["host"]),
            )
            steps = qmail_local_steps(
                target,
                str(request["sender"]),
                str(request["defaultdelivery"]),
                fds[0],
                forward=None,
                rules=Rules(),
                now=float(request["now"]),
                maildirs_only=bool(request.get("maildirs_only")),
            )
        except Exception as e:
            finish(request, fds[0], internal_error(e))
            continue
        drive_steps(steps, syncer, functools.partial(delivered, request, fds[0]), pool.submit)
    in_flight.wait_all()
    pool.shutdown()
    syncer.close()
    durable.close()
