"""Parallel remote delivery: one message to a mailing list must not wait for
one slow domain. Ours and Postfix on the very same scenario, alternating.

    python bench/remote_parallel.py [--rounds 3] [--configs parallel serial]
                                    [--no-peer] [--peer-configs parallel]

The scenario is ../shared/bench/parallel_sinks.py's: ONE message to 200
recipients in 20 domains (10 each), submitted over SMTP; slow.test's server
waits STALL s (10) on every connection before its greeting, the 19 others
answer at once. It prints, per run, the time from the start of the submission
until all 190 recipients of the fast domains had the message (fast_s), until
all 200 had it (all_s), and the submission's own time (submit_s).

Ours: a fresh root, `qmailtui serve --smtp 127.0.0.1:0 --pop3 off` started
for each run (so no connection or timeout-table state carries over), relaying
for 127.0.0.1 by a tcp rule, with control/smtproutes sending each domain to
its sink (`slow.test:127.0.0.2:PORT` ...), as Postfix's transport map does.
Configurations:
  parallel  the defaults (concurrencyremote 20)
  serial    concurrencyremote 1: one SMTP transaction at a time (sendmail-like)

Postfix: ../shared/bench/postfix_parallel.sh run for one round per round of
ours (it needs root and installs Postfix if missing; --no-peer skips it), with
--peer-configs (its "parallel" is its defaults, "serial" one delivery at a time).

Runs alternate (ours parallel, ours serial, Postfix ..., then again), since
these machines drift; the table gives medians and ranges, then the ratio of
our parallel fast_s to Postfix's in the same run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_BENCH = Path(os.environ.get("BENCH_SHARED", REPO.parent / "shared" / "bench"))
SINKS = SHARED_BENCH / "parallel_sinks.py"
CLI = [sys.executable, "-m", "qmailtui"]
PAIR = re.compile(r"(\w+)=(\S+)")


def routes(domains: int) -> list[tuple[str, str]]:
    out = subprocess.run(
        [sys.executable, str(SINKS), "routes", "--domains", str(domains)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [(d, a) for d, a in (line.split() for line in out.splitlines())]


class Ours:
    def __init__(self, top: Path, sink_port: int, domains: int) -> None:
        self.root = top / "qmail"
        subprocess.run(
            [*CLI, "init", str(self.root), "--me", "bench.local"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        control = self.root / "control"
        (control / "smtproutes").write_text(
            "".join(f"{d}:{a}:{sink_port}\n" for d, a in routes(domains))
        )
        (self.root / "etc" / "tcp.smtp").write_text('127.0.0.1:allow,RELAYCLIENT=""\n')
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, concurrency: int | None) -> str:
        path = self.root / "control" / "concurrencyremote"
        if concurrency is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(f"{concurrency}\n")
        self.proc = subprocess.Popen(
            [*CLI, "serve", "--root", str(self.root), "--smtp", "127.0.0.1:0", "--pop3", "off"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        found = re.match(r"ready smtp=(\S+) ", line)
        if found is None:
            self.stop()
            raise SystemExit(f"serve did not start: {line!r}")
        return found[1]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None


def run_ours(ours: Ours, label: str, args: argparse.Namespace) -> dict[str, str]:
    concurrency = {"parallel": None, "serial": 1}[label]
    where = ours.start(concurrency)
    try:
        done = subprocess.run(
            [
                sys.executable,
                str(SINKS),
                "run",
                "--port",
                str(args.sink_port),
                "--submit",
                where,
                "--domains",
                str(args.domains),
                "--per-domain",
                str(args.per_domain),
                "--stall",
                str(args.stall),
                "--timeout",
                "150",
                "--label",
                f"ours-{label}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        ours.stop()
    line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr
    print(line, flush=True)
    return dict(PAIR.findall(line))


def run_postfix(configs: list[str]) -> list[dict[str, str]]:
    script = SHARED_BENCH / "postfix_parallel.sh"
    done = subprocess.run(
        ["bash", str(script), "1", " ".join(configs)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env={**os.environ, "PY": sys.executable},
    )
    rows = []
    for line in done.stdout.splitlines():
        if "label=" in line:
            fields = dict(PAIR.findall(line))
            fields["label"] = "postfix-" + fields["label"]
            print(" ".join(f"{k}={v}" for k, v in fields.items() if k != "round"), flush=True)
            rows.append(fields)
    if not rows:
        print(f"postfix run failed: {done.stderr.strip()[-500:]}", flush=True)
    return rows


def seconds(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if re.fullmatch(r"[0-9.]+", r.get(key, "-"))]


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    low, high = min(values), max(values)
    return f"{statistics.median(values):.2f} [{low:.2f}-{high:.2f}] (n={len(values)})"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", nargs="+", default=["parallel", "serial"])
    ap.add_argument("--peer-configs", nargs="+", default=["parallel"])
    ap.add_argument("--no-peer", action="store_true", help="measure ours alone")
    ap.add_argument("--sink-port", type=int, default=2531)
    ap.add_argument("--domains", type=int, default=20)
    ap.add_argument("--per-domain", type=int, default=10)
    ap.add_argument("--stall", type=float, default=10.0)
    args = ap.parse_args()
    if not SINKS.exists():
        print(f"{SINKS} is missing (set BENCH_SHARED)", file=sys.stderr)
        return 1
    peer = not args.no_peer
    if peer and os.geteuid() != 0:
        print("Postfix needs root: measuring ours alone", flush=True)
        peer = False
    rev = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    print(f"# remote_parallel at {rev}, {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    print(
        f"# {args.domains} domains x {args.per_domain} recipients, slow.test stalls"
        f" {args.stall:g} s per connection",
        flush=True,
    )
    rows: list[dict[str, str]] = []
    top = Path(tempfile.mkdtemp(prefix="qmailtui-remote-bench-", dir="/var/tmp"))
    try:
        ours = Ours(top, args.sink_port, args.domains)
        for _ in range(args.rounds):
            for label in args.configs:
                rows.append(run_ours(ours, label, args))
            if peer:
                rows += run_postfix(args.peer_configs)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    by_label: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_label.setdefault(r.get("label", "?"), []).append(r)
    print()
    print("| config | 190 fast rcpts arrived, s | all 200, s | submission (250), s |")
    print("|---|---|---|---|")
    for label, group in by_label.items():
        print(
            f"| {label} | {cell(seconds(group, 'fast_s'))} | {cell(seconds(group, 'all_s'))}"
            f" | {cell(seconds(group, 'submit_s'))} |"
        )
    ours_fast = seconds(by_label.get("ours-parallel", []), "fast_s")
    theirs_fast = seconds(by_label.get("postfix-parallel", []), "fast_s")
    if ours_fast and theirs_fast:
        ratio = statistics.median(ours_fast) / statistics.median(theirs_fast)
        print(f"\nours/Postfix, parallel, 190 fast recipients: {ratio:.2f}x (target <= 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
