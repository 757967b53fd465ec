"""QmailRoot: every path under a qmail root, computed in one place."""

from __future__ import annotations

import os
from pathlib import Path

SPLIT = 23  # conf-split: hash subdirectories of mess/ info/ local/ remote/

SPLIT_DIRS = ("mess", "info", "local", "remote")
QMAIL_FLAT_DIRS = ("todo", "intd", "bounce", "pid", "lock")
OUR_FLAT_DIRS = ("hold", "state", "spare")  # made on start if a qmail queue lacks them
FLAT_DIRS = QMAIL_FLAT_DIRS + OUR_FLAT_DIRS


def is_same_file(path: Path, fd: int) -> bool:
    """Does `path` still name the file open on `fd`? (A queue file's inode may be
    reused once its message is gone; a reader checks this after reading.)"""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev)


def default_root() -> Path:
    return Path(os.environ.get("QMAILHOME") or "/var/qmail")


class QmailRoot:
    """The directory tree of one qmail installation (INTERFACE.md, "The qmail root")."""

    __slots__ = ("_q", "path")

    def __init__(self, path: Path | str) -> None:
        self.path = Path(os.path.abspath(path))
        # queue paths are made several times per message: one string, no joins
        self._q = os.path.join(str(self.path), "queue") + "/"

    def __repr__(self) -> str:
        return f"QmailRoot({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QmailRoot) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    # top level
    @property
    def control(self) -> Path:
        return self.path / "control"

    @property
    def alias(self) -> Path:
        return self.path / "alias"

    @property
    def users(self) -> Path:
        return self.path / "users"

    @property
    def etc(self) -> Path:
        return self.path / "etc"

    @property
    def queue(self) -> Path:
        return self.path / "queue"

    @property
    def log(self) -> Path:
        return self.path / "log"

    @property
    def run(self) -> Path:
        return self.path / "run"

    def control_file(self, name: str) -> Path:
        return self.control / name

    @property
    def assign(self) -> Path:
        return self.users / "assign"

    @property
    def users_cdb(self) -> Path:
        return self.users / "cdb"

    @property
    def passwd(self) -> Path:
        return self.users / "passwd"

    @property
    def tcp_smtp(self) -> Path:
        return self.etc / "tcp.smtp"

    @property
    def tcp_pop3(self) -> Path:
        return self.etc / "tcp.pop3"

    @property
    def lock_file(self) -> Path:
        return self.run / "lock"

    @property
    def pid_file(self) -> Path:
        return self.run / "pid"

    @property
    def control_socket(self) -> Path:
        return self.run / "control.sock"

    @property
    def log_current(self) -> Path:
        return self.log / "current"

    # the queue (spec/queue.md §4)
    def split(self, kind: str, msgid: int) -> Path:
        return Path(self.split_name(kind, msgid))

    def flat_name(self, kind: str, msgid: int) -> str:
        """queue/KIND/N as a string (todo, intd, bounce, state, hold)."""
        return f"{self._q}{kind}/{msgid}"

    def split_name(self, kind: str, msgid: int) -> str:
        """As split(), as a string: loading a big queue opens hundreds of
        thousands of these, and a Path costs more to make than the open."""
        return f"{self._q}{kind}/{msgid % SPLIT}/{msgid}"

    def mess(self, msgid: int) -> Path:
        return self.split("mess", msgid)

    def info(self, msgid: int) -> Path:
        return self.split("info", msgid)

    def channel(self, name: str, msgid: int) -> Path:
        return self.split(name, msgid)

    def todo(self, msgid: int) -> Path:
        return Path(f"{self._q}todo/{msgid}")

    def intd(self, msgid: int) -> Path:
        return Path(f"{self._q}intd/{msgid}")

    def bounce(self, msgid: int) -> Path:
        return Path(f"{self._q}bounce/{msgid}")

    def hold(self, msgid: int) -> Path:
        return Path(f"{self._q}hold/{msgid}")

    def state(self, msgid: int) -> Path:
        return Path(f"{self._q}state/{msgid}")

    @property
    def trigger(self) -> Path:
        return self.queue / "lock" / "trigger"

    @property
    def tcpto(self) -> Path:
        return self.queue / "lock" / "tcpto"

    @property
    def nextid(self) -> Path:
        return self.queue / "lock" / "nextid"
