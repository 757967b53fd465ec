"""POP3 on a big mailbox: ours (`qmailtui serve --pop3`) beside qmail's own
qmail-popup + checkpassword + qmail-pop3d under tcpserver, alternating.

    python bench/pop3_mailbox.py [--messages 10000] [--size 2000]
                                 [--big 20] [--big-size 5000000] [--rounds 5]

A Maildir of MESSAGES messages of SIZE bytes in cur/ (mtimes a minute old),
plus BIG messages of BIG_SIZE bytes in a second user's Maildir. Per round and
server, from a fresh TCP connection each time:
  list_s   connect, greeting, USER, PASS, LIST to its final "."
  uidl_s   the same with UIDL
  retr     one session RETRs every big message: MB/s of what came over the wire
Medians of the rounds are printed with their ranges.

Ours: a fresh root; the users in users/assign (nobody, as root), passwords
with `qmailtui passwd`. qmail's: ../shared/oracle's qmail-popup and
qmail-pop3d (built by its build.sh) with its checkpassword-stub, under
ucspi-tcp's tcpserver, on the very same Maildirs (absent: ours alone).
Sessions end with QUIT and delete nothing, so every round sees the same mail.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ORACLE = Path(os.environ.get("QMAIL_ORACLE_BIN", "/tmp/qmail-oracle/bin"))
CLI = [sys.executable, "-m", "qmailtui"]
PASSWORD = "bench password"
NOBODY = 65534


def make_maildir(path: Path, count: int, size: int, tag: str) -> None:
    for sub in ("new", "cur", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    line = b"x" * 75 + b"\n"
    body = line * max(size // len(line), 1)
    past = time.time() - 60
    for n in range(count):
        name = path / "cur" / f"{1700000000 + n}.{n}_{tag}.bench:2,S"
        name.write_bytes(b"Subject: message %d\n\n" % n + body)
        os.utime(name, (past, past))


def chown_tree(path: Path) -> None:
    if os.geteuid() != 0:
        return
    for directory, _, names in os.walk(path):
        os.chown(directory, NOBODY, NOBODY)
        for name in names:
            os.chown(Path(directory) / name, NOBODY, NOBODY)


class Conn:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.buf = b""

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def command(self, text: bytes) -> bytes:
        self.sock.sendall(text + b"\r\n")
        reply = self.line()
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"{text!r}: {reply!r}")
        return reply

    def multiline(self, text: bytes) -> int:
        """Send, then read to the final dot; the bytes received."""
        self.sock.sendall(text + b"\r\n")
        got = 0
        while True:
            end = self.buf.find(b"\r\n.\r\n")
            if end >= 0:
                got += end + 5
                self.buf = self.buf[end + 5 :]
                return got
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk

    def close(self) -> None:
        self.sock.sendall(b"QUIT\r\n")
        self.sock.close()


def login(port: int, user: str) -> Conn:
    conn = Conn(port)
    conn.line()  # greeting
    conn.command(b"USER " + user.encode())
    conn.command(b"PASS " + PASSWORD.encode())
    return conn


def listing(port: int, user: str, verb: bytes) -> float:
    start = time.perf_counter()
    conn = login(port, user)
    conn.multiline(verb)
    took = time.perf_counter() - start
    conn.close()
    return took


def retr_rate(port: int, user: str, count: int) -> float:
    conn = login(port, user)
    start = time.perf_counter()
    total = 0
    for n in range(1, count + 1):
        total += conn.multiline(b"RETR %d" % n)
    took = time.perf_counter() - start
    conn.close()
    return total / took / 1e6


class Ours:
    def __init__(self, top: Path, homes: dict[str, Path]) -> None:
        self.root = top / "qmail"
        subprocess.run([*CLI, "init", str(self.root), "--me", "pop.bench"], check=True)
        uid = NOBODY if os.geteuid() == 0 else os.geteuid()
        gid = NOBODY if os.geteuid() == 0 else os.getegid()
        assign = "".join(f"={u}:{u}:{uid}:{gid}:{h}:::\n" for u, h in homes.items())
        (self.root / "users" / "assign").write_text(assign + ".\n")
        subprocess.run([*CLI, "newu", "--root", str(self.root)], check=True)
        for user in homes:
            subprocess.run(
                [*CLI, "passwd", user, "--stdin", "--root", str(self.root)],
                input=PASSWORD + "\n",
                text=True,
                check=True,
            )
        self.proc = subprocess.Popen(
            [*CLI, "serve", "--root", str(self.root), "--smtp", "off", "--pop3", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline().decode()
        found = re.search(r"pop3=127\.0\.0\.1:(\d+)", ready)
        if found is None:
            raise SystemExit(f"serve did not start: {ready!r}")
        self.port = int(found[1])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class Qmail:
    def __init__(self, user: str, home: Path) -> None:
        tcpserver = shutil.which("tcpserver")
        assert tcpserver is not None
        env = {**os.environ, "CHECKPW_USER": user, "CHECKPW_PASS": PASSWORD}
        env["CHECKPW_HOME"] = str(home)
        chain = (
            str(ORACLE / "qmail-popup"),
            "pop.bench",
            str(ORACLE / "checkpassword-stub"),
            str(ORACLE / "qmail-pop3d"),
            "Maildir",
        )
        self.proc = subprocess.Popen(
            [tcpserver, "-1", "-HR", "-l", "pop.bench", "127.0.0.1", "0", *chain],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def cell(values: list[float], unit: str) -> str:
    if not values:
        return "-"
    low, high = min(values), max(values)
    return f"{statistics.median(values):.3f} {unit} [{low:.3f}-{high:.3f}]"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--size", type=int, default=2000)
    ap.add_argument("--big", type=int, default=20)
    ap.add_argument("--big-size", type=int, default=5_000_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    peer = (ORACLE / "qmail-pop3d").exists() and shutil.which("tcpserver") is not None
    top = Path(tempfile.mkdtemp(prefix="qmailtui-pop3-bench-", dir="/var/tmp"))
    top.chmod(0o755)
    results: dict[str, dict[str, list[float]]] = {}
    try:
        homes = {"many": top / "many", "big": top / "big"}
        make_maildir(homes["many"] / "Maildir", args.messages, args.size, "m")
        make_maildir(homes["big"] / "Maildir", args.big, args.big_size, "b")
        for home in homes.values():
            chown_tree(home)
        servers: list[tuple[str, object, object]] = []
        ours = Ours(top, homes)
        servers.append(("ours", ours, ours))
        if peer:
            servers.append(("qmail", Qmail("many", homes["many"]), Qmail("big", homes["big"])))
        print(
            f"# pop3_mailbox: {args.messages} x {args.size} B; RETR of {args.big} x"
            f" {args.big_size} B; {args.rounds} rounds" + ("" if peer else "; no qmail peer"),
            flush=True,
        )
        for r in range(args.rounds):
            order = servers if r % 2 == 0 else list(reversed(servers))
            for name, many, big in order:
                row = results.setdefault(name, {"list": [], "uidl": [], "retr": []})
                row["list"].append(listing(many.port, "many", b"LIST"))  # type: ignore[attr-defined]
                row["uidl"].append(listing(many.port, "many", b"UIDL"))  # type: ignore[attr-defined]
                row["retr"].append(retr_rate(big.port, "big", args.big))  # type: ignore[attr-defined]
                print(
                    f"round={r + 1} server={name} list_s={row['list'][-1]:.3f}"
                    f" uidl_s={row['uidl'][-1]:.3f} retr_MBps={row['retr'][-1]:.1f}",
                    flush=True,
                )
        for _, many, big in servers:
            for s in {id(many): many, id(big): big}.values():
                s.stop()  # type: ignore[attr-defined]
    finally:
        shutil.rmtree(top, ignore_errors=True)
    print()
    print("| server | connect to end of LIST | connect to end of UIDL | RETR |")
    print("|---|---|---|---|")
    for name, row in results.items():
        print(
            f"| {name} | {cell(row['list'], 's')} | {cell(row['uidl'], 's')}"
            f" | {cell(row['retr'], 'MB/s')} |"
        )
    print("\ntargets: LIST and UIDL under 0.5 s each, RETR at least 50 MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
