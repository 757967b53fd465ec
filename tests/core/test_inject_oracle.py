"""core.inject against the real qmail-inject: the same message and the same envelope.

Each case runs notqmail's qmail-inject twice in its own instance directory:
with -n (the printed message, Return-Path line first) and queued through the
stand-in qmail-queue (queue/PID.msg and PID.env). Rather than masking the
Date and Message-ID fields, the tests read qmail's clock and pid back from
what it wrote (the Message-ID it added, or the -TIME.PID of a QMAILINJECT=m
sender, or the Date) and give the same values to `prepare`, so the outputs
are compared byte for byte with nothing normalised away.
"""

from __future__ import annotations

import calendar
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.inject import InjectError, Prepared, prepare, return_path, settings_from

CONTROL = {
    "me": "mx.example.org",
    "defaultdomain": "example.org",
    "plusdomain": "plus.example",
}
SETTING_KEYS = ("defaulthost", "defaultdomain", "plusdomain", "idhost")


@dataclass(frozen=True)
class Case:
    raw: bytes
    flags: tuple[str, ...] = ()  # -a, -h, -H, -A
    args: tuple[str, ...] = ()
    sender: str | None = None  # the -f value
    env: dict[str, str] = field(default_factory=lambda: {"USER": "alice"})
    control: dict[str, str] = field(default_factory=dict)  # added to CONTROL


@dataclass(frozen=True)
class Outcome:
    """What one qmail-inject run produced: output and envelope, or the failure."""

    code: int
    output: bytes  # -n: stdout; queued: queue/PID.msg
    stderr: bytes
    sender: str | None = None
    recipients: tuple[str, ...] = ()


def instance(tmp_path: Path, oracle: Path, control: dict[str, str]) -> Path:
    """A qmail home for one run: control files and `bin` pointing at the oracle."""
    home = tmp_path / f"inst{len(list(tmp_path.iterdir()))}"
    (home / "control").mkdir(parents=True)
    (home / "bin").symlink_to(oracle)
    for name, value in {**CONTROL, **control}.items():
        (home / "control" / name).write_text(value + "\n")
    return home


def qmail_inject(oracle: Path, tmp_path: Path, case: Case, *, print_only: bool) -> Outcome:
    home = instance(tmp_path, oracle, case.control)
    command = [str(oracle / "qmail-inject"), *case.flags]
    if print_only:
        command.append("-n")
    if case.sender is not None:
        command += ["-f", case.sender]
    command += ["--", *case.args]
    result = subprocess.run(
        command,
        cwd=home,
        env=case.env,
        input=case.raw.replace(b"\r\n", b"\n"),  # our one deliberate input difference
        capture_output=True,
        timeout=30,
        check=False,
    )
    if print_only or result.returncode != 0:
        return Outcome(result.returncode, result.stdout, result.stderr)
    (envelope,) = (home / "queue").glob("*.env")
    message = envelope.with_suffix(".msg").read_bytes()
    records = envelope.read_bytes().split(b"\0")
    assert records[-2:] == [b"", b""], records  # the list ends with an empty record
    sender = records[0].removeprefix(b"F").decode("utf-8", "surrogateescape")
    recipients = tuple(r[1:].decode("utf-8", "surrogateescape") for r in records[1:-2])
    assert all(r.startswith(b"T") for r in records[1:-2])
    return Outcome(0, message, result.stderr, sender, recipients)


MESSAGE_ID = re.compile(rb"^(?:Resent-)?Message-ID: <(\d{14})\.(\d+)\.qmail@", re.M)
DATE = re.compile(rb"^(?:Resent-)?Date: (\d+ \w{3} \d{4} \d\d:\d\d:\d\d) -0000$", re.M)
VERP = re.compile(r"-(\d+)\.(\d+)-?\"?@")


