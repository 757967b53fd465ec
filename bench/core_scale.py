"""The running core with a big queue: start-up, memory, the console's first
snapshot, and the event stream under load.

    python bench/core_scale.py [--messages 100000] [--rounds 5] [--load 3000]

A fresh root gets MESSAGES queued messages (written with the queue's own
code, one remote recipient each, without fsyncs: this is set-up, not what is
measured) and control/concurrencyremote 0, so the core holds them without
trying to deliver. Then, per round (a new core each time):

  startup_s   from exec of `qmailtui serve` to its `ready` line
  rss_mb      the core's resident memory once ready (VmRSS), and its peak (VmHWM)
  snapshot_ms a `snapshot` request for the first page (50 messages), over the
              control socket, median of 20, from a connected client

Then, once, the event stream: a subscriber counts events while LOAD local
messages arrive over SMTP from 8 sending threads as fast as they go; printed:
messages/s achieved, events/s received by the subscriber, and whether it
lagged. (The issue asks for this under 1,000 msgs/s; our SMTP ingest on this
machine kind reaches about 700/s, so the load is what it can take.)

Targets: snapshot under 100 ms, start-up under 5 s, memory under 300 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.paths import QmailRoot  # noqa: E402
from core.queue import Queue  # noqa: E402

CLI = [sys.executable, "-m", "qmailtui"]


class NoSync:
    def sync(self, files: Sequence[Path], dirs: Sequence[Path]) -> None:
        pass


def populate(root: QmailRoot, count: int) -> None:
    queue = Queue(root, id_block=1024, durability=NoSync())
    now = time.time()
    body = b"From: a@b.test\nSubject: queued\n\n" + b"x" * 1000 + b"\n"
    for n in range(count):
        rcpt = f"user{n % 5000}@far{n % 97}.test"
        msgid = queue.enqueue(
            body, "a@b.test", [rcpt], uid=0, pid=1, invoked="invoked by uid 0", now=now - n
        )
        queue.preprocess(msgid, "a@b.test", [], [rcpt], now - n)


def start(root: QmailRoot) -> tuple[subprocess.Popen[bytes], float, int]:
    began = time.perf_counter()
    proc = subprocess.Popen(
        [*CLI, "serve", "--root", str(root.path), "--smtp", "127.0.0.1:0", "--pop3", "off"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    took = time.perf_counter() - began
    found = re.match(r"ready smtp=127\.0\.0\.1:(\d+)", line)
    if found is None:
        proc.kill()
        raise SystemExit(f"serve did not start: {line!r}")
    return proc, took, int(found[1])


def memory(pid: int) -> tuple[float, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024  # type: ignore[index]
    peak = int(re.search(r"VmHWM:\s+(\d+)", status)[1]) / 1024  # type: ignore[index]
    return rss, peak


class Control:
    def __init__(self, root: QmailRoot) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(root.control_socket))
        self.stream = self.sock.makefile("rb")

    def call(self, op: str, **args: object) -> dict[str, object]:
        self.sock.sendall(json.dumps({"v": 1, "id": 1, "op": op, "args": args}).encode() + b"\n")
        return dict(json.loads(self.stream.readline()))

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(120)
    if proc.stdout is not None:
        proc.stdout.close()


def event_load(root: QmailRoot, port: int, count: int) -> tuple[float, float, bool]:
    sub = Control(root)
    sub.sock.sendall(b'{"v":1,"id":1,"op":"subscribe","args":{}}\n')
    sub.stream.readline()
    events = 0
    lagged = False
    done = threading.Event()

    def count_events() -> None:
        nonlocal events, lagged
        sub.sock.settimeout(2)
        while not done.is_set():
            try:
                line = sub.stream.readline()
            except OSError:
                continue
            if not line:
                return
            events += 1
            if b'"event":"lagged"' in line:
                lagged = True

    reader = threading.Thread(target=count_events)
    reader.start()
    each = count // 8

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
            for _ in range(each):
                client.sendmail("a@b.test", ["bench@bench.local"], b"Subject: load\r\n\r\nx\r\n")

    began = time.perf_counter()
    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - began
    time.sleep(1.0)  # the deliveries' events
    done.set()
    reader.join(10)
    sub.close()
    return each * 8 / took, events / (took + 1.0), lagged


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--load", type=int, default=3000)
    args = ap.parse_args()
    top = Path(tempfile.mkdtemp(prefix="qmailtui-scale-", dir="/var/tmp"))
    try:
        subprocess.run([*CLI, "init", str(top / "qmail"), "--me", "bench.local"], check=True)
        root = QmailRoot(top / "qmail")
        (root.control / "concurrencyremote").write_text("0\n")
        (root.control / "smtproutes").write_text(":127.0.0.1:1\n")
        (root.etc / "tcp.smtp").write_text('127.0.0.1:allow,RELAYCLIENT=""\n')
        home = top / "home"
        (home / "Maildir").mkdir(parents=True)
        for sub in ("new", "cur", "tmp"):
            (home / "Maildir" / sub).mkdir()
        uid = 65534 if os.geteuid() == 0 else os.geteuid()
        if os.geteuid() == 0:
            for path in (home, *(home / "Maildir").rglob("*"), home / "Maildir"):
                os.chown(path, uid, uid)
        (root.users / "assign").write_text(f"=bench:bench:{uid}:{uid}:{home}:::\n.\n")
        subprocess.run([*CLI, "newu", "--root", str(root.path)], check=True)
        began = time.perf_counter()
        populate(root, args.messages)
        print(
            f"# core_scale: {args.messages} queued messages (written in"
            f" {time.perf_counter() - began:.0f} s), {args.rounds} rounds",
            flush=True,
        )
        starts, rss, peaks, snaps = [], [], [], []
        for r in range(args.rounds):
            proc, took, port = start(root)
            resident, peak = memory(proc.pid)
            control = Control(root)
            times = []
            for _ in range(20):
                t0 = time.perf_counter()
                answer = control.call("snapshot", limit=50)
                times.append((time.perf_counter() - t0) * 1000)
            result = answer["result"]
            assert isinstance(result, dict)
            control.close()
            snap = statistics.median(times)
            print(
                f"round={r + 1} startup_s={took:.2f} rss_mb={resident:.0f} peak_mb={peak:.0f}"
                f" snapshot_ms={snap:.1f} queued={result['queue']['messages']}",  # type: ignore[index]
                flush=True,
            )
            starts.append(took)
            rss.append(resident)
            peaks.append(peak)
            snaps.append(snap)
            if r == args.rounds - 1:
                rate, per_s, lagged = event_load(root, port, args.load)
                print(
                    f"events: load {rate:.0f} msgs/s over SMTP, subscriber got {per_s:.0f}"
                    f" events/s, lagged={lagged}",
                    flush=True,
                )
            stop(proc)
    finally:
        shutil.rmtree(top, ignore_errors=True)

    def med(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"

    print()
    print(f"start-up, s: {med(starts)}   (target < 5)")
    print(f"memory once ready, MB: {med(rss)}; peak {med(peaks)}   (target < 300)")
    print(f"snapshot of the first page, ms: {med(snaps)}   (target < 100)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
