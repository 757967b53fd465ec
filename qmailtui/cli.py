"""The `qmailtui` command line: sub-commands, and the one place where errors
become one line on standard error and an exit code."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from core.errors import ExitCode, UserError
from core.paths import QmailRoot, default_root

PROG = "qmailtui"
Handler = Callable[[argparse.Namespace], int]


def _root(args: argparse.Namespace) -> QmailRoot:
    given = getattr(args, "root", None)
    return QmailRoot(given) if given else QmailRoot(default_root())


def _run(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


# -- init, check, maildirmake, newu -------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from core.setup import init_root

    root = init_root(args.dir, me=args.me, force=args.force)
    print(f"created a qmail root in {root.path} for {args.me}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from qmailtui.client import connect

    async def go() -> int:
        async with connect(_root(args)) as client:
            problems = await client.call("check")
        for p in problems:
            print(p["text"])
        errors = sum(1 for p in problems if p["severity"] == "error")
        warnings = len(problems) - errors
        print(f"{errors} error(s), {warnings} warning(s)", file=sys.stderr)
        return 1 if errors else 0

    return _run(go())


def cmd_maildirmake(args: argparse.Namespace) -> int:
    from core.setup import maildirmake

    maildirmake(Path(args.dir))
    return 0


def cmd_newu(args: argparse.Namespace) -> int:
    from core import users

    root = _root(args)
    problems = users.newu(root)
    for p in problems:
        print(p.format(root.path), file=sys.stderr)
    return 1 if any(p.is_error for p in problems) else 0


# -- serve -----------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from core.daemon import Core

    def ready(line: str) -> None:
        print(line, flush=True)

    import signal

    # A supervisor may start us with signals blocked; the core must hear them.
    signal.pthread_sigmask(
        signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGHUP, signal.SIGALRM, signal.SIGINT}
    )
    smtp = None if args.smtp == "off" else _address(args.smtp, "--smtp")
    pop3 = None if args.pop3 == "off" else _address(args.pop3, "--pop3")
    checker = shlex.split(args.checkpassword) if args.checkpassword else None
    group = _group(args.control_group) if args.control_group else None
    resolver = None if args.resolver is None else _address(args.resolver, "--resolver")
    core = Core(
        _root(args),
        log_stderr=not args.quiet,
        ready=ready,
        smtp=smtp,
        resolver=resolver,
        remote_port=args.remote_port,
        pop3=pop3,
        checkpassword=checker,
        control_group=group,
        smtp_workers=args.smtp_workers,
    )
    _run_core(core)
    return 0


def _group(name: str) -> int:
    import grp

    try:
        return grp.getgrnam(name).gr_gid if not name.isdigit() else int(name)
    except KeyError:
        raise UserError(f"--control-group {name}: no such group", code=ExitCode.USAGE) from None


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit() or int(text) > 64:
        raise argparse.ArgumentTypeError(f"not a number from 0 to 64: {text!r}")
    return int(text)


def _address(text: str, option: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise UserError(f"{option} {text}: expected ADDRESS:PORT (or off)", code=ExitCode.USAGE)
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - the admin asked for it


def _run_core(core: Any) -> None:
    async def go() -> None:
        await core.run()

    asyncio.run(go())


def cmd_demo(args: argparse.Namespace) -> int:
    from qmailtui.demo import run_demo

    return run_demo(getattr(args, "root", None))


# -- the queue ----------------------------------------------------------------


def cmd_qstat(args: argparse.Namespace) -> int:
    from qmailtui.client import connect

    async def go() -> int:
        async with connect(_root(args)) as client:
            counts = await client.call("qstat")
        print(f"messages in queue: {counts['messages']}")
        print(f"messages in queue but not yet preprocessed: {counts['todo']}")
        return 0

    return _run(go())


def _filter(args: argparse.Namespace) -> dict[str, Any]:
    flt: dict[str, Any] = {}
    if getattr(args, "all", False):
        flt["all"] = True
    for name in ("sender", "recipient", "domain", "state"):
        value = getattr(args, name, None)
        if value is not None:
            flt[name] = value
    if getattr(args, "older_than", None) is not None:
        from core.admin import parse_age

        try:
            flt["older_than"] = parse_age(args.older_than)
        except ValueError as e:
            raise UserError(str(e), code=ExitCode.USAGE) from None
    return flt


def cmd_list(args: argparse.Namespace) -> int:
    from qmailtui.client import connect

    async def go() -> int:
        async with connect(_root(args)) as client:
            result = await client.call(
                "list",
                filter=_filter(args),
                format="json" if args.json else "qread",
            )
        if args.json:
            for message in result["messages"]:
                print(json.dumps(message, ensure_ascii=False))
        else:
            sys.stdout.write(result["text"])
        return 0

    return _run(go())


def cmd_show(args: argparse.Namespace) -> int:
    return _answer(args, format_show, "show", id=args.id)


def _answer(args: argparse.Namespace, text: Callable[[Any], str], op: str, **request: Any) -> int:
    """One request to the core (or, with none running, to the files): its
    answer as JSON with --json, else as `text` makes it."""
    from qmailtui.client import connect

    async def go() -> int:
        async with connect(_root(args)) as client:
            result = await client.call(op, **request)
        if getattr(args, "json", False):
            print(json.dumps(result, ensure_ascii=False, indent=2))
        elif shown := text(result):
            print(shown)
        return 0

    return _run(go())


def cmd_destinations(args: argparse.Namespace) -> int:
    return _answer(args, format_destinations, "destinations")


def format_destinations(result: dict[str, Any]) -> str:
    c = result["concurrency"]
    lines = [f"remote {c['remote']}/{c['remote_max']}"]
    for d in result["destinations"]:
        lines.append(
            f"{d['domain']}: {d['in_flight']} in flight, {d['queued']} queued"
            + (f", last {d['last_attempt']}" if d.get("last_attempt") else "")
        )
        if d.get("last_reply"):
            lines += [f"  {line}" for line in d["last_reply"].splitlines()]
        for ip, until in d.get("down_until", {}).items():
            lines.append(f"  {ip} is marked down until {until}")
    return "\n".join(lines)


def cmd_reload(args: argparse.Namespace) -> int:
    """HUP's twin; exit 1 when the new configuration was refused."""
    result: dict[str, Any] = {}

    def text(answer: dict[str, Any]) -> str:
        result.update(answer)
        lines = [p["text"] for p in answer["problems"]]
        return "\n".join(lines or ["configuration reloaded"])

    code = _answer(args, text, "reload")
    return code or (0 if result.get("ok", True) else 1)


