"""Local delivery at scale: 2,000 messages to 50 users, half with a Maildir,
half with an mbox (./Mailbox in their .qmail), through the core's enqueue API.

    python bench/local_mix.py [--messages 2000] [--size 5000] [--sessions 10] [--runs 3]

Prints messages per second from the first enqueue until the last delivery,
as bench/throughput.py does (same roots, same durability), so that the two
figures compare: local delivery must not become the bottleneck.
"""

from __future__ import annotations

import mailbox
import os
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from throughput import main

from core import users
from core.paths import QmailRoot
from core.setup import init_root, maildirmake

USERS = 50


def make_root(base: Path) -> tuple[QmailRoot, list[str], Callable[[int], None]]:
    root = init_root(base / "qmail", me="bench.test")
    uid, gid = os.getuid(), os.getgid()
    if uid == 0:  # qmail never delivers as root: the users are nobody
        uid = gid = 65534
        base.chmod(0o755)
    lines, rcpts, maildirs, mboxes = [], [], [], []
    for n in range(USERS):
        name = f"user{n}"
        home = base / "home" / name
        home.mkdir(parents=True, mode=0o700)
        if n % 2 == 0:
            maildirmake(home / "Maildir")
            maildirs.append(home / "Maildir")
        else:
            (home / ".qmail").write_text("./Mailbox\n")
            mboxes.append(home / "Mailbox")
        if os.getuid() == 0:
            for directory, _, names in os.walk(home):
                os.chown(directory, uid, gid)
                for file in names:
                    os.chown(Path(directory) / file, uid, gid)
        lines.append(f"={name}:{name}:{uid}:{gid}:{home}:::")
        rcpts.append(f"{name}@bench.test")
    (base / "home").chmod(0o755)
    root.assign.write_text("\n".join(lines) + "\n.\n")
    users.newu(root)

    def check(messages: int) -> None:
        """Read what arrived with Python's own mailbox readers."""
        count = sum(len(mailbox.Maildir(str(m), create=False)) for m in maildirs)
        count += sum(len(mailbox.mbox(str(m), create=False)) for m in mboxes)
        assert count == messages, f"{count} messages delivered, expected {messages}"

    return root, rcpts, check


if __name__ == "__main__":
    sys.exit(main(make_root, __doc__))
