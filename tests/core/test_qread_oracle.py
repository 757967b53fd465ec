"""`qmailtui queue list` and `qmailtui qstat` against the real qmail-qread and
qmail-qstat (spec/queue.md §7, §8) on the same queue directory.

qmail-qread walks info/0..22 in directory order, we list by id: blocks (a
summary line and its recipient lines) are compared as sets. Our additions,
` held` and ` (not yet preprocessed)`, which qmail cannot show, are tested
on their own.
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from core.paths import QmailRoot
from core.queue import Queue
from tests.processes import qmailtui

pytestmark = pytest.mark.oracle

T = 1_704_164_645.0  # 2 Jan 2024 03:04:05 UTC


def oracle_run(oracle: Path, program: str, root: QmailRoot) -> str:
    result = subprocess.run(
        [str(oracle / program)], cwd=root.path, capture_output=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.decode("latin-1")


def ours(root: QmailRoot, *args: str) -> str:
    result = qmailtui(root, *args)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def blocks(text: str) -> Counter[tuple[str, ...]]:
    """qread output as a multiset of (summary line, recipient lines...)."""
    found: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith(("\t", "  done\t")):
            assert found, f"a recipient line before any message: {line!r}"
            found[-1].append(line)
        else:
            found.append([line])
    return Counter(tuple(b) for b in found)


def enqueue(
    queue: Queue,
    sender: str,
    local: list[str],
    remote: list[str],
    *,
    birth: float,
    body: bytes = b"Subject: t\n\nhello\n",
    preprocess: bool = True,
) -> int:
    msgid = queue.enqueue(
        body,
        sender,
        local + remote,
        uid=0,
        pid=77,
        invoked="invoked by uid 0",
        now=birth,
    )
    if preprocess:
        queue.preprocess(msgid, sender, local, remote, birth)
    return msgid


def mark(queue: Queue, channel: str, msgid: int, index: int) -> None:
    found = queue.read_channel(channel, msgid)
    assert found is not None
    queue.mark_done(channel, msgid, found[0][index].offset)


def by_hand(root: QmailRoot) -> None:
    """The oracle README's queue, written as its shell commands do."""
    q = root.queue
    (q / "mess/20/457").write_bytes(b"Subject: x\n\nhi\n")
    (q / "info/20/457").write_bytes(b"Falice@example.org\0")
    (q / "local/20/457").write_bytes(b"Tbob@example.org\0")
    (q / "remote/20/457").write_bytes(b"Dcarol@remote.test\0Tdave@remote.test\0")
    os.utime(q / "info/20/457", (T, T))


README_OUTPUT = (
    "2 Jan 2024 03:04:05 GMT  #457  15  <alice@example.org> \n"
    "\tlocal\tbob@example.org\n"
    "  done\tremote\tcarol@remote.test\n"
    "\tremote\tdave@remote.test\n"
)


def test_the_oracle_readme_queue_reads_the_same(oracle: Path, root: QmailRoot) -> None:
    by_hand(root)
    assert oracle_run(oracle, "qmail-qread", root) == README_OUTPUT
    assert ours(root, "queue", "list") == README_OUTPUT
    assert ours(root, "qstat") == oracle_run(oracle, "qmail-qstat", root)


def build_queue(root: QmailRoot) -> None:
    queue = Queue(root)
    a = enqueue(
        queue, "joe@example.com", ["u@mx.example.org"], ["ann@example.net", "bob@ex.org"], birth=T
    )
    mark(queue, "remote", a, 1)
    enqueue(queue, "", [], ["postmaster@example.net"], birth=T + 86_400, body=b"x" * 5000)
    bouncing = enqueue(
        queue, "b@b.test", ["gone@mx.example.org", "v@mx.example.org"], [], birth=T + 1
    )
    queue.append_bounce(
        bouncing, "gone@mx.example.org", "Sorry, no mailbox here by that name. (#5.1.1)\n"
    )
    mark(queue, "local", bouncing, 0)
    all_done = enqueue(queue, "c@c.test", ["x@mx.example.org"], ["y@r.test"], birth=T + 2)
    mark(queue, "local", all_done, 0)  # every record D, file not yet removed
    enqueue(queue, "nobody@c.test", [], [], birth=T + 3)  # no channel file at all
    for n in range(30):  # enough to fill several of the 23 split directories
        enqueue(queue, f"bulk{n}@d.test", [f"l{n}@mx.example.org"], [f"r{n}@e.test"], birth=T + n)
    by_hand(root)