def _content(args: argparse.Namespace) -> str:
    data = sys.stdin.buffer.read()
    return data.decode("utf-8", "surrogateescape")


def cmd_validate(args: argparse.Namespace) -> int:
    """What would be wrong with FILE holding standard input; exit 1 on errors."""
    verdict: dict[str, Any] = {}

    def text(answer: dict[str, Any]) -> str:
        verdict.update(answer)
        return "\n".join(p["text"] for p in answer["problems"]) or f"{args.path}: ok"

    code = _answer(args, text, "validate", path=args.path, content=_content(args))
    return code or (0 if verdict.get("ok") else 1)


def cmd_write_config(args: argparse.Namespace) -> int:
    """Check standard input as FILE, write it, apply it; the diff on stdout."""
    verdict: dict[str, Any] = {}

    def text(answer: dict[str, Any]) -> str:
        verdict.update(answer)
        lines = [p["text"] for p in answer["problems"]]
        if not answer["written"]:
            lines.append(f"{args.path}: not written")
        return "\n".join([answer["diff"].rstrip("\n"), *lines]).strip("\n")

    code = _answer(args, text, "write-config", path=args.path, content=_content(args))
    return code or (0 if verdict.get("written") else 1)


def cmd_snapshot(args: argparse.Namespace) -> int:
    args.json = True
    return _answer(args, lambda r: "", "snapshot", limit=args.limit)


def cmd_events(args: argparse.Namespace) -> int:
    """Follow the running core's events, one JSON line each, until interrupted."""
    from core import protocol
    from qmailtui.client import SocketClient

    async def go() -> int:
        client = await SocketClient.connect(_root(args))
        if client is None:
            raise UserError("no core is running: events come from a running core")
        try:
            async for item in client.events(args.kinds):  # as the socket sends them
                sys.stdout.write(protocol.event(item["event"], item["data"]).decode())
                sys.stdout.flush()
        finally:
            await client.close()
        return 0

    return _run(go())


