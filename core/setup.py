"""`qmailtui init`: create a qmail root (INTERFACE.md, "The qmail root")."""

from __future__ import annotations

import os
from pathlib import Path

from core.control import HOSTNAME
from core.errors import ExitCode, UserError
from core.paths import QmailRoot
from core.queue import Queue, fsync_directory

ALIASES = (".qmail-postmaster", ".qmail-root", ".qmail-mailer-daemon")


def maildirmake(path: Path) -> None:
    """maildirmake: DIR with tmp/, new/, cur/, all 0700; an existing DIR is an error."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        raise UserError(
            f"unable to mkdir {path}: file already exists", code=ExitCode.TEMPORARY
        ) from None
    except OSError as e:
        raise UserError(f"unable to mkdir {path}: {e.strerror}", code=ExitCode.TEMPORARY) from e
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(mode=0o700)
    fsync_directory(path)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    os.chmod(path, mode)


def init_root(path: Path | str, *, me: str, force: bool = False) -> QmailRoot:
    """Create the tree; refuse an existing non-empty directory unless `force`.

    With `force`, files that exist are kept (an admin's edits are never
    overwritten) and only what is missing is created.
    """
    me = me.strip().lower()
    if not HOSTNAME.fullmatch(me) or "." not in me:
        raise UserError(f"not a fully qualified host name: {me!r}", code=ExitCode.USAGE)
    root = QmailRoot(path)
    if root.path.exists() and any(root.path.iterdir()) and not force:
        raise UserError(
            f"{root.path} exists and is not empty; use --force to complete it",
            code=ExitCode.FAILURE,
        )
    root.path.mkdir(parents=True, exist_ok=True)
    for directory in (root.control, root.users, root.etc, root.log, root.run):
        directory.mkdir(mode=0o755, exist_ok=True)
    os.chmod(root.run, 0o700)
    files = {
        root.control_file("me"): f"{me}\n",
        root.control_file("locals"): f"{me}\n",
        root.control_file("rcpthosts"): f"{me}\n",
        root.control_file("defaultdelivery"): "./Maildir/\n",
        root.assign: ".\n",
    }
    for file, text in files.items():
        if not file.exists():
            _write(file, text)
    root.alias.mkdir(mode=0o755, exist_ok=True)
    for name in ALIASES:
        if not (root.alias / name).exists():
            _write(root.alias / name, "", 0o644)
    if not (root.alias / "Maildir").exists():
        maildirmake(root.alias / "Maildir")
    Queue(root).create_layout()
    fsync_directory(root.path)
    return root
