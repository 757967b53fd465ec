"""SMTP ingest side by side: our receiver (`qmailtui serve --smtp`) and Postfix.

    python bench/smtp_ingest.py [--messages 2000] [--sessions 10] [--size 5000]
                                [--rounds 3] [--reuse] [--client smtp-source|asyncio]
                                [--smtp-workers N [N ...]]

Sends the same load to both servers, alternating round by round (ours, Postfix,
then Postfix, ours, ...: these machines drift, so servers are compared only
inside one run), and prints per round and as medians: messages accepted per
second (N / the load generator's wall time), the server's CPU per accepted
message, the time until every message of the round was in the recipient's
Maildir, and the load generator's own CPU (it must stay well below one core,
else the client is what is measured). Then the ratio ours/Postfix.

The load: SESSIONS concurrent SMTP sessions on loopback, SIZE-byte payloads
(headers not included), one recipient, a new connection per message (as
smtp-source does by default) or, with --reuse, connections kept open. Both
servers keep their default durability: every acknowledged message is fsynced.

Server CPU is the whole process tree's: utime+stime of the server process and
every descendant, plus cutime+cstime (children that exited and were reaped),
from /proc/PID/stat, read before and after each round. "accepting" is that
delta over the load generator's run; "with delivery" runs until the round's last
message is in Maildir/new (the deliveries that lag behind the acceptance).
Between rounds the previous deliveries are waited for, then sync and a pause.
"other CPU" is the machine's busy CPU (/proc/stat) that is neither the server's
nor the client's; "background" is how busy the machine was during the pause
before the round. "busiest thread" is the server's thread that was on a CPU
the most during the run, and how long it was runnable but waiting for a CPU
(/proc/PID/task/TID/schedstat): a thread near 100% of the two together is what
limits the rate, however idle the machine looks. "other CPU" or "background"
well above ~0.3 ms/msg or ~10% of a core means something else was running (a
test suite, say), and a warning says the figures are disturbed: our core's
group commit is a syncfs(2) of the whole file system, so other writers on it
slow ours more than Postfix's per-file fsyncs.

Ours: `qmailtui init` on a fresh root, a user `user` (nobody, when run as root)
with a Maildir, `qmailtui serve --smtp 127.0.0.1:0 --pop3 off`, stopped with
SIGTERM at the end. The root goes under a new top-level directory, as
bench/throughput.py explains (ext4 inode allocation), and is removed afterwards.
With --smtp-workers 0 1 2, one such core for each value, each on its own root,
all started at once and measured in turn with the others idle: what the SMTP
worker processes buy, inside one run.

Postfix: the peer of ../shared/bench/postfix-peer.sh on 127.0.0.1:2526 (the
script installs it with apt if needed; needs root), delivering to
/var/mail/vhosts/bench.test/user/. Started if it is not running, and then
stopped at the end. If it cannot be set up, that is printed and ours is
measured alone. What it delivered stays in that Maildir unless
--clean-postfix-mail: deleting thousands of files there makes Postfix's next
minutes slower (measured: 850-925 msgs/s and ~1.5 ms CPU/msg before deleting
6,000 of them, 365-513 msgs/s and 2.4-3.2 ms right after), which would
handicap Postfix in the next run.

Load generator: Postfix's smtp-source (HELO, no pipelining), or --client asyncio,
a small client here that speaks the same dialogue (the fallback when
smtp-source is missing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import os
import platform
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_BENCH = Path(os.environ.get("BENCH_SHARED", REPO.parent / "shared" / "bench"))
HZ = os.sysconf("SC_CLK_TCK")
SENDER = "a@client.test"
RECIPIENT = "user@bench.test"
HELO = "bench.client"
NOBODY = 65534
TARGET = 1.2  # ours must accept at least this many times Postfix's rate


# -- CPU accounting -------------------------------------------------------------


def _proc_stats() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime+stime+cutime+cstime in ticks) for every process."""
    stats = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    return stats


def tree_cpu(pid: int) -> float:
    """CPU seconds of pid and all its descendants, including reaped children."""
    stats = _proc_stats()
    return sum(stats[p][1] for p in tree_pids(pid, stats)) / HZ


