"""Injection cost: wall time of one `qmailtui-sendmail -t < msg` process, beside
`python3 -c pass` measured in the same run, alternating the two.

    python bench/inject_cost.py [--runs 40]

Prints the medians and their ratio (target: at most 6x the bare interpreter).
Also lists the modules the injection path imports, so a heavy import that
creeps in (asyncio, email, textual) shows up here first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.setup import init_root

MESSAGE = b"To: alice@bench.test\nSubject: cron output\n\n" + b"all is well\n" * 40
HEAVY = ("asyncio", "email", "textual", "rich", "json", "argparse", "aiosmtpd", "dns", "cdblib")


def timed(cmd: list[str], data: bytes, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, input=data, env=env, check=True, timeout=60, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    sendmail = shutil.which("qmailtui-sendmail")
    if sendmail is None:
        print("qmailtui-sendmail is not installed (pip install -e .)", file=sys.stderr)
        return 1
    base = Path(tempfile.mkdtemp(prefix="qmailtui-inject-"))
    try:
        root = init_root(base / "qmail", me="bench.test")
        env = dict(os.environ, QMAILHOME=str(root.path), USER="cron")
        bare, inject = [], []
        for _ in range(3):  # warm the page cache for both
            timed([sys.executable, "-c", "pass"], b"", env)
            timed([sendmail, "-t"], MESSAGE, env)
        for _ in range(args.runs):
            bare.append(timed([sys.executable, "-c", "pass"], b"", env))
            inject.append(timed([sendmail, "-t"], MESSAGE, env))
        queued = len(os.listdir(root.queue / "todo"))
        probe = subprocess.run(
            [sys.executable, "-X", "importtime", sendmail, "-t"],
            input=MESSAGE,
            env=env,
            capture_output=True,
            timeout=60,
            check=True,
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    loaded = {line.split("|")[-1].strip() for line in probe.stderr.decode().splitlines()}
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
    b, i = statistics.median(bare), statistics.median(inject)
    print(f"python3 -c pass: median {b * 1000:.1f} ms over {args.runs} runs")
    print(f"qmailtui-sendmail -t: median {i * 1000:.1f} ms over {args.runs} runs")
    print(f"ratio {i / b:.2f}x (target: at most 6x); {queued} messages queued")
    print("heavy modules imported: " + (", ".join(heavy) if heavy else "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
