"""`qmailtui explain ADDRESS`: where a message to ADDRESS would go, step by step.

Built from the very functions that deliver (rewrite.route, lspawn.find_owner,
local.prepare/finish_plan, dotqmail), so the answer is what would happen.
Each step names the file and line that decided it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core import users
from core.control import Config
from core.dotqmail import Failure
from core.errors import UserError
from core.local import Target, finish_plan, prepare
from core.lspawn import find_owner
from core.paths import QmailRoot
from core.rewrite import route


@dataclass(frozen=True, slots=True)
class Step:
    text: str
    file: str | None = None  # relative to the root when inside it
    line: int | None = None
    level: str = "info"  # "info", "warning", "error"


@dataclass
class Explanation:
    address: str
    channel: str = ""
    outcome: str = ""  # one line: what happens to a message for this address
    steps: list[Step] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "channel": self.channel,
            "outcome": self.outcome,
            "steps": [asdict(s) for s in self.steps],
        }


def _line_of(path: Path, wanted: str, *, key: bool = False) -> int | None:
    """The line of a list (or key:value) file that holds `wanted`; the last wins."""
    try:
        lines = path.read_text("utf-8", "surrogateescape").splitlines()
    except OSError:
        return None
    found = None
    for number, text in enumerate(lines, 1):
        text = text.rstrip(" \t\r")
        name = text.split(":", 1)[0] if key else text
        if name.lower() == wanted.lower() and (not key or ":" in text):
            found = number
    return found


class _Steps:
    """Adds steps to an explanation, naming files relative to the root."""

    def __init__(self, root: QmailRoot, ex: Explanation) -> None:
        self.root = root
        self.ex = ex

    def __call__(
        self, text: str, path: Path | None = None, line: int | None = None, level: str = "info"
    ) -> None:
        name = None
        if path is not None:
            try:
                name = str(path.relative_to(self.root.path))
            except ValueError:
                name = str(path)
        self.ex.steps.append(Step(text, name, line, level))


def _remote(
    root: QmailRoot,
    config: Config,
    domain: str,
    step: _Steps,
    ex: Explanation,
    resolver: tuple[str, int] | None,
    port: int,
) -> None:
    """The route delivery would take: the smtproutes line, or the MX and A
    records, and the "this host" check, from core/mxroute.py."""
    import asyncio

    from core import mxroute
    from core.rdns import resolver_for

    answer = asyncio.run(mxroute.find(config, domain, resolver_for(resolver), port))
    routes = root.control_file("smtproutes")
    if answer.route is not None:
        line = _line_of(routes, answer.route.domain, key=True)
        if answer.route.relay:
            step(f"smtproutes line {answer.route.text!r} matches {domain}", routes, line)
        else:
            step(f"smtproutes line {answer.route.text!r}: {domain} goes by MX", routes, line)
    for text in mxroute.describe(answer):
        failed = text.startswith(("temporary failure", "permanent failure"))
        step(text, level="error" if failed else "info")
    if answer.error is not None:
        letter, text = answer.error[0], answer.error[1:].replace("\n", " ")
        kind = "deferred" if letter == "Z" else "bounced"
        ex.outcome = f"remote: {kind} ({text})"
        return
    import time

    from core.tcpto import Table
    from core.timefmt import iso

    table, now = Table(root.tcpto), time.time()
    usable = []
    for c in answer.candidates:
        until = table.down_until(c.ip, now)
        if until is None:
            usable.append(c)
        else:
            step(
                f"{c.ip} timed out twice: skipped until {iso(until)} (qmailtui tcpok forgets it)",
                root.tcpto,
                level="warning",
            )
    if not usable:
        ex.outcome = "remote: deferred (every address is marked down)"
        return
    first = usable[0]
    ex.outcome = f"remote: to {first.ip} port {answer.port} ({first.name})"
    step(f"SMTP to {first.ip} port {answer.port}; if it does not answer, the next address")


def explain(
    root: QmailRoot,
    config: Config,
    address: str,
    resolver: tuple[str, int] | None = None,
    remote_port: int = 25,
) -> Explanation:
    ex = Explanation(address)
    step = _Steps(root, ex)

    if "@" not in address:
        step(f"no domain: control/envnoathost adds @{config.envnoathost}")
    routed = route(config, address)
    domain = routed.address.rpartition("@")[2]
    ex.channel = routed.channel
    if routed.channel == "remote":
        if "exception" in routed.reason:
            key = routed.reason.split()[1].rstrip(":")
            line = _line_of(root.control_file("virtualdomains"), key, key=True)
            step(routed.reason, root.control_file("virtualdomains"), line)
        else:
            step(f"{domain} is not in control/locals nor control/virtualdomains: remote")
        _remote(root, config, domain, step, ex, resolver, remote_port)
        return ex
    if routed.address == address or "@" not in address:
        source = root.control_file("locals")
        if source.exists():
            step(f"{domain} is local", source, _line_of(source, domain))
        else:
            step(
                f"{domain} is local (control/locals is missing: control/me)",
                root.control_file("me"),
                1,
            )
    else:
        vd = root.control_file("virtualdomains")
        key = routed.reason.split()[1].rpartition(":")[0]
        line = _line_of(vd, "" if key == "(catch-all)" else key, key=True)
        step(f"{routed.reason}: delivered locally as {routed.address}", vd, line)
    return _explain_local(root, config, routed.address, ex, step)


def _explain_local(
    root: QmailRoot, config: Config, address: str, ex: Explanation, step: _Steps
) -> Explanation:
    local_part, _, host = address.rpartition("@")
    if not local_part:
        step("empty local part: a trash address; the delivery succeeds and nothing is kept")
        ex.outcome = "discarded (trash address)"
        return ex
    as_root = os.geteuid() == 0
    try:
        owner = find_owner(root, local_part, as_root)
    except UserError as e:
        step(
            f"users/cdb cannot be read: {e.message}; deliveries are deferred",
            root.users_cdb,
            None,
            "error",
        )
        ex.outcome = "deferred (users/cdb)"
        return ex
    _owner_step(root, owner, local_part, step)
    is_alias_home = owner.user == "alias" and Path(owner.home) == root.alias
    if as_root and owner.uid == 0 and not is_alias_home:
        step("uid 0: qmail never delivers as root; deliveries are deferred", level="error")
        ex.outcome = "deferred (Not allowed to perform deliveries as root.)"
        return ex
    if as_root and owner.uid != 0:
        step(f"delivered as uid {owner.uid}, gid {owner.gid}, no other groups")
    elif as_root:
        step("the alias home is root's: delivered by the core, confined to alias/, no programs")
    elif owner.uid == os.getuid():
        step(f"delivered by the core itself (uid {os.getuid()}); files only inside the home")
    else:
        step(
            f"assigned uid {owner.uid}, but the core runs as uid {os.getuid()}: files are written"
            " as the core, only inside the home; program lines are deferred",
            level="warning",
        )
    target = Target(owner.user, Path(owner.home), local_part, owner.dash, owner.ext, host)
    defaultdelivery = "".join(line + "\n" for line in config.defaultdelivery)
    try:
        plan = prepare(target, "sender@example.com", defaultdelivery, 0.0, dry_run=True)
    except Failure as e:
        step(e.text, Path(owner.home), None, "error")
        ex.outcome = ("bounced: " if e.permanent else "deferred: ") + e.text
        return ex
    for note in plan.notes:
        step(note, Path(owner.home), None, "warning")
    for name in plan.search.tried:
        path = Path(owner.home) / name
        if name == plan.search.found:
            step(f"{name}: used", path)
            break
        step(f"{name}: none", path)
    try:
        finish_plan(plan, defaultdelivery)
    except Failure as e:
        level = "error"
        step(e.text, Path(owner.home) / (plan.search.found or ""), None, level)
        ex.outcome = ("bounced: " if e.permanent else "deferred: ") + e.text
        return ex
    if "DEFAULT" in plan.env:
        step(f"$DEFAULT is {plan.env['DEFAULT']!r}")
    if plan.from_default:
        why = "is empty" if plan.search.found else "does not exist"
        step(
            f"the .qmail file {why}: control/defaultdelivery applies",
            root.control_file("defaultdelivery"),
        )
    if plan.newsender != plan.sender:
        step(f"forwards are sent with the envelope sender {plan.newsender}")
    kinds = []
    failure = None
    home = Path(owner.home)
    for ins in plan.instructions:
        source = root.control_file("defaultdelivery") if plan.from_default else home / ins.source
        if ins.kind == "fail":
            step(ins.value, source, ins.line, "error")
            ex.outcome = "deferred: " + ins.value
            return ex
        kinds.append(ins.kind)
        if ins.kind == "maildir":
            target_dir = home / ins.value
            ok = (target_dir / "new").is_dir() and (target_dir / "tmp").is_dir()
            if not ok and failure is None:
                failure = "Unable to chdir to maildir. (#4.2.1)"
            step(
                f"Maildir {ins.value}" + ("" if ok else ": does not exist, so deliveries defer"),
                source,
                ins.line,
                "info" if ok else "warning",
            )
        elif ins.kind == "mbox":
            step(f"mbox {ins.value}", source, ins.line)
        elif ins.kind == "program":
            step(f"program {ins.value} (run by /bin/sh -c in {home})", source, ins.line)
        else:
            step(f"forward to {ins.value}", source, ins.line)
    if failure is not None:
        ex.outcome = "deferred: " + failure
    else:
        ex.outcome = "delivered: " + (", ".join(kinds) if kinds else "nothing (no instruction)")
    return ex


def _owner_step(root: QmailRoot, owner: users.Owner, local_part: str, step: _Steps) -> None:
    where = f"home {owner.home}, uid {owner.uid}"
    if owner.source.startswith("users/assign:"):
        step(
            f"user {owner.user} ({where}) from users/assign",
            root.assign,
            int(owner.source.split(":")[1]),
        )
    elif owner.source == "users/cdb":
        found = users.lookup_assign_line(root, local_part) if root.assign.exists() else None
        step(f"user {owner.user} ({where}) from users/cdb", root.assign, found)
    elif owner.user == "alias":
        step(f"no user owns {local_part!r}: the alias user ({owner.home})", root.alias)
    else:
        step(f"{owner.source} ({where})")
    if owner.dash or owner.ext:
        step(f"its .qmail files: .qmail{owner.dash}{owner.ext} and the -default ones")
