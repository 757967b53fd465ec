"""`qmailtui check`: every problem in a root's configuration, with file and line.

Besides what the readers report (control.py, users.py), this warns about the
mistakes install guides spread: an open relay, a rule file newer than its
cdb, a `.qmail` file others may write, a local domain SMTP would refuse.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from core import control, users
from core.errors import Problem
from core.paths import QmailRoot

COMPILED = (
    ("etc/tcp.smtp", "etc/tcp.smtp.cdb", "qmailtui tcprules etc/tcp.smtp.cdb etc/tcp.smtp.tmp"),
    ("etc/tcp.pop3", "etc/tcp.pop3.cdb", "qmailtui tcprules etc/tcp.pop3.cdb etc/tcp.pop3.tmp"),
    ("users/assign", "users/cdb", "qmailtui newu"),
    ("control/morercpthosts", "control/morercpthosts.cdb", "qmail-newmrh"),
)


def _stale(root: QmailRoot) -> list[Problem]:
    problems = []
    for source, compiled, fix in COMPILED:
        src, cdb = root.path / source, root.path / compiled
        if not src.exists():
            continue
        if not cdb.exists():
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


def _dotqmail_modes(home: Path, label: str) -> list[Problem]:
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
    return problems


def check(root: QmailRoot) -> list[Problem]:
    config = control.load(root)
    problems = list(config.problems)
    if config.rcpthosts is None:
        problems.append(
            Problem(
                root.control_file("rcpthosts"),
                None,
                "missing: qmail would relay for anyone (an open relay);"
                " the SMTP listener refuses to start",
                hint="list the domains you receive mail for, one a line",
            )
        )
    else:
        for domain in sorted(config.locals):
            if not _accepted(domain, config.rcpthosts):
                problems.append(
                    Problem(
                        root.control_file("locals"),
                        None,
                        f"{domain} is local but not in control/rcpthosts:"
                        " SMTP clients cannot send mail to it",
                        "warning",
                    )
                )
        for key in sorted(config.virtualdomains):
            domain = key.rpartition("@")[2]
            if domain and config.virtualdomains[key] and not _accepted(domain, config.rcpthosts):
                problems.append(
                    Problem(
                        root.control_file("virtualdomains"),
                        None,
                        f"{domain} is a virtual domain but not in control/rcpthosts:"
                        " SMTP clients cannot send mail to it",
                        "warning",
                    )
                )
    if root.assign.exists():
        _, assign_problems = users.parse_assign(root.assign.read_bytes(), root.assign)
        problems += assign_problems
        assignments, _ = users.parse_assign(root.assign.read_bytes(), root.assign)
        homes = {a.home: a.user for a in assignments if a.home.startswith("/")}
        for home, user in sorted(homes.items()):
            problems += _dotqmail_modes(Path(home), f"user {user}")
    problems += _dotqmail_modes(root.alias, "alias user")
    problems += _stale(root)
    missing_maildir = root.alias / "Maildir"
    if "./Maildir/" in config.defaultdelivery and not (missing_maildir / "new").is_dir():
        problems.append(
            Problem(
                root.alias,
                None,
                "alias/Maildir/ does not exist: mail for postmaster would wait in the queue",
                "warning",
                hint=f"qmailtui maildirmake {missing_maildir}",
            )
        )
    return problems


def _accepted(domain: str, rcpthosts: frozenset[str]) -> bool:
    domain = domain.lower()
    if domain in rcpthosts:
        return True
    return any(domain[i:] in rcpthosts for i in range(len(domain)) if domain[i] == ".")
