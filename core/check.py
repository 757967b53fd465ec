"""`qmailtui check`: every problem in a root's configuration, with file and line.

Besides what the readers report (control.py, users.py), this warns about the
mistakes install guides spread: an open relay, a rule file newer than its
cdb, a `.qmail` file others may write, a local domain SMTP would refuse, a
control line that another file makes useless.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from core import control, dotqmail, users
from core.errors import Problem
from core.paths import QmailRoot

COMPILED = (
    ("etc/tcp.smtp", "etc/tcp.smtp.cdb", "qmailtui tcprules etc/tcp.smtp.cdb etc/tcp.smtp.tmp"),
    ("etc/tcp.pop3", "etc/tcp.pop3.cdb", "qmailtui tcprules etc/tcp.pop3.cdb etc/tcp.pop3.tmp"),
    ("users/assign", "users/cdb", "qmailtui newu"),
    ("control/morercpthosts", "control/morercpthosts.cdb", "qmail-newmrh"),
)


def _stale(root: QmailRoot, has_assignments: bool) -> list[Problem]:
    problems = []
    for source, compiled, fix in COMPILED:
        src, cdb = root.path / source, root.path / compiled
        if not src.exists():
            continue
        if not cdb.exists():
            if source == "users/assign" and not has_assignments:
                continue  # no users/cdb and an empty one both mean "ask the passwd database"
            problems.append(
                Problem(src, None, f"{compiled} does not exist", "warning", hint=f"run {fix}")
            )
        elif src.stat().st_mtime > cdb.stat().st_mtime:
            problems.append(
                Problem(
                    src,
                    None,
                    f"newer than {compiled}: the change is not in effect",
                    "warning",
                    hint=f"run {fix}",
                )
            )
    return problems


def _home_mode(home: Path, label: str) -> list[Problem]:
    """qmail-local defers every delivery to a writable or sticky home (local.md §6)."""
    try:
        mode = home.stat().st_mode
    except OSError:
        return []
    if mode & stat.S_IWOTH:
        return [
            Problem(
                home,
                None,
                f"{label}: home directory is world-writable: qmail defers every delivery to it",
                hint=f"chmod o-w {home}",
            )
        ]
    if mode & stat.S_ISVTX:
        return [
            Problem(
                home,
                None,
                f"{label}: home directory is sticky: qmail defers every delivery to it"
                " (the sign of a user editing a .qmail file)",
                "warning",
                hint=f"chmod -t {home}",
            )
        ]
    return []


def _dotqmail_files(home: Path, label: str) -> list[Problem]:
    problems: list[Problem] = []
    try:
        names = sorted(n for n in os.listdir(home) if n.startswith(".qmail"))
    except OSError:
        return problems
    for name in names:
        path = home / name
        try:
            mode = path.stat().st_mode
        except OSError:
            continue
        if not stat.S_ISREG(mode):
            continue
        if mode & stat.S_IWOTH:
            problems.append(
                Problem(
                    path,
                    None,
                    f"{label}: world-writable: qmail defers every delivery through it",
                    hint=f"chmod o-w {path}",
                )
            )
        elif mode & stat.S_IWGRP:
            problems.append(
                Problem(
                    path,
                    None,
                    f"{label}: group-writable: anyone in its group can redirect this mail",
                    "warning",
                    hint=f"chmod g-w {path}",
                )
            )
        ext = name[len(".qmail") :]
        if ext != ext.lower() or "." in ext:
            # qmail-local looks for the extension lower-cased, with '.' as ':' (local.md §5.4)
            wanted = ".qmail" + ext.lower().replace(".", ":")
            problems.append(
                Problem(
                    path,
                    None,
                    f"{label}: never used: qmail looks for {wanted!r}",
                    "warning",
                    hint=f"rename it to {wanted!r}",
                )
            )
        try:
            text = path.read_text("utf-8", "surrogateescape")
        except OSError:
            continue
        problems += _instructions(text, path, home, label)
    return problems


def _instructions(text: str, path: Path, home: Path, label: str) -> list[Problem]:
    """A `.qmail` text read in `home`: the blank first line, Maildirs that do not exist."""
    try:
        instructions = dotqmail.parse(text.encode("utf-8", "surrogateescape"), str(path), False)
    except dotqmail.Failure:
        return [Problem(path, 1, f"{label}: first line is blank: qmail defers every delivery")]
    problems = []
    for instruction in instructions:
        if instruction.kind != "maildir":
            continue
        maildir = home / instruction.value
        if not (maildir / "new").is_dir():
            problems.append(
                Problem(
                    path,
                    instruction.line,
                    f"{label}: {instruction.value!r} is not a Maildir:"
                    " its deliveries would wait in the queue",
                    "warning",
                    hint=f"qmailtui maildirmake {str(maildir)!r}",
                )
            )
    return problems


def _entries(root: QmailRoot, name: str) -> list[tuple[int, str]]:
    """(line, entry) of a list file, for checks that name the line; [] if absent."""
    return control.read_list(root.control_file(name), []) or []


def _line_of(entries: list[tuple[int, str]], key: str) -> int | None:
    """The line of the last entry equal to `key` (the one constmap uses)."""
    found = [number for number, text in entries if text.lower() == key]
    return found[-1] if found else None


def _relaying(root: QmailRoot, config: control.Config) -> list[Problem]:
    if config.rcpthosts is None:
        return [
            Problem(
                root.control_file("rcpthosts"),
                None,
                "missing: qmail would relay for anyone (an open relay);"
                " the SMTP listener refuses to start",
                hint="list the domains you receive mail for, one a line",
            )
        ]
    problems = []
    locals_file = root.control_file("locals")
    locals_lines = _entries(root, "locals")
    for domain in sorted(config.locals):
        if not _accepted(domain, config.rcpthosts):
            problems.append(
                Problem(
                    locals_file if locals_file.exists() else root.control_file("me"),
                    _line_of(locals_lines, domain) if locals_file.exists() else None,
                    f"{domain!r} is local but not in control/rcpthosts:"
                    " SMTP clients cannot send mail to it",
                    "warning",
                )
            )
    virtual_lines = _colon_entries(root, "virtualdomains")
    for key in sorted(config.virtualdomains):
        domain = key.rpartition("@")[2]
        if config.is_local(domain):
            continue  # _shadowed says this line is never used
        if domain and config.virtualdomains[key] and not _accepted(domain, config.rcpthosts):
            problems.append(
                Problem(
                    root.control_file("virtualdomains"),
                    _line_of(virtual_lines, key),
                    f"{domain!r} is a virtual domain but not in control/rcpthosts:"
                    " SMTP clients cannot send mail to it",
                    "warning",
                )
            )
    return problems


def _colon_entries(root: QmailRoot, name: str) -> list[tuple[int, str]]:
    """(line, key) of a colon list."""
    return [(n, text.partition(":")[0]) for n, text in _entries(root, name) if ":" in text]


def _shadowed(root: QmailRoot, config: control.Config) -> list[Problem]:
    """Lines another file makes useless: qmail-send never looks past locals."""
    problems = []
    for number, key in _colon_entries(root, "virtualdomains"):
        domain = key.lower().rpartition("@")[2]
        if config.is_local(domain):
            problems.append(
                Problem(
                    root.control_file("virtualdomains"),
                    number,
                    f"{domain!r} is in control/locals, so this line is never used",
                    "warning",
                    hint="remove the domain from one of the two files",
                )
            )
    for route in config.smtproutes:
        if route.domain and not route.domain.startswith(".") and config.is_local(route.domain):
            problems.append(
                Problem(
                    root.control_file("smtproutes"),
                    route.line,
                    f"{route.domain!r} is in control/locals, so mail for it is never"
                    " sent by SMTP and this route is never used",
                    "warning",
                )
            )
    return problems


def _controls(root: QmailRoot, config: control.Config) -> list[Problem]:
    problems = []
    me = config.me
    if me is not None and control.HOSTNAME.fullmatch(me.lower()) and "." not in me.strip("."):
        problems.append(
            Problem(
                root.control_file("me"),
                1,
                f"{config.me!r} is not fully qualified: it is the default for"
                " envnoathost, bouncehost and the rest, and names this host in HELO",
                "warning",
                hint="write the full name, such as mx.example.org",
            )
        )
    for name, value in (
        ("concurrencylocal", config.concurrencylocal),
        ("concurrencyremote", config.concurrencyremote),
    ):
        if value == 0:
            problems.append(
                Problem(
                    root.control_file(name),
                    1,
                    "0 holds every delivery on this channel: messages only accumulate",
                    "warning",
                )
            )
    return problems


def _defaultdelivery(root: QmailRoot) -> list[Problem]:
    """The alias user's empty .qmail-postmaster and friends deliver by defaultdelivery."""
    if not root.alias.is_dir():
        return []
    path = root.control_file("defaultdelivery")
    lines: list[tuple[int | None, str]]
    try:
        lines = list(enumerate(path.read_text("utf-8", "surrogateescape").split("\n"), 1))
    except FileNotFoundError:
        lines = [(None, "./Maildir/")]  # the product's default (control.md §5)
    except OSError:
        return []  # control.load has reported it
    problems = []
    for number, raw in lines:
        line = raw.rstrip(" \t\r")
        if (
            line[:1] in (".", "/")
            and line.endswith("/")
            and not (root.alias / line / "new").is_dir()
        ):
            problems.append(
                Problem(
                    path,
                    number,
                    f"{line!r} is not a Maildir in alias/: mail for postmaster would wait"
                    " in the queue",
                    "warning",
                    hint=f"qmailtui maildirmake {str(root.alias / line)!r}",
                )
            )
    return problems


