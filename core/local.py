"""qmail-local: deliver a message to one user's .qmail instructions (local.md §5-8).

`prepare()` does everything qmail-local does before the first delivery (home
checks, environment, the .qmail search, NEWSENDER, parsing) without side
effects, so that the address tracer prints the plan that delivery follows;
`execute()` carries it out. `python -m core.local` is a drop-in for qmail-local
with the same arguments, output and exit codes; the core runs it as the
recipient's uid when it runs as root, and calls these functions in-process
otherwise (see lspawn.py).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from core import dotqmail
from core.dotqmail import Failure, Instruction, Search
from core.durable import Durability, FsyncEach, Steps, run_steps
from core.maildir import (
    MailboxError,
    Message,
    deliver_mbox,
    header_of,
    maildir_steps,
    open_message,
)
from core.paths import default_root
from core.quote import quote2
from core.timefmt import mbox_date

PERMANENT_EXITS = frozenset({100, 64, 65, 70, 76, 77, 78, 112})
REPORT_MAX = 3000  # qmail-lspawn keeps this much of a report
PROGRAM_TIMEOUT = 24 * 3600.0  # qmail has none; a program stuck for a day is deferred
NO_MAILBOX = "Sorry, no mailbox here by that name. (#5.1.1)"
LOOPING = "This message is looping: it already has my Delivered-To line. (#5.4.6)"


@dataclass(frozen=True, slots=True)
class Result:
    """A delivery's outcome in qmail-spawn's terms: K success, Z defer, D fail;
    and X, ours: not tried, since a direct delivery may only write Maildirs
    (see NOT_MAILDIRS)."""

    status: str
    text: str
    # Forwards left to the caller (a delivery as another uid cannot write the
    # queue): the envelope sender and the recipients; "qp N" is not yet in text.
    forward: tuple[str, tuple[str, ...]] | None = None

    @property
    def ok(self) -> bool:
        return self.status == "K"


# A direct delivery (before the SMTP 250, see send.Send.enqueue_then) is
# declined, before anything is done, by a .qmail that does more than write
# Maildirs: a program or an mbox lock may take long, and a program or a
# forward must not run twice if the message is then queued after all.
NOT_MAILDIRS = Result("X", "Not only Maildir deliveries: queued instead.\n")


def internal_error(e: object) -> Result:
    """Our bug in local delivery: defer the delivery, never lose it."""
    return Result("Z", f"Internal error in local delivery: {e!r} (#4.3.0)\n")


@dataclass(frozen=True, slots=True)
class Target:
    """qmail-local's arguments: who owns the address and where its .qmail files live."""

    user: str
    home: Path
    local: str
    dash: str
    ext: str
    host: str


@dataclass
class Plan:
    target: Target
    sender: str
    env: dict[str, str]
    search: Search
    newsender: str
    instructions: list[Instruction] = field(default_factory=list)
    from_default: bool = False  # control/defaultdelivery (qmail's aliasempty) applies
    notes: list[str] = field(default_factory=list)

    @property
    def dtline(self) -> bytes:
        return self.env["DTLINE"].encode("utf-8", "surrogateescape")

    @property
    def rpline(self) -> bytes:
        return self.env["RPLINE"].encode("utf-8", "surrogateescape")

    @property
    def ufline(self) -> bytes:
        return self.env["UFLINE"].encode("utf-8", "surrogateescape")


# (dtline, message, sender, recipients) -> the forwarded message's qp
Forwarder = Callable[[bytes, Message, str, list[str]], int]


def _host_prefixes(host: str) -> tuple[str, str, str]:
    i = host.rfind(".")
    i = len(host) if i < 0 else i
    out = []
    for _ in range(3):
        out.append(host[:i])
        j = host.rfind(".", 0, i)
        i = j if j >= 0 else i
    return out[0], out[1], out[2]


def _ext_parts(ext: str) -> tuple[str, str, str]:
    parts = []
    x = ext
    for _ in range(3):
        dash = x.find("-")
        x = x[dash + 1 :] if dash >= 0 else ""
        parts.append(x)
    return parts[0], parts[1], parts[2]


