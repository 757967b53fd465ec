"""Checking and writing one configuration file for the console's editor:
`validate` says what would be wrong with a proposed content, `write` checks
it, writes it atomically and returns what changed.

Only the files an admin edits can be named, each relative to the root:
control/NAME (a control file qmail or we know), alias/.qmail-*,
users/assign, etc/tcp.smtp and etc/tcp.pop3. Anything else (a `..`, a
sub-directory, queue/) is refused before any file is touched.

A control file is checked the way the core loads it: a scratch root holds
links to every current control file and the proposed text in place of the
one named, and control.load reads that. So a proposed `me` is checked with
the other files as they are, and the live files are never written to
find out.
"""

from __future__ import annotations

import difflib
import os
import re
import tempfile
from pathlib import Path

from core import control, users
from core.check import _instructions
from core.durable import replace_file
from core.errors import Problem, UserError
from core.paths import QmailRoot
from core.tcprules import parse_rules

RULES = ("etc/tcp.smtp", "etc/tcp.pop3")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_SIZE = 4 << 20  # bytes: a configuration file larger than this is a mistake


def target(root: QmailRoot, name: str) -> Path:
    """The file `name` (relative to the root) may change; UserError else."""
    parts = name.split("/")
    ok = len(parts) == 2 and all(parts) and ".." not in parts
    if ok and parts[0] == "control":
        ok = parts[1] in control.KNOWN_FILES and parts[1] != "morercpthosts.cdb"
    elif ok and parts[0] == "alias":
        ok = parts[1].startswith(".qmail") and NAME.fullmatch(parts[1][1:]) is not None
    elif ok:
        ok = name == "users/assign" or name in RULES
    if not ok:
        raise UserError(
            f"{name}: not a file the console edits (control/NAME, alias/.qmail-*,"
            " users/assign, etc/tcp.smtp, etc/tcp.pop3)"
        )
    return root.path / name


def validate(root: QmailRoot, name: str, content: str) -> list[Problem]:
    """What would be wrong with `name` holding `content` (errors and warnings)."""
    path = target(root, name)
    data = content.encode("utf-8", "surrogateescape")
    if len(data) > MAX_SIZE:
        return [Problem(path, None, f"larger than {MAX_SIZE} bytes")]
    kind = name.split("/")[0]
    if name == "users/assign":
        return users.parse_assign(data, path)[1]
    if name in RULES:
        return parse_rules(data, path)[1]
    if kind == "alias":
        return _instructions(content, path, root.alias, name)
    return _control(root, path, data)


def _control(root: QmailRoot, path: Path, data: bytes) -> list[Problem]:
    with tempfile.TemporaryDirectory(prefix="qmailtui-validate-") as scratch:
        shadow = QmailRoot(scratch)
        shadow.control.mkdir()
        for entry in os.scandir(root.control):
            if entry.name != path.name:
                os.symlink(entry.path, shadow.control / entry.name)
        (shadow.control / path.name).write_bytes(data)
        problems = control.load(shadow).problems
        return [
            Problem(root.control / p.path.name, p.line, p.message, p.severity, p.hint)
            for p in problems
            if p.path.parent == shadow.control
        ]


def write(root: QmailRoot, name: str, content: str) -> tuple[bool, str, list[Problem]]:
    """Check, then replace the file in one rename: (written?, a unified diff of
    the change, the problems). Nothing is written when there is an error."""
    problems = validate(root, name, content)
    if any(p.is_error for p in problems):
        return False, "", problems
    path = target(root, name)
    try:
        old = path.read_text(errors="surrogateescape")
    except FileNotFoundError:
        old = ""
    mode = 0o600 if name == "control/servercert.pem" else None
    data = content.encode("utf-8", "surrogateescape")
    replace_file(path.with_name(f".{path.name}.tmp"), path, data, mode)
    diff = "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True),
            content.splitlines(keepends=True),
            f"a/{name}",
            f"b/{name}",
        )
    )
    return True, diff, problems
