"""`qmailtui-sendmail`: qmail's sendmail wrapper (spec/inject.md §9).

Options: -t (recipients from the header, plus any arguments, as qmail does),
-f SENDER, -F NAME, -i/-oi and the other sendmail options qmail ignores,
-bp (the queue), -bs (an SMTP session on standard input and output).
Imports nothing heavy: cron runs this once per message.
"""

from __future__ import annotations

import os
import sys

from core.paths import QmailRoot, default_root

USAGE = "usage: sendmail [ -t ] [ -fsender ] [ -Fname ] [ -bp ] [ -bs ] [ arg ... ]"
IGNORED_WITH_ARG = "epB"
IGNORED = "imxvV"


def parse(argv: list[str]) -> tuple[dict[str, object], list[str]] | str:
    """Options as qmail's sendmail.c reads them; a string is the usage error."""
    opts: dict[str, object] = {"t": False, "f": None, "F": None, "b": None, "root": None}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if arg.startswith("--root"):
            if arg == "--root" and i + 1 < len(argv):
                opts["root"] = argv[i + 1]
                i += 2
                continue
            if arg.startswith("--root="):
                opts["root"] = arg.split("=", 1)[1]
                i += 1
                continue
        if not arg.startswith("-") or arg == "-":
            break
        letter, rest = arg[1], arg[2:]
        i += 1
        if letter in "fFepBEJ" and not rest and letter not in "EJ":
            if i >= len(argv):
                return USAGE
            rest = argv[i]
            i += 1
        if letter == "t":
            opts["t"] = True
        elif letter == "f":
            opts["f"] = rest
        elif letter == "F":
            opts["F"] = rest
        elif letter == "b":
            if rest not in ("m", "p", "s"):
                return USAGE
            opts["b"] = rest
        elif letter == "o" or letter in IGNORED or letter in IGNORED_WITH_ARG or letter in "EJ":
            continue
        else:
            return USAGE
    return opts, argv[i:]


def smtp_session(root: QmailRoot) -> int:
    """-bs: qmail's sendmail runs qmail-smtpd as a local, trusted client
    (spec/inject.md §5): relaying allowed, no size limit, unless PROTO is set
    (then the caller, such as tcpserver, has set the environment already)."""
    from core import smtpstdio

    env = dict(os.environ)
    if "PROTO" not in env:
        env.update(
            RELAYCLIENT="",
            DATABYTES="0",
            PROTO="TCP",
            TCPLOCALIP="127.0.0.1",
            TCPLOCALHOST="localhost",
            TCPREMOTEIP="127.0.0.1",
            TCPREMOTEHOST="localhost",
            TCPREMOTEINFO="sendmail-bs",
        )
    return smtpstdio.serve(root, env)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    prog = "qmailtui-sendmail"
    parsed = parse(args)
    if isinstance(parsed, str):
        sys.stderr.write(f"{prog}: {parsed}\n")
        return 100
    opts, recipients = parsed
    root = QmailRoot(str(opts["root"])) if opts["root"] else default_root_path()
    if opts["b"] == "p":
        from qmailtui.cli import main as cli_main

        return cli_main(["--root", str(root.path), "queue", "list"])
    if opts["b"] == "s":
        return smtp_session(root)
    env = dict(os.environ)
    sender = opts["f"]
    if opts["F"] is not None:
        env["MAILNAME"] = str(opts["F"])
    if isinstance(sender, str):
        # netqmail 1.04: the generated From: follows -f
        for name in ("QMAILNAME", "MAILNAME", "NAME", "QMAILHOST", "MAILHOST"):
            env.pop(name, None)
        user, at, host = sender.rpartition("@")
        if at:
            env["QMAILUSER"], env["QMAILHOST"] = user, host
        else:
            env["QMAILUSER"] = sender
    from qmailtui.injecting import inject, read_stdin

    return inject(
        root,
        read_stdin(),
        mode="H" if opts["t"] else "a",
        args=recipients,
        sender=sender if isinstance(sender, str) else None,
        env=env,
        prog=prog,
    )


def default_root_path() -> QmailRoot:
    return QmailRoot(default_root())


if __name__ == "__main__":
    sys.exit(main())