def check_home(home: Path, dry_run: bool = False) -> list[str]:
    """checkhome(): raise Failure for a home that is writable by others or
    sticky (a user editing his .qmail); with `dry_run` a sticky home is a note."""
    try:
        st = os.stat(home)
    except OSError as e:
        raise Failure(f"Unable to switch to {home}: {_reason(e)}. (#4.3.0)") from e
    if not stat.S_ISDIR(st.st_mode):
        raise Failure(f"Unable to switch to {home}: not a directory. (#4.3.0)")
    if st.st_mode & dotqmail.PATRN:
        raise Failure("Uh-oh: home directory is writable. (#4.7.0)")
    if st.st_mode & stat.S_ISVTX:
        if not dry_run:
            raise Failure("Home directory is sticky: user is editing his .qmail file. (#4.2.1)")
        return ["Warning: home directory is sticky."]
    return []


def prepare(
    target: Target, sender: str, defaultdelivery: str, now: float, dry_run: bool = False
) -> Plan:
    """qmail-local up to its first delivery; raises Failure as qmail-local exits."""
    if not target.home.is_absolute():
        raise Failure("Unable to switch to a relative home directory. (#4.3.0)")
    notes = check_home(target.home, dry_run)
    recipient = f"{target.local}@{target.host}"
    ufsender = sender or "MAILER-DAEMON"
    for ch in " \t\n":
        ufsender = ufsender.replace(ch, "-")
    host2, host3, host4 = _host_prefixes(target.host)
    ext2, ext3, ext4 = _ext_parts(target.ext)
    env = {
        "HOST": target.host,
        "HOME": str(target.home),
        "USER": target.user,
        "LOCAL": target.local,
        "RECIPIENT": recipient,
        "DTLINE": "Delivered-To: " + recipient.replace("\n", "_") + "\n",
        "SENDER": sender,
        "RPLINE": "Return-Path: <" + quote2(sender).replace("\n", "_") + ">\n",
        "UFLINE": f"From {ufsender} {mbox_date(now)}\n",
        "EXT": target.ext,
        "EXT2": ext2,
        "EXT3": ext3,
        "EXT4": ext4,
        "HOST2": host2,
        "HOST3": host3,
        "HOST4": host4,
    }
    found = dotqmail.search(target.home, target.dash, target.ext)
    plan = Plan(target, sender, env, found, sender, notes=notes)
    return plan


def finish_plan(plan: Plan, defaultdelivery: str) -> Plan:
    """The rest of prepare(), after the loop check: which file, NEWSENDER, the lines."""
    found, target, sender = plan.search, plan.target, plan.sender
    if found.error:
        raise Failure(found.error)
    if found.found is None and target.dash:
        raise Failure(NO_MAILBOX, permanent=True)
    if found.default is not None:
        plan.env["DEFAULT"] = found.default
    if sender not in ("", "#@[]") and dotqmail.owner_exists(
        target.home, target.dash, target.ext, "-owner"
    ):
        if dotqmail.owner_exists(target.home, target.dash, target.ext, "-owner-default"):
            plan.newsender = f"{target.local}-owner-@{target.host}-@[]"
        else:
            plan.newsender = f"{target.local}-owner@{target.host}"
    plan.env["NEWSENDER"] = plan.newsender
    text, source, forward_only = found.text, found.found or "", found.forward_only
    if not text:
        plan.from_default = True
        # qmail-local ends the text with "\n" if it lacks one: an empty text is a blank line.
        text = defaultdelivery.encode("utf-8", "surrogateescape") or b"\n"
        source, forward_only = "control/defaultdelivery", False
    plan.instructions = dotqmail.parse(text, source, forward_only)
    return plan


def is_looping(message: Message, dtline: bytes) -> bool:
    """bouncexf(): is our Delivered-To line already among the header lines?"""
    header = header_of(message)
    if header is not None:
        return dtline in header.splitlines(keepends=True)
    with open_message(message) as f:
        for line in f:
            if len(line) <= 1:
                return False
            if line == dtline:
                return True
    return False


def _inside(home: Path, target: Path) -> bool:
    real_home = os.path.realpath(home)
    real = os.path.realpath(target)
    return real == real_home or real.startswith(real_home + os.sep)


@dataclass
class Rules:
    """What an in-process delivery may do (lspawn.py decides)."""

    confine: bool = False  # files only inside the home (no uid switch protects them)
    programs: bool = True  # may |program lines run here?
    why_no_programs: str = ""


def execute(
    plan: Plan,
    message: Message,
    *,
    forward: Forwarder | None,
    durable: Durability | None = None,
    rules: Rules | None = None,
    passthrough: bool = False,
) -> Result:
    """Carry out the plan as qmail-local does; the report is its output, cut as
    qmail-lspawn cuts it. With `passthrough` (the qmail-local command) programs
    write to our own fd 1 and 2 as qmail-local's do, and nothing is cut: the
    report holds only our lines, and qmail-lspawn does the cutting."""
    steps = execute_steps(plan, message, forward=forward, rules=rules, passthrough=passthrough)
    return run_steps(steps, durable or FsyncEach())