def cmd_tcpto(args: argparse.Namespace) -> int:
    return _answer(args, lambda r: "\n".join(e["text"] for e in r["entries"]), "tcpto")


def cmd_tcpok(args: argparse.Namespace) -> int:
    return _answer(args, lambda r: "", "tcpok")


def format_show(result: dict[str, Any]) -> str:
    m = result["message"]
    lines = [
        f"message {m['id']}",
        f"  queued   {m['queued']}",
        f"  expires  {m['expires']}",
        f"  size     {m['size']} bytes",
        f"  sender   <{m['sender']}>",
        f"  held     {'yes' if m['held'] else 'no'}",
        "recipients",
    ]
    for r in m["recipients"]:
        lines.append(f"  {r['state']:<8} {r['channel']:<6} {r['address']}")
        lines.append(
            f"           attempts {r['attempts']}, next {r['next_attempt'] or '-'}"
            + (", delivering now" if r.get("in_progress") else "")
        )
        if r["last_reply"]:
            for reply in r["last_reply"].splitlines():
                lines.append(f"           {reply}")
    if result["why"]:
        lines.append("why it is still here")
        lines += [f"  {w}" for w in result["why"]]
    for d in result.get("destinations", []):
        lines.append(f"destination {d['domain']}")
        lines.append(f"  {d['in_flight']} in flight, {d['queued']} queued")
        if d.get("last_reply"):
            lines.append(f"  last reply ({d.get('last_attempt') or '-'}):")
            lines += [f"    {line}" for line in d["last_reply"].splitlines()]
    if result.get("bounce_reports"):
        lines.append("failures gathered for the bounce")
        lines += [f"  {b}" for b in result["bounce_reports"].rstrip("\n").splitlines()]
    lines.append("log")
    lines += [f"  {entry}" for entry in result["log"]] or ["  (no lines)"]
    lines.append("message")
    lines.append(result["content"].rstrip("\n"))
    return "\n".join(lines)


def _confirm(question: str) -> bool:
    """Ask on the terminal; with no terminal (cron, a pipe) the answer is no."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return False
    try:
        os.write(fd, f"{question} [y/N] ".encode())
        answer = b""
        while not answer.endswith(b"\n") and len(answer) < 100:
            chunk = os.read(fd, 100)
            if not chunk:
                break
            answer += chunk
        return answer.strip().lower() in (b"y", b"yes")
    finally:
        os.close(fd)


def cmd_act(args: argparse.Namespace) -> int:
    from qmailtui.client import connect

    action = args.queue_command
    flt = _filter(args)
    ids = args.ids or None
    if ids is None and not flt:
        raise UserError(
            f"queue {action}: name messages by id or by a filter (--all, --sender, ...)",
            code=ExitCode.USAGE,
        )
    if ids is not None and flt:
        raise UserError(f"queue {action}: give ids or filters, not both", code=ExitCode.USAGE)

    async def go() -> int:
        async with connect(_root(args)) as client:
            preview = await client.call("act", action=action, ids=ids, filter=flt, dry_run=True)
            chosen = preview["messages"]
            missing = preview["failed"]
            if args.dry_run:
                for m in chosen:
                    print(f"{m['id']} <{m['sender']}> {' '.join(m['recipients'])}".rstrip())
                for msgid, why in missing.items():
                    print(f"{PROG}: {msgid}: {why}", file=sys.stderr)
                return 1 if missing else 0
            if not chosen:
                for msgid, why in missing.items():
                    print(f"{PROG}: queue {action}: {msgid}: {why}", file=sys.stderr)
                if not missing:
                    print(f"{PROG}: queue {action}: no message matches", file=sys.stderr)
                return 1
            if action in ("delete", "bounce") and len(chosen) > 1 and not args.yes:
                for m in chosen:
                    print(f"{m['id']} <{m['sender']}>", file=sys.stderr)
                if not _confirm(f"{action} these {len(chosen)} messages?"):
                    print(f"{PROG}: queue {action}: nothing done", file=sys.stderr)
                    return 1
            result = await client.call(
                "act", action=action, ids=[m["id"] for m in chosen], dry_run=False
            )
        for msgid, why in {**missing, **result["failed"]}.items():
            print(f"{PROG}: queue {action}: {msgid}: {why}", file=sys.stderr)
        for msgid, why in result.get("skipped", {}).items():
            print(f"{PROG}: queue {action}: {msgid}: skipped: {why}", file=sys.stderr)
        print(result["summary"])
        # A held message skipped by a filter (retry --all) is no failure; one named by id is.
        named_skips = ids is not None and bool(result.get("skipped"))
        return 1 if result["failed"] or missing or named_skips else 0

    return _run(go())


def cmd_explain(args: argparse.Namespace) -> int:
    extra = {"resolver": args.resolver} if args.resolver else {}
    return _answer(args, format_explain, "explain", address=args.address, **extra)


def format_steps(title: str, steps: list[dict[str, Any]], numbered: bool) -> str:
    """explain's and smtpcheck's answers: a title, then a step a line with its
    level's mark and, where known, [file:line]."""
    lines = [title]
    marks = {"info": " ", "warning": "!", "error": "x"}
    for n, step in enumerate(steps, 1):
        where = ""
        if step["file"]:
            where = f"  [{step['file']}" + (f":{step['line']}" if step["line"] else "") + "]"
        number = f" {n:2}." if numbered else ""
        lines.append(f"{marks.get(step['level'], ' ')}{number} {step['text']}{where}")
    return "\n".join(lines)


