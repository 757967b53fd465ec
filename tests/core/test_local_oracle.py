"""`python -m core.local` against the real qmail-local: the same home, the same result.

Each case builds a home directory (inside `tmp_path/box`), runs notqmail's
qmail-local in it, moves the box aside, builds it again at the same path and
runs `python -m core.local` with the same arguments, message (a regular file
on fd 0) and environment. One path for both keeps $HOME, $RECIPIENT and the
paths in error messages comparable byte for byte. Compared:

- the exit code, and stdout and stderr as one stream (qmail-lspawn reads fd 1
  and fd 2 through one pipe, so the interleaving is what a report shows);
- every file and directory under the box, with its mode: Maildir messages
  byte for byte, mbox files byte for byte, whatever programs wrote (the
  environment dumps), what the stand-in qmail-queue stored for a forward
  (`queue/PID.msg`, `queue/PID.env`).

Normalised, and nothing else: the date of a `From ` line (mbox, $UFLINE),
pids (`qp N` and the stand-in's `queue/N.*`, checked to be the same N) and
Maildir unique names (files in new/, cur/, tmp/ numbered in content order).

The oracle was built with qmail's home `.`, so its qmail-queue runs where
qmail-local is, in the home; ours runs $QMAILQUEUE in $QMAILHOME as qmail runs
it in its home, so both runs get QMAILHOME=the home.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from core.local import _report

REPO = Path(__file__).resolve().parents[2]
OURS = (sys.executable, "-m", "core.local")
TIMEOUT = 60

MESSAGE = (
    b"Received: (qmail 4242 invoked by uid 0); 1 Jan 2024 00:00:00 -0000\n"
    b"From: a@b.test\n"
    b"To: alice@example.org\n"
    b"Subject: t\n"
    b"\n"
    b"hello\n"
)
ENV_DUMP = "|env | sort > env.out"  # every variable a program sees, into the home
SHOW = (  # the same, for the report: one line on stdout
    '|echo "S=$SENDER N=$NEWSENDER R=$RECIPIENT U=$USER H=$HOME L=$LOCAL'
    " E=$EXT/$EXT2/$EXT3/$EXT4 D=${DEFAULT-unset} HOST=$HOST/$HOST2/$HOST3/$HOST4"
    ' RP=$RPLINE"'
)
DATE = re.compile(rb"[A-Z][a-z]{2} [A-Z][a-z]{2} \d\d \d\d:\d\d:\d\d \d{4}")
QP = re.compile(rb"^qp (\d+)$", re.MULTILINE)
QUEUED = re.compile(r"(.*/)?queue/(\d+)\.(msg|env)")


@dataclass(frozen=True)
class Case:
    """One delivery. `code` (and `says`, a piece of its output) is what qmail-local
    does: checked first, so that a case tests what its name says."""

    code: int
    dotqmail: dict[str, str | bytes | None] = field(default_factory=dict)  # None: a directory
    says: str = ""
    local: str = "alice"
    dash: str = ""
    ext: str = ""
    host: str = "example.org"
    sender: str = "sender@b.test"
    default: str = "./Maildir/"
    message: bytes = MESSAGE
    flags: tuple[str, ...] = ()
    modes: dict[str, int] = field(default_factory=dict)  # "." is the home
    maildirs: tuple[str, ...] = ("home/Maildir",)  # relative to the box
    symlinks: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    home_suffix: str = ""  # appended to the homedir argument
    make_home: bool = True


def ext_case(ext: str, code: int = 0, **kw: Any) -> Case:
    """An address `alice-EXT`, as qmail-getpw gives it: dash '-'."""
    return Case(code, local=f"alice-{ext}", dash="-", ext=ext, **kw)


CASES: dict[str, Case] = {
    # -- which .qmail file (local.md §5.4) and $DEFAULT ------------------------------
    "ext a: the exact file wins over -default": ext_case(
        "a", dotqmail={".qmail-a": ENV_DUMP + "\n./Maildir/\n", ".qmail-default": "./Mailbox\n"}
    ),
    "ext a: .qmail-default, DEFAULT=a": ext_case(
        "a", dotqmail={".qmail-default": ENV_DUMP + "\n./Maildir/\n"}
    ),
    "ext a-b: .qmail-a-default before .qmail-default": ext_case(
        "a-b",
        dotqmail={".qmail-a-default": ENV_DUMP + "\n", ".qmail-default": "./Mailbox\n"},
    ),
    "ext a-b-c: .qmail-a-b-default": ext_case(
        "a-b-c",
        dotqmail={
            ".qmail-a-b-default": ENV_DUMP + "\n",
            ".qmail-a-default": "./Mailbox\n",
            ".qmail-default": "./Mailbox\n",
        },
    ),
    "ext a-b-c: .qmail-a-default, DEFAULT=b-c": ext_case(
        "a-b-c", dotqmail={".qmail-a-default": ENV_DUMP + "\n", ".qmail-default": "./Mailbox\n"}
    ),
    "ext a-b-c: only .qmail-default, DEFAULT=a-b-c": ext_case(
        "a-b-c", dotqmail={".qmail-default": ENV_DUMP + "\n" + SHOW + "\n"}
    ),
    "ext x-default: exact file, DEFAULT is the word default": ext_case(
        "x-default", dotqmail={".qmail-x-default": ENV_DUMP + "\n", ".qmail-default": "./Mbox\n"}
    ),
    "ext a-: .qmail-a-default with an empty DEFAULT": ext_case(
        "a-", dotqmail={".qmail-a-default": SHOW + "\n"}
    ),
    "uppercase ext: file lower-cased, DEFAULT keeps the case": ext_case(
        "Foo-BAR", dotqmail={".qmail-foo-default": ENV_DUMP + "\n" + SHOW + "\n"}
    ),
    "dots in ext become colons": ext_case(
        "P.D.Q.Bach", dotqmail={".qmail-p:d:q:bach": SHOW + "\n", ".qmail-default": "./Mbox\n"}
    ),
    "a directory named like the file is skipped": ext_case(
        "a", dotqmail={".qmail-a": None, ".qmail-default": SHOW + "\n"}
    ),
    "a symlink loop is a missing file": ext_case(
        "a", dotqmail={".qmail-default": SHOW + "\n"}, symlinks={"home/.qmail-a": ".qmail-a"}
    ),
    "an ext too long for a file name falls to .qmail-default": ext_case(
        "x" * 300, dotqmail={".qmail-default": SHOW + "\n"}
    ),
    "dash '-' and no ext: .qmail- then .qmail-default": Case(
        0, local="alice", dash="-", dotqmail={".qmail-default": SHOW + "\n"}
    ),
    "user address without .qmail: .qmaildefault is read (a qmail quirk)": Case(
        0, dotqmail={".qmaildefault": SHOW + "\n"}
    ),
    # -- missing and empty files: the default delivery (§5.6) ----------------------
    "no .qmail for the user: defaultdelivery ./Maildir/": Case(0),
    "no .qmail for an extension: no mailbox": ext_case(
        "nobody", 100, says="Sorry, no mailbox here by that name. (#5.1.1)"
    ),
    "empty .qmail: defaultdelivery ./Mailbox": Case(
        0, dotqmail={".qmail": ""}, default="./Mailbox"
    ),
    "empty .qmail: multi-line defaultdelivery": Case(
        0, dotqmail={".qmail": ""}, default=f"./Maildir/\n./Mailbox\n{SHOW}\n"
    ),
    "empty .qmail with the x bit: defaultdelivery, x bit ignored": ext_case(
        "a", dotqmail={".qmail-a": ""}, modes={"home/.qmail-a": 0o700}
    ),
    "empty defaultdelivery text: a blank first line": Case(
        111, default="", says="Uh-oh: first line of .qmail file is blank. (#4.2.1)"
    ),
    "defaultdelivery without a final newline": Case(0, default="./Maildir/\n./Mailbox"),
    # -- .qmail syntax (§5.3) --------------------------------------------------------
    "comments and blank lines are skipped": Case(
        0, dotqmail={".qmail": "# mail\n./Maildir/\n\n#./Mailbox\n\n"}
    ),
    "a blank first line defers": Case(
        111, dotqmail={".qmail": "\n./Maildir/\n"}, says="first line of .qmail file is blank"
    ),
    "a first line of blanks and tabs defers": Case(
        111, dotqmail={".qmail": " \t \n./Maildir/\n"}, says="first line of .qmail file is blank"
    ),
    "trailing spaces and tabs are stripped": Case(
        0, dotqmail={".qmail": "./Maildir/ \t \n./Mailbox\t\n|echo hi  \t\n"}
    ),
    "a leading space makes a forward address": Case(
        0, dotqmail={".qmail": " ./Maildir/\n"}, says="did 0+1+0"
    ),
    "a last line without newline": Case(0, dotqmail={".qmail": "./Maildir/\n|echo end"}),
    "CRLF lines: the CR stays, ./Maildir/ CR is an mbox": Case(
        0, dotqmail={".qmail": "./Mbox\r\n|echo crlf\r\n"}
    ),
    "a NUL ends a line's value where qmail-local's C strings end": Case(
        0, dotqmail={".qmail": b"|echo one\x00two\n&bob@x.test\x00junk\n./Maildir/\n"}
    ),
    "a line starting with NUL is blank": Case(
        0, dotqmail={".qmail": b"./Maildir/\n\x00&bob@x.test\n"}, says="did 1+0+0"
    ),
    "+ lines other than +list are ignored": Case(
        0, dotqmail={".qmail": "+lists\n+\n|echo still a program\n"}
    ),
    # -- forwards: one injection for the whole file (§7.4) ---------------------------
    "&address and bare address, several, one injection": Case(
        0,
        dotqmail={".qmail": "&bob@x.test\ncarol@y.test\n./Maildir/\n&dave\n|echo prog\n"},
        says="did 1+3+1",
    ),
    "& alone forwards to the empty address": Case(0, dotqmail={".qmail": "&\n"}),
    "forwarding keeps a message without a final newline": Case(
        0, dotqmail={".qmail": "&bob@x.test\n"}, message=b"Subject: x\n\nno newline"
    ),
    "a temporary qmail-queue failure defers": Case(
        111,
        dotqmail={".qmail": "&bob@x.test\n", "qq-exit": "71\n"},
        says="Unable to forward message: mail server temporarily rejected message (#4.3.0).",
    ),
    "a permanent qmail-queue failure bounces": Case(
        100,
        dotqmail={".qmail": "|echo before\n&bob@x.test\n", "qq-exit": "31\n"},
        says="permanently rejected",
    ),
    "qmail-queue exit 82 gives its own text": Case(
        100,
        dotqmail={".qmail": "&bob@x.test\n", "qq-exit": "82\nDno thanks, not here\n"},
        says="Unable to forward message: no thanks, not here.",
    ),
    "qmail-queue exit 40: qq permanent problem": Case(
        100, dotqmail={".qmail": "&bob@x.test\n", "qq-exit": "40\n"}, says="qq permanent problem"
    ),
    "qmail-queue that cannot be run": Case(
        111,
        dotqmail={".qmail": "&bob@x.test\n"},
        env={"QMAILQUEUE": "/nonexistent/qmail-queue"},
        says="unable to exec qq",
    ),
    "a failing program stops the forwards before it": Case(
        111, dotqmail={".qmail": "&bob@x.test\n|echo no; exit 111\n&carol@x.test\n"}
    ),
    # -- forward-only mode: +list and the owner-x bit (§5.5) -------------------------
    "x bit: forwards only are fine": ext_case(
        "list", dotqmail={".qmail-list": "&bob@x.test\ncarol\n"}, modes={"home/.qmail-list": 0o700}
    ),
    "x bit: a file line defers": ext_case(
        "list",
        111,
        dotqmail={".qmail-list": "&bob@x.test\n./Maildir/\n"},
        modes={"home/.qmail-list": 0o700},
        says="Uh-oh: .qmail has file delivery but has x bit set. (#4.7.0)",
    ),
    "x bit: a program line defers": ext_case(
        "list",
        111,
        dotqmail={".qmail-list": "&bob@x.test\n|echo never\n"},
        modes={"home/.qmail-list": 0o700},
        says="Uh-oh: .qmail has prog delivery but has x bit set. (#4.7.0)",
    ),
    "+list: a program before it runs, the file line after it defers": Case(
        111,
        dotqmail={".qmail": "|echo ran first\n./Maildir/\n+list\n&bob@x.test\n./Mailbox\n"},
        says="has file delivery but has x bit set",
    ),
    "+list then forwards only": Case(0, dotqmail={".qmail": "+list\n&bob@x.test\n&carol\n"}),
    "+list then a program": Case(
        111, dotqmail={".qmail": "+list\n|echo never\n"}, says="prog delivery"
    ),
    # -- programs (§7.3) ---------------------------------------------------------------
    "program: environment, stdout and stderr in order": Case(
        0,
        dotqmail={".qmail": ENV_DUMP + "\n|echo out; echo err >&2; echo out again\n" + SHOW},
    ),
    "program exit 99: later lines skipped, earlier forwards sent": Case(
        0,
        dotqmail={".qmail": "&bob@x.test\n|echo stop; exit 99\n./Maildir/\n&carol@x.test\n"},
        says="did 0+1+1",
    ),
    "program exit 100 bounces with its output": Case(
        100, dotqmail={".qmail": "./Maildir/\n|echo no such list; exit 100\n./Mailbox\n"}
    ),
    "program exit 64 bounces": Case(100, dotqmail={".qmail": "|echo usage >&2; exit 64\n"}),
    "program exit 111 defers": Case(111, dotqmail={".qmail": "|echo later; exit 111\n"}),
    "program exit 1 defers": Case(111, dotqmail={".qmail": "|exit 1\n./Maildir/\n"}),
    "program killed by a signal": Case(
        111,
        dotqmail={".qmail": "|echo before; kill -9 $$\n"},
        says="Aack, child crashed. (#4.3.0)",
    ),
    "programs read the whole message, rewound each time": Case(
        0, dotqmail={".qmail": "|head -c 20 >/dev/null; cat > one\n|cat > two\n|wc -c\n"}
    ),
    "program output that is not UTF-8, with a NUL": Case(
        0, dotqmail={".qmail": b"|printf 'caf\\351 \\377\\000 end\\n'\n|echo \xe9t\xe9\n"}
    ),
    "program output not UTF-8 under a strict stdout encoding": Case(
        0,
        dotqmail={".qmail": b"|printf 'caf\\351\\n'\n"},
        env={"PYTHONIOENCODING": "utf-8:strict"},
    ),
    "programs get SIGPIPE at its default": Case(0, dotqmail={".qmail": "|yes | head -n 2\n"}),
    "program in the home with qmail-local's umask": Case(
        0, dotqmail={".qmail": "|pwd; umask; touch made\n"}
    ),
    # -- loops (§5.2 step 4) ---------------------------------------------------------
    "my Delivered-To line in the header: looping": Case(
        100,
        message=b"Delivered-To: alice@example.org\nSubject: x\n\nbody\n",
        says="This message is looping: it already has my Delivered-To line. (#5.4.6)",
    ),
    "my Delivered-To line only in the body: delivered": Case(
        0, message=b"Subject: x\n\nDelivered-To: alice@example.org\n"
    ),
    "another case or another address: delivered": Case(
        0,
        message=b"delivered-to: alice@example.org\nDelivered-To: bob@example.org\n\nx\n",
    ),
    "a Delivered-To line without newline ends the header": Case(
        0, message=b"Subject: x\nDelivered-To: alice@example.org"
    ),
    # -- mbox and maildir (§7.1, §7.2) ----------------------------------------------
    "mbox: >From quoting": Case(
        0,
        dotqmail={".qmail": "./Mailbox\n"},
        message=b"Subject: q\n\nFrom me\n>From you\n>>From them\nFrom\nFromage\n From x\n",
    ),
    "mbox and maildir: a message without final newline": Case(
        0, dotqmail={".qmail": "./Mailbox\n./Maildir/\n"}, message=b"Subject: q\n\nlast"
    ),
    "mbox and maildir: an empty message": Case(
        0, dotqmail={".qmail": "./Mailbox\n./Maildir/\n"}, message=b""
    ),
    "mbox: appended to what is there": Case(
        0, dotqmail={".qmail": "./Mailbox\n", "Mailbox": "From x Mon Jan 01 00:00:00 2024\n\n"}
    ),
    "mbox and maildir outside the home by absolute path": Case(
        0,
        dotqmail={".qmail": "{box}/elsewhere/Maildir/\n{box}/elsewhere/mbox\n"},
        maildirs=("elsewhere/Maildir",),
    ),
    "mbox in a missing directory": Case(
        111, dotqmail={".qmail": "./nodir/Mailbox\n"}, says="file does not exist"
    ),
    "mbox that is a directory": Case(
        111, dotqmail={".qmail": "|echo first\n./Maildir\n"}, says="is a directory"
    ),
    "missing maildir": Case(
        111, dotqmail={".qmail": "./NoMaildir/\n"}, says="Unable to chdir to maildir. (#4.2.1)"
    ),
    "maildir without tmp/": Case(
        111,
        dotqmail={".qmail": "./Half/\n", "Half/new/": None, "Half/cur/": None},
        says="Temporary error on maildir delivery. (#4.3.0)",
    ),
    "maildir without new/": Case(
        111,
        dotqmail={".qmail": "./Half/\n", "Half/tmp/": None, "Half/cur/": None},
        says="Temporary error on maildir delivery. (#4.3.0)",
    ),
    # -- NEWSENDER (§5.7), senders, hosts --------------------------------------------
    "NEWSENDER from .qmail-EXT-owner": ext_case(
        "list",
        dotqmail={".qmail-list": SHOW + "\n&bob@x.test\n", ".qmail-list-owner": "&me\n"},
    ),
    "NEWSENDER with -owner-default: VERP": ext_case(
        "list",
        dotqmail={
            ".qmail-list": SHOW + "\n&bob@x.test\n",
            ".qmail-list-owner": "&me\n",
            ".qmail-list-owner-default": "&me\n",
        },
    ),
    "NEWSENDER looks at the address's own ext, not the -default file used": ext_case(
        "list-foo",
        dotqmail={".qmail-list-default": SHOW + "\n&bob@x.test\n", ".qmail-list-owner": ""},
    ),
    "NEWSENDER: a directory counts as an -owner file": ext_case(
        "list", dotqmail={".qmail-list": SHOW + "\n", ".qmail-list-owner": None}
    ),
    "sender empty: MAILER-DAEMON, <>, NEWSENDER stays empty": ext_case(
        "list",
        sender="",
        dotqmail={
            ".qmail-list": ENV_DUMP + "\n./Mailbox\n./Maildir/\n&bob@x.test\n",
            ".qmail-list-owner": "",
        },
    ),
    "sender #@[]: NEWSENDER stays #@[]": ext_case(
        "list",
        sender="#@[]",
        dotqmail={".qmail-list": SHOW + "\n./Mailbox\n&bob\n", ".qmail-list-owner": ""},
    ),
    "senders that need quoting and From_ dashes": Case(
        0,
        sender='a b\t"c\\d.@x.test',
        dotqmail={".qmail": ENV_DUMP + "\n./Mailbox\n./Maildir/\n"},
    ),
    "a sender with a newline": Case(
        0, sender="evil\nFrom: x@y", dotqmail={".qmail": ENV_DUMP + "\n./Mailbox\n./Maildir/\n"}
    ),
    "HOST2..4 and EXT2..4 with many parts": ext_case(
        "a-b-c-d-e", host="m.a.b.c.d.e", dotqmail={".qmail-default": ENV_DUMP + "\n"}
    ),
    "HOST2..4 for a host without dots": Case(0, host="localhost", dotqmail={".qmail": SHOW}),
    "HOST2..4 for a host with one dot": Case(0, host="a.b", dotqmail={".qmail": SHOW}),
    "an inherited DEFAULT stays when no default file matched": Case(
        0, dotqmail={".qmail": SHOW}, env={"DEFAULT": "from-outside"}
    ),
    # -- the home and the file's permissions (§6) ------------------------------------
    "a world-writable .qmail is refused": Case(
        111,
        dotqmail={".qmail": "./Maildir/\n"},
        modes={"home/.qmail": 0o602},
        says="Uh-oh: .qmail file is writable. (#4.7.0)",
    ),
    "a group-writable .qmail is accepted (conf-patrn 002)": Case(
        0, dotqmail={".qmail": "./Maildir/\n"}, modes={"home/.qmail": 0o660}
    ),
    "a world-writable home is refused": Case(
        111, modes={"home": 0o703}, says="Uh-oh: home directory is writable. (#4.7.0)"
    ),
    "a group-writable home is accepted": Case(0, modes={"home": 0o770}),
    "a sticky home defers": Case(
        111,
        modes={"home": 0o1700},
        says="Home directory is sticky: user is editing his .qmail file. (#4.2.1)",
    ),
    "a missing home": Case(
        111, make_home=False, maildirs=(), says="Unable to switch to", home_suffix="/x"
    ),
    "homedir given with a trailing slash: HOME keeps it": Case(
        0, home_suffix="/", dotqmail={".qmail": ENV_DUMP + "\n"}
    ),
    "homedir given with /./ in it": Case(0, home_suffix="/./", dotqmail={".qmail": SHOW}),
    # -- -n: print the plan (§5.9) -----------------------------------------------------
    "-n: every kind of line": Case(
        0,
        flags=("-n",),
        dotqmail={
            ".qmail": "# c\n&bob@x.test\ncarol\n./Maildir/ \n./Mailbox\n|echo x  \n+list\n&d\n"
        },
    ),
    "-n: the default delivery": Case(0, flags=("-n",), default="./Maildir/\n|preline x\n"),
    "-n: .qmail-default for an extension": ext_case(
        "a-b", flags=("-n",), dotqmail={".qmail-a-default": "|echo $DEFAULT\n"}
    ),
    "-n: no mailbox": ext_case("nobody", 100, flags=("-n",)),
    "-n: x bit, the lines before the file line are printed": ext_case(
        "list",
        111,
        flags=("-n",),
        dotqmail={".qmail-list": "&bob@x.test\n./Maildir/\n"},
        modes={"home/.qmail-list": 0o700},
        says="has file delivery",
    ),
    "-n: a blank first line": Case(111, flags=("-n",), dotqmail={".qmail": "\n./Maildir/\n"}),
    "-n: no loop check": Case(0, flags=("-n",), message=b"Delivered-To: alice@example.org\n\nx\n"),
    "-n: a sticky home is only a warning": Case(
        0, flags=("-n",), modes={"home": 0o1700}, says="Warning: home directory is sticky."
    ),
    "-n: NUL in a line is printed as it is": Case(
        0, flags=("-n",), dotqmail={".qmail": b"|echo one\x00two\n&bob\x00x\n"}
    ),
    "-N after -n delivers": Case(0, flags=("-n", "-N")),
    "-Nn in one word prints": Case(0, flags=("-Nn",), says="maildir ./Maildir/"),
    "-- ends the options": Case(0, flags=("-n", "--")),
}


@dataclass(frozen=True)
class Outcome:
    code: int
    output: bytes  # stdout and stderr, as one stream; or stdout alone, when split
    files: dict[str, tuple[str, bytes]]  # path in the box -> (mode, content)
    errors: bytes | None = None  # stderr, when split


def build(box: Path, case: Case) -> Path:
    """The box and its home, as `case` says; returns the home."""
    home = box / "home"
    box.mkdir()
    if case.make_home:
        home.mkdir(mode=0o700)
    for maildir in case.maildirs:
        for sub in ("tmp", "new", "cur"):
            (box / maildir / sub).mkdir(mode=0o700, parents=True)
    for name, content in case.dotqmail.items():
        path = home / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir(mode=0o700)
            continue
        data = content.encode() if isinstance(content, str) else content
        path.write_bytes(data.replace(b"{box}", str(box).encode()))
        path.chmod(0o600)
    for name, target in case.symlinks.items():
        (box / name).symlink_to(target)
    for name, mode in case.modes.items():
        (box / name).chmod(mode)
    return home


def snapshot(box: Path) -> dict[str, tuple[str, bytes]]:
    files: dict[str, tuple[str, bytes]] = {}
    for directory, dirnames, filenames in os.walk(box):
        for name in sorted(dirnames + filenames):
            path = Path(directory) / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                content = os.readlink(path).encode()
            elif stat.S_ISDIR(st.st_mode):
                content = b""
            else:
                content = DATE.sub(b"<date>", path.read_bytes())
            files[path.relative_to(box).as_posix()] = (stat.filemode(st.st_mode), content)
    return files


def normalise(
    code: int, output: bytes, files: dict[str, tuple[str, bytes]], errors: bytes | None = None
) -> Outcome:
    """Dates, pids and Maildir unique names out; everything else as it is."""
    qps = QP.findall(output)
    assert len(qps) <= 1, output
    renamed: dict[str, tuple[str, bytes]] = {}
    numbered: dict[str, list[tuple[bytes, str]]] = {}
    for name, (mode, content) in files.items():
        queued = QUEUED.fullmatch(name)
        parent = name.rpartition("/")[0]
        if queued:
            # The stand-in names its files by its pid, which qmail-local reports as qp.
            assert not qps or queued[2].encode() == qps[0], (name, output)
            renamed[f"{queued[1] or ''}queue/PID.{queued[3]}"] = (mode, content)
        elif parent.rpartition("/")[2] in ("new", "cur", "tmp") and not mode.startswith("d"):
            numbered.setdefault(parent, []).append((content, mode))
        else:
            renamed[name] = (mode, content)
    for parent, entries in numbered.items():
        for n, (content, mode) in enumerate(sorted(entries)):
            renamed[f"{parent}/#{n}"] = (mode, content)
    output = QP.sub(b"qp PID", DATE.sub(b"<date>", output))
    return Outcome(code, output, renamed, errors)


def args_for(case: Case, home: Path) -> list[str]:
    return [
        *case.flags,
        "alice",
        str(home) + case.home_suffix,
        case.local,
        case.dash,
        case.ext,
        case.host,
        case.sender,
        case.default,
    ]


def environment(oracle: Path, home: Path, case: Case) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",  # see test_python_locale_coercion_shows_in_the_environment
        "PYTHONPATH": str(REPO),
        "QMAILQUEUE": str(oracle / "qmail-queue"),
        "QMAILHOME": str(home),
        **case.env,
    }


def deliver(
    command: list[str],
    case: Case,
    tmp_path: Path,
    oracle: Path,
    keep_as: str,
    split: bool = False,
) -> Outcome:
    """Build the box, run `command` on it, move the box to `keep_as`. Output is
    one stream, as qmail-lspawn reads it, unless `split`."""
    box = tmp_path / "box"
    home = build(box, case)
    message = tmp_path / "message"
    message.write_bytes(case.message)
    with open(message, "rb") as stdin:
        result = subprocess.run(
            [*command, *args_for(case, home)],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if split else subprocess.STDOUT,
            env=environment(oracle, home, case),
            cwd=tmp_path,
            timeout=TIMEOUT,
            check=False,
        )
    outcome = normalise(result.returncode, result.stdout, snapshot(box), result.stderr)
    box.rename(tmp_path / keep_as)
    return outcome


def both(case: Case, tmp_path: Path, oracle: Path, split: bool = False) -> tuple[Outcome, Outcome]:
    theirs = deliver([str(oracle / "qmail-local")], case, tmp_path, oracle, "qmail", split)
    ours = deliver(list(OURS), case, tmp_path, oracle, "ours", split)
    return theirs, ours


@pytest.mark.parametrize("case", [pytest.param(c, id=name) for name, c in CASES.items()])
def test_core_local_does_what_qmail_local_does(case: Case, tmp_path: Path, oracle: Path) -> None:
    theirs, ours = both(case, tmp_path, oracle)
    assert theirs.code == case.code, theirs.output
    assert case.says.encode() in theirs.output
    assert ours.output == theirs.output
    assert ours.code == theirs.code
    assert ours.files == theirs.files
    for name, (mode, _) in ours.files.items():
        assert "/tmp/#" not in name, f"left in tmp/: {name} {mode}"


SPLIT = (
    "program: environment, stdout and stderr in order",
    "program exit 64 bounces",
    "program exit 100 bounces with its output",
    "program killed by a signal",
    "+list: a program before it runs, the file line after it defers",
    "a permanent qmail-queue failure bounces",
    "no .qmail for an extension: no mailbox",
    "-n: x bit, the lines before the file line are printed",
    "-n: a sticky home is only a warning",
)


@pytest.mark.parametrize("name", SPLIT)
def test_stdout_and_stderr_each_as_qmail_local_writes_them(
    name: str, tmp_path: Path, oracle: Path
) -> None:
    """Apart from qmail-lspawn, the streams matter too (`qmail-local -n` by hand):
    program output on the stream the program chose, the did line on stdout,
    qmail-local's own complaint on stderr."""
    theirs, ours = both(CASES[name], tmp_path, oracle, split=True)
    assert theirs.errors is not None
    assert (ours.code, ours.output, ours.errors) == (theirs.code, theirs.output, theirs.errors)