def execute_steps(
    plan: Plan,
    message: Message,
    *,
    forward: Forwarder | None,
    rules: Rules | None = None,
    passthrough: bool = False,
) -> Steps[Result]:
    """execute as steps (durable.Steps): Maildir deliveries yield their sync
    points; an mbox, a program or a forward first yields None (it may block)."""
    report = str if passthrough else _report
    rules = rules or Rules()
    home = plan.target.home
    header = plan.rpline + plan.dtline
    output: list[str] = []
    files = forwards = programs = 0
    forward_to: list[str] = []
    stop = False

    def failed(text: str, permanent: bool = False) -> Result:
        return Result("D" if permanent else "Z", report("".join(output) + text + "\n"))

    for ins in plan.instructions:
        if ins.kind == "fail":
            return failed(ins.value)
        # qmail-local hands each line on as a C string: a NUL byte ends it.
        value = ins.value.split("\0", 1)[0]
        if ins.kind in ("maildir", "mbox"):
            files += 1
            path = home / value
            if rules.confine and not _inside(home, path):
                return failed(
                    f"Uh-oh: {ins.value} ({ins.source} line {ins.line}) is outside the home"
                    " directory. (#4.7.0)"
                )
            try:
                if ins.kind == "maildir":
                    yield from maildir_steps(path, header, message)
                else:
                    yield None
                    deliver_mbox(path, header, message, plan.ufline, value)
            except MailboxError as e:
                return failed(e.text, e.permanent)
        elif ins.kind == "program":
            programs += 1
            if not rules.programs:
                return failed(rules.why_no_programs)
            yield None
            code, text = run_program(value, plan, message, capture=not passthrough)
            output.append(text)
            if code is None:
                return failed("Aack, child crashed. (#4.3.0)")
            if code in PERMANENT_EXITS:
                return Result("D", report("".join(output)))
            if code == 99:
                stop = True
            elif code != 0:
                return Result("Z", report("".join(output)))
        else:
            forwards += 1
            forward_to.append(value)
        if stop:
            break
    qp = ""
    if forward_to and forward is None:
        done = f"did {files}+{forwards}+{programs}\n"
        return Result("K", report("".join(output) + done), (plan.newsender, tuple(forward_to)))
    if forward_to and forward is not None:
        from core.queue import QueueError

        yield None

        try:
            qp = f"qp {forward(plan.dtline, message, plan.newsender, forward_to)}\n"
        except QueueError as e:
            return failed(f"Unable to forward message: {e.text}.", e.permanent)
        except OSError as e:
            return failed(f"Unable to forward message: {_reason(e)}. (#4.3.0)")
    return Result("K", report("".join(output) + f"did {files}+{forwards}+{programs}\n" + qp))