def tree_pids(pid: int, stats: dict[int, tuple[int, int]] | None = None) -> list[int]:
    """pid and all its living descendants."""
    stats = _proc_stats() if stats is None else stats
    children: dict[int, list[int]] = {}
    for p, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(p)
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            found.append(p)
            todo.extend(children.get(p, ()))
    return found


def tree_threads(pid: int) -> dict[int, tuple[str, int, int]]:
    """tid -> (name, ns on a CPU, ns runnable but waiting for a CPU) for every
    thread of pid's tree (/proc/PID/task/TID/schedstat)."""
    threads = {}
    for p in tree_pids(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/schedstat") as f:
                    on_cpu, waiting, _ = f.read().split()
                with open(f"/proc/{p}/task/{tid}/comm") as f:
                    name = f.read().strip()
            except (OSError, ValueError):
                continue
            if p == pid and int(tid) == pid:
                name = "main thread"
            elif int(tid) != p:
                name += " (a thread)"
            threads[int(tid)] = (name, int(on_cpu), int(waiting))
    return threads


def busiest(
    before: dict[int, tuple[str, int, int]], after: dict[int, tuple[str, int, int]], wall: float
) -> tuple[str, float, float]:
    """The thread that was on a CPU the most: (name, fraction of the time on a
    CPU, fraction runnable but waiting for one). One thread near 100% together
    is the limit, whatever the other CPU does."""
    best = ("-", 0.0, 0.0)
    for tid, (name, on_cpu, waiting) in after.items():
        if tid not in before:
            continue
        on = (on_cpu - before[tid][1]) / 1e9 / wall
        if on > best[1]:
            best = (name, on, (waiting - before[tid][2]) / 1e9 / wall)
    return best


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine, all cores (user nice system irq softirq steal)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return sum(int(fields[i]) for i in (1, 2, 3, 6, 7, 8)) / HZ


# -- the servers ------------------------------------------------------------------


class Server:
    name = ""
    port = 0
    pid = 0

    def delivered(self) -> int:
        raise NotImplementedError

    def idle(self) -> bool:
        return True

    def stop(self) -> None:
        pass


def _count_new(maildir: Path) -> int:
    try:
        return sum(1 for e in os.scandir(maildir / "new") if not e.name.startswith("."))
    except FileNotFoundError:
        return 0


class Ours(Server):
    name = "ours"

    def __init__(self, top: Path, workers: int | None = None) -> None:
        self.workers = workers  # serve --smtp-workers; None: serve's default
        if workers is not None:
            self.name = f"ours w={workers}"
        self.base = Path(tempfile.mkdtemp(prefix="qmailtui-bench-", dir=top))
        self.root = self.base / "qmail"
        self.maildir = self.base / "home" / "Maildir"
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path = self.base / "serve.stderr"

    def _cli(self, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        done = subprocess.run(
            [sys.executable, "-m", "qmailtui", *args], env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise SystemExit(f"qmailtui {' '.join(args)}: {done.stderr.strip() or done.stdout}")

    def setup(self) -> None:
        self._cli("init", str(self.root), "--me", "bench.test")
        home = self.maildir.parent
        home.mkdir(mode=0o700)
        self._cli("maildirmake", str(self.maildir))
        uid, gid = os.getuid(), os.getgid()
        if uid == 0:  # qmail never delivers as root: the user is nobody, who owns the home
            uid = gid = NOBODY
            self.base.chmod(0o755)
            for directory, _, files in os.walk(home):
                os.chown(directory, uid, gid)
                for name in files:
                    os.chown(Path(directory) / name, uid, gid)
        (self.root / "users" / "assign").write_text(f"=user:user:{uid}:{gid}:{home}:::\n.\n")
        self._cli("--root", str(self.root), "newu")

    def start(self, timeout: float = 30.0) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        cmd = [sys.executable, "-m", "qmailtui", "--root", str(self.root), "serve", "--quiet"]
        cmd += ["--smtp", "127.0.0.1:0", "--pop3", "off"]
        if self.workers is not None:
            cmd += ["--smtp-workers", str(self.workers)]
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        self.pid = self.proc.pid
        assert self.proc.stdout is not None
        line = _read_line(self.proc, timeout, b"ready ")
        if line is None:
            self.stop()
            tail = self.stderr_path.read_text(errors="replace").strip()[-2000:]
            raise SystemExit(f"qmailtui serve printed no ready line within {timeout:.0f} s\n{tail}")
        words = dict(w.split("=", 1) for w in line.decode().split()[1:] if "=" in w)
        smtp = words.get("smtp", "off")
        if smtp == "off" or ":" not in smtp:
            self.stop()
            raise SystemExit(f"qmailtui serve has no SMTP listener: {line.decode().strip()!r}")
        self.port = int(smtp.rsplit(":", 1)[1])
        # Keep draining its standard output so that it never blocks on a full pipe.
        threading.Thread(target=_drain, args=(self.proc.stdout,), daemon=True).start()

    def delivered(self) -> int:
        return _count_new(self.maildir)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            print("ours: did not stop within 60 s of SIGTERM; killed", flush=True)
            self.proc.kill()
            self.proc.wait()

    def warnings(self) -> list[str]:
        log = self.root / "log" / "current"
        if not log.exists():
            return []
        lines = log.read_text(errors="replace").splitlines()
        return [line for line in lines if " warning: " in line or " alert: " in line]


def _read_line(proc: subprocess.Popen[bytes], timeout: float, prefix: bytes) -> bytes | None:
    """The first stdout line starting with prefix, or None at a timeout or an exit."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(max(deadline - time.monotonic(), 0)):
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                return None
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.startswith(prefix):
                    return line
    return None


def _drain(stream: object) -> None:
    read = getattr(stream, "read", None)
    assert read is not None
    with contextlib.suppress(OSError, ValueError):
        while read(65536):
            pass


class Postfix(Server):
    name = "postfix"
    maildir = Path("/var/mail/vhosts/bench.test/user")

    def __init__(self, port: int, clean: bool = False) -> None:
        self.port = port
        self.clean = clean
        self.started = False
        self.before: set[str] = set()

    def setup(self) -> None:
        """Make sure the peer answers on the port; raises RuntimeError when it cannot."""
        if not (_banner(self.port) and shutil.which("postfix")):
            script = SHARED_BENCH / "postfix-peer.sh"
            if not script.exists():
                raise RuntimeError(f"{script} not found (set BENCH_SHARED)")
            running = shutil.which("postfix") and _postfix_running()
            print(f"setting up Postfix with {script} (apt may take a minute)", flush=True)
            done = subprocess.run(
                [str(script)] + ([] if running else ["start"]),
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
            )
            if done.returncode != 0:
                raise RuntimeError(f"{script.name} failed: {(done.stderr or done.stdout)[-800:]}")
            if running:
                subprocess.run(["postfix", "reload"], capture_output=True)
            else:
                self.started = True
            for _ in range(50):
                if _banner(self.port):
                    break
                time.sleep(0.2)
        banner = _banner(self.port)
        if not banner:
            raise RuntimeError(f"nothing answers SMTP on 127.0.0.1:{self.port}")
        if b"bench.localhost" not in banner:
            raise RuntimeError(f"127.0.0.1:{self.port} is not the Postfix peer: {banner!r}")
        qdir = subprocess.run(
            ["postconf", "-h", "queue_directory"], capture_output=True, text=True, check=True
        ).stdout.strip()
        self.pid = int(Path(qdir, "pid", "master.pid").read_text().split()[0])
        self.before = set(os.listdir(self.maildir / "new")) if self.maildir.exists() else set()

    def delivered(self) -> int:
        return _count_new(self.maildir)

    def idle(self) -> bool:
        done = subprocess.run(["postqueue", "-j"], capture_output=True)
        return done.returncode == 0 and not done.stdout.strip()

    def stop(self) -> None:
        """Stop Postfix if this run started it; with `clean`, remove what it delivered."""
        new = self.maildir / "new"
        if self.pid and new.exists():
            mine = set(os.listdir(new)) - self.before
            if self.clean:
                for name in mine:
                    with contextlib.suppress(FileNotFoundError):
                        (new / name).unlink()
                print(
                    f"removed the {len(mine)} messages Postfix delivered in this run"
                    " (Postfix is slower for some minutes after such a deletion)"
                )
            else:
                print(
                    f"left the {len(mine)} messages Postfix delivered in this run in {new}"
                    f" ({len(self.before) + len(mine)} there now; see --clean-postfix-mail)"
                )
        if self.started:
            subprocess.run(["postfix", "stop"], capture_output=True)
            self.started = False


def _postfix_running() -> bool:
    return subprocess.run(["postfix", "status"], capture_output=True).returncode == 0


def _banner(port: int) -> bytes | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            banner = s.recv(512)
            s.sendall(b"QUIT\r\n")
            return banner if banner.startswith(b"220") else None
    except OSError:
        return None


def revision() -> str:
    """The checkout's commit, and whether core/ or qmailtui/ differ from it."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return "?"
    dirty = git("status", "--porcelain", "--", "core", "qmailtui").stdout.strip()
    return head.stdout.strip() + (" + uncommitted changes" if dirty else "")


def postfix_version() -> str:
    done = subprocess.run(["postconf", "-h", "mail_version"], capture_output=True, text=True)
    return done.stdout.strip() or "?"


# -- the load generators --------------------------------------------------------------


@dataclass
class Load:
    messages: int
    sessions: int
    size: int
    reuse: bool
    timeout: float


@dataclass
class ClientRun:
    wall: float
    accepted: int
    cpu: float  # CPU seconds of the load generator itself
    error: str = ""


def smtp_source() -> str | None:
    return shutil.which("smtp-source") or (
        "/usr/sbin/smtp-source" if os.access("/usr/sbin/smtp-source", os.X_OK) else None
    )


def run_smtp_source(port: int, load: Load) -> ClientRun:
    binary = smtp_source()
    assert binary is not None
    cmd = [binary, "-s", str(load.sessions), "-m", str(load.messages), "-l", str(load.size)]
    cmd += ["-f", SENDER, "-t", RECIPIENT, "-M", HELO]
    if load.reuse:
        cmd.append("-d")
    cmd.append(f"127.0.0.1:{port}")
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        timer = threading.Timer(load.timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read().decode(errors="replace").strip()
    cpu = usage.ru_utime + usage.ru_stime
    if proc.returncode != 0:
        why = f"killed after {load.timeout:.0f} s" if proc.returncode == -9 else text[-500:]
        return ClientRun(wall, 0, cpu, f"smtp-source exited {proc.returncode}: {why}")
    return ClientRun(wall, load.messages, cpu)


class SmtpError(Exception):
    pass


def _payload(size: int) -> bytes:
    """SIZE bytes of lines of 78 characters and CRLF, as smtp-source -l sends."""
    line = b"X" * 78 + b"\r\n"
    body = line * (size // len(line))
    rest = size - len(body)
    if rest > 2:
        body += b"X" * (rest - 2) + b"\r\n"
    return body


class _Session(asyncio.Protocol):
    """One SMTP session as smtp-source speaks it: a state machine driven by replies
    (protocol callbacks rather than streams, to keep the client's CPU low)."""

    def __init__(self, load: _AsyncLoad) -> None:
        self.load = load
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.step = 0
        self.closed = load.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if line[3:4] != b"-":
                self.reply(line)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            if self.step == -1:
                self.closed.set_result(None)
            else:
                self.closed.set_exception(SmtpError(f"connection lost at step {self.step}"))

    def fail(self, why: str) -> None:
        if not self.closed.done():
            self.closed.set_exception(SmtpError(why))
        assert self.transport is not None
        self.transport.abort()

    def reply(self, line: bytes) -> None:
        load, write = self.load, self.write
        expected = _STEPS[self.step]
        if not line.startswith(expected):
            self.fail(f"step {self.step}: expected {expected!r}, got {line.strip()!r}")
            return
        if self.step == 0:  # greeting
            write(load.helo)
        elif self.step == 1:  # HELO, or the previous message when the connection is kept
            write(load.mail)
        elif self.step == 2:
            write(load.rcpt)
        elif self.step == 3:
            write(b"DATA\r\n")
        elif self.step == 4:
            write(load.message())
        elif self.step == 5:  # the message was accepted
            load.accepted += 1
            if load.reuse and load.remaining > 0:
                load.remaining -= 1
                self.step = 2
                write(load.mail)
                return
            write(b"QUIT\r\n")
        elif self.step == 6:  # QUIT answered
            self.step = -1
            assert self.transport is not None
            self.transport.close()
            return
        self.step += 1

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


_STEPS = (b"220", b"250", b"250", b"250", b"354", b"250", b"221")


class _AsyncLoad:
    def __init__(self, port: int, load: Load) -> None:
        self.loop = asyncio.get_running_loop()
        self.port = port
        self.reuse = load.reuse
        self.remaining = load.messages
        self.accepted = 0
        self.helo = f"HELO {HELO}\r\n".encode()
        self.mail = f"MAIL FROM:<{SENDER}>\r\n".encode()
        self.rcpt = f"RCPT TO:<{RECIPIENT}>\r\n".encode()
        date = email.utils.formatdate(localtime=False)
        self.head = f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nDate: {date}\r\n".encode()
        self.body = _payload(load.size) + b".\r\n"
        self.tag = b"%x.%x" % (os.getpid(), time.time_ns())
        self.serial = 0

    def message(self) -> bytes:
        self.serial += 1
        msgid = b"Message-Id: <%s.%d@%s>\r\n\r\n" % (self.tag, self.serial, HELO.encode())
        return self.head + msgid + self.body

    async def session(self) -> None:
        while self.remaining > 0:
            self.remaining -= 1
            proto = _Session(self)
            await self.loop.create_connection(lambda p=proto: p, "127.0.0.1", self.port)
            await proto.closed


async def _asyncio_load(port: int, load: Load) -> int:
    state = _AsyncLoad(port, load)
    sessions = asyncio.gather(*(state.session() for _ in range(load.sessions)))
    try:
        await asyncio.wait_for(sessions, load.timeout)
    except TimeoutError:
        raise SmtpError(f"not done within {load.timeout:.0f} s") from None
    return state.accepted


def run_asyncio(port: int, load: Load) -> ClientRun:
    """The asyncio client in this process: its CPU is this process's during the run."""
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    error, accepted = "", 0
    try:
        accepted = asyncio.run(_asyncio_load(port, load))
    except (OSError, SmtpError, TimeoutError) as e:
        error = f"asyncio client: {type(e).__name__}: {e}"
    wall = time.perf_counter() - start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
    return ClientRun(wall, accepted, cpu, error)


# -- rounds -------------------------------------------------------------------------


@dataclass
class Result:
    rate: float  # messages accepted per second
    cpu_ms: float  # server tree CPU per accepted message while accepting
    cpu_all_ms: float | None  # ... until the round's messages were delivered
    e2e_rate: float | None  # messages per second until the last was in Maildir/new
    client_ms: float  # load generator CPU per message
    client_core: float  # load generator CPU / wall time (1.0 = one core, its limit)
    other_ms: float  # machine busy CPU that is neither server nor client, per message
    background: float = 0.0  # machine busy during the pause before the round, in cores
    busiest: tuple[str, float, float] = ("-", 0.0, 0.0)  # see busiest()


@dataclass
class Column:
    server: Server
    results: list[Result] = field(default_factory=list)


def wait_delivered(server: Server, target: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.delivered() >= target:
            return True
        time.sleep(0.05)
    return False


def settle(server: Server, pause: float, timeout: float = 300.0) -> float:
    """Let the previous load finish, then sync and pause; returns how busy the
    machine was during the pause (in cores: 0.3 = 30% of one core), i.e. what
    else runs on it (the servers are idle by then)."""
    deadline = time.monotonic() + timeout
    while not server.idle() and time.monotonic() < deadline:
        time.sleep(0.5)
    os.sync()
    busy0, t0 = machine_busy(), time.monotonic()
    time.sleep(pause)
    return (machine_busy() - busy0) / (time.monotonic() - t0)


def one_round(server: Server, load: Load, client: str) -> Result | str:
    base = server.delivered()
    run = run_smtp_source if client == "smtp-source" else run_asyncio
    cpu0, busy0, threads0 = tree_cpu(server.pid), machine_busy(), tree_threads(server.pid)
    start = time.perf_counter()
    out = run(server.port, load)
    cpu1, busy1, threads1 = tree_cpu(server.pid), machine_busy(), tree_threads(server.pid)
    if out.error or out.accepted != load.messages:
        return out.error or f"{out.accepted} of {load.messages} accepted"
    n = load.messages
    ok = wait_delivered(server, base + n, load.timeout)
    e2e = time.perf_counter() - start
    cpu2 = tree_cpu(server.pid)
    return Result(
        rate=n / out.wall,
        cpu_ms=(cpu1 - cpu0) * 1000 / n,
        cpu_all_ms=(cpu2 - cpu0) * 1000 / n if ok else None,
        e2e_rate=n / e2e if ok else None,
        client_ms=out.cpu * 1000 / n,
        client_core=out.cpu / out.wall,
        other_ms=max(busy1 - busy0 - (cpu1 - cpu0) - out.cpu, 0) * 1000 / n,
        busiest=busiest(threads0, threads1, out.wall),
    )


def _f(x: float | None, fmt: str = "%.0f") -> str:
    return "-" if x is None else fmt % x


def report(rnd: int, name: str, r: Result | str) -> None:
    if isinstance(r, str):
        print(f"round {rnd} {name:<9} FAILED: {r}", flush=True)
        return
    print(
        f"round {rnd} {name:<9} {r.rate:6.0f} msgs/s accepted;"
        f" server CPU {r.cpu_ms:.2f} ms/msg accepting,"
        f" {_f(r.cpu_all_ms, '%.2f')} with delivery;"
        f" in Maildir at {_f(r.e2e_rate)} msgs/s;"
        f" client CPU {r.client_ms:.2f} ms/msg ({r.client_core:.0%} of a core);"
        f" other CPU {r.other_ms:.2f} ms/msg; background before {r.background:.0%} of a core;"
        f" busiest thread: {r.busiest[0]}, {r.busiest[1]:.0%} on a CPU"
        f" and {r.busiest[2]:.0%} waiting for one",
        flush=True,
    )


def _med(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    return f"{fmt % statistics.median(values)} [{fmt % min(values)}-{fmt % max(values)}]"


def summarise(columns: list[Column], args: argparse.Namespace) -> None:
    mode = "connections kept open" if args.reuse else "new connection per message"
    print(
        f"\nmedians [min-max] of {args.rounds} rounds: {args.messages} msgs x {args.size} B,"
        f" {args.sessions} sessions, {mode}, fsync on, client {args.client}"
    )
    head = ("server", "accepted msgs/s", "CPU ms/msg accepting", "with delivery")
    head += ("in Maildir msgs/s", "client CPU ms/msg", "client % core")
    rows = [head]
    for col in columns:
        rs = [r for r in col.results]
        rows.append(
            (
                col.server.name,
                _med([r.rate for r in rs], "%.0f"),
                _med([r.cpu_ms for r in rs], "%.2f"),
                _med([r.cpu_all_ms for r in rs if r.cpu_all_ms is not None], "%.2f"),
                _med([r.e2e_rate for r in rs if r.e2e_rate is not None], "%.0f"),
                _med([r.client_ms for r in rs], "%.2f"),
                _med([r.client_core * 100 for r in rs], "%.0f"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for col in columns:
        names = [r.busiest[0] for r in col.results]
        if names:
            name = max(set(names), key=names.count)
            on = _med([r.busiest[1] * 100 for r in col.results], "%.0f")
            waiting = _med([r.busiest[2] * 100 for r in col.results], "%.0f")
            print(
                f"{col.server.name}: busiest thread mostly {name}:"
                f" {on} % on a CPU, {waiting} % waiting for one"
            )
    theirs = [c for c in columns if not isinstance(c.server, Ours) and c.results]
    for ours in [c for c in columns if isinstance(c.server, Ours) and c.results]:
        if not theirs:
            break
        peer = theirs[0]
        rate = statistics.median(r.rate for r in ours.results) / statistics.median(
            r.rate for r in peer.results
        )
        cpu = statistics.median(r.cpu_ms for r in ours.results) / statistics.median(
            r.cpu_ms for r in peer.results
        )
        verdict = "met" if rate >= TARGET else "NOT met"
        print(
            f"{ours.server.name}/Postfix: accepted msgs/s {rate:.2f}x, CPU per message {cpu:.2f}x"
            f" (target: ahead of Postfix by at least {TARGET}x in msgs/s: {verdict})"
        )
    noisy = max((r.background for c in columns for r in c.results), default=0.0)
    if noisy > 0.1:
        print(
            f"warning: something else used up to {noisy:.0%} of a core between rounds"
            " (see 'background' and 'other CPU'): these figures are disturbed"
        )
    busy = [c.server.name for c in columns for r in c.results if r.client_core > 0.7]
    if busy:
        print(
            f"warning: the client used more than 70% of a core in rounds against"
            f" {', '.join(sorted(set(busy)))}: it may be what limits the rate"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="per round (2000)")
    parser.add_argument("--sessions", type=int, default=10, help="concurrent sessions (10)")
    parser.add_argument("--size", type=int, default=5000, help="payload bytes (5000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per server (3; 5 steadier)")
    parser.add_argument("--reuse", action="store_true", help="keep connections open")
    parser.add_argument("--client", choices=("smtp-source", "asyncio"), default="smtp-source")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured messages first (200)")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between rounds (2)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per round, seconds (300)")
    parser.add_argument("--postfix-port", type=int, default=2526)
    parser.add_argument("--no-postfix", action="store_true", help="measure ours alone")
    parser.add_argument(
        "--clean-postfix-mail",
        action="store_true",
        help="delete what Postfix delivered, at the end (slows Postfix for minutes)",
    )
    parser.add_argument("--dir", default=None, help="where to make the root (see above)")
    parser.add_argument(
        "--smtp-workers",
        type=int,
        nargs="+",
        metavar="N",
        help="measure ours with each of these serve --smtp-workers, alternating (default:"
        " serve's own default)",
    )
    args = parser.parse_args()
    if args.client == "smtp-source" and smtp_source() is None and args.no_postfix:
        print("smtp-source not found: using --client asyncio")
        args.client = "asyncio"
    load = Load(args.messages, args.sessions, args.size, args.reuse, args.timeout)
    warm = Load(min(args.warmup, args.messages), args.sessions, args.size, args.reuse, 120)

    top = None
    if args.dir is None and os.geteuid() == 0:
        top = Path(tempfile.mkdtemp(prefix="qmailtui-bench-", dir="/"))
        top.chmod(0o755)  # the user the deliveries run as must pass through
        args.dir = str(top)
    servers: list[Server] = []
    try:
        for workers in args.smtp_workers or [None]:
            ours = Ours(Path(args.dir or tempfile.gettempdir()), workers)
            servers.append(ours)
            ours.setup()
            ours.start()
        if not args.no_postfix:
            postfix = Postfix(args.postfix_port, args.clean_postfix_mail)
            servers.append(postfix)
            try:
                postfix.setup()
            except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
                print(f"Postfix could not be set up ({e}): measuring ours alone", flush=True)
                servers.remove(postfix)
                postfix.stop()
        if args.client == "smtp-source" and smtp_source() is None:
            print("smtp-source not found: using --client asyncio", flush=True)
            args.client = "asyncio"
        mine = [s for s in servers if isinstance(s, Ours)]
        info = f"ours ({revision()}) on " + ", ".join(
            f"127.0.0.1:{s.port} ({s.name})" for s in mine
        )
        if len(servers) > len(mine):
            info += f"; Postfix {postfix_version()} on 127.0.0.1:{args.postfix_port}"
        print(
            f"{info}; {os.cpu_count()} CPUs, {platform.python_implementation()}"
            f" {platform.python_version()}, client {args.client}",
            flush=True,
        )
        columns = [Column(s) for s in servers]
        for server in servers:
            if warm.messages > 0:
                out = one_round(server, warm, args.client)
                if isinstance(out, str):
                    raise SystemExit(f"{server.name}: warm-up failed: {out}")
        for rnd in range(1, args.rounds + 1):
            order = columns if rnd % 2 else columns[::-1]
            for col in order:
                background = settle(col.server, args.pause)
                out = one_round(col.server, load, args.client)
                if isinstance(out, Result):
                    out.background = background
                    col.results.append(out)
                report(rnd, col.server.name, out)
        summarise(columns, args)
        for server in mine:
            for line in server.warnings()[-5:]:
                print(f"{server.name} said:", line.split(" ", 1)[-1])
    finally:
        for server in servers:
            server.stop()
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        else:
            for server in servers:
                if isinstance(server, Ours):
                    shutil.rmtree(server.base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