def _assignments(root: QmailRoot) -> tuple[list[users.Assignment], list[Problem]]:
    try:
        data = root.assign.read_bytes()
    except FileNotFoundError:
        return [], []
    except OSError as e:
        return [], [Problem(root.assign, None, f"unable to read: {e.strerror or e}")]
    return users.parse_assign(data, root.assign)


def check(root: QmailRoot) -> list[Problem]:
    config = control.load(root)
    problems = list(config.problems)
    problems += _controls(root, config)
    problems += _relaying(root, config)
    problems += _shadowed(root, config)
    assignments, assign_problems = _assignments(root)
    problems += assign_problems
    homes = {a.home: a.user for a in assignments if a.home.startswith("/")}
    for home, user in sorted(homes.items()):
        problems += _home_mode(Path(home), f"user {user}")
        problems += _dotqmail_files(Path(home), f"user {user}")
    problems += _home_mode(root.alias, "alias user")
    problems += _dotqmail_files(root.alias, "alias user")
    problems += _stale(root, has_assignments=bool(assignments))
    problems += _defaultdelivery(root)
    problems += _tcp_rules(root)
    return problems


def _tcp_rules(root: QmailRoot) -> list[Problem]:
    """Bad lines in etc/tcp.* with their line numbers (tcprules would refuse the file)."""
    from core.tcprules import parse_rules

    problems: list[Problem] = []
    for path in (root.tcp_smtp, root.tcp_pop3):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as e:
            problems.append(Problem(path, None, f"unable to read: {e.strerror or e}"))
            continue
        problems += parse_rules(data, path)[1]
    return problems


def _accepted(domain: str, rcpthosts: frozenset[str]) -> bool:
    domain = domain.lower()
    if domain in rcpthosts:
        return True
    return any(domain[i:] in rcpthosts for i in range(len(domain)) if domain[i] == ".")