def run_program(
    command: str, plan: Plan, message: Message, capture: bool = True
) -> tuple[int | None, str]:
    """`/bin/sh -c command` in the home, the message on stdin; (exit code or None
    if killed, its output: fd 1 and 2 together, or "" when not `capture`d and the
    program wrote to ours)."""
    env = {**os.environ, **plan.env}
    with open_message(message) as stdin:
        try:
            proc = subprocess.run(
                ["/bin/sh", "-c", command],
                stdin=stdin,
                stdout=subprocess.PIPE if capture else None,
                stderr=subprocess.STDOUT if capture else None,
                cwd=plan.target.home,
                env=env,
                timeout=PROGRAM_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            out = (e.output or b"").decode("utf-8", "replace")
            return 111, out + "Timeout: the program ran for a day; it will be tried again.\n"
        except OSError as e:
            return 111, f"Unable to run /bin/sh: {_reason(e)}. (#4.3.0)\n"
    text = (proc.stdout or b"").decode("utf-8", "surrogateescape")
    if proc.returncode < 0:
        return None, text
    return proc.returncode, text


def _report(text: str) -> str:
    """qmail-lspawn's cut: the output up to its first NUL; past 3000 bytes, 2966
    of them and a note."""
    data = text.encode("utf-8", "surrogateescape").split(b"\0", 1)[0]
    if len(data) <= REPORT_MAX:
        return data.decode("utf-8", "surrogateescape")
    return data[:2966].decode("utf-8", "surrogateescape") + "\nError report too long, sorry.\n"


def qmail_local_steps(
    target: Target,
    sender: str,
    defaultdelivery: str,
    message: Message,
    *,
    forward: Forwarder | None,
    rules: Rules | None = None,
    now: float | None = None,
    maildirs_only: bool = False,
) -> Steps[Result]:
    """The whole of qmail-local for one delivery, as steps (durable.Steps): the
    caller syncs at each, with a group commit of its own. `maildirs_only`: do
    nothing, and return NOT_MAILDIRS, unless every instruction is a Maildir (a
    direct delivery)."""
    when = time.time() if now is None else now
    try:
        plan = prepare(target, sender, defaultdelivery, when)
        try:
            if is_looping(message, plan.dtline):
                return Result("D", LOOPING + "\n")
        except OSError:
            return Result("Z", "Unable to read message. (#4.3.0)\n")
        finish_plan(plan, defaultdelivery)
    except Failure as e:
        return Result("D" if e.permanent else "Z", e.text + "\n")
    if maildirs_only and not (
        plan.instructions and all(ins.kind == "maildir" for ins in plan.instructions)
    ):
        return NOT_MAILDIRS
    return (yield from execute_steps(plan, message, forward=forward, rules=rules))


def describe(plan: Plan) -> tuple[list[str], str | None]:
    """qmail-local -n: one line per instruction, then the counts; or the lines
    before a refused one (forward-only mode) and the refusal."""
    lines = list(plan.notes)
    files = forwards = programs = 0
    for ins in plan.instructions:
        if ins.kind == "fail":
            return lines, ins.value
        if ins.kind in ("maildir", "mbox"):
            files += 1
            lines.append(f"{ins.kind} {ins.value}")
        elif ins.kind == "program":
            programs += 1
            lines.append(f"program {ins.value}")
        else:
            forwards += 1
            lines.append(f"forward {ins.value}")
    lines.append(f"did {files}+{forwards}+{programs}")
    return lines, None


def _reason(e: OSError) -> str:
    from core.errors import os_reason

    return os_reason(e)


# -- the qmail-local command -------------------------------------------------------

USAGE = (
    "qmail-local: usage: qmail-local [ -nN ] user homedir local dash ext domain sender aliasempty"
)
# qmail.c's qmail_close(): what each exit code of qmail-queue means, letter first.
QQ_EXITS = {
    11: "Denvelope address too long for qq (#5.1.3)",
    115: "Denvelope address too long for qq (#5.1.3)",
    31: "Dmail server permanently rejected message (#5.3.0)",
    51: "Zqq out of memory (#4.3.0)",
    52: "Zqq timeout (#4.3.0)",
    53: "Zqq write error or disk full (#4.3.0)",
    54: "Zqq read error (#4.3.0)",
    55: "Zqq unable to read configuration (#4.3.0)",
    56: "Zqq trouble making network connection (#4.3.0)",
    61: "Zqq trouble in home directory (#4.3.0)",
    **dict.fromkeys((62, 63, 64, 65, 66), "Zqq trouble creating files in queue (#4.3.0)"),
    71: "Zmail server temporarily rejected message (#4.3.0)",
    72: "Zconnection to mail server timed out (#4.4.1)",
    73: "Zconnection to mail server rejected (#4.4.1)",
    74: "Zcommunication with mail server failed (#4.4.2)",
    81: "Zqq internal bug (#4.3.0)",
    91: "Zqq internal bug (#4.3.0)",
    120: "Zunable to exec qq (#4.3.0)",
}


def run_qmail_queue(program: str, data: bytes, envelope: bytes) -> tuple[int, str]:
    """qmail.c's qmail_open()..qmail_close(): run `program` in the qmail home
    ($QMAILHOME) with the message on fd 0, the envelope on fd 1 and fd 6 open for
    its own error text; return its pid (qmail-local's qp) and "" or the qq error,
    letter first."""
    message, envelope_pipe, errors = os.pipe(), os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child execs or exits
        try:
            os.dup2(message[0], 0)
            os.dup2(envelope_pipe[0], 1)
            os.dup2(errors[1], 6)
            try:
                os.chdir(default_root())
            except OSError:
                os._exit(61)
            os.execv(program, [program])  # noqa: S606 - qmail-queue is run as qmail runs it
        finally:
            os._exit(120)
    for fd in (message[0], envelope_pipe[0], errors[1]):
        os.close(fd)
    broken = False
    for fd, chunk in ((message[1], data), (envelope_pipe[1], envelope)):
        try:
            if not broken:
                _write_all(fd, chunk)
        except OSError:
            broken = True  # qmail_put's flagerr: qmail-queue stopped reading
        finally:
            os.close(fd)
    with os.fdopen(errors[0], "rb") as f:
        errstr = f.read(255).decode("utf-8", "surrogateescape")
    _, wstat = os.waitpid(pid, 0)
    if os.WIFSIGNALED(wstat):
        return pid, "Zqq crashed (#4.3.0)"
    code = os.waitstatus_to_exitcode(wstat)
    if code == 0:
        return pid, "Zqq read error (#4.3.0)" if broken else ""
    if code in QQ_EXITS:
        return pid, QQ_EXITS[code]
    if code == 82 and len(errstr) > 2:
        return pid, errstr
    if 11 <= code <= 40:
        return pid, "Dqq permanent problem (#5.3.0)"
    return pid, "Zqq temporary problem (#4.3.0)"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def forward_with_qmailqueue(dtline: bytes, message: Message, sender: str, rcpts: list[str]) -> int:
    """Forward through $QMAILQUEUE as qmail-local does, or into the queue of
    $QMAILHOME: what the command does when run alone."""
    from core.queue import Queue, QueueError, encode_envelope

    with open_message(message) as f:
        data = dtline + f.read()
    program = os.environ.get("QMAILQUEUE")
    if program:
        envelope = encode_envelope(0, 0, sender, rcpts).split(b"\0", 2)[2] + b"\0"
        qp, error = run_qmail_queue(program, data, envelope)
        if error:
            raise QueueError(error[1:], permanent=error[0] == "D")
        return qp
    from core.paths import QmailRoot

    uid = os.getuid()
    return Queue(QmailRoot(default_root())).enqueue(
        data,
        sender,
        rcpts,
        uid=uid,
        pid=os.getpid(),
        invoked=f"invoked by uid {uid}",
        now=time.time(),
    )


def _say(stream: TextIO, text: str) -> None:
    """Bytes out as they came in: program output need not be UTF-8."""
    stream.flush()
    stream.buffer.write(text.encode("utf-8", "surrogateescape"))
    stream.buffer.flush()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    dry_run = False
    while args and args[0].startswith("-") and args[0] != "-":  # qmail's sgetopt
        option, args = args[0], args[1:]
        if option.startswith("--"):
            break  # "--" ends the options (subgetopt skips any "--..." word)
        for letter in option[1:]:
            if letter not in "nN":
                _say(sys.stderr, f"qmail-local: illegal option -- {letter}\n{USAGE}\n")
                return 100
            dry_run = letter == "n"
    if len(args) != 8 or not args[1].startswith("/"):
        _say(sys.stderr, USAGE + "\n")
        return 100
    os.umask(0o077)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    user, home, local, dash, ext, host, sender, aliasempty = args
    target = Target(user, Path(home), local, dash, ext, host)
    try:
        try:
            os.chdir(home)  # as qmail-local: programs, and qmail-queue's QMAILHOME, start here
        except OSError as e:
            raise Failure(f"Unable to switch to {home}: {_reason(e)}. (#4.3.0)") from e
        plan = prepare(target, sender, aliasempty, time.time(), dry_run=dry_run)
        plan.env["HOME"] = home  # as given: Path() drops a final "/" and "/./"
        if not dry_run:
            try:
                if is_looping(0, plan.dtline):
                    raise Failure(LOOPING, permanent=True)
            except OSError as e:
                raise Failure(f"Unable to read message: {_reason(e)}. (#4.3.0)") from e
        finish_plan(plan, aliasempty)
    except Failure as e:
        _say(sys.stderr, e.text + "\n")
        return 100 if e.permanent else 111
    if dry_run:
        notes, plan.notes = plan.notes, []  # qmail-local warns on stderr
        lines, refused = describe(plan)
        _say(sys.stderr, "".join(note + "\n" for note in notes))
        _say(sys.stdout, "".join(line + "\n" for line in lines))
        if refused:
            _say(sys.stderr, refused + "\n")
            return 111
        return 0
    result = execute(plan, 0, forward=forward_with_qmailqueue, passthrough=True)
    _say(sys.stdout if result.ok else sys.stderr, result.text)
    return {"K": 0, "D": 100}.get(result.status, 111)


if __name__ == "__main__":
    try:
        code = main()
    except Exception:
        # Our bug: say so, but defer (111) rather than let exit 1 bounce the mail.
        traceback.print_exc()
        code = 111
    sys.exit(code)