def test_a_queue_of_every_kind_reads_the_same_as_qmail_qread(oracle: Path, root: QmailRoot) -> None:
    build_queue(root)
    theirs = oracle_run(oracle, "qmail-qread", root)
    assert " bouncing\n" in theirs  # the cases are there
    assert "  done\tlocal\t" in theirs
    assert blocks(ours(root, "queue", "list")) == blocks(theirs)


def test_our_listing_is_ordered_by_id(root: QmailRoot) -> None:
    build_queue(root)
    ids = [
        int(line.split("#")[1].split()[0])
        for line in ours(root, "queue", "list").splitlines()
        if "#" in line
    ]
    assert ids == sorted(ids)
    assert len(ids) == 36


@pytest.mark.parametrize(
    ("sender", "recipient"),
    [
        ("a\x01b\x7f@x.test", "tab\there@mx.example.org"),
        ("", "del\x7f\x1b[31m@y.test"),
        ("bad\udcff\udcfe@x.test", "u@mx.example.org"),  # bytes that are not UTF-8
    ],
    ids=["control bytes", "escape sequence", "invalid utf-8"],
)
def test_bytes_outside_32_to_126_print_as_underscores_like_qmail_qread(
    oracle: Path, root: QmailRoot, sender: str, recipient: str
) -> None:
    queue = Queue(root)
    enqueue(
        queue,
        sender,
        [recipient] if "mx." in recipient else [],
        [] if "mx." in recipient else [recipient],
        birth=T,
    )
    theirs = oracle_run(oracle, "qmail-qread", root)
    assert "_" in theirs
    assert ours(root, "queue", "list") == theirs


def test_utf8_addresses_print_one_underscore_per_byte_like_qmail_qread(
    oracle: Path, root: QmailRoot
) -> None:
    enqueue(Queue(root), "caf\xe9@x.test", ["j\xfcrgen@mx.example.org"], [], birth=T)
    theirs = oracle_run(oracle, "qmail-qread", root)
    assert "<caf__@x.test>" in theirs
    assert ours(root, "queue", "list") == theirs


# -- qstat ----------------------------------------------------------------------------


def test_qstat_is_byte_for_byte_qmail_qstat(oracle: Path, root: QmailRoot) -> None:
    assert ours(root, "qstat") == oracle_run(oracle, "qmail-qstat", root)
    build_queue(root)
    queue = Queue(root)
    for n in range(4):  # queued, not yet preprocessed
        enqueue(queue, "t@t.test", [f"t{n}@mx.example.org"], [], birth=T, preprocess=False)
    root.mess(999).write_bytes(b"a crashed writer's S2 leftover")  # counted by both
    expected = oracle_run(oracle, "qmail-qstat", root)
    assert expected == "messages in queue: 41\nmessages in queue but not yet preprocessed: 4\n"
    assert ours(root, "qstat") == expected


# -- what we add ------------------------------------------------------------------------


def test_a_held_message_says_held_after_what_qmail_qread_prints(
    oracle: Path, root: QmailRoot
) -> None:
    queue = Queue(root)
    held = enqueue(queue, "h@h.test", ["u@mx.example.org"], [], birth=T)
    queue.set_held(held, True)
    theirs = oracle_run(oracle, "qmail-qread", root)
    first, rest = theirs.split("\n", 1)
    assert ours(root, "queue", "list") == f"{first} held\n{rest}"


def test_a_bouncing_held_message_says_both(oracle: Path, root: QmailRoot) -> None:
    queue = Queue(root)
    msgid = enqueue(queue, "h@h.test", ["u@mx.example.org", "v@mx.example.org"], [], birth=T)
    queue.append_bounce(msgid, "u@mx.example.org", "Sorry.\n")
    mark(queue, "local", msgid, 0)
    queue.set_held(msgid, True)
    theirs = oracle_run(oracle, "qmail-qread", root)
    first, rest = theirs.split("\n", 1)
    assert first.endswith(">  bouncing")
    assert ours(root, "queue", "list") == f"{first} held\n{rest}"


def test_a_message_not_yet_preprocessed_is_listed_which_qmail_qread_cannot(
    oracle: Path, root: QmailRoot
) -> None:
    queue = Queue(root)
    msgid = enqueue(
        queue, "t@t.test", ["u@mx.example.org"], ["r@remote.test"], birth=T, preprocess=False
    )
    assert oracle_run(oracle, "qmail-qread", root) == ""
    size = root.mess(msgid).stat().st_size
    lines = ours(root, "queue", "list").splitlines()
    assert lines[0].endswith(f"GMT  #{msgid}  {size}  <t@t.test>  (not yet preprocessed)")
    assert lines[1:] == ["\tlocal\tu@mx.example.org", "\tremote\tr@remote.test"]
