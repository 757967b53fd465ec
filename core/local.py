"""Deliver to one local recipient, as qmail-lspawn + qmail-local do (spec/local.md).

`plan()` decides, without side effects, who owns the address, which `.qmail`
file applies and what it says; `deliver()` carries the plan out. The address
tracer prints the same plan, so what it says is what happens.

Supported here: users/assign owners, the alias user, the `.qmail` search
order with `-default` files, Maildir, mbox and forward lines, the loop check,
Delivered-To and Return-Path. Program lines are recognised but deferred until
program delivery (with its uid switch) exists.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from core import users
from core.control import Config
from core.errors import UserError
from core.maildir import MailboxError, deliver_maildir, deliver_mbox
from core.paths import QmailRoot
from core.queue import Queue, QueueError
from core.quote import quote2


@dataclass(frozen=True, slots=True)
class Result:
    """A delivery's outcome in qmail-spawn's terms: K success, Z defer, D fail."""

    status: str
    text: str

    @property
    def ok(self) -> bool:
        return self.status == "K"


@dataclass(frozen=True, slots=True)
class Instruction:
    kind: str  # "maildir", "mbox", "forward", "program"
    value: str
    line: int
    source: str  # the .qmail file, or "control/defaultdelivery"


@dataclass
class Plan:
    recipient: str
    local: str
    domain: str
    owner: users.Owner | None = None
    tried: list[Path] = field(default_factory=list)
    dotqmail: Path | None = None
    instructions: list[Instruction] = field(default_factory=list)
    newsender: str = ""
    failure: Result | None = None
    notes: list[str] = field(default_factory=list)


NO_MAILBOX = "Sorry, no mailbox here by that name. (#5.1.1)\n"
LOOPING = "This message is looping: it already has my Delivered-To line. (#5.4.6)\n"


def alias_owner(root: QmailRoot, local: str) -> users.Owner:
    """qmail-getpw's last resort: the alias user, ext = the whole local part."""
    st = os.stat(root.alias) if root.alias.exists() else None
    return users.Owner(
        user="alias",
        uid=st.st_uid if st else os.getuid(),
        gid=st.st_gid if st else os.getgid(),
        home=str(root.alias),
        dash="-",
        ext=local,
        source="the alias user (alias/)",
    )


def candidates(dash: str, ext: str) -> list[str]:
    """The .qmail names qmail-local tries, in order (local.md §5.4)."""
    safe = ext.lower().replace(".", ":")
    names = [f".qmail{dash}{safe}"]
    for i in range(len(safe), -1, -1):
        if i == 0 or safe[i - 1] == "-":
            names.append(f".qmail{dash}{safe[:i]}default")
    return names


def parse_lines(text: str, source: str) -> tuple[list[Instruction], Result | None]:
    instructions: list[Instruction] = []
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.rstrip(" \t")
        if not line.strip():
            if number == 1 and text.strip():
                return [], Result("Z", "Uh-oh: first line of .qmail file is blank. (#4.2.1)\n")
            continue
        first = line[0]
        if first == "#" or first == "+":
            continue
        if first == "|":
            instructions.append(Instruction("program", line[1:], number, source))
        elif first in "./":
            kind = "maildir" if line.endswith("/") else "mbox"
            instructions.append(Instruction(kind, line, number, source))
        elif first == "&":
            instructions.append(Instruction("forward", line[1:], number, source))
        else:
            instructions.append(Instruction("forward", line, number, source))
    return instructions, None


