"""Core: one running mail host. Takes the root's lock, wires the scheduler,
the trigger, the control socket and the signals, and stops without losing
anything. `offline()` gives the same Service to a command run with no core.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import signal
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core import control, users
from core.clock import Clock, SystemClock
from core.control import Config
from core.controlsock import ControlSocket
from core.durable import GroupCommit, LoopGroupCommit
from core.errors import ExitCode, Problem, UserError
from core.events import Events
from core.listener import Settings, SmtpServer, settings_for
from core.local import Result
from core.log import Log
from core.lspawn import Deliverer, LocalSpawner
from core.paths import QmailRoot
from core.queue import Queue, QueueError
from core.send import Send, Written
from core.service import Service

if TYPE_CHECKING:
    from core.pop3listen import Pop3Server
    from core.rspawn import Remote

QUEUE_THREADS = 4
ID_BLOCK = 1024  # message ids reserved at once (see _run_locked)
ASSIGN_CHECK = 1.0  # seconds between looks at users/assign


def lock_root(root: QmailRoot) -> int:
    """Take run/lock; raise UserError naming the pid of the core holding it."""
    try:
        root.run.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(root.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise UserError(f"unable to open {root.lock_file}: {e.strerror}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"another core is running (pid {running_pid(root) or '?'})") from None
    return fd


def running_pid(root: QmailRoot) -> int | None:
    try:
        text = root.pid_file.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def queue_error(e: BaseException) -> str:
    """qmail-queue's error string for a failure to queue: letter, then text."""
    if isinstance(e, QueueError):
        return ("D" if e.permanent else "Z") + e.text
    return "Zqq write error or disk full (#4.3.0)"


def check_root(root: QmailRoot) -> None:
    if not root.path.is_dir():
        raise UserError(f"{root.path}: no such qmail root (create one with qmailtui init)")
    missing = Queue(root).missing_layout()
    if missing:
        raise UserError(f"{missing[0]}: missing; is {root.path} a qmail root?")


def strict_config(root: QmailRoot) -> Config:
    config = control.load(root)
    if config.errors:
        raise ConfigErrors(root, config.errors)
    return config


class ConfigErrors(UserError):
    def __init__(self, root: QmailRoot, problems: list[Problem]) -> None:
        self.lines = [p.format(root.path) for p in problems]
        super().__init__("\n".join(self.lines), code=ExitCode.FAILURE)
        self.problems = problems


def make_send(
    root: QmailRoot,
    queue: Queue,
    config: Callable[[], Config],
    *,
    clock: Clock,
    log: Log,
    events: Events,
    executor: ThreadPoolExecutor,
    spawner: LocalSpawner | None = None,
    remote: Remote | None = None,
) -> Send:
    """The scheduler; local deliveries go to `spawner`'s process, or (for the
    command line with no core, which only delivers to nobody) run in-process."""

    deliverer = Deliverer(root, queue, config)

    def deliver_local(recipient: str, sender: str, msgid: int, now: float) -> Result:
        return deliverer.deliver(recipient, sender, msgid, now)

    return Send(
        queue,
        config,
        clock=clock,
        log=log,
        events=events,
        local=spawner.deliver if spawner is not None else deliver_local,
        executor=executor,
        direct=spawner.deliver if spawner is not None else None,
        **({"remote": remote.deliver} if remote is not None else {}),
    )