def clock_of(outcome: Outcome, case: Case) -> tuple[float, int]:
    """qmail's start time and pid, read back from the fields and sender it made."""
    if match := MESSAGE_ID.search(outcome.output):
        when = calendar.timegm(time.strptime(match[1].decode(), "%Y%m%d%H%M%S"))
        return when, int(match[2])
    sender = outcome.sender or outcome.output.split(b"\n", 1)[0].decode("latin-1")
    if "m" in case.env.get("QMAILINJECT", "") and (match2 := VERP.search(sender)):
        return int(match2[1]), int(match2[2])
    if match := DATE.search(outcome.output):
        return calendar.timegm(time.strptime(match[1].decode(), "%d %b %Y %H:%M:%S")), 0
    return 0, 0  # nothing qmail wrote depends on them


def ours(case: Case, now: float, pid: int) -> Prepared:
    mode = next((flag[1] for flag in reversed(case.flags) if flag in ("-a", "-A", "-h", "-H")), "A")
    control = {**CONTROL, **case.control}
    resolved = {key: control.get(key, control["me"]) for key in SETTING_KEYS}
    return prepare(
        case.raw,
        mode=mode,
        args=case.args,
        sender=case.sender,
        env=case.env,
        settings=settings_from(resolved, case.env),
        now=now,
        pid=pid,
    )


def check_against_qmail(oracle: Path, tmp_path: Path, case: Case) -> int:
    """Compare one case both ways; return qmail-inject's exit code."""
    printed = qmail_inject(oracle, tmp_path, case, print_only=True)
    queued = qmail_inject(oracle, tmp_path, case, print_only=False)
    assert printed.code == queued.code
    if printed.code != 0:
        stamp = re.search(rb"-(\d+)\.(\d+)", printed.stderr)  # QMAILINJECT=m's -TIME.PID
        now, pid = (int(stamp[1]), int(stamp[2])) if stamp else (0, 0)
        with pytest.raises(InjectError) as caught:
            ours(case, now, pid)
        assert caught.value.code == printed.code
        # qmail ends the line itself only when the text it quotes ends in one (a
        # header field); a -f value or control value goes out without it.
        assert printed.stderr.removesuffix(b"\n") == (
            f"qmail-inject: fatal: {caught.value.message}".encode("utf-8", "surrogateescape")
        )
        assert printed.output == b""
        return printed.code
    mine = ours(case, *clock_of(printed, case))
    assert return_path(mine.sender) + mine.message == printed.output
    mine = ours(case, *clock_of(queued, case))
    assert mine.message == queued.output
    assert (mine.sender, tuple(mine.recipients)) == (queued.sender, queued.recipients)
    return 0


def env(**extra: str) -> dict[str, str]:
    return {"USER": "alice", **extra}


LONG_LIST = b"To: " + b", ".join(b"person%02d@lists.example.net" % n for n in range(14)) + b"\n"

