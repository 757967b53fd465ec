"""qmail-lspawn: local deliveries in a process of their own.

The scheduler hands each local delivery to this process over a pipe and gets
qmail-local's K/Z/D report back. As in qmail, the delivering code runs apart
from the scheduler: here that lets deliveries use the second CPU (Python runs
one thread at a time per process), and it is where deliveries as another user
will switch uid.

Protocol, one JSON object a line each way:
    core -> lspawn  {"n": 7, "rcpt": "...", "sender": "...", "id": 123, "now": 1.5}
                    {..., "draft": "QUEUE/pid/NAME.direct"}   a direct delivery
                    {"reload": true}        re-read control/* before the next delivery
    lspawn -> core  {"n": 7, "status": "K", "text": "did 1+0+0\\n"}
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from core import control, users
from core.asuser import ForkServer, InFlight, UserWorkers
from core.durable import GroupCommit, ThreadGroupCommit, drive_steps
from core.errors import UserError
from core.getpw import getpw
from core.local import Result, Rules, Target, internal_error, qmail_local_steps
from core.paths import QmailRoot
from core.queue import Queue, QueueError
from core.reads import small_reads

LINE_MAX = 1 << 20
PROJECT = str(Path(__file__).resolve().parent.parent)  # so that `-m core.lspawn` imports us
CRASHED = Result("Z", "qmail-local crashed. (#4.3.0)\n")


def find_owner(root: QmailRoot, local_part: str, use_passwd: bool) -> users.Owner:
    """qmail-lspawn's look-up: users/assign (users/cdb), then the password database
    (only for a core run as root: no other can deliver to a system user's home),
    then the alias user. Raises UserError when users/cdb cannot be read."""
    return owner_after_assign(root, local_part, use_passwd, users.lookup(root, local_part))


def owner_after_assign(
    root: QmailRoot, local_part: str, use_passwd: bool, assigned: users.Owner | None
) -> users.Owner:
    """find_owner once users/assign has answered (`assigned`)."""
    owner = assigned
    if owner is None and use_passwd:
        owner = getpw(local_part)
    return owner or alias_owner(root, local_part)


def alias_owner(root: QmailRoot, local_part: str) -> users.Owner:
    """The alias user: the root's alias/ home, ext = the whole local part."""
    try:
        st = os.stat(root.alias)
        uid, gid = st.st_uid, st.st_gid
    except OSError:
        uid, gid = os.getuid(), os.getgid()
    return users.Owner("alias", uid, gid, str(root.alias), "-", local_part, "the alias user")


class Deliverer:
    """qmail-lspawn for one root: finds the owner, chooses who delivers, forwards."""

    def __init__(
        self,
        root: QmailRoot,
        queue: Queue,
        config: Callable[[], control.Config],
        forks: ForkServer | None = None,
        syncer: ThreadGroupCommit | None = None,
    ) -> None:
        self.root = root
        self.syncer = syncer  # deliveries in this process: None, each in `blocking`
        self.queue = queue
        self.config = config
        self.workers = UserWorkers(forks)
        self.is_root = os.geteuid() == 0

    def deliver(self, rcpt: str, sender: str, msgid: int, now: float) -> Result:
        """deliver_then, waiting here for the result (no core: the command line)."""
        slot: list[Result] = []
        finished = threading.Event()

        def done(result: Result) -> None:
            slot.append(result)
            finished.set()

        self.deliver_then(rcpt, sender, msgid, now, done, lambda step: step())
        finished.wait()  # a worker's reader answers every delivery, in time (asuser.HUNG)
        return slot[0]

    def deliver_then(
        self,
        rcpt: str,
        sender: str,
        msgid: int,
        now: float,
        done: Callable[[Result], None],
        blocking: Callable[[Callable[[], None]], object],
        *,
        passwd: bool = False,
        draft: str | None = None,
    ) -> None:
        """deliver, calling `done(result)` back. A delivery as another user is
        handed to its worker at once and answered from the worker's reader
        thread; what may block (a delivery in this process, queueing a forward,
        the password database, which NSS may ask over the network) is run
        through `blocking` (a thread pool's submit). `passwd`: this call may
        ask the password database (it runs in `blocking` already).

        `draft`: a direct delivery of that file in the queue's pid/ (not of
        mess/msgid), which only writes Maildirs or else does nothing (the
        result is local.NOT_MAILDIRS)."""
        if draft is not None and not self._is_draft(draft):
            done(Result("Z", "qmail-spawn unable to open message. (#4.3.0)\n"))
            return
        try:
            routed = self._route(rcpt, passwd)
        except Exception as e:
            done(internal_error(e))
            return
        if routed is None:
            blocking(
                lambda: self.deliver_then(
                    rcpt, sender, msgid, now, done, blocking, passwd=True, draft=draft
                )
            )
            return
        if isinstance(routed, Result):
            done(routed)
            return
        owner, target = routed
        defaultdelivery = "".join(line + "\n" for line in self.config().defaultdelivery)
        message = Path(draft) if draft is not None else self.root.mess(msgid)

        def then(result: Result) -> None:
            if result.forward is None:
                done(result)
                return

            def forward() -> None:
                try:
                    done(self._forward(result, owner, target, message, now))
                except Exception as e:
                    done(internal_error(e))

            blocking(forward)

        if not (self.is_root and owner.uid != 0):
            rules = self._rules(owner)
            if rules is None:
                done(Result("Z", "Not allowed to perform deliveries as root.\n"))
                return
            steps = qmail_local_steps(
                target,
                sender,
                defaultdelivery,
                message,
                forward=None,
                rules=rules,
                now=now,
                maildirs_only=draft is not None,
            )

            def delivered(result: Result | None, error: BaseException | None) -> None:
                then(result if result is not None else internal_error(error))

            drive_steps(steps, self.syncer, delivered, blocking, self.queue.durable)
            return
        try:
            # A draft is the core's own file: never a link to another (we are root).
            fd = os.open(message, os.O_RDONLY | (os.O_NOFOLLOW if draft is not None else 0))
        except OSError:
            done(Result("Z", "qmail-spawn unable to open message. (#4.3.0)\n"))
            return
        request = self._request(target, sender, defaultdelivery, now)
        if draft is not None:
            request["maildirs_only"] = True

        def replied(result: Result) -> None:
            os.close(fd)
            then(result)

        try:
            self.workers.send(owner.uid, owner.gid, request, fd, replied)
        except OSError as e:
            os.close(fd)
            done(Result("Z", f"Unable to run qmail-local: {e.strerror or e}. (#4.3.0)\n"))

    def _is_draft(self, path: str) -> bool:
        """A direct delivery's file is one the core wrote in pid/ for it, and
        nothing else: lspawn runs as root and opens it."""
        head, name = os.path.split(path)
        return (
            head == str(self.root.queue / "pid")
            and name.endswith(".direct")
            and not os.path.islink(path)
        )

    def _route(self, rcpt: str, passwd: bool) -> Result | tuple[users.Owner, Target] | None:
        """Who delivers to `rcpt`, or the result when nobody needs to; None when
        finding out needs the password database and `passwd` is False."""
        local_part, at, host = rcpt.rpartition("@")
        if not at:
            return Result("D", "Sorry, address must include host name. (#5.1.3)\n")
        if not local_part:
            return Result("K", "")  # a trash address, as qmail-lspawn has it
        try:
            assigned = users.lookup(self.root, local_part)
            if assigned is None and self.is_root and not passwd:
                return None  # the password database is next: see deliver_then
            owner = owner_after_assign(self.root, local_part, self.is_root, assigned)
        except UserError:
            return Result("Z", "Trouble reading users/cdb in qmail-lspawn.\n")
        target = Target(owner.user, Path(owner.home), local_part, owner.dash, owner.ext, host)
        return owner, target

    def _rules(self, owner: users.Owner) -> Rules | None:
        """What an in-process delivery may do; None: it may not happen at all."""
        if self.is_root:
            if owner.user != "alias" or Path(owner.home) != self.root.alias:
                return None  # qmail-lspawn: "Not allowed to perform deliveries as root."
            return Rules(
                confine=True,
                programs=False,
                why_no_programs="Program deliveries for the alias user need an alias"
                " account to run as: chown the alias directory to it. (#4.3.0)",
            )
        # An unprivileged core is one Unix user: a home is the only fence between
        # its users, and a program can run only as that one uid.
        mine = owner.uid == os.getuid()
        return Rules(
            confine=True,
            programs=mine,
            why_no_programs=f"Unable to run programs as uid {owner.uid}: this core runs as"
            f" uid {os.getuid()} and is not root. (#4.3.0)",
        )

    @staticmethod
    def _request(target: Target, sender: str, defaultdelivery: str, now: float) -> dict[str, Any]:
        return {
            "user": target.user,
            "home": str(target.home),
            "local": target.local,
            "dash": target.dash,
            "ext": target.ext,
            "host": target.host,
            "sender": sender,
            "defaultdelivery": defaultdelivery,
            "now": now,
        }

    def _forward(
        self, result: Result, owner: users.Owner, target: Target, message: Path, now: float
    ) -> Result:
        """Queue the forwards a delivery asked for: DTLINE + the message (local.md §7.4)."""
        assert result.forward is not None
        sender, rcpts = result.forward
        dtline = f"Delivered-To: {target.local}@{target.host}".replace("\n", "_") + "\n"
        invoked = "invoked by alias" if owner.user == "alias" else f"invoked by uid {owner.uid}"
        try:
            data = dtline.encode("utf-8", "surrogateescape") + self.queue.read_message(
                int(message.name)
            )
            qp = self.queue.enqueue(
                data, sender, list(rcpts), uid=owner.uid, pid=os.getpid(), invoked=invoked, now=now
            )
        except QueueError as e:
            return Result(
                "D" if e.permanent else "Z", f"{result.text}Unable to forward message: {e.text}.\n"
            )
        except OSError:
            return Result("Z", f"{result.text}Unable to read message. (#4.3.0)\n")
        return Result("K", f"{result.text}qp {qp}\n")

    def close(self) -> None:
        self.workers.close()


def serve(root: QmailRoot, requests: BinaryIO, replies: BinaryIO, threads: int = 64) -> None:
    """The child's side: hand each request on at once, answer as each ends."""
    # As root, fork the fork server now, while this process has no threads.
    forks = ForkServer() if os.geteuid() == 0 else None
    durability = GroupCommit()
    syncer = ThreadGroupCommit(durability)
    queue = Queue(root, durability=durability)  # forwards are queued through todo/
    config = [control.load(root)]
    deliverer = Deliverer(root, queue, lambda: config[0], forks, syncer)
    write_lock = threading.Lock()
    in_flight = InFlight()  # deliveries handed on and not answered yet

    def reply(n: object, result: Result) -> None:
        line = json.dumps({"n": n, "status": result.status, "text": result.text})
        with write_lock, contextlib.suppress(OSError, ValueError):  # the core is gone
            replies.write(line.encode() + b"\n")
            replies.flush()
        in_flight.end()

    with ThreadPoolExecutor(threads, thread_name_prefix="lspawn") as pool:
        for raw in requests:
            request = json.loads(raw)
            if request.get("reload"):
                config[0] = control.load(root)
                continue
            in_flight.start()
            deliverer.deliver_then(
                str(request["rcpt"]),
                str(request["sender"]),
                int(request["id"]),
                float(request["now"]),
                functools.partial(reply, request["n"]),
                pool.submit,
                draft=str(request["draft"]) if "draft" in request else None,
            )
        # EOF: every delivery handed on is answered first (one between two
        # sync points is neither in the pool nor in a worker), and only then
        # do the workers and the pool go.
        in_flight.wait_all()
        deliverer.close()
    syncer.close()
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
        # Requests made in one turn of the loop go in one write (see _send).
        self._outgoing: list[bytes] = []
        self._outgoing_numbers: list[int] = []
        self._outgoing_to: asyncio.subprocess.Process | None = None

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
            start_new_session=True,  # a Ctrl-C or a kill of our group is not for it
        )
        transport = getattr(self._proc, "_transport", None)  # asyncio's own; may change
        if transport is not None:
            small_reads(transport.get_pipe_transport(1))  # report lines of a few hundred bytes
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

    async def deliver(
        self, rcpt: str, sender: str, msgid: int, now: float, draft: str | None = None
    ) -> Result:
        """qmail-local's report for one delivery of message `msgid`, or with
        `draft`, a direct delivery of that file (Deliverer.deliver_then)."""
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
        request: dict[str, Any] = {"n": n, "rcpt": rcpt, "sender": sender, "id": msgid, "now": now}
        if draft is not None:
            request["draft"] = draft
        self._send(proc, json.dumps(request).encode() + b"\n", n)
        return await future

    def reload(self) -> None:
        if self._proc is not None:
            self._send(self._proc, b'{"reload": true}\n')

    def _send(self, proc: asyncio.subprocess.Process, line: bytes, n: int | None = None) -> None:
        """Queue a line for the child; the lines of one turn of the loop go in
        one write, at the start of the next turn.

        Each write wakes lspawn, and the wake-up of a process blocked on a pipe
        may preempt the writer there and then: about 60 us of the loop's time
        per write, measured, when every delivery had one. Deliveries start in
        bursts (a group commit's batch of messages at once), so this writes
        about half as often. No drain: the requests in flight are bounded by
        concurrencylocal."""
        if self._outgoing and self._outgoing_to is not proc:
            self._flush()
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outgoing_to = proc
        self._outgoing.append(line)
        if n is not None:
            self._outgoing_numbers.append(n)

    def _flush(self) -> None:
        lines, numbers, proc = self._outgoing, self._outgoing_numbers, self._outgoing_to
        self._outgoing, self._outgoing_numbers, self._outgoing_to = [], [], None
        if not lines:
            return
        try:
            if proc is not self._proc or proc is None or proc.stdin is None:
                raise ConnectionError("lspawn has gone")  # _read has answered them
            proc.stdin.write(b"".join(lines))
        except (ConnectionError, RuntimeError):
            for n in numbers:
                future = self._pending.pop(n, None)
                if future is not None and not future.done():
                    future.set_result(CRASHED)

    async def close(self) -> None:
        self._flush()
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


def _ignore(signum: int, frame: object) -> None:
    pass


def main() -> int:
    root = QmailRoot(sys.argv[1])
    os.umask(0o077)
    # The core ends us by closing our input, after its deliveries have wound
    # down: a TERM or Ctrl-C sent to the whole process group (systemd's
    # control-group kill, a terminal) must not cut them short. A handler, not
    # SIG_IGN: the programs deliveries run get the default actions back at exec.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _ignore)
    serve(root, sys.stdin.buffer, sys.stdout.buffer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