def format_explain(result: dict[str, Any]) -> str:
    return format_steps(f"{result['address']}: {result['outcome']}", result["steps"], True)


# -- SMTP ------------------------------------------------------------------------


def cmd_smtpd(args: argparse.Namespace) -> int:
    from core import smtpstdio

    return smtpstdio.serve(_root(args), os.environ)


def cmd_smtpcheck(args: argparse.Namespace) -> int:
    extra = {"resolver": args.resolver} if args.resolver else {}
    request = {"ip": args.ip, "helo": args.helo, "to": args.to, "from": args.sender, **extra}
    return _answer(args, format_smtpcheck, "smtpcheck", **request)


def format_smtpcheck(result: dict[str, Any]) -> str:
    return format_steps(f"{result['ip']}: {result['outcome']}", result["steps"], False)


# -- inject ----------------------------------------------------------------------


def cmd_inject(args: argparse.Namespace) -> int:
    from qmailtui.injecting import inject, read_stdin

    env = dict(os.environ)
    if args.F is not None:
        env["MAILNAME"] = args.F
    mode = "A"
    if args.t:
        mode = "H"
    return inject(
        _root(args),
        read_stdin(),
        mode=mode,
        args=args.recipients,
        sender=args.f,
        env=env,
        prog=f"{PROG} inject",
        print_only=args.n,
    )


# -- the parser -----------------------------------------------------------------


def _add_root(parser: argparse.ArgumentParser, top: bool = False) -> None:
    parser.add_argument(
        "--root",
        metavar="DIR",
        default=None if top else argparse.SUPPRESS,
        help="the qmail root (default: $QMAILHOME, else /var/qmail)",
    )


