"""`qmailtui --demo`: a fresh root with demo users and a sample message, served.

Until the console exists this runs the core in the foreground with its log on
standard error, so a newcomer sees a message arrive in a Maildir.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path

from core.paths import QmailRoot
from core.setup import init_root, maildirmake

DEMO_HOST = "demo.example.test"
USERS = ("alice", "bob")
DEMO_PASSWORD = "demo"  # noqa: S105 - the demo users' POP3 password, printed for the user


def demo_dir() -> Path:
    if os.geteuid() == 0:
        # Deliveries run as the demo users' uid (nobody), who cannot pass through
        # root's home directory: keep the demo where everyone may enter.
        return Path("/var/tmp/qmailtui-demo")
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local/share")
    return Path(base) / "qmailtui" / "demo"


def make_demo_root(path: Path) -> QmailRoot:
    fresh = not (path / "control" / "me").exists()
    root = init_root(path, me=DEMO_HOST, force=True)
    if fresh:
        lines = []
        uid, gid = os.getuid(), os.getgid()
        if uid == 0:
            uid = gid = 65534  # qmail never delivers as root: the demo users are nobody
        for user in USERS:
            home = root.path / "home" / user
            home.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not (home / "Maildir").exists():
                maildirmake(home / "Maildir")
            if os.getuid() == 0:
                for path in (home, home / "Maildir", *(home / "Maildir").iterdir()):
                    os.chown(path, uid, gid)
            lines.append(f"={user}:{user}:{uid}:{gid}:{home}:::")
        root.assign.write_text("\n".join(lines) + "\n.\n")
        from core import users
        from core.checkpassword import set_password

        users.newu(root)
        for user in USERS:
            set_password(root.passwd, user, DEMO_PASSWORD)
    return root


SAMPLE = """To: alice@{host}
Cc: bob@{host}, postmaster@{host}
Subject: Welcome to qmailtui

This message was queued by `qmailtui inject` and delivered by the core
you are watching. Look in {root}/home/alice/Maildir/new/, or read it
over POP3 as alice, password demo (the port is on the `ready` line).
"""


def run_demo(root_arg: str | None) -> int:
    path = Path(root_arg) if root_arg else demo_dir()
    root = make_demo_root(path)
    from qmailtui.injecting import inject

    code = inject(
        root,
        SAMPLE.format(host=DEMO_HOST, root=root.path).encode(),
        mode="A",
        args=(),
        sender=None,
        env={"USER": "demo", "NAME": "qmailtui demo"},
        prog="qmailtui --demo",
    )
    if code:
        return code
    print(f"demo root: {root.path}  (stop with Ctrl-C)", file=sys.stderr)
    from core.daemon import Core

    core = Core(
        root,
        log_stderr=True,
        ready=lambda line: print(line, flush=True),
        smtp=_free_or_any(2525),
        pop3=_free_or_any(1110),
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(core.run())
    print(f"alice's mail: {root.path}/home/alice/Maildir/new/", file=sys.stderr)
    return 0


def _free_or_any(port: int) -> tuple[str, int]:
    """127.0.0.1:PORT for the demo, or any free port if that one is taken."""
    import socket

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return ("127.0.0.1", 0)
    return ("127.0.0.1", port)