def plan(root: QmailRoot, config: Config, recipient: str, sender: str) -> Plan:
    local, _, domain = recipient.rpartition("@")
    p = Plan(recipient, local, domain)
    if not local:
        p.notes.append("empty local part: a trash address, the delivery succeeds")
        return p
    try:
        owner = users.lookup(root, local)
    except (OSError, ValueError, UserError):
        p.failure = Result("Z", "Trouble reading users/cdb in qmail-lspawn.\n")
        return p
    p.owner = owner or alias_owner(root, local)
    home = Path(p.owner.home)
    try:
        st = os.stat(home)
    except OSError as e:
        p.failure = Result("Z", f"Unable to switch to {home}: {e.strerror}. (#4.3.0)\n")
        return p
    if st.st_mode & stat.S_IWOTH:
        p.failure = Result("Z", "Uh-oh: home directory is writable. (#4.7.0)\n")
        return p
    if st.st_mode & stat.S_ISVTX:
        p.failure = Result(
            "Z", "Home directory is sticky: user is editing his .qmail file. (#4.2.1)\n"
        )
        return p
    text: str | None = None
    for name in candidates(p.owner.dash, p.owner.ext):
        path = home / name
        p.tried.append(path)
        try:
            fst = os.stat(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            p.failure = Result("Z", f"Unable to open {path}: {e.strerror}. (#4.3.0)\n")
            return p
        if not stat.S_ISREG(fst.st_mode):
            continue
        if fst.st_mode & stat.S_IWOTH:
            p.failure = Result("Z", "Uh-oh: .qmail file is writable. (#4.7.0)\n")
            return p
        p.dotqmail = path
        try:
            text = path.read_text("utf-8", "surrogateescape")
        except OSError as e:
            p.failure = Result("Z", f"Unable to open {path}: {e.strerror}. (#4.3.0)\n")
            return p
        break
    if p.dotqmail is None and p.owner.dash:
        p.failure = Result("D", NO_MAILBOX)
        return p
    source = str(p.dotqmail) if p.dotqmail else "control/defaultdelivery"
    if not text:
        if p.dotqmail is not None:
            p.notes.append(f"{p.dotqmail.name} is empty: control/defaultdelivery applies")
        source = "control/defaultdelivery"
        text = "\n".join(config.defaultdelivery)
    p.instructions, p.failure = parse_lines(text, source)
    p.newsender = sender
    return p


def _inside(home: Path, target: Path) -> bool:
    real_home = os.path.realpath(home)
    real = os.path.realpath(target)
    return real == real_home or real.startswith(real_home + os.sep)


def deliver(
    root: QmailRoot,
    config: Config,
    queue: Queue,
    recipient: str,
    sender: str,
    msgid: int,
    now: float,
) -> Result:
    p = plan(root, config, recipient, sender)
    if p.failure is not None:
        return p.failure
    if p.owner is None:
        return Result("K", "")  # trash address
    home = Path(p.owner.home)
    dtline = f"Delivered-To: {recipient.replace(chr(10), '_')}\n".encode("utf-8", "surrogateescape")
    message = root.mess(msgid)
    try:
        if _has_line(message, dtline):
            return Result("D", LOOPING)
    except OSError:
        return Result("Z", "Unable to read message. (#4.3.0)\n")
    rpline = f"Return-Path: <{_quote_sender(sender)}>\n".encode("utf-8", "surrogateescape")
    files = forwards = programs = 0
    forward_to: list[str] = []
    for ins in p.instructions:
        if ins.kind in ("maildir", "mbox"):
            target = home / ins.value
            if not _inside(home, target):
                return Result(
                    "Z",
                    f"Uh-oh: {ins.value} in {ins.source} is outside the home directory. (#4.7.0)\n",
                )
            try:
                if ins.kind == "maildir":
                    deliver_maildir(target, rpline + dtline, message, queue.durable)
                else:
                    deliver_mbox(target, rpline + dtline, message, sender)
            except MailboxError as e:
                return Result("D" if e.permanent else "Z", e.text + "\n")
            files += 1
        elif ins.kind == "forward":
            forward_to.append(ins.value)
            forwards += 1
        else:
            return Result(
                "Z",
                f"Program delivery ({ins.source} line {ins.line}) is not supported yet. (#4.3.0)\n",
            )
    qp = ""
    if forward_to:
        try:
            data = dtline + message.read_bytes()
            uid = os.getuid()
            new = queue.enqueue(
                data,
                p.newsender,
                forward_to,
                uid=uid,
                pid=os.getpid(),
                invoked=f"invoked by uid {uid}",
                now=now,
            )
        except QueueError as e:
            return Result("D" if e.permanent else "Z", f"Unable to forward message: {e.text}.\n")
        except OSError:
            return Result("Z", "Unable to read message. (#4.3.0)\n")
        qp = f"qp {new}\n"
    return Result("K", f"did {files}+{forwards}+{programs}\n{qp}")


def _has_line(message: Path, line: bytes) -> bool:
    """Is `line` one of the header lines (up to the first empty line)?"""
    with open(message, "rb") as f:
        for raw in f:
            if raw == b"\n":
                return False
            if raw == line:
                return True
    return False


def _quote_sender(sender: str) -> str:
    return quote2(sender).replace("\n", "_")
