"""SMTP sessions in worker processes, so that the receiver uses every CPU.

The core stays tcpserver: it accepts each connection, applies the tcp rules
and the connection limits (so `concurrencyincoming` and `concurrencyperip`
count across all workers), and then passes the socket to a worker over a
SOCK_SEQPACKET pair (SCM_RIGHTS) with the rule's environment. The worker
runs qmail-smtpd's session (core/smtpd.py through the listener's
SmtpConnection, byte for byte the in-process one, STARTTLS included) and
hands each message back to the core, which queues it with the same group
commit as every other message and answers with its id; the worker's 250
waits for that answer. Workers never open the queue: one process writes
it, and one syncfs makes many workers' messages durable at once.

A worker of a core run as root runs as qmail-smtpd does in the seed guide,
as an unprivileged user (qmaild if the system has one, else nobody), with no
supplementary groups: it reads no file. The core sends it what the session
needs, the control files' policy and the STARTTLS certificate, at its start
and on every reload.

Everything else between the two travels on a SOCK_STREAM pair as frames, a
4-byte length, a kind byte and the payload:

    worker -> core  U                            up: unprivileged, configured
                    Q {"q": n, "sender": s, "rcpts": [...]}\\n<message>
                    C {"cid": n}                 a connection has ended
                    L text                       a line for the log
    core -> worker  R {"q": n, "id": 123} | {"q": n, "error": "Ztext"}
                    H {"policy": {...}, "local": "me", "pem": "..."|null}   settings
                    S                            stop: 421 to idle clients, finish, exit
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import pwd
import signal
import socket
import ssl
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.fdpass import Records
from core.listener import Limits, Settings, SmtpConnection, SmtpServer, plain_ip
from core.paths import QmailRoot
from core.privileges import become
from core.smtpd import Policy, server_tls

if TYPE_CHECKING:
    from core.send import Written  # not imported here: a worker has no scheduler

FRAME = struct.Struct("!IB")
META_MAX = 65536
STOP_GRACE = 5.0  # a worker told to stop waits this long for clients mid-message
PROJECT = str(Path(__file__).resolve().parent.parent)
NOBODY = 65534
WORKER_START = 30.0  # seconds a new worker may take to say it is up
QQ_TROUBLE = "Zqq temporary problem (#4.3.0)"  # a worker's message with no core to queue it
LAG_GRACE = 0.5  # seconds a connection over a limit waits for count-outs on their way
HELD_MAX = 64  # connections waiting so at most; more are refused at once


def _keep(tasks: set[asyncio.Future[Any]], coro: Any) -> None:
    """Run `coro` as a task held in `tasks` until it ends (the loop keeps
    only a weak reference to a task)."""
    task = asyncio.ensure_future(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


class Channel(asyncio.BufferedProtocol):
    """Frames over a stream socket, both ways."""

    def __init__(self, on_frame: Callable[[bytes, bytes], None], on_lost: Callable[[], None]):
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._inbox = bytearray(1 << 16)
        self._pending = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._inbox)

    def buffer_updated(self, nbytes: int) -> None:
        pending = self._pending
        pending += memoryview(self._inbox)[:nbytes]
        start = 0
        while len(pending) - start >= FRAME.size:
            length, kind = FRAME.unpack_from(pending, start)
            end = start + FRAME.size + length
            if len(pending) < end:
                break
            payload = bytes(pending[start + FRAME.size : end])
            start = end
            self.on_frame(bytes((kind,)), payload)
        del pending[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.on_lost()

    def send(self, kind: bytes, *parts: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        length = sum(len(p) for p in parts)
        self.transport.writelines([FRAME.pack(length, kind[0]), *parts])


# -- the core's side -------------------------------------------------------------------


class _Handed:
    """A connection given to a worker, as the limits count it."""

    __slots__ = ("cid", "ip")

    def __init__(self, cid: int, ip: str) -> None:
        self.cid = cid
        self.ip = ip


# A connection waiting for count-outs: deadline, socket, peer, ip, host, rules.
_Held = tuple[float, socket.socket, Any, str, str | None, Any]


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process, handoff: socket.socket) -> None:
        self.proc = proc
        self.handoff = handoff
        self.channel: Channel | None = None
        self.connections: dict[int, _Handed] = {}
        self.alive = True
        self.up: asyncio.Future[None] = asyncio.get_running_loop().create_future()


EnqueueThen = Callable[[bytes, str, list[str], "Written"], None]


class SmtpWorkers(SmtpServer):
    """The listener with its sessions in `count` worker processes."""

    def __init__(
        self, root: QmailRoot, count: int, enqueue_then: EnqueueThen, *args: Any, **kwargs: Any
    ) -> None:
        self.root = root
        self.count = count
        self.enqueue_then = enqueue_then
        self.run_as = unprivileged() if os.geteuid() == 0 else ()
        self.workers: list[_Worker] = []
        self._listen: socket.socket | None = None
        self._cids = itertools.count(1)
        self._closing = False
        self._tasks: set[asyncio.Future[Any]] = set()
        self._held: list[_Held] = []
        self._held_timer: asyncio.TimerHandle | None = None
        self._admitting = False
        super().__init__(*args, **kwargs)

    @property
    def settings(self) -> Settings:
        return self._settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        """A reload: new connections are screened with the new rules and limits,
        and each worker gets the new session settings."""
        self._settings = settings
        for worker in getattr(self, "workers", ()):
            if worker.channel is not None:
                worker.channel.send(b"H", self._session_settings())

    def _session_settings(self) -> bytes:
        """What a worker's sessions need, as the core has read it: the policy,
        TCPLOCALHOST, and the certificate with its key when STARTTLS is on."""
        settings = self._settings
        pem = None
        if settings.tls is not None:
            with contextlib.suppress(OSError):
                pem = self.root.control_file("servercert.pem").read_bytes().decode("latin-1")
        policy = {
            name: sorted(value) if isinstance(value, frozenset) else value
            for name, value in dataclasses.asdict(settings.policy).items()
        }
        return json.dumps({"policy": policy, "local": settings.local, "pem": pem}).encode()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listen = socket.create_server((host, port), family=family, backlog=self.backlog)
        listen.setblocking(False)
        try:
            for _ in range(self.count):
                self.workers.append(await self._spawn())
        except BaseException:
            listen.close()
            raise
        self._listen = listen
        asyncio.get_running_loop().add_reader(listen.fileno(), self._accept)
        name = listen.getsockname()
        self.address = f"{name[0]}:{name[1]}"
        return str(name[0]), int(name[1])

    def status(self) -> dict[str, Any]:
        """Listening.status, and each worker process with its sessions."""
        workers = [
            {"pid": w.proc.pid, "sessions": len(w.connections), "alive": w.alive}
            for w in self.workers
        ]
        return {**super().status(), "workers": workers}

    async def _spawn(self) -> _Worker:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        stream, their_stream = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "core.smtpworker",
                str(theirs.fileno()),
                str(their_stream.fileno()),
                *(str(n) for n in self.run_as),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(), their_stream.fileno()),
                cwd=PROJECT,
                start_new_session=True,  # a Ctrl-C or a kill of our group is not for it
            )
        finally:
            theirs.close()
            their_stream.close()
        ours.setblocking(False)
        worker = _Worker(proc, ours)
        _, channel = await loop.create_unix_connection(
            lambda: Channel(
                lambda kind, payload: self._frame(worker, kind, payload),
                lambda: self._lost(worker),
            ),
            sock=stream,
        )
        worker.channel = channel
        channel.send(b"H", self._session_settings())  # before its first client
        try:  # started, unprivileged, configured: then it counts as up
            await asyncio.wait_for(asyncio.shield(worker.up), WORKER_START)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise OSError(f"an SMTP worker did not start within {WORKER_START:.0f} s") from None
        return worker

    def _accept(self) -> None:
        assert self._listen is not None
        for _ in range(self.backlog):
            try:
                conn, peer = self._listen.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: tcpserver carries on too
                self.log(f"alert: unable to accept an SMTP connection: {e.strerror}")
                return
            self._admit_new(conn, peer)

    def _admit_new(self, conn: socket.socket, peer: Any) -> None:
        ip = plain_ip(str(peer[0]))
        looked = self.rules_for(ip)
        if looked is None:
            conn.close()  # tcpserver drops the connection when it cannot read its rules
            return
        rules, named = looked
        if named:
            _keep(self._tasks, self._named(conn, peer, ip, rules))
            return
        self._hand(conn, peer, ip, None, rules)

    async def _named(self, conn: socket.socket, peer: Any, ip: str, rules: Any) -> None:
        try:
            host = await self.client_name(ip)
        except BaseException:
            conn.close()
            raise
        self._hand(conn, peer, ip, host, rules)

    def _hand(
        self,
        conn: socket.socket,
        peer: Any,
        ip: str,
        host: str | None,
        rules: Any,
        waited: bool = False,
    ) -> None:
        if not waited and self._hold(conn, peer, ip, host, rules):
            return
        try:
            sockname = conn.getsockname()
            handed = _Handed(next(self._cids), ip)
            env, refusal = self.screen(None, ip, peer, sockname, host, rules)
            if env is None:
                if refusal:
                    conn.setblocking(False)
                    with contextlib.suppress(OSError):
                        conn.send(refusal)
                return
            meta = json.dumps({"cid": handed.cid, "ip": ip, "env": env}).encode()
            worker = self._pass(conn, meta)
            if worker is None:  # no worker alive, or every one is behind: busy
                self.log(f"alert: no SMTP worker took the connection from {ip}; said 421")
                self.turned_away(ip)
                conn.setblocking(False)
                with contextlib.suppress(OSError):
                    conn.send(self.too_many)
                return
            worker.connections[handed.cid] = handed
        except OSError:
            pass  # the client went away while we looked at it
        finally:
            conn.close()  # the worker has its own descriptor now

    def _hold(self, conn: socket.socket, peer: Any, ip: str, host: str | None, rules: Any) -> bool:
        """Keep a connection that a limit would refuse, for a moment.

        A worker ends a session when the client quits, and the core counts it
        out only when the worker's word arrives: a client that quits and
        connects again at once would meet its old session's count and get a
        421 that tcpserver (which hears of its child's exit at once) never
        gives. So such a connection waits up to LAG_GRACE for count-outs and is
        screened again as each arrives; then it is refused as before."""
        if not self.full_for(ip) or len(self._held) >= HELD_MAX or self._closing:
            return False
        self._held.append((time.monotonic() + LAG_GRACE, conn, peer, ip, host, rules))
        if self._held_timer is None:
            self._held_timer = asyncio.get_running_loop().call_later(LAG_GRACE, self._expire)
        return True

    def count_out(self, ip: str) -> None:
        super().count_out(ip)
        if self._held:
            self._admit_held(time.monotonic())

    def _admit_held(self, now: float) -> None:
        """Screen again every held connection that fits now, or whose time is up
        (oldest first; one refused now gets its 421)."""
        if self._admitting:
            return  # a count-out while screening: the loop below sees it
        self._admitting = True
        try:
            while True:
                ready = [h for h in self._held if h[0] <= now or not self.full_for(h[3])]
                if not ready:
                    return
                held = ready[0]
                self._held.remove(held)
                _, conn, peer, ip, host, rules = held
                self._hand(conn, peer, ip, host, rules, waited=True)
        finally:
            self._admitting = False

    def _expire(self) -> None:
        self._held_timer = None
        self._admit_held(time.monotonic())
        if self._held:
            delay = max(0.0, min(h[0] for h in self._held) - time.monotonic())
            self._held_timer = asyncio.get_running_loop().call_later(delay, self._expire)

    def _pass(self, conn: socket.socket, meta: bytes) -> _Worker | None:
        """Give the connection to the least busy worker that takes it."""
        alive = [w for w in self.workers if w.alive and w.channel is not None]
        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [conn.fileno()]))]
        for worker in sorted(alive, key=lambda w: len(w.connections)):
            try:
                worker.handoff.sendmsg([meta], fds)
            except BlockingIOError:
                continue  # its backlog of handed connections is full
            except OSError as e:
                self.log(f"alert: unable to pass a connection to an SMTP worker: {e.strerror}")
                continue
            return worker
        return None

    def _frame(self, worker: _Worker, kind: bytes, payload: bytes) -> None:
        if kind == b"U":
            if not worker.up.done():
                worker.up.set_result(None)
        elif kind == b"Q":
            self._enqueue(worker, payload)
        elif kind == b"C":
            handed = worker.connections.pop(int(json.loads(payload)["cid"]), None)
            if handed is not None:
                self.count_out(handed.ip)
        elif kind == b"L":
            self.log(payload.decode("utf-8", "surrogateescape"))

    def _enqueue(self, worker: _Worker, payload: bytes) -> None:
        head, _, message = payload.partition(b"\n")
        request = json.loads(head)

        def written(msgid: int | None, error: BaseException | None) -> None:
            reply: dict[str, Any] = {"q": request["q"]}
            if error is None:
                reply["id"] = msgid
            else:  # a failure to queue is a 451 (or 554), never a lost message
                reply["error"] = self.queue_error(error)
            if worker.channel is not None:
                worker.channel.send(b"R", json.dumps(reply).encode())

        self.enqueue_then(message, request["sender"], request["rcpts"], written)

    def _lost(self, worker: _Worker) -> None:
        """A worker is gone: its clients are cut off (none was told 250 for a
        message not queued); count them out and start another worker."""
        worker.alive = False
        worker.channel = None
        worker.handoff.close()
        for handed in worker.connections.values():
            self.count_out(handed.ip)
        worker.connections.clear()
        _keep(self._tasks, self._replace(worker))

    async def _replace(self, worker: _Worker) -> None:
        status = await worker.proc.wait()
        if self._closing:
            return
        pid = worker.proc.pid
        self.log(f"alert: SMTP worker {pid} exited with status {status}; starting another")
        with contextlib.suppress(ValueError):
            self.workers.remove(worker)
        try:
            new = await self._spawn()
        except OSError as e:
            self.log(f"alert: unable to start an SMTP worker: {e.strerror or e}")
            return
        self.workers.append(new)
        self.log(f"info: SMTP worker {new.proc.pid} started in place of {pid}")

    async def close(self) -> None:
        self._closing = True
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        for _, conn, *_ in self._held:
            conn.close()
        self._held.clear()
        if self._listen is not None:
            asyncio.get_running_loop().remove_reader(self._listen.fileno())
            self._listen.close()
            self._listen = None
        for worker in self.workers:
            if worker.channel is not None:
                worker.channel.send(b"S")
        for worker in self.workers:
            try:
                await asyncio.wait_for(worker.proc.wait(), STOP_GRACE + 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.kill()
                await worker.proc.wait()
        for task in list(self._tasks):
            if not task.done():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(task, 5)


# -- the worker's side -----------------------------------------------------------------


class Refused(Exception):
    """The core's answer to a message it could not queue: qmail-queue's text."""


class _HandedConnection(SmtpConnection):
    def __init__(self, server: WorkerServer, cid: int, ip: str, env: dict[str, str]) -> None:
        super().__init__(server)
        self.cid = cid
        self.ip = ip
        self.env = env

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.admit(self, self.ip)  # counted already, by the core
        self.begin(self.env)


class WorkerServer(SmtpServer):
    def __init__(self, handoff: socket.socket) -> None:
        self.handoff = handoff
        self._handed = Records(handoff, META_MAX)
        self.channel: Channel | None = None
        self._waiting: dict[int, asyncio.Future[int]] = {}
        self._q = itertools.count(1)
        self._tasks: set[asyncio.Future[None]] = set()
        self.stopping = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        nothing_yet = Settings(Policy("", 0, 1, frozenset()), None, Limits(), "", None)
        super().__init__(nothing_yet, self._enqueue, self._log, _refusal_text)

    def configure(self, payload: bytes) -> None:
        """The core's settings for new sessions (the first ones, or a reload)."""
        given = json.loads(payload)
        fields = dict(given["policy"])
        for name in ("rcpthosts", "morercpthosts", "badmailfrom"):
            fields[name] = frozenset(fields.get(name) or ())  # no rcpthosts: relay nothing
        tls = None
        if given.get("pem"):
            with contextlib.suppress(OSError):  # then no STARTTLS offered
                tls = _tls(given["pem"])
        self.settings = Settings(Policy(**fields), None, Limits(), str(given["local"]), tls)
        if not self.ready.done():
            self.ready.set_result(None)

    def admit(self, connection: SmtpConnection, ip: str) -> bytes | None:
        self._connections.add(connection)  # the core has counted it
        return None

    def leave(self, connection: SmtpConnection, ip: str) -> None:
        self._connections.discard(connection)
        if self.channel is not None and isinstance(connection, _HandedConnection):
            self.channel.send(b"C", json.dumps({"cid": connection.cid}).encode())
        if self.stopping and not self._connections and not self.done.done():
            self.done.set_result(None)

    def _log(self, text: str) -> None:
        if self.channel is not None:
            self.channel.send(b"L", text.encode("utf-8", "surrogateescape"))

    async def _enqueue(self, message: bytes, sender: str, recipients: list[str]) -> int:
        if self.channel is None:  # the core is gone: nobody can queue it
            raise Refused(QQ_TROUBLE)
        q = next(self._q)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[q] = future
        head = json.dumps({"q": q, "sender": sender, "rcpts": recipients}).encode()
        self.channel.send(b"Q", head, b"\n", message)
        return await future

    def frame(self, kind: bytes, payload: bytes) -> None:
        if kind == b"R":
            reply = json.loads(payload)
            future = self._waiting.pop(int(reply["q"]), None)
            if future is not None and not future.done():
                if "error" in reply:
                    future.set_exception(Refused(str(reply["error"])))
                else:
                    future.set_result(int(reply["id"]))
        elif kind == b"H":
            with contextlib.suppress(Exception):  # keep the old settings on trouble
                self.configure(payload)
        elif kind == b"S":
            self.stop()

    def stop(self) -> None:
        """As the in-process listener stops: idle clients get a 421 at once, a
        client mid-message has STOP_GRACE seconds to finish."""
        self.stopping = True
        for connection in list(self._connections):
            connection.shutdown()
        if not self._connections and not self.done.done():
            self.done.set_result(None)
        asyncio.get_running_loop().call_later(STOP_GRACE, self._cut_off)

    def _cut_off(self) -> None:
        """Every client still here is cut off, and the worker is done."""
        for connection in list(self._connections):
            if connection.transport is not None:
                connection.transport.abort()
        if not self.done.done():
            self.done.set_result(None)

    def lost(self) -> None:
        """The core is gone: nothing more can be queued."""
        self.channel = None
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(Refused(QQ_TROUBLE))
        self._waiting.clear()
        self._cut_off()

    def take(self) -> None:
        """Connections the core hands over: each a descriptor and its environment."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                meta, fds = self._handed.recv_fds(1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                meta, fds = b"", []
            if not meta:
                for fd in fds:
                    os.close(fd)
                loop.remove_reader(self.handoff.fileno())
                self.lost()
                return
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                continue
            request = json.loads(meta)
            sock = socket.socket(fileno=fds[0])
            if self.stopping:
                sock.close()
                continue
            connection = _HandedConnection(
                self, int(request["cid"]), str(request["ip"]), dict(request["env"])
            )
            _keep(self._tasks, self._attach(connection, sock))

    async def _attach(self, connection: _HandedConnection, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(lambda: connection, sock)
        except OSError:  # gone already: the core must count it out all the same
            sock.close()
            if connection.transport is None:
                connection.counted = True
                self.leave(connection, connection.ip)


def _tls(pem: str) -> ssl.SSLContext | None:
    """STARTTLS's context from the certificate and key the core read: through
    a file only we can read, for the moment ssl takes to load it."""
    with tempfile.TemporaryDirectory(prefix="qmailtui-smtp-") as private:
        path = Path(private) / "servercert.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            data = memoryview(pem.encode("latin-1"))
            while data:
                data = data[os.write(fd, data) :]
        finally:
            os.close(fd)
        context, _ = server_tls(path)
    return context


def unprivileged() -> tuple[int, int]:
    """Whom a worker runs as when the core is root: qmail-smtpd's qmaild if
    this system has that user, else nobody."""
    for name in ("qmaild", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            if entry.pw_uid != 0:
                return entry.pw_uid, entry.pw_gid
    return NOBODY, NOBODY


def _refusal_text(e: BaseException) -> str:
    if isinstance(e, Refused):
        return str(e)
    return QQ_TROUBLE


async def _work(handoff: socket.socket, stream: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    server = WorkerServer(handoff)
    _, channel = await loop.create_unix_connection(
        lambda: Channel(server.frame, server.lost), sock=stream
    )
    server.channel = channel
    await asyncio.wait([server.ready, server.done], return_when=asyncio.FIRST_COMPLETED)
    handoff.setblocking(False)
    loop.add_reader(handoff.fileno(), server.take)  # clients only once we have settings
    channel.send(b"U")
    await server.done


def main() -> int:
    handoff = socket.socket(fileno=int(sys.argv[1]))
    stream = socket.socket(fileno=int(sys.argv[2]))
    if len(sys.argv) > 4:  # before a byte from the network: as qmaild, or nobody
        become(int(sys.argv[3]), int(sys.argv[4]))
    os.umask(0o077)
    # The core decides when we stop (S, or its end of the stream closing): a
    # Ctrl-C or a TERM sent to the whole process group must not cut clients off
    # mid-message before the core has told them 421.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_work(handoff, stream))
    return 0


if __name__ == "__main__":
    sys.exit(main())