class Core:
    def __init__(
        self,
        root: QmailRoot,
        *,
        clock: Clock | None = None,
        log_stderr: bool = False,
        ready: Callable[[str], None] | None = None,
        smtp: tuple[str, int] | None = None,
        resolver: tuple[str, int] | None = None,
        remote_port: int = 25,
        pop3: tuple[str, int] | None = None,
        checkpassword: list[str] | None = None,
        control_group: int | None = None,
        smtp_workers: int = 0,
    ) -> None:
        self.root = root
        self.smtp_address = smtp  # where to listen; None: no SMTP listener
        self.smtp_workers = smtp_workers  # processes for SMTP sessions; 0: in the core
        self.resolver_address = resolver  # DNS server to ask; None: the system's
        self.remote_port = remote_port  # where a route names no port
        self.remote: Remote | None = None
        self.pop3_address = pop3  # where to listen for POP3; None: not at all
        self.checkpassword = checkpassword  # an external checkpassword; None: users/passwd
        self.control_group = control_group  # may also use run/control.sock (mode 0660)
        self.pop3: Pop3Server | None = None
        self._closing: asyncio.Task[None] | None = None
        self.smtp: SmtpServer | None = None
        self._late: asyncio.Future[None] | None = None  # a listener starting after a reload
        self.clock = clock or SystemClock()
        self.events = Events()
        self.log = Log(root.log, clock=self.clock, events=self.events, stderr=log_stderr)
        self._ready = ready
        self._config: Config | None = None
        self.started = asyncio.Event()
        self._stopping = asyncio.Event()
        self.send: Send | None = None
        self.service: Service | None = None
        self.spawner: LocalSpawner | None = None

    def config(self) -> Config:
        assert self._config is not None
        return self._config

    def stop(self) -> None:
        """TERM: no new connections from now on; then deliveries wind down."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        with contextlib.suppress(RuntimeError):  # no loop: nothing is listening
            self._closing = asyncio.get_running_loop().create_task(self._close_listeners())

    async def _close_listeners(self) -> None:
        if self.smtp is not None:
            await self.smtp.close()
        if self.pop3 is not None:
            await self.pop3.close()

    def reload(self) -> list[Problem]:
        """Re-read control/*; keep the last good configuration if the new one has errors."""
        problems = self._reload()
        if self.service is not None:
            from core.timefmt import iso

            self.service.last_reload = {
                "at": iso(self.clock.now()),
                "ok": not problems,
                "problems": [{**p.as_dict(), "text": p.format(self.root.path)} for p in problems],
            }
        return problems

    def _reload(self) -> list[Problem]:
        new = control.load(self.root)
        if new.errors:
            for problem in new.errors:
                self.log.line(
                    f"alert: {problem.format(self.root.path)}; keeping the last good configuration"
                )
            self.events.publish("config-rejected", problems=[p.as_dict() for p in new.errors])
            return new.errors
        self._config = new
        if self.spawner is not None:
            self.spawner.reload()
        if self.smtp is not None:
            settings = self._smtp_settings()
            if settings is not None:
                self.smtp.settings = settings
        elif self.smtp_address is not None and self.send is not None and self._late is None:
            # The listener was held back (no rcpthosts): it may start now.
            self._late = asyncio.ensure_future(self._start_smtp_late())
        if self.pop3 is not None:
            from core.pop3listen import pop3_settings

            self.pop3.settings = pop3_settings(self.root, new, self.log.line, self.checkpassword)
        self.log.line("info: configuration reloaded")
        self.events.publish("config-reloaded")
        if self.send is not None:
            self.send.wake()
        return []

    async def _watch_assign(self) -> None:
        """Recompile users/cdb when users/assign changes, as an admin would run newu.

        (Deliveries already read a users/assign newer than users/cdb; this keeps
        the compiled form current.) A file with errors is not compiled: users/cdb
        stays as it was, and the problems are logged once per version.
        """
        reported: float | None = None
        while True:
            await asyncio.sleep(ASSIGN_CHECK)
            try:
                assign = self.root.assign.stat().st_mtime
            except OSError:
                continue
            try:
                compiled = self.root.users_cdb.stat().st_mtime
            except OSError:
                compiled = -1.0
            if assign <= compiled or assign == reported:
                continue
            assert self.send is not None
            problems = await self.send.io(users.newu, self.root)
            errors = [p for p in problems if p.is_error]
            if errors:
                reported = assign
                for problem in errors:
                    self.log.line(f"alert: {problem.format(self.root.path)}; users/cdb unchanged")
            else:
                self.log.line("info: users/assign compiled into users/cdb")

    def _changed(self, paths: set[str]) -> None:
        """Configuration files changed on disk: reload, as on HUP."""
        names = sorted(os.path.relpath(p, self.root.path) for p in paths)
        self.log.line(f"info: changed: {' '.join(names)}")
        self.reload()

    def _lost_spawn(self, why: str) -> None:
        self.log.line(f"alert: {why}; deferring its deliveries, starting a new one")

    def retry_all(self) -> None:
        if self.send is not None:
            self.send.retry_all()

    async def run(self) -> None:
        check_root(self.root)
        lock = lock_root(self.root)
        try:
            await self._run_locked()
        finally:
            with contextlib.suppress(OSError):
                self.root.pid_file.unlink()
            os.close(lock)

    async def _run_locked(self) -> None:
        self._config = strict_config(self.root)
        Queue(self.root).create_layout()  # adds our directories to a queue qmail made
        self.root.pid_file.write_text(f"{os.getpid()}\n")
        loop = asyncio.get_running_loop()
        self.events.bind(loop)
        # Few threads: they only do queue file work (deliveries have their own
        # process), and every extra runnable thread costs GIL hand-offs.
        executor = ThreadPoolExecutor(QUEUE_THREADS, thread_name_prefix="core")
        durability = GroupCommit()
        # Ids are reserved in blocks, one fsync of queue/lock/nextid each, on
        # the event loop; a restart skips the rest of a block (ids are never
        # reused, gaps are harmless). 1,024 a block: at 1,500 messages a
        # second, one such sync every 0.7 s instead of 23 a second.
        queue = Queue(self.root, id_block=ID_BLOCK, durability=durability)
        self.spawner = LocalSpawner(self.root, self._lost_spawn)
        # Now, as qmail-start starts qmail-lspawn, not at the first delivery: a
        # process started while a TERM is sent to our whole group could get it
        # before it has left the group.
        try:
            await self.spawner.start()
        except OSError as e:  # the first delivery tries again
            self.log.line(f"alert: unable to start lspawn: {e.strerror or e}")
        from core.rspawn import Remote  # dnspython and the SMTP client: only in a running core

        self.remote = Remote(
            self.root,
            queue,
            self.config,
            events=self.events,
            resolver=self.resolver_address,
            port=self.remote_port,
        )
        self.remote.start()
        self.send = make_send(
            self.root,
            queue,
            self.config,
            clock=self.clock,
            log=self.log,
            events=self.events,
            executor=executor,
            spawner=self.spawner,
            remote=self.remote,
        )
        self.send.syncer = syncer = LoopGroupCommit(loop, durability)
        self.service = Service(self.root, self.send, self.config, self.clock)
        self.service.resolver = self.resolver_address
        self.service.remote = self.remote
        self.service.reloader = self.reload
        self.service.listeners = self._listeners
        sock = ControlSocket(self.root.control_socket, self.service, self.control_group)
        trigger = self._listen_trigger(loop)
        handled = self._signals(loop)
        try:
            await self.send.load(cleanup=True)  # before anything else may write the queue
            await sock.start()
            smtp = await self._start_smtp()
            pop3 = await self._start_pop3()
            from core.watch import Watcher

            files = Watcher(self.root, loop, self._changed)
            try:
                files.start()  # before "ready": an edit right after it must count
            except OSError as e:  # inotify limits, say: HUP still reloads
                self.log.line(f"alert: cannot watch the configuration ({e}); reload with HUP")
            watcher = asyncio.ensure_future(self._watch_assign())
            self.started.set()
            if self._ready is not None:
                self._ready(f"ready smtp={smtp} pop3={pop3}")
            try:
                await self.send.run(self._stopping)
            finally:
                files.stop()
                watcher.cancel()
        finally:
            for signum in handled:
                loop.remove_signal_handler(signum)
            loop.remove_reader(trigger[0])
            for fd in trigger:
                os.close(fd)
            await self._close_listeners()
            await sock.close()
            await self.spawner.close()
            executor.shutdown(wait=True)
            syncer.close()
            durability.close()
            self.log.close()

    def _listeners(self) -> dict[str, Any]:
        return {
            "smtp": self.smtp.status() if self.smtp is not None else None,
            "pop3": self.pop3.status() if self.pop3 is not None else None,
        }

    async def _start_smtp_late(self) -> None:
        try:
            where = await self._start_smtp()
        except UserError as e:
            self.smtp = None
            self.log.line(f"alert: {e}")
        else:
            if where != "off":
                self.log.line(f"info: listening for SMTP on {where}")
        finally:
            self._late = None

    async def _start_smtp(self) -> str:
        """Start the listener; its address as the ready line gives it, or "off"."""
        if self.smtp_address is None:
            return "off"
        settings = self._smtp_settings()
        if settings is None:
            return "off"
        assert self.send is not None
        send = self.send

        async def enqueue(message: bytes, sender: str, recipients: list[str]) -> int:
            return await send.enqueue(message, sender, recipients, invoked="invoked from network")

        if self.smtp_workers > 0:
            from core.smtpworker import SmtpWorkers

            def enqueue_then(
                message: bytes, sender: str, recipients: list[str], done: Written
            ) -> None:
                invoked = "invoked from network"
                send.enqueue_then(message, sender, recipients, invoked=invoked, done=done)

            self.smtp = SmtpWorkers(
                self.root,
                self.smtp_workers,
                enqueue_then,
                settings,
                enqueue,
                self.log.line,
                queue_error,
            )
        else:
            self.smtp = SmtpServer(settings, enqueue, self.log.line, queue_error)
        host, port = self.smtp_address
        try:
            bound = await self.smtp.start(host, port)
        except OSError as e:
            self.smtp = None
            raise UserError(f"unable to listen for SMTP on {host}:{port}: {e.strerror}") from e
        return f"{bound[0]}:{bound[1]}"

    async def _start_pop3(self) -> str:
        if self.pop3_address is None:
            return "off"
        from core.pop3listen import Pop3Server, pop3_settings

        settings = pop3_settings(self.root, self.config(), self.log.line, self.checkpassword)
        self.pop3 = Pop3Server(settings, self.log.line)
        host, port = self.pop3_address
        try:
            bound = await self.pop3.start(host, port)
        except OSError as e:
            self.pop3 = None
            raise UserError(f"unable to listen for POP3 on {host}:{port}: {e.strerror}") from e
        return f"{bound[0]}:{bound[1]}"

    def _smtp_settings(self) -> Settings | None:
        from core.rdns import resolver_for

        resolver = resolver_for(self.resolver_address)
        return settings_for(self.root, self.config(), self.log.line, resolver=resolver)

    def _listen_trigger(self, loop: asyncio.AbstractEventLoop) -> tuple[int, int]:
        """Read lock/trigger; a writer of our own keeps it from reporting EOF forever."""
        path = self.root.trigger
        if not path.exists():
            os.mkfifo(path, 0o622)
        reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        keeper = os.open(path, os.O_WRONLY | os.O_NONBLOCK)

        def pulled() -> None:
            with contextlib.suppress(BlockingIOError):
                while os.read(reader, 4096):
                    pass
            assert self.send is not None
            self.send.wake_todo()

        loop.add_reader(reader, pulled)
        return reader, keeper

    def _signals(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        actions = {
            signal.SIGTERM: self.stop,
            signal.SIGINT: self.stop,
            signal.SIGHUP: self.reload,
            signal.SIGALRM: self.retry_all,
        }
        handled: list[int] = []
        for signum, action in actions.items():
            try:
                loop.add_signal_handler(signum, action)
                handled.append(signum)
            except (RuntimeError, ValueError):
                pass  # not the main thread (tests): the caller stops us with stop()
        return handled


@contextlib.asynccontextmanager
async def offline(root: QmailRoot, clock: Clock | None = None) -> AsyncIterator[Service]:
    """The Service on the files directly, under the root's lock (no core running)."""
    check_root(root)
    lock = lock_root(root)
    with contextlib.suppress(OSError):  # read-only use (queue list) works without them
        Queue(root).create_layout()  # adds our directories to a queue qmail made
    executor = ThreadPoolExecutor(8, thread_name_prefix="offline")
    clock = clock or SystemClock()
    log = Log(root.log, clock=clock)
    try:
        config = control.load(root)
        send = make_send(
            root,
            Queue(root),
            lambda: config,
            clock=clock,
            log=log,
            events=Events(),
            executor=executor,
        )
        await send.load()
        yield Service(root, send, lambda: config, clock)
    finally:
        executor.shutdown(wait=True)
        log.close()
        os.close(lock)


def is_socket_alive(path: Path) -> bool:
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError as e:
        return e.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        s.close()
