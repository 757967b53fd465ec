"""Throughput: queue N messages for a local Maildir user through the core's
enqueue API (as the SMTP receiver does) and time until the last is in new/.

    python bench/throughput.py [--messages 2000] [--size 5000] [--sessions 10] [--runs 3]

Prints, per run and as medians: messages per second from the first enqueue
until the last file is in Maildir/new, fsyncs and syncfs calls per message
made by the core process (deliveries run in a process of their own, whose
syncs are not counted; a message delivered directly, before its enqueue
returns, makes none in the core), CPU per message of both processes. Durability stays
on: every acknowledged message is on disk.

Where the roots go matters on ext4 without a journal: a file created in a
block group where many inodes were deleted in the last minutes costs ~0.5 ms
of CPU (the allocator skips each recently deleted inode), so a root next to
a test suite's /tmp churn measures the churn. By default each invocation
makes its roots under a new top-level directory (as root; the allocator
places those in quiet groups, as /var/qmail on a server would be), else
under $TMPDIR; --dir chooses.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core import users
from core.daemon import Core
from core.paths import QmailRoot
from core.setup import init_root, maildirmake

FSYNCS = 0
_real_fsync = os.fsync


def _counting_fsync(fd: int) -> None:
    global FSYNCS
    FSYNCS += 1
    _real_fsync(fd)


def spawn_cpu(core: Core) -> float:
    """CPU seconds used so far by the delivery process (qmail-lspawn's part) and
    its descendants (the per-uid workers of a core run as root)."""
    proc = getattr(core.spawner, "_proc", None)
    if proc is None:
        return 0.0
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    family, ticks = {proc.pid}, 0
    for _ in range(3):  # lspawn, its fork server, the workers
        family |= {pid for pid, (ppid, _) in stats.items() if ppid in family}
    ticks = sum(stats[pid][1] for pid in family if pid in stats)
    return ticks / os.sysconf("SC_CLK_TCK")


def core_syncs(core: Core) -> int:
    """syncfs calls made by the core's group commit (each covers many writers)."""
    assert core.send is not None
    durable = core.send.queue.durable
    return int(getattr(durable, "syncs", 0))


Setup = Callable[[Path], tuple[QmailRoot, list[str], Callable[[int], None]]]


def make_root(base: Path) -> tuple[QmailRoot, list[str], Callable[[int], None]]:
    """One user with a Maildir: (root, the recipients to use, a check of what arrived)."""
    root = init_root(base / "qmail", me="bench.test")
    home = base / "home"
    home.mkdir(mode=0o700)
    maildirmake(home / "Maildir")
    uid, gid = os.getuid(), os.getgid()
    if uid == 0:  # qmail never delivers as root: the user is nobody, who owns the home
        uid = gid = 65534
        base.chmod(0o755)
        for path in (home, home / "Maildir", *(home / "Maildir").iterdir()):
            os.chown(path, uid, gid)
    root.assign.write_text(f"=user:user:{uid}:{gid}:{home}:::\n.\n")
    users.newu(root)
    new = home / "Maildir" / "new"

    def check(messages: int) -> None:
        in_new = len(os.listdir(new))
        assert in_new == messages, f"{in_new} messages in new/, expected {messages}"

    return root, ["user@bench.test"], check


async def one_run(
    base: Path, messages: int, size: int, sessions: int, setup: Setup = make_root
) -> dict[str, float]:
    global FSYNCS
    root, rcpts, check = setup(base)
    core = Core(root)
    task = asyncio.create_task(core.run())
    await asyncio.wait_for(core.started.wait(), 10)
    assert core.send is not None
    send = core.send
    body = (b"x" * 75 + b"\n") * (size // 76)
    header = b"From: bench@client.test\nTo: user@bench.test\nSubject: bench\n\n"
    done = asyncio.Event()
    delivered = 0
    failures: list[str] = []
    sub = core.events.subscribe(maxsize=messages * 4)

    async def count() -> None:
        nonlocal delivered
        while delivered < messages:
            event = await sub.get()
            if event is None:
                return
            if event.kind == "delivery-finished":
                if event.data["result"] != "K":
                    failures.append(str(event.data["text"]))
                    done.set()
                    return
                delivered += 1
        done.set()

    counter = asyncio.create_task(count())
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(messages):
        queue.put_nowait(i)

    async def session() -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await send.enqueue(
                header + b"Message %d\n" % i + body,
                "bench@client.test",
                [rcpts[i % len(rcpts)]],
                invoked="invoked from network",
            )

    FSYNCS = 0
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    await asyncio.gather(*(session() for _ in range(sessions)))
    accepted = time.perf_counter() - start
    await asyncio.wait_for(done.wait(), 600)
    if failures:
        core.stop()
        await asyncio.wait_for(task, 60)
        raise SystemExit(f"a delivery did not succeed: {failures[0].strip()}")
    elapsed = time.perf_counter() - start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    child_cpu = spawn_cpu(core)
    fsyncs = FSYNCS
    syncs = core_syncs(core)
    counter.cancel()
    core.stop()
    try:
        await asyncio.wait_for(task, 60)
    finally:
        for line in (root.log / "current").read_text().splitlines()[-5:]:
            print("core log:", line.split(" ", 1)[1], file=sys.stderr)
    for line in (root.log / "current").read_text().splitlines():
        if " warning: " in line or " alert: " in line:
            print("core said:", line.split(" ", 1)[1], file=sys.stderr)
    check(messages)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime) + child_cpu
    return {
        "rate": messages / elapsed,
        "accept_rate": messages / accepted,
        "fsyncs": fsyncs / messages,
        "syncfs": syncs / messages,
        "cpu_ms": cpu * 1000 / messages,
    }


def main(setup: Setup = make_root, doc: str | None = None) -> int:
    parser = argparse.ArgumentParser(description=(doc or __doc__ or "").split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to make the roots (see above)")
    args = parser.parse_args()
    os.fsync = _counting_fsync  # count every fsync the core makes (files and directories)
    results = []
    bases: list[Path] = []
    top = None
    if args.dir is None and os.geteuid() == 0:
        top = Path(tempfile.mkdtemp(prefix="qmailtui-bench-", dir="/"))
        top.chmod(0o755)  # the user the deliveries run as must pass through
        args.dir = str(top)
    print(f"roots under {args.dir or tempfile.gettempdir()}", flush=True)
    try:
        for run in range(args.runs):
            # Roots are removed only at the end: on ext4 without a journal, inodes
            # deleted in the last minute make every file creation scan past them
            # (~0.5 ms of CPU each), so deleting one run's files would slow the next.
            bases.append(Path(tempfile.mkdtemp(prefix="qmailtui-bench-", dir=args.dir)))
            run_ = one_run(bases[-1], args.messages, args.size, args.sessions, setup)
            results.append(asyncio.run(run_))
            report(run, results[-1])
    finally:
        for base in bases:
            shutil.rmtree(base, ignore_errors=True)
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
    summarise(results, args)
    return 0


def report(run: int, r: dict[str, float]) -> None:
    print(
        f"run {run + 1}: {r['rate']:.0f} msgs/s end to end"
        f" (accepted at {r['accept_rate']:.0f}/s), {r['fsyncs']:.1f} fsyncs/msg,"
        f" {r['syncfs']:.2f} core syncfs/msg, {r['cpu_ms']:.2f} ms CPU/msg",
        flush=True,
    )


def summarise(results: list[dict[str, float]], args: argparse.Namespace) -> None:
    med = {k: statistics.median(r[k] for r in results) for k in results[0]}
    print(
        f"median of {args.runs}: {med['rate']:.0f} msgs/s end to end, {args.messages} x"
        f" {args.size} B, {args.sessions} sessions; {med['fsyncs']:.1f} fsyncs/msg,"
        f" {med['syncfs']:.2f} core syncfs/msg,"
        f" {med['cpu_ms']:.2f} ms CPU/msg (target: 500 msgs/s)"
    )


if __name__ == "__main__":
    sys.exit(main())
