"""`qmailtui queue ...` and `qmailtui qstat` through the real entry point, with
no core running (the command works on the files under the root's lock) and
with `qmailtui serve` running (the command asks it over run/control.sock).

The queue (built in-process, then left to the command line):

    old      alice@a.test -> u@mx.example.org                 3 days old
    mixed    bob@b.test   -> u@mx.example.org, r@remote.test  1 hour old
    held     alice@a.test -> r@remote.test                    2 hours old, held
    bounce   <>           -> v@other.test                      10 minutes old

u's home has no Maildir, so local deliveries defer ("Unable to chdir to
maildir"); remote routes go to 127.0.0.1:1, where nothing listens. Either
way a running core tries each message once, then waits 20 minutes or more
(qmail's schedule): the queue holds still while a test looks at it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import selectors
import signal
import subprocess
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from core import users
from core.paths import QmailRoot
from core.queue import Queue
from tests.processes import CLI, TIMEOUT, qmailtui, serving, wait_until
from tests.queue_faults import queue_files

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
HOUR = 3600.0


def populate(root: QmailRoot) -> dict[str, int]:
    home = root.path.parent / "home" / "u"
    home.mkdir(parents=True)
    uid = 65534 if os.getuid() == 0 else os.getuid()
    gid = 65534 if os.getuid() == 0 else os.getgid()
    root.assign.write_text(f"=u:u:{uid}:{gid}:{home}:::\n.\n")
    assert not [p for p in users.newu(root) if p.is_error]
    root.control_file("smtproutes").write_text(":127.0.0.1:1\n")
    queue = Queue(root)
    now = time.time()
    plan = {
        "old": ("alice@a.test", ["u@mx.example.org"], [], now - 3 * 24 * HOUR),
        "mixed": ("bob@b.test", ["u@mx.example.org"], ["r@remote.test"], now - HOUR),
        "held": ("alice@a.test", [], ["r@remote.test"], now - 2 * HOUR),
        "bounce": ("", [], ["v@other.test"], now - 600),
    }
    ids = {}
    for name, (sender, local, remote, birth) in plan.items():
        body = f"From: {sender or 'MAILER-DAEMON'}\nSubject: {name}\n\nthe {name} message\n"
        msgid = queue.enqueue(
            body.encode(),
            sender,
            local + remote,
            uid=0,
            pid=1,
            invoked="invoked by uid 0",
            now=birth,
        )
        queue.preprocess(msgid, sender, local, remote, birth)
        ids[name] = msgid
    queue.set_held(ids["held"], True)
    return ids


def cli(root: QmailRoot, *args: str) -> subprocess.CompletedProcess[str]:
    result = qmailtui(root, *args)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def listing(root: QmailRoot, *filters: str) -> dict[int, dict[str, Any]]:
    result = cli(root, "queue", "list", "--json", *filters)
    assert result.returncode == 0, result.stderr
    found = [json.loads(line) for line in result.stdout.splitlines()]
    return {m["id"]: m for m in found}


def settled(root: QmailRoot) -> bool:
    """Every message not held has been tried once and nothing is running."""
    for m in listing(root).values():
        for r in m["recipients"]:
            if r["in_progress"] or (
                not m["held"] and r["state"] == "pending" and not r["attempts"]
            ):
                return False
    return True


@dataclass
class Setup:
    root: QmailRoot
    ids: dict[str, int]
    core: subprocess.Popen[bytes] | None

    def name(self, msgid: int) -> str:
        return {v: k for k, v in self.ids.items()}.get(msgid, f"new {msgid}")

    def names(self, *filters: str) -> set[str]:
        return {self.name(i) for i in listing(self.root, *filters)}


@pytest.fixture(params=["no core", "core running"])
def q(request: pytest.FixtureRequest, root: QmailRoot) -> Iterator[Setup]:
    ids = populate(root)
    if request.param == "no core":
        yield Setup(root, ids, None)
        return
    with serving(root) as core:
        wait_until(lambda: settled(root), 60, "each message tried once")
        yield Setup(root, ids, core)


# -- listing ----------------------------------------------------------------------------


def test_list_json_has_the_shape_scripts_rely_on(q: Setup) -> None:
    messages = listing(q.root)
    assert q.names() == {"old", "mixed", "held", "bounce"}
    for m in messages.values():
        assert {"id", "queued", "size", "sender", "held", "recipients", "expires"} <= set(m)
        assert type(m["id"]) is int
        assert type(m["size"]) is int
        assert m["size"] == q.root.mess(m["id"]).stat().st_size
        assert ISO.fullmatch(m["queued"])
        assert ISO.fullmatch(m["expires"])
        assert type(m["held"]) is bool
        for r in m["recipients"]:
            assert {"address", "channel", "state", "attempts", "last_reply", "next_attempt"} <= set(
                r
            )
            assert not r["address"].startswith("<")
            assert r["channel"] in ("local", "remote")
            assert r["state"] in ("pending", "done", "bounced")
            assert type(r["attempts"]) is int
            if r["attempts"] == 0:  # null before the first attempt
                assert r["last_reply"] is None
                assert r["next_attempt"] is None
            else:
                assert isinstance(r["last_reply"], str)
                assert ISO.fullmatch(r["next_attempt"])
    bounce = messages[q.ids["bounce"]]
    assert bounce["sender"] == ""
    assert [(r["address"], r["channel"]) for r in messages[q.ids["mixed"]]["recipients"]] == [
        ("u@mx.example.org", "local"),
        ("r@remote.test", "remote"),
    ]
    assert messages[q.ids["held"]]["held"] is True
    assert messages[q.ids["held"]]["recipients"][0]["attempts"] == 0  # never tried


def test_list_json_is_the_same_from_a_core_and_from_the_files(root: QmailRoot) -> None:
    populate(root)
    with serving(root) as core:
        wait_until(lambda: settled(root), 60, "each message tried once")
        from_core = listing(root)
        core.send_signal(signal.SIGTERM)
        assert core.wait(30) == 0
    from_files = listing(root)
    assert from_files == from_core
    assert any(r["attempts"] for m in from_files.values() for r in m["recipients"])


FILTERS = {
    ("--sender", "alice@a.test"): {"old", "held"},
    ("--sender", "@a.test"): {"old", "held"},
    ("--sender", "ALICE@A.TEST"): {"old", "held"},
    ("--recipient", "r@remote.test"): {"mixed", "held"},
    ("--recipient", "@mx.example.org"): {"old", "mixed"},
    ("--domain", "remote.test"): {"mixed", "held"},
    ("--domain", "mx.example.org"): {"old", "mixed"},
    ("--older-than", "2d"): {"old"},
    ("--older-than", "30m"): {"old", "mixed", "held"},
    ("--state", "held"): {"held"},
    ("--state", "pending"): {"old", "mixed", "bounce"},
    ("--sender", "alice@a.test", "--state", "pending"): {"old"},
    ("--all",): {"old", "mixed", "held", "bounce"},
    ("--sender", "nobody@x.test"): set(),
}


def test_list_filters_select_as_documented(q: Setup) -> None:
    got = {args: q.names(*args) for args in FILTERS}
    assert got == FILTERS


def test_qread_listing_says_held(q: Setup) -> None:
    result = cli(q.root, "queue", "list")
    assert result.returncode == 0
    summaries = [line for line in result.stdout.splitlines() if " GMT  #" in line]
    assert len(summaries) == 4
    held = [line for line in summaries if line.endswith(" held")]
    assert len(held) == 1
    assert f"#{q.ids['held']} " in held[0]


def test_qstat_counts_the_messages(q: Setup) -> None:
    result = cli(q.root, "qstat")
    assert result.returncode == 0
    assert result.stdout == "messages in queue: 4\nmessages in queue but not yet preprocessed: 0\n"


def test_show_gives_envelope_recipients_and_the_message(q: Setup) -> None:
    msgid = q.ids["mixed"]
    result = cli(q.root, "queue", "show", str(msgid))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith(f"message {msgid}\n")
    assert "sender   <bob@b.test>" in out
    assert "u@mx.example.org" in out
    assert "r@remote.test" in out
    assert "Received: (qmail 1 invoked by uid 0);" in out
    assert out.rstrip().endswith("the mixed message")
    as_json = json.loads(cli(q.root, "queue", "show", str(msgid), "--json").stdout)
    assert as_json["message"] == listing(q.root)[msgid]


def test_show_of_an_unknown_id_is_one_line_and_non_zero(q: Setup) -> None:
    result = cli(q.root, "queue", "show", "99999")
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "99999" in result.stderr


# -- acting -----------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["retry", "bounce", "delete", "hold", "release"])
def test_dry_run_lists_one_line_per_message_and_changes_nothing(q: Setup, action: str) -> None:
    before = listing(q.root)
    result = cli(q.root, "queue", action, "--all", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sorted(int(line.split()[0]) for line in lines) == sorted(q.ids.values())
    assert listing(q.root) == before
    narrow = cli(q.root, "queue", action, "--sender", "alice@a.test", "--dry-run")
    assert sorted(int(line.split()[0]) for line in narrow.stdout.splitlines()) == sorted(
        [q.ids["old"], q.ids["held"]]
    )


@pytest.mark.parametrize("action", ["delete", "bounce"])
def test_acting_on_several_without_yes_and_no_terminal_declines(q: Setup, action: str) -> None:
    before = queue_files(q.root)
    result = cli(q.root, "queue", action, "--sender", "alice@a.test")
    assert result.returncode == 1
    assert "nothing done" in result.stderr
    assert queue_files(q.root) == before


def test_delete_with_yes_removes_every_file_of_the_messages(q: Setup) -> None:
    result = cli(q.root, "queue", "delete", "--sender", "alice@a.test", "--yes")
    assert result.returncode == 0, result.stderr
    assert q.names() == {"mixed", "bounce"}
    for name in ("old", "held"):
        msgid = q.ids[name]
        assert not [f for f in queue_files(q.root) if f.rsplit("/", 1)[-1] == str(msgid)]


def test_delete_of_one_id_does_not_ask(q: Setup) -> None:
    result = cli(q.root, "queue", "delete", str(q.ids["bounce"]))
    assert result.returncode == 0, result.stderr
    assert q.names() == {"old", "mixed", "held"}


def test_bounce_replaces_the_message_by_a_bounce_to_its_sender(q: Setup) -> None:
    result = cli(q.root, "queue", "bounce", str(q.ids["old"]))
    assert result.returncode == 0, result.stderr
    messages = listing(q.root)
    assert q.ids["old"] not in messages
    new = [m for i, m in messages.items() if i not in q.ids.values()]
    assert len(new) == 1
    assert new[0]["sender"] == ""
    assert [r["address"] for r in new[0]["recipients"]] == ["alice@a.test"]
    mess = q.root.mess(new[0]["id"]).read_bytes()
    assert b"<u@mx.example.org>:\n" in mess
    assert b"Subject: old" in mess  # the original goes with it


def test_bounce_of_several_with_yes_bounces_them_all(q: Setup) -> None:
    result = cli(q.root, "queue", "bounce", "--domain", "remote.test", "--yes")
    assert result.returncode == 0, result.stderr
    left = q.names()
    assert "mixed" not in left
    assert "held" not in left
    assert {"old", "bounce"} <= left


def test_hold_and_release(q: Setup) -> None:
    msgid = q.ids["mixed"]
    assert cli(q.root, "queue", "hold", str(msgid)).returncode == 0
    assert listing(q.root)[msgid]["held"] is True
    assert q.root.hold(msgid).exists()
    assert q.names("--state", "held") == {"held", "mixed"}
    assert cli(q.root, "queue", "release", str(msgid)).returncode == 0
    assert listing(q.root)[msgid]["held"] is False
    assert not q.root.hold(msgid).exists()


def test_release_by_filter(q: Setup) -> None:
    result = cli(q.root, "queue", "release", "--state", "held")
    assert result.returncode == 0, result.stderr
    assert q.names("--state", "held") == set()


def attempts(root: QmailRoot) -> dict[int, int]:
    return {i: sum(r["attempts"] for r in m["recipients"]) for i, m in listing(root).items()}


def test_retry_all_leaves_held_messages_held(q: Setup) -> None:
    before = attempts(q.root)
    cli(q.root, "queue", "retry", "--all")
    held = listing(q.root)[q.ids["held"]]
    assert held["held"] is True
    if q.core is not None:  # the others are tried again, the held one is not
        others = [i for i in q.ids.values() if i != q.ids["held"]]
        wait_until(
            lambda: all(attempts(q.root)[i] > before[i] for i in others) and settled(q.root),
            60,
            "the retried messages to be tried again",
        )
    assert attempts(q.root)[q.ids["held"]] == 0
    assert listing(q.root)[q.ids["held"]]["held"] is True


def test_alrm_to_the_core_leaves_held_messages_held(root: QmailRoot) -> None:
    ids = populate(root)
    with serving(root) as core:
        wait_until(lambda: settled(root), 60, "each message tried once")
        before = attempts(root)
        core.send_signal(signal.SIGALRM)
        others = [i for i in ids.values() if i != ids["held"]]
        wait_until(
            lambda: all(attempts(root)[i] > before[i] for i in others) and settled(root),
            60,
            "ALRM to make the core try every message again",
        )
        after = listing(root)[ids["held"]]
        assert after["held"] is True
        assert sum(r["attempts"] for r in after["recipients"]) == 0


def test_retry_of_one_id(q: Setup) -> None:
    msgid = q.ids["mixed"]
    before = attempts(q.root)[msgid]
    result = cli(q.root, "queue", "retry", str(msgid))
    assert result.returncode == 0, result.stderr
    if q.core is not None:
        wait_until(lambda: attempts(q.root)[msgid] > before, 60, "the retry")


# -- mistakes: one line, never a traceback ----------------------------------------------


@pytest.mark.parametrize("action", ["retry", "bounce", "delete", "hold", "release"])
def test_an_unknown_id_fails_and_changes_nothing(q: Setup, action: str) -> None:
    before = queue_files(q.root)
    result = cli(q.root, "queue", action, "99999")
    assert result.returncode != 0
    assert "99999" in result.stderr
    assert queue_files(q.root) == before


def test_an_unknown_id_is_one_line(root: QmailRoot) -> None:
    populate(root)
    result = cli(root, "queue", "hold", "99999")
    assert result.stderr.count("\n") == 1, result.stderr


def test_a_known_and_an_unknown_id_acts_on_the_known_one(q: Setup) -> None:
    result = cli(q.root, "queue", "hold", str(q.ids["old"]), "99999")
    assert result.returncode == 1
    assert "99999" in result.stderr
    assert listing(q.root)[q.ids["old"]]["held"] is True


@pytest.mark.parametrize(
    "args",
    [
        ("queue", "delete"),
        ("queue", "delete", "5", "--all"),
        ("queue", "retry", "--older-than", "3x"),
        ("queue", "list", "--older-than", "soon"),
    ],
    ids=["neither ids nor filters", "ids and filters", "bad age", "bad age in list"],
)
def test_a_bad_command_line_is_one_line_and_changes_nothing(
    q: Setup, args: tuple[str, ...]
) -> None:
    before = queue_files(q.root)
    result = cli(q.root, *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("qmailtui: ")
    assert queue_files(q.root) == before


# -- with a terminal: delete and bounce of several ask ----------------------------------


def on_terminal(root: QmailRoot, args: list[str], answer: bytes | None) -> tuple[int, bytes]:
    """Run with a pseudo-terminal as controlling terminal; answer the question if asked."""
    master, slave = os.openpty()

    def take_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [*CLI, *args, "--root", str(root.path)],
        stdin=slave,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=take_terminal,
    )
    os.close(slave)
    seen = b""
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(master, selectors.EVENT_READ)
            deadline = time.monotonic() + TIMEOUT
            while proc.poll() is None and time.monotonic() < deadline:
                if not sel.select(0.1):
                    continue
                try:
                    chunk = os.read(master, 1024)
                except OSError:  # EIO: the child closed the terminal
                    break
                seen += chunk
                if b"[y/N]" in seen and answer is not None:
                    os.write(master, answer)
                    answer = None
        return proc.wait(TIMEOUT), seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)


@pytest.mark.parametrize(("answer", "acted"), [(b"y\n", True), (b"n\n", False), (b"\n", False)])
def test_on_a_terminal_deleting_several_asks_first(q: Setup, answer: bytes, acted: bool) -> None:
    code, seen = on_terminal(q.root, ["queue", "delete", "--sender", "alice@a.test"], answer)
    assert b"delete these 2 messages? [y/N]" in seen
    if acted:
        assert code == 0
        assert q.names() == {"mixed", "bounce"}
    else:
        assert code == 1
        assert q.names() == {"old", "mixed", "held", "bounce"}


def test_on_a_terminal_dry_run_and_yes_never_ask(q: Setup) -> None:
    code, seen = on_terminal(q.root, ["queue", "delete", "--all", "--dry-run"], None)
    assert (code, seen) == (0, b"")
    code, seen = on_terminal(q.root, ["queue", "delete", "--sender", "alice@a.test", "--yes"], None)
    assert (code, seen) == (0, b"")
    assert q.names() == {"mixed", "bounce"}