def _add_filters(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("filters (all must match)")
    group.add_argument("--all", action="store_true", help="every message")
    group.add_argument("--sender", metavar="S", help="envelope sender (or @domain)")
    group.add_argument("--recipient", metavar="R", help="a pending recipient (or @domain)")
    group.add_argument("--domain", metavar="D", help="a pending recipient at this domain")
    group.add_argument("--older-than", metavar="AGE", help="queued longer ago than AGE (2h, 3d)")
    group.add_argument("--state", choices=("pending", "held"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="A qmail-compatible mail host and its console."
    )
    _add_root(parser, top=True)
    parser.add_argument("--demo", action="store_true", help="run on a demo root")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_root(p)
        p.set_defaults(handler=handler)
        return p

    p = command("serve", cmd_serve, "run the core in the foreground")
    p.add_argument("--quiet", action="store_true", help="log only to log/current")
    as_root = os.geteuid() == 0
    p.add_argument(
        "--smtp",
        metavar="ADDR:PORT",
        default="0.0.0.0:25" if as_root else "127.0.0.1:2525",
        help="where to listen for SMTP, or off (default: 0.0.0.0:25 as root, else 127.0.0.1:2525)",
    )
    p.add_argument(
        "--pop3",
        metavar="ADDR:PORT",
        default="0.0.0.0:110" if as_root else "127.0.0.1:1110",
        help="where to listen for POP3, or off (default: 0.0.0.0:110 as root, else 127.0.0.1:1110)",
    )
    p.add_argument(
        "--checkpassword",
        metavar="PROG",
        help="POP3 logins by this checkpassword program (default: users/passwd)",
    )
    p.add_argument(
        "--resolver", metavar="ADDR:PORT", help="send DNS look-ups there (default: the system's)"
    )
    p.add_argument(
        "--control-group",
        metavar="GROUP",
        help="this group may use the control socket too (mode 0660; default: 0600)",
    )
    p.add_argument(
        "--smtp-workers",
        type=_count,
        default=1 if (os.cpu_count() or 1) > 1 else 0,
        metavar="N",
        help="run SMTP sessions in N worker processes, 0: in the core"
        " (default: 1 with more than one CPU, else 0)",
    )
    p.add_argument(
        "--remote-port",
        type=_port,
        default=25,
        metavar="N",
        help="port for remote deliveries whose route names none (default 25)",
    )
    p = command("init", cmd_init, "create a qmail root")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--me", required=True, metavar="HOST", help="this host's name")
    p.add_argument("--force", action="store_true", help="complete an existing root")
    command("check", cmd_check, "validate the configuration")
    for name, help_text in (
        ("tcprules", "compile tcp rules like ucspi-tcp's tcprules: tcprules CDB TMP < RULES"),
        ("tcprulescheck", "the rule for a connection, like tcprulescheck: CDB [IP [HOST]]"),
    ):
        sub.add_parser(name, help=help_text, add_help=False)  # main() runs them before argparse
    command("qstat", cmd_qstat, "count the messages in the queue, like qmail-qstat")
    p = command("maildirmake", cmd_maildirmake, "create a Maildir")
    p.add_argument("dir", metavar="DIR")
    command("newu", cmd_newu, "compile users/assign into users/cdb, like qmail-newu")
    p = command("explain", cmd_explain, "where a message to ADDRESS would go, and why")
    p.add_argument("address", metavar="ADDRESS")
    p.add_argument("--resolver", metavar="ADDR:PORT", help="DNS server for the MX look-up")
    p.add_argument("--json", action="store_true")
    p = command("inject", cmd_inject, "queue a message from standard input, like qmail-inject")
    p.add_argument("-f", metavar="SENDER", help="envelope sender")
    p.add_argument("-F", metavar="NAME", help="full name of the sender")
    p.add_argument("-t", action="store_true", help="also take recipients from the header")
    p.add_argument("-i", action="store_true", help="ignored (a lone '.' never ends input)")
    p.add_argument("-n", action="store_true", help="print the message instead of queueing it")
    p.add_argument("recipients", nargs="*", metavar="RCPT")

    p = command("smtpcheck", cmd_smtpcheck, "what the SMTP listener would answer a client at IP")
    p.add_argument("ip", metavar="IP")
    p.add_argument("--helo", metavar="H", help="the HELO/EHLO argument")
    p.add_argument("--from", dest="sender", metavar="S", required=True, help="envelope sender")
    p.add_argument("--to", nargs="+", required=True, metavar="R", help="recipients")
    p.add_argument("--resolver", metavar="ADDR:PORT", help="DNS server for the client's name")
    p.add_argument("--json", action="store_true")
    command("smtpd", cmd_smtpd, "one SMTP session on standard input/output, like qmail-smtpd")
    p = command("tcpto", cmd_tcpto, "remote addresses that timed out, like qmail-tcpto")
    p.add_argument("--json", action="store_true")
    command("tcpok", cmd_tcpok, "forget those timeouts, like qmail-tcpok")
    command("reload", cmd_reload, "re-read the configuration now, as HUP does")
    for name, handler, help_text in (
        ("validate", cmd_validate, "check standard input as the new content of FILE"),
        ("write-config", cmd_write_config, "check, write and apply FILE from standard input"),
    ):
        p = command(name, handler, help_text)
        p.add_argument("path", metavar="FILE", help="relative to the root: control/NAME, ...")
        p.add_argument("--json", action="store_true")
    p = command("snapshot", cmd_snapshot, "the running core's state as JSON")
    p.add_argument("--limit", type=int, default=50, help="messages on the first page")
    p = command("events", cmd_events, "follow the running core's events (JSON lines)")
    p.add_argument("--kinds", nargs="+", metavar="KIND", help="only these kinds of event")
    p = command("passwd", cmd_passwd, "set a user's POP3 password in users/passwd")
    p.add_argument("user", metavar="USER")
    p.add_argument("--stdin", action="store_true", help="read the password from standard input")

    q = command("queue", lambda a: 2, "list and act on the queue")
    qsub = q.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    p = qsub.add_parser("list", help="the queue, like qmail-qread")
    _add_root(p)
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    _add_filters(p)
    p.set_defaults(handler=cmd_list)
    p = qsub.add_parser("show", help="one message: envelope, attempts, log, content")
    _add_root(p)
    p.add_argument("id", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_show)
    p = qsub.add_parser("destinations", help="remote domains: in flight, queued, last reply")
    _add_root(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_destinations)
    helps = {
        "retry": "try now, past the schedule",
        "bounce": "give up now and bounce",
        "delete": "remove without a bounce",
        "hold": "keep out of delivery",
        "release": "let held messages back in",
    }
    for action, help_text in helps.items():
        p = qsub.add_parser(action, help=help_text, description=help_text)
        _add_root(p)
        p.add_argument("ids", nargs="*", type=int, metavar="ID")
        _add_filters(p)
        p.add_argument("--dry-run", action="store_true", help="list what would be acted on")
        p.add_argument("--yes", action="store_true", help="do not ask before delete/bounce")
        p.set_defaults(handler=cmd_act)
    return parser


def _classic(name: str, argv: list[str]) -> int:
    from core import pop3stdio

    if name == "pop3d":
        return pop3stdio.main_pop3d(argv)
    if name == "popup":
        if len(argv) < 2:
            print("qmailtui popup: usage: popup HOSTNAME PROG...", file=sys.stderr)
            return 2
        return pop3stdio.popup(argv[0], argv[1:])
    from core import pop3auth

    root = default_root()
    if argv[:1] == ["--root"] and len(argv) > 1:
        root, argv = Path(argv[1]), argv[2:]
    return pop3auth.main(QmailRoot(root), argv)


def cmd_passwd(args: argparse.Namespace) -> int:
    """Set a POP3 password: asked twice on a terminal, else the first line of stdin."""
    import getpass

    from core.checkpassword import set_password

    if args.stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"new POP3 password for {args.user}: ")
        if getpass.getpass("again: ") != password:
            raise UserError("the two passwords differ; nothing changed")
    if not password:
        raise UserError("an empty password is not allowed; nothing changed")
    set_password(_root(args).passwd, args.user, password)
    return 0


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        # File names and addresses are bytes from disk and network: never crash on them.
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    raw = sys.argv[1:] if argv is None else argv
    if raw[:1] in (["popup"], ["pop3d"], ["checkpassword"]):
        # qmail-popup's, qmail-pop3d's and checkpassword's interfaces: no argparse.
        return _classic(raw[0], raw[1:])
    if raw[:1] in (["tcprules"], ["tcprulescheck"]):
        # ucspi-tcp's own argument conventions, bytes and exit codes: no argparse, no --root.
        from qmailtui.tcprulescmd import tcprules_main, tcprulescheck_main

        run = tcprules_main if raw[0] == "tcprules" else tcprulescheck_main
        return run(raw[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.demo:
            return cmd_demo(args)
        handler: Handler | None = getattr(args, "handler", None)
        if handler is None:
            parser.print_help(sys.stderr)
            return ExitCode.USAGE
        return int(handler(args))
    except UserError as e:
        root = _root(args).path
        for line in e.format(root).splitlines():  # several problems: one line each
            print(f"{PROG}: {line}", file=sys.stderr)
        return int(e.code)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