def test_long_program_output_is_passed_whole(tmp_path: Path, oracle: Path) -> None:
    """qmail-local passes a program's output through uncut; qmail-lspawn keeps
    2966 bytes of a report over 3000 and adds a note. So the command must not cut
    (it stands in for qmail-local), and lspawn's cut, core.local._report, applied
    to qmail-local's output must give what qmail-lspawn would report."""
    loop = "i=0; while [ $i -lt 400 ]; do echo 0123456789; i=$((i+1)); done"
    case = Case(0, dotqmail={".qmail": f"|{loop}\n|echo more >&2\n"})
    theirs, ours = both(case, tmp_path, oracle)
    assert len(theirs.output) == 4400 + len(b"more\ndid 0+0+2\n")
    assert (ours.code, ours.output, ours.files) == (theirs.code, theirs.output, theirs.files)
    report = _report(theirs.output.decode())
    assert report.encode() == theirs.output[:2966] + b"\nError report too long, sorry.\n"


def test_lspawn_report_stops_at_a_nul(tmp_path: Path, oracle: Path) -> None:
    """qmail-lspawn's report is the output up to its first NUL byte."""
    case = Case(0, dotqmail={".qmail": "|printf 'before\\000after\\n'\n"})
    theirs, ours = both(case, tmp_path, oracle)
    assert ours.output == theirs.output == b"before\0after\ndid 0+0+1\n"
    assert _report(theirs.output.decode()) == "before"