CASES: dict[str, Case] = {
    "oracle README example": Case(
        b'To: bob, carol@other\nCc: "Dave D" <dave@x.test>\nSubject: hi\n\nbody\n',
        env=env(NAME="Alice A"),
    ),
    "comments and quoted names": Case(
        b'To: "Smith, John" <john@x.test> (work), jane (Jane Doe), "q\\"uote" <q@x.test>\n'
        b"Cc: Mary Major <mary@y.test>, (only a comment) bare@z.test\n\nhello\n"
    ),
    "nested comment": Case(b"To: bob (a (nested) comment) @ host . test\n\nx\n"),
    "several To and Cc fields": Case(
        b"To: a@one.test\nCc: b@two.test, c\nTo: d@three.test\nCC: e\n\nbody\n"
    ),
    "group syntax": Case(
        b"To: undisclosed: ;\nCc: friends: a, b@c.test; , d\n\nbody\n",
    ),
    "empty group only": Case(b"To: undisclosed-recipients:;\nSubject: s\n\nbody\n"),
    "bcc removed but delivered": Case(
        b"To: to@x.test\nBcc: hidden@y.test, other\nSubject: s\n\nbody\n"
    ),
    "no To or Cc gets the hidden list": Case(b"Bcc: hidden@y.test\nSubject: s\n\nbody\n"),
    "resent message": Case(
        b"From: orig@x.test\nTo: first@x.test\nDate: 1 Jan 2020 00:00:00 -0000\n"
        b"Message-ID: <orig@x.test>\nResent-To: again@y.test, more\n"
        b"Resent-Bcc: secret@z.test\n\nbody\n"
    ),
    "resent without resent recipients": Case(
        b"To: first@x.test\nResent-From: fwd\nResent-Date: 2 Feb 2021 01:02:03 -0000\n\nbody\n",
        env=env(NAME="Fwd Er"),
    ),
    "return path sets the sender": Case(
        b"Return-Path: <first@rp.test>, <last@rp.test>\nTo: x@y.test\n\nbody\n"
    ),
    "return path ignored with s": Case(
        b"Return-Path: <bounce@rp.test>\nTo: x@y.test\n\nbody\n", env=env(QMAILINJECT="s")
    ),
    "null return path": Case(b"Return-Path: <>\nTo: x@y.test\n\nbody\n"),
    "source routes": Case(
        b"To: <@a.test,@b.test:user@host.test>, Name <@relay.test:other@far.test>\n\nbody\n"
    ),
    "trailing dot and stray at": Case(b"To: user@host., <@>, <.>, two@dots..\n\nbody\n"),
    "no host and no dot": Case(b"To: joe, djb@silverton, <bob>, Bob <bob@silverton>\n\nx\n"),
    "plus domain": Case(b"To: eric@mammoth.cs+, root@+, x@y+.z\n\nbody\n"),
    "literals": Case(b"To: user@[10.0.0.1], <foo@[]>, a@[]\n\nbody\n"),
    "long list folds": Case(LONG_LIST + b"Cc: short@x.test\n\nbody\n"),
    "long names fold": Case(
        b"To: "
        + b", ".join(b'"Person Number %d" <p%d@example.net>' % (n, n) for n in range(6))
        + b"\n\nbody\n"
    ),
    "djb fred": Case(b'To: djb fred\nCc: <a@b.test> c@d.test "e" f\n\nbody\n'),
    "missing separator": Case(b"To: x@y.test\nthis line is not a field\nmore body\n"),
    "first line is body": Case(b"hello world\nTo: x@y.test\n\nbody\n", args=("z@w.test",)),
    "continuation first": Case(b" indented: line\nbody\n", args=("z@w.test",)),
    "header only": Case(b"To: x@y.test\nSubject: no body\n"),
    "header only without newline": Case(b"To: x@y.test\nSubject: no body"),
    "body without final newline": Case(b"To: x@y.test\n\nlast line"),
    "eight bit bytes": Case(
        b'To: "J\xfcrgen" <j@x.test>, J\xfcrgen <k@x.test>\nSubject: caf\xc3\xa9 \xff\n\n'
        b"\xff\xfe\x80 body\n"
    ),
    "eight bit name": Case(b"To: x@y.test\n\nb\n", env=env(NAME="Ren\xe9e Z")),
    "mbox From line": Case(b"From alice Mon Jan  1 00:00:00 2024\nTo: x@y.test\n\nbody\n"),
    "continuations and content length": Case(
        b"To: a@x.test,\n b@x.test,\n\tc\nX-Long: one\n two\nContent-Length: 99\n"
        b"Subject: s\n\nbody\n"
    ),
    "a ] inside a word quotes it": Case(
        b"To: joe, a]b@c.test\n\nb\n", control={"defaulthost": "a]"}
    ),
    "field name case and spacing": Case(b"tO :  bob\ncC:\tcarol\nSUBJECT: s\n\nbody\n"),
    "empty To field": Case(b"To:\nCc: \nSubject: s\n\nbody\n"),
    "unparsable recipient field is kept": Case(
        b'To: a:b, c@d\nCc: "unbalanced\nBcc: ) x\nApparently-To: y\n\nbody\n'
    ),
    "sender fields rewritten": Case(
        b"From: me\nSender: sec@office\nReply-To: list, <other@x>\nErrors-To: err\n"
        b"Return-Receipt-To: rr@x.test\nTo: x@y.test\n\nbody\n"
    ),
    "existing date message-id from": Case(
        b"Date: Tue, 1 Jan 2030 00:00:00 +0000\nMessage-ID: <keep@x.test>\n"
        b"From: Keep <keep@x.test>\nTo: x@y.test\n\nbody\n"
    ),
    "name as comment": Case(
        b"To: x@y.test\n\nb\n", env=env(NAME="Alice (A) Smith", QMAILINJECT="c")
    ),
    "name with quotes and backslash": Case(b"To: x@y.test\n\nb\n", env=env(NAME='Al "the" \\ Pal')),
    "delete from": Case(
        b"From: spoof@evil.test\nTo: x@y.test\n\nb\n", env=env(QMAILINJECT="f", MAILNAME="Real")
    ),
    "delete message-id": Case(
        b"Message-ID: <old@x.test>\nTo: x@y.test\n\nb\n", env=env(QMAILINJECT="i")
    ),
    "verp letters r and m": Case(b"To: x@y.test\n\nb\n", env=env(QMAILINJECT="rm")),
    "verp r with return path": Case(
        b"Return-Path: <list-owner@lists.test>\nTo: x@y.test\n\nb\n", env=env(QMAILINJECT="r")
    ),
    "verp m alone": Case(
        b"Message-ID: <k@x.test>\nDate: 1 Jan 2001 00:00:00 -0000\nTo: x\n\nb\n",
        env=env(QMAILINJECT="m"),
    ),
    "null sender": Case(b"To: x@y.test\n\nb\n", sender=""),
    "sender needing quotes": Case(b"To: x@y.test\n\nb\n", sender="Weird User@host"),
    "sender without host beats return path": Case(
        b"Return-Path: <rp@x.test>\nTo: x@y.test\n\nb\n", sender="bounces", env=env(QMAILINJECT="r")
    ),
    "mode a": Case(b"To: header@x.test\n\nb\n", flags=("-a",), args=("arg1@x.test", "arg2")),
    "mode a without args": Case(b"To: header@x.test\n\nb\n", flags=("-a",)),
    "mode h ignores args": Case(b"To: header@x.test\n\nb\n", flags=("-h",), args=("arg@x.test",)),
    "mode H adds both": Case(
        b"To: header@x.test\nCc: c\n\nb\n", flags=("-H",), args=("arg@x.test", "plain")
    ),
    "mode A with args": Case(b"To: header@x.test\n\nb\n", flags=("-A",), args=("arg@x.test",)),
    "odd arguments": Case(b"Subject: s\n\nb\n", args=("John Doe", "<x@y>", "", "a@b@c", "u.@h")),
    "environment names": Case(
        b"To: x\n\nb\n",
        env={
            "LOGNAME": "logname",
            "MAILUSER": "mailuser",
            "MAILHOST": "mail.host.test",
            "QMAILSUSER": "envuser",
            "QMAILSHOST": "envhost",
            "MAILNAME": "Mail Name",
        },
    ),
    "no user at all": Case(b"To: x\n\nb\n", env={}),
    "empty user": Case(b"To: x\n\nb\n", env={"USER": "", "QMAILHOST": "h.test"}),
    "quoted user": Case(b"To: x\n\nb\n", env={"QMAILUSER": "first last", "QMAILHOST": "h+"}),
    "masquerading controls": Case(
        b"To: joe, eric@cs+\n\nb\n",
        control={"defaulthost": "af.mil", "idhost": "id.example.net", "plusdomain": "berkeley.edu"},
        env=env(QMAILDEFAULTDOMAIN="env.example"),
    ),
    "defaulthost with plus": Case(b"To: joe\n\nb\n", control={"defaulthost": "local+"}),
    "environment settings": Case(
        b"To: joe, sam@h\n\nb\n",
        env=env(QMAILDEFAULTHOST="dh", QMAILPLUSDOMAIN="pd.test", QMAILIDHOST="ids.test"),
    ),
    "recipient list not shown already there": Case(
        b"Cc: recipient list not shown: ;\nSubject: s\n\nb\n", args=("x@y.test",)
    ),
    "lone carriage returns kept": Case(b"To: a@b.test\nX: y\r z\n\nbody\rmore\n"),
    "unclosed angle bracket is not an error": Case(b"From: Me <me@x.test\nTo: x@y.test\n\nb\n"),
    "unclosed group is not an error": Case(b"Return-Path: a;b\nTo: x@y.test\n\nb\n"),
    "error: From with > but no <": Case(b"From: Me me@x.test>\nTo: x@y.test\n\nb\n"),
    "error: unparsable Reply-To": Case(b"Reply-To: (open\nTo: x@y.test\n\nb\n"),
    "error: Return-Path colon outside a group": Case(b"Return-Path: a:b\nTo: x@y.test\n\nb\n"),
    "error: nested group in Sender": Case(b"Sender: g: h: a;;\nTo: x@y.test\n\nb\n"),
    "error: unparsable argument": Case(b"Subject: s\n\nb\n", args=("ok@x.test", "foo@(bar")),
    "error: unparsable -f": Case(b"To: x@y.test\n\nb\n", sender="x@[y"),
    "error: unparsable defaultdomain": Case(b"To: x\n\nb\n", env=env(QMAILDEFAULTDOMAIN="(x")),
    "error: unparsable defaulthost": Case(b"To: x\n\nb\n", control={"defaulthost": "]a"}),
}


