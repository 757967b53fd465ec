"""The requests a client may make of the core, answered by one piece of code
whether the core is running (over the control socket) or not (in-process,
under the root's lock): queue listings, "why is it stuck", and actions."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from core import admin
from core.clock import Clock
from core.control import Config
from core.errors import Problem, UserError
from core.log import read_lines
from core.paths import QmailRoot
from core.send import Send
from core.timefmt import iso

if TYPE_CHECKING:
    from core.rspawn import Remote
    from core.tcpto import Table

PROTOCOL_VERSION = 1
ACTIONS = ("retry", "bounce", "delete", "hold", "release")
SHOW_MAX = 1_000_000  # bytes of a message that `show` returns


class ServiceError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def message_log(lines: list[str], msgid: int) -> list[str]:
    """The log lines about one message, following its delivery numbers."""
    mine: set[str] = set()
    out = []
    tag = re.compile(rf"\b(msg {msgid})(:|\s|$)")
    for line in lines:
        text = line.split(" ", 1)[1] if line.startswith("@") else line
        if text.startswith("starting delivery "):
            number = text.split()[2].rstrip(":")
            if tag.search(text):
                mine.add(number)
                out.append(line)
            else:
                mine.discard(number)  # the number was reused after a restart
        elif text.startswith("delivery "):
            number = text.split()[1].rstrip(":")
            if number in mine:
                out.append(line)
                mine.discard(number)
        elif tag.search(text):
            out.append(line)
    return out


class Service:
    def __init__(
        self, root: QmailRoot, send: Send, config: Callable[[], Config], clock: Clock
    ) -> None:
        self.root = root
        self.send = send
        self.config = config
        self.clock = clock
        self.resolver: tuple[str, int] | None = None  # serve --resolver
        self.remote: Remote | None = None  # the running core's remote deliveries
        # The running core's reload (HUP's), and how the last one went; None offline.
        self.reloader: Callable[[], list[Problem]] | None = None
        self.last_reload: dict[str, Any] = {"at": None, "ok": True, "problems": []}
        # The running core's listeners, SMTP and POP3, each its status or None (off).
        self.listeners: Callable[[], dict[str, Any]] = dict

    async def handle(self, op: str, args: dict[str, Any]) -> Any:
        if op in ACTIONS:  # `retry` and the rest, as ops of their own: `act` named for you
            return await self.op_act({**args, "action": op})
        method = getattr(self, "op_" + op.replace("-", "_"), None)
        if method is None:
            raise ServiceError("unknown-op", f"unknown request {op!r}")
        return await method(args)

    def _resolver(self, args: dict[str, Any]) -> tuple[str, int] | None:
        """The DNS server a request names, else the one serve was given."""
        given = args.get("resolver")
        if given is not None and not isinstance(given, str):
            raise ServiceError("bad-request", "resolver must be ADDRESS:PORT")
        return _address(given) if given else self.resolver

    async def op_ping(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"version": PROTOCOL_VERSION, "pid": os.getpid(), "root": str(self.root.path)}

    async def op_qstat(self, args: dict[str, Any]) -> dict[str, int]:
        messages, todo = await self.send.io(self.send.queue.count)
        return {"messages": messages, "todo": todo}

    def _select(self, args: dict[str, Any]) -> list[Any]:
        ids = args.get("ids")
        if ids is not None and not (
            isinstance(ids, list)
            and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
        ):
            raise ServiceError("bad-request", "ids must be a list of message numbers")
        try:
            flt = admin.Filter.from_dict(args.get("filter") or {})
        except ValueError as e:
            raise ServiceError("bad-request", str(e)) from None
        if ids is None and flt.is_empty and not args.get("everything", False):
            raise ServiceError("bad-request", "name messages by id or by a filter (or --all)")
        return admin.select(self.send.messages.values(), ids, flt, self.clock.now(), self.config())

    async def op_list(self, args: dict[str, Any]) -> dict[str, Any]:
        chosen = self._select({**args, "everything": True})
        total = len(chosen)
        offset = int(args.get("offset", 0))
        limit = args.get("limit")
        page = chosen[offset : offset + int(limit)] if limit is not None else chosen[offset:]
        config = self.config()
        result: dict[str, Any] = {
            "total": total,
            "offset": offset,
            "messages": [admin.message_json(m, config) for m in page],
        }
        if args.get("format") == "qread":
            bouncing = {m.id: await self.send.io(self.root.bounce(m.id).exists) for m in page}
            result["text"] = admin.qread((m, bouncing[m.id]) for m in page)
        return result

    async def op_show(self, args: dict[str, Any]) -> dict[str, Any]:
        msgid = args.get("id")
        if not isinstance(msgid, int):
            raise ServiceError("bad-request", "show needs a message id")
        message = self.send.messages.get(msgid)
        if message is None or message.removed:
            raise ServiceError("not-found", f"no message {msgid} in the queue")
        config = self.config()
        lines = await self.send.io(read_lines, self.root.log, None, 200_000)
        try:
            data = await self.send.io(self._read_message, msgid)
        except FileNotFoundError:
            raise ServiceError("not-found", f"message {msgid} left the queue meanwhile") from None
        bounce = await self.send.io(self.send.queue.read_bounce, msgid)
        domains = {r.address.rpartition("@")[2].lower() for r in message.pending("remote")}
        destinations = self._destinations(domains) if domains else []
        return {
            "message": admin.message_json(message, config),
            "why": admin.why(message, config, self.clock.now()) + _stuck(destinations),
            "destinations": destinations,
            "log": message_log(lines, msgid),
            "bounce_reports": bounce.decode("utf-8", "replace") if bounce else None,
            "content": data,
        }

    def _read_message(self, msgid: int) -> str:
        data = self.send.queue.read_message(msgid, SHOW_MAX + 1)
        text = data[:SHOW_MAX].decode("utf-8", "replace")
        if len(data) > SHOW_MAX:
            text += f"\n[... cut at {SHOW_MAX} bytes ...]\n"
        return text

    async def op_act(self, args: dict[str, Any]) -> dict[str, Any]:
        action = args.get("action")
        if action not in ACTIONS:
            raise ServiceError("bad-request", f"unknown action {action!r}")
        chosen = self._select(args)
        ids = [m.id for m in chosen]
        missing = [i for i in (args.get("ids") or []) if i not in ids]
        result = await self.send.act(str(action), ids, bool(args.get("dry_run", False)))
        data = result.as_dict()
        for msgid in missing:
            data["failed"][str(msgid)] = "no such message in the queue"
        data["messages"] = [
            {"id": m.id, "sender": m.sender, "recipients": [r.address for r in m.pending()]}
            for m in chosen
        ]
        return data

    async def op_check(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        from core.check import check

        problems = await self.send.io(check, self.root)
        return [{**p.as_dict(), "text": p.format(self.root.path)} for p in problems]

    async def op_explain(self, args: dict[str, Any]) -> dict[str, Any]:
        from core.explain import explain

        address = args.get("address")
        if not isinstance(address, str) or not address or "\n" in address:
            raise ServiceError("bad-request", "explain needs one address")
        where = self._resolver(args)
        port = self.remote.port if self.remote is not None else 25
        result = await self.send.io(explain, self.root, self.config(), address, where, port)
        return result.as_dict()

    async def op_smtpcheck(self, args: dict[str, Any]) -> dict[str, Any]:
        from core.smtpcheck import smtpcheck

        ip, helo, sender = args.get("ip"), args.get("helo"), args.get("from")
        rcpts = args.get("to")
        if not isinstance(ip, str) or not ip or not isinstance(sender, str):
            raise ServiceError("bad-request", "smtpcheck needs ip and from")
        if not isinstance(rcpts, list) or not all(isinstance(r, str) for r in rcpts):
            raise ServiceError("bad-request", "smtpcheck needs to: a list of addresses")
        if helo is not None and not isinstance(helo, str):
            raise ServiceError("bad-request", "helo must be a string")
        texts = [ip, sender, *rcpts, helo or ""]
        if any("\n" in t or "\r" in t or "\0" in t for t in texts):
            raise ServiceError("bad-request", "no line breaks or NULs in smtpcheck's arguments")
        where = self._resolver(args)
        result = await smtpcheck(
            self.root, self.config(), ip, helo, sender, list(rcpts), self.send.io, where
        )
        return result.as_dict()

    def _destinations(self, only: set[str] | None = None) -> list[dict[str, Any]]:
        """Per remote domain: in flight, queued, last reply, addresses marked down."""
        queued: dict[str, int] = {}
        for message in self.send.messages.values():
            if message.removed:
                continue
            for r in message.pending("remote"):
                domain = r.address.rpartition("@")[2].lower()
                if not r.busy and (only is None or domain in only):
                    queued[domain] = queued.get(domain, 0) + 1
        rows: list[dict[str, Any]]
        if self.remote is None:  # no core running: nothing in flight, no history
            rows = [
                {"domain": d, "in_flight": 0, "queued": n, "last_status": None}
                for d, n in sorted(queued.items())
            ]
        else:
            rows = self.remote.snapshot(queued, self.clock.now())
        if only is not None:
            rows = [r for r in rows if r["domain"] in only]
        for row in rows:
            row["last_attempt"] = iso(row.get("last_attempt"))
            row["timed_out_at"] = iso(row.get("timed_out_at"))
            row["down_until"] = {ip: iso(t) for ip, t in row.get("down_until", {}).items()}
        return rows

    async def op_destinations(self, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "concurrency": {
                "remote": self.send.active["remote"],
                "remote_max": self.send.limit("remote"),
            },
            "destinations": self._destinations(),
        }

    def _tcpto(self) -> Table:
        from core.tcpto import Table

        return self.remote.tcpto if self.remote is not None else Table(self.root.tcpto)

    async def op_tcpto(self, args: dict[str, Any]) -> dict[str, Any]:
        """The timeout table, as qmail-tcpto prints it and as data."""
        from core.tcpto import describe

        now = self.clock.now()
        entries = self._tcpto().entries(now)
        return {
            "entries": [
                {
                    "ip": e.ip,
                    "count": e.count,
                    "last_timeout": iso(e.when),
                    "down_until": iso(e.down_until),
                    "text": describe(e, now),
                }
                for e in entries
            ]
        }

    async def op_tcpok(self, args: dict[str, Any]) -> dict[str, Any]:
        """qmail-tcpok: forget every timeout, so down hosts are tried again."""
        self._tcpto().clear()
        return {"ok": True}

    async def op_snapshot(self, args: dict[str, Any]) -> dict[str, Any]:
        """Everything a console's first screen needs, in one answer."""
        page = await self.op_list(
            {k: args[k] for k in ("filter", "offset", "limit") if k in args}
            | {"limit": args.get("limit", 50)}
        )
        held = sum(1 for m in self.send.messages.values() if m.held and not m.removed)
        return {
            "version": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "root": str(self.root.path),
            "running": self.reloader is not None,
            "queue": {
                "messages": sum(1 for m in self.send.messages.values() if not m.removed),
                "held": held,
                "page": page,
            },
            "concurrency": {
                channel: {"active": self.send.active[channel], "max": self.send.limit(channel)}
                for channel in ("local", "remote")
            },
            "config": self.last_reload,
            "listeners": self.listeners(),
        }

    async def op_reload(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.reloader is None:
            raise ServiceError("no-core", "no core is running: it reads the files when it starts")
        self.reloader()
        return self.last_reload

    async def op_validate(self, args: dict[str, Any]) -> dict[str, Any]:
        from core import configedit

        name, content = _file_args(args)
        try:
            problems = await self.send.io(configedit.validate, self.root, name, content)
        except UserError as e:
            raise ServiceError("bad-request", e.message) from None
        return {
            "path": name,
            "ok": not any(p.is_error for p in problems),
            "problems": _shown(self.root, problems),
        }

    async def op_write_config(self, args: dict[str, Any]) -> dict[str, Any]:
        """Check, write atomically, apply: the console's save button."""
        from core import configedit

        name, content = _file_args(args)
        try:
            written, diff, problems = await self.send.io(configedit.write, self.root, name, content)
        except UserError as e:
            raise ServiceError("bad-request", e.message) from None
        except OSError as e:
            raise ServiceError("io", f"{name}: unable to write: {e.strerror or e}") from None
        applied = None
        if written and self.reloader is not None:
            self.reloader()  # now, not when the watcher notices
            applied = self.last_reload
        return {
            "path": name,
            "written": written,
            "diff": diff,
            "problems": _shown(self.root, problems),
            "reload": applied,
        }

    async def op_retry_all(self, args: dict[str, Any]) -> dict[str, Any]:
        self.send.retry_all()
        return {"ok": True}


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ServiceError("bad-request", f"resolver {text!r}: expected ADDRESS:PORT")
    return host.strip("[]"), int(port)


def _stuck(destinations: list[dict[str, Any]]) -> list[str]:
    """What the destinations add to "why is this stuck"."""
    lines = []
    for d in destinations:
        for ip, until in d.get("down_until", {}).items():
            lines.append(
                f"{d['domain']}: {ip} timed out twice, skipped until {until}"
                " (the timeout table; `qmailtui tcpok` forgets it)"
            )
        if d.get("in_flight"):
            lines.append(f"{d['domain']}: {d['in_flight']} SMTP transaction(s) in progress")
    return lines


def _file_args(args: dict[str, Any]) -> tuple[str, str]:
    name, content = args.get("path"), args.get("content")
    if not isinstance(name, str) or not isinstance(content, str):
        raise ServiceError("bad-request", "give path (relative to the root) and content")
    return name, content


def _shown(root: QmailRoot, problems: list[Problem]) -> list[dict[str, Any]]:
    return [{**p.as_dict(), "text": p.format(root.path)} for p in problems]