@pytest.mark.parametrize(
    "arguments",
    [
        pytest.param(["alice", "relative/home", "alice", "", "", "h", "s", "./Maildir/"], id="rel"),
        pytest.param(["alice", "/", "alice", "", "", "h", "s"], id="seven arguments"),
        pytest.param(["alice", "/", "alice", "", "", "h", "s", "d", "extra"], id="nine"),
        pytest.param(["-x", "alice", "/", "alice", "", "", "h", "s", "d"], id="unknown option"),
    ],
)
def test_usage(arguments: list[str], tmp_path: Path, oracle: Path) -> None:
    def run(command: list[str]) -> tuple[int, bytes]:
        message = tmp_path / "message"
        message.write_bytes(MESSAGE)
        with open(message, "rb") as stdin:
            result = subprocess.run(
                [*command, *arguments],
                stdin=stdin,
                capture_output=True,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": str(REPO)},
                cwd=tmp_path,
                timeout=TIMEOUT,
                check=False,
            )
        assert result.stdout == b""
        return result.returncode, result.stderr

    theirs = run([str(oracle / "qmail-local")])
    assert theirs[0] == 100
    assert run(list(OURS)) == theirs


@pytest.mark.xfail(
    reason="Python's PEP 538 locale coercion: started in the C locale, the interpreter"
    " sets LC_CTYPE=C.UTF-8 in its own environment, which programs inherit. Not ours to"
    " undo reliably; run the core with a UTF-8 LANG (or PYTHONCOERCECLOCALE=0).",
    strict=True,
)
def test_python_locale_coercion_shows_in_the_environment(tmp_path: Path, oracle: Path) -> None:
    case = Case(0, dotqmail={".qmail": ENV_DUMP + "\n"}, env={"LANG": ""})
    theirs, ours = both(case, tmp_path, oracle)
    assert ours.files == theirs.files
