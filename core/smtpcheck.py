"""`qmailtui smtpcheck IP --from S --to R...`: what the SMTP listener would
answer a client at IP, and why, with the file and line of each decision.

It plays the conversation through the listener's own pieces (the tcp rule
look-up and environment of core/listener.py, the session of core/smtpd.py),
so the answer cannot drift from what a real client gets. It reads the rules
cdb in force and never compiles it: a check changes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from core.control import Config
from core.explain import Step, _line_of
from core.listener import client_env, settings_for
from core.paths import QmailRoot
from core.rdns import remote_host, resolver_for
from core.smtpd import Client, Deliver, Session
from core.tcprules import RulesError, RulesFile, find_line


@dataclass
class Check:
    ip: str
    outcome: str = ""
    steps: list[Step] = field(default_factory=list)
    replies: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ip": self.ip,
            "outcome": self.outcome,
            "steps": [asdict(s) for s in self.steps],
            "replies": self.replies,
        }


async def smtpcheck(
    root: QmailRoot,
    config: Config,
    ip: str,
    helo: str | None,
    sender: str,
    rcpts: list[str],
    io: Callable[..., Awaitable[Any]],
    resolver: tuple[str, int] | None = None,
) -> Check:
    """Find the client's name first when the rules name hosts (as the listener
    does), then play the conversation in a worker thread (`io`)."""
    host = None
    cdb = RulesFile(root.tcp_smtp.with_name("tcp.smtp.cdb"))
    with contextlib.suppress(OSError):
        cdb.current()
    if cdb.names_hosts:
        host = await remote_host(ip, resolver_for(resolver))
    check: Check = await io(_check, root, config, ip, helo, sender, rcpts, host)
    if cdb.names_hosts:
        found = f"its name is {host}" if host else "no name found for it"
        check.steps.insert(0, Step(f"a rule names hosts: {ip} was looked up in DNS, {found}"))
    return check


def _check(
    root: QmailRoot,
    config: Config,
    ip: str,
    helo: str | None,
    sender: str,
    rcpts: list[str],
    host: str | None,
) -> Check:
    check = Check(ip)
    notes: list[str] = []
    settings = settings_for(root, config, notes.append, compile_rules=False)
    if settings is None:
        check.outcome = "no SMTP listener: control/rcpthosts is missing"
        check.steps.append(
            Step(
                "control/rcpthosts is missing: qmail would relay for every domain, so the"
                " listener does not run",
                "control/rcpthosts",
                level="error",
            )
        )
        return check
    for note in notes:
        check.steps.append(Step(note, level="warning"))
    _stale_rules(root, check)
    try:
        env, decision = client_env(settings, ip, 0, "0.0.0.0", 25, host)  # noqa: S104
    except (RulesError, OSError) as e:
        check.outcome = "dropped: the rules cannot be read"
        check.steps.append(Step(f"unable to read etc/tcp.smtp.cdb: {e}", "etc/tcp.smtp.cdb"))
        return check
    rule_line = _rule_step(root, check, ip, decision)
    if decision is not None and not decision.allow:
        check.outcome = "refused: the connection is closed at once, without a reply"
        return check
    client = Client.from_env(env)
    decisions: list[tuple[str, object]] = []
    session = Session(
        settings.policy, client, on_decision=lambda what, value: decisions.append((what, value))
    )
    session.start()
    _reply(check, "(connect)", session)
    commands = [f"EHLO {helo}" if helo is not None else "EHLO"]
    commands.append(f"MAIL FROM:<{sender}>")
    commands += [f"RCPT TO:<{rcpt}>" for rcpt in rcpts]
    accepted = 0
    for command in commands:
        decisions.clear()
        session.feed(command.encode("utf-8", "surrogateescape") + b"\r\n")
        action = session.step()
        assert not isinstance(action, Deliver)
        reply = _reply(check, command, session)
        if command.startswith("RCPT") and reply.startswith("250"):
            accepted += 1
        for what, value in decisions:
            check.steps.append(_why(root, config, client, what, value, rule_line, command))
    if client.databytes is not None:
        check.steps.append(
            Step(f"DATABYTES={client.databytes} from the tcp rule overrides control/databytes")
        )
    elif config.databytes:
        check.steps.append(
            Step(f"messages over {config.databytes} bytes get a 552", "control/databytes", 1)
        )
    check.outcome = f"{accepted} of {len(rcpts)} recipient(s) accepted"
    return check


def _reply(check: Check, command: str, session: Session) -> str:
    text = bytes(session.out).decode("utf-8", "surrogateescape").replace("\r\n", "\n").strip()
    session.out.clear()
    check.replies.append({"command": command, "reply": text})
    lines = text.splitlines() or ["(nothing)"]
    shown = lines[0][:3] + " " + lines[0][4:]
    if lines[1:]:
        shown += f" ({', '.join(line[4:] for line in lines[1:])})"
    check.steps.append(Step(f"{command} -> {shown}"))
    return text


def _stale_rules(root: QmailRoot, check: Check) -> None:
    cdb = root.tcp_smtp.with_name("tcp.smtp.cdb")
    try:
        source = root.tcp_smtp.stat().st_mtime
    except OSError:
        return
    try:
        compiled = cdb.stat().st_mtime
    except OSError:
        compiled = -1.0
    if source > compiled:
        check.steps.append(
            Step(
                "etc/tcp.smtp is newer than etc/tcp.smtp.cdb: the answer below is from the"
                " rules in force; a running core compiles the new ones on reload",
                "etc/tcp.smtp",
                level="warning",
            )
        )


def _rule_step(root: QmailRoot, check: Check, ip: str, decision: Any) -> int | None:
    cdb = root.tcp_smtp.with_name("tcp.smtp.cdb")
    if decision is None or not cdb.exists():
        check.steps.append(
            Step(f"no etc/tcp.smtp.cdb: {ip} is allowed, with no variables (tcpserver without -x)")
        )
        return None
    if decision.key is None:
        text = f"no tcp rule matches {ip}: allowed, no variables set"
        check.steps.append(Step(text, "etc/tcp.smtp"))
        return None
    try:
        text = root.tcp_smtp.read_text("utf-8", "surrogateescape")
    except OSError:
        text = ""
    line = find_line(text, decision.key) if text else None
    verdict = "allow" if decision.allow else "deny"
    sets = ", ".join(f'{k}="{v}"' for k, v in decision.env)
    check.steps.append(
        Step(
            f"tcp rule {decision.key!r}: {verdict}" + (f", sets {sets}" if sets else ""),
            "etc/tcp.smtp",
            line,
            level="info" if decision.allow else "error",
        )
    )
    return line


def _why(
    root: QmailRoot,
    config: Config,
    client: Client,
    what: str,
    value: object,
    rule_line: int | None,
    command: str,
) -> Step:
    control = root.control
    if what == "badmailfrom":
        if value is None:
            return Step("   the sender is not in control/badmailfrom")
        entry = str(value)
        return Step(
            f"   {entry!r} in control/badmailfrom: every RCPT of this transaction is refused",
            "control/badmailfrom",
            _line_of(control / "badmailfrom", entry),
            level="error",
        )
    if what == "relayclient":
        return Step(
            f'   RELAYCLIENT="{value}" from the tcp rule: any recipient is accepted'
            + (f", with {value!r} appended" if value else "")
            + "; rcpthosts is not consulted",
            "etc/tcp.smtp",
            rule_line,
        )
    if what == "rcpthosts":
        if value is None:
            domain = command[command.rfind("@") + 1 :].rstrip(">")
            return Step(
                f"   {domain!r} is in neither control/rcpthosts nor control/morercpthosts,"
                " and no RELAYCLIENT is set: relaying refused",
                "control/rcpthosts",
                level="error",
            )
        assert isinstance(value, tuple)
        name, entry = value
        if not name:
            return Step("   an address without @ is always accepted (qmail adds envnoathost)")
        return Step(
            f"   {entry!r} in control/{name}",
            f"control/{name}",
            _line_of(control / name, entry),
        )
    if what == "size":
        return Step(f"   SIZE={value} is over databytes", "control/databytes", 1, level="error")
    return Step(f"   {what}: {value}")