@pytest.mark.parametrize(("name", "case"), CASES.items(), ids=CASES.keys())
def test_prepare_matches_qmail_inject(oracle: Path, tmp_path: Path, name: str, case: Case) -> None:
    code = check_against_qmail(oracle, tmp_path, case)
    assert (code == 100) == name.startswith("error:"), code


# Bytes that steer qmail's tokenizer and header splitter, plus a few plain ones.
HEADER_BYTES = st.sampled_from(
    [
        *(b"a", b"b", b"x", b"@", b".", b",", b";", b":", b"<", b">", b"(", b")", b"[", b"]"),
        *(b'"', b"\\", b" ", b"\t", b"+", b"\xe9", b"\x01", b"\r", b"\n", b"\n "),
        # long words, so that address lists reach qmail's 80-column folding
        *(b"abcdefghijklmno", b"user@host.example", b'"Quoted Name"', b"(a comment)", b", "),
    ]
)
FIELD_NAMES = st.sampled_from(
    [
        *(b"To", b"Cc", b"Bcc", b"From", b"Reply-To", b"Return-Path", b"Resent-To"),
        *(b"Resent-From", b"Resent-Bcc", b"Apparently-To", b"Sender", b"Errors-To"),
        *(b"Subject", b"Message-ID", b"Date", b"Content-Length", b"X-Other", b"tO ", b"From "),
    ]
)
# Arguments, -f values and environment values: any string reaches the tokenizer.
WORDS = st.text(alphabet='ab.@<>()[]"\\ +,;:\xe9', max_size=8)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    fields = draw(
        st.lists(
            st.tuples(FIELD_NAMES, st.lists(HEADER_BYTES, max_size=40).map(b"".join)),
            max_size=5,
        )
    )
    header = b"".join(
        name + (b"" if name == b"From " else b": ") + value.replace(b"\n", b"\n ") + b"\n"
        for name, value in fields
    )
    body = draw(st.sampled_from([b"", b"\n", b"\nbody\n", b"body line\n", b"\nno newline"]))
    return header + body or b"\n"


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    raw=messages(),
    flags=st.sampled_from([(), ("-a",), ("-h",), ("-H",)]),
    args=st.lists(WORDS, max_size=2),
    sender=st.none() | WORDS,
    letters=st.sampled_from(["", "c", "s", "f", "i", "r", "m", "rs", "cfi"]),
    variables=st.dictionaries(
        st.sampled_from(["QMAILUSER", "NAME", "QMAILHOST", "QMAILSUSER", "QMAILSHOST"]), WORDS
    ),
)
def test_random_input_matches_qmail_inject(
    oracle: Path,
    tmp_path: Path,
    raw: bytes,
    flags: tuple[str, ...],
    args: list[str],
    sender: str | None,
    letters: str,
    variables: dict[str, str],
) -> None:
    environment = {**env(QMAILINJECT=letters, NAME="N a(m)e"), **variables}
    check_against_qmail(oracle, tmp_path, Case(raw, flags, tuple(args), sender, environment))
