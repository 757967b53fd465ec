"""core.queue on real files: qmail's layout and formats, ids, crash leftovers.

Formats are spec/queue.md §4 (mess, todo/intd, info, local/remote) and
spec/send.md §6.1 (bounce/N); crash states are queue.md §6.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from core.paths import SPLIT, QmailRoot
from core.queue import (
    ADDRESS_MAX,
    BAD_ADDRESS,
    NO_QUEUE,
    TOO_LONG,
    WRITE_ERROR,
    Queue,
    QueueError,
    bounce_entry,
    decode_envelope,
)
from tests.queue_faults import DEAD_PID, failing, queue_files

NOW = 1_700_000_000.0  # 14 Nov 2023 22:13:20 UTC
MESSAGE = b"From: a@b.test\nSubject: hi\n\nhello\n"


def enqueue(
    queue: Queue,
    message: bytes = MESSAGE,
    sender: str = "a@b.test",
    recipients: tuple[str, ...] = ("u@mx.example.org",),
    *,
    pid: int = 4242,
    now: float = NOW,
) -> int:
    return queue.enqueue(
        message,
        sender,
        list(recipients),
        uid=1000,
        pid=pid,
        invoked="invoked by uid 1000",
        now=now,
    )


def envelope_with(who: str, address: str) -> dict[str, Any]:
    if who == "sender":
        return {"sender": address}
    return {"recipients": ("ok@b.test", address)}


def without_nextid(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k != "lock/nextid"}


# -- enqueue: qmail-queue's files ------------------------------------------


def test_enqueue_writes_the_received_line_and_the_message_to_mess(root: QmailRoot) -> None:
    msgid = enqueue(Queue(root))
    path = root.queue / "mess" / str(msgid % 23) / str(msgid)
    assert path.read_bytes() == (
        b"Received: (qmail 4242 invoked by uid 1000); 14 Nov 2023 22:13:20 -0000\n" + MESSAGE
    )


def test_enqueue_writes_todo_in_qmail_queues_envelope_format(root: QmailRoot) -> None:
    msgid = enqueue(Queue(root), recipients=("u@mx.example.org", "r@remote.test"))
    todo = root.queue / "todo" / str(msgid)
    assert todo.read_bytes() == b"u1000\0p4242\0Fa@b.test\0Tu@mx.example.org\0Tr@remote.test\0"


def test_intd_is_the_same_file_as_todo(root: QmailRoot) -> None:
    msgid = enqueue(Queue(root))
    intd, todo = root.queue / "intd" / str(msgid), root.queue / "todo" / str(msgid)
    assert intd.stat().st_ino == todo.stat().st_ino  # todo/N is a hard link: the commit
    assert intd.read_bytes() == todo.read_bytes()


def test_null_sender_and_no_recipients_make_an_envelope_of_u_p_and_f(root: QmailRoot) -> None:
    msgid = enqueue(Queue(root), sender="", recipients=())
    assert (root.queue / "todo" / str(msgid)).read_bytes() == b"u1000\0p4242\0F\0"


def test_enqueue_leaves_no_file_in_pid(root: QmailRoot) -> None:
    enqueue(Queue(root))
    assert os.listdir(root.queue / "pid") == []


def test_message_files_are_split_by_id_mod_23(root: QmailRoot) -> None:
    queue = Queue(root)
    ids = [enqueue(queue) for _ in range(30)]
    for msgid in ids:
        assert (root.queue / "mess" / str(msgid % SPLIT) / str(msgid)).is_file()
    assert queue.count() == (30, 30)


def test_decode_envelope_reads_what_enqueue_wrote(root: QmailRoot) -> None:
    queue = Queue(root)
    msgid = enqueue(queue, sender="", recipients=("x@y.test", "caf\xe9@z.test"))
    envelope = queue.read_todo(msgid)
    assert (envelope.uid, envelope.pid, envelope.sender) == (1000, 4242, "")
    assert envelope.recipients == ["x@y.test", "caf\xe9@z.test"]


@pytest.mark.parametrize(
    "data",
    [b"u1\0p2\0Fa", b"u1\0p2\0Tb\0", b"u1\0p2\0Fa\0Xjunk\0", b"Fa\0Fb\0"],
    ids=["truncated", "no sender", "unknown record", "two senders"],
)
def test_decode_envelope_refuses_what_qmail_send_would_not_take(data: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies by case
        decode_envelope(data)


# -- ids ---------------------------------------------------------------------


def test_an_id_is_never_reused_after_its_message_leaves(root: QmailRoot) -> None:
    queue = Queue(root)
    first = enqueue(queue)
    queue.remove_message(first)
    second = enqueue(queue)
    assert second > first
    assert enqueue(Queue(root)) > second  # another process: same counter


def test_id_blocks_of_a_core_and_single_ids_of_inject_never_collide(root: QmailRoot) -> None:
    core_queue, inject_queue = Queue(root, id_block=64), Queue(root)
    ids = [enqueue(core_queue), enqueue(inject_queue), enqueue(core_queue), enqueue(inject_queue)]
    assert len(set(ids)) == 4
    assert ids[1] > 64  # the core's block 1..64 is reserved, used or not


@pytest.mark.parametrize("where", ["mess", "todo", "info", "intd", "pid"])
def test_a_deleted_nextid_is_rebuilt_above_the_highest_id_present(
    root: QmailRoot, where: str
) -> None:
    queue = Queue(root)
    for _ in range(3):
        enqueue(queue)
    highest = 40
    if where == "mess":  # an S2 leftover
        root.mess(highest).write_bytes(b"x")
    elif where == "todo":
        root.todo(highest).write_bytes(b"u0\0p0\0F\0")
    elif where == "info":
        root.info(highest).write_bytes(b"F\0")
    elif where == "intd":
        root.intd(highest).write_bytes(b"u0\0p0\0F\0")
    else:  # a writer at work: its id is in its pid/ file's name
        (root.queue / "pid" / f"{DEAD_PID}.{int(NOW)}.{highest}").write_bytes(b"x")
    root.nextid.unlink()
    assert enqueue(Queue(root)) == highest + 1


@pytest.mark.parametrize("text", [b"", b"garbage\n", b"\0\0\0"])
def test_an_unreadable_nextid_is_rebuilt_too(root: QmailRoot, text: bytes) -> None:
    queue = Queue(root)
    ids = [enqueue(queue) for _ in range(3)]
    root.nextid.write_bytes(text)
    assert enqueue(Queue(root)) == max(ids) + 1


def test_nextid_failing_to_write_is_qmails_write_error_not_a_crash(root: QmailRoot) -> None:
    before = queue_files(root)
    with failing("pwrite", errno.ENOSPC), pytest.raises(QueueError) as caught:
        enqueue(Queue(root))
    assert caught.value.text == WRITE_ERROR
    assert not caught.value.permanent
    assert without_nextid(queue_files(root)) == without_nextid(before)


# -- addresses qmail-queue refuses ---------------------------------------------


@pytest.mark.parametrize("who", ["sender", "recipient"])
def test_an_address_of_1002_bytes_is_queued(root: QmailRoot, who: str) -> None:
    address = "a" * (ADDRESS_MAX - len("@b.test")) + "@b.test"
    assert len(address) == 1002
    queue = Queue(root)
    if who == "sender":
        msgid = enqueue(queue, sender=address)
        assert queue.read_todo(msgid).sender == address
    else:
        msgid = enqueue(queue, recipients=(address,))
        assert queue.read_todo(msgid).recipients == [address]


@pytest.mark.parametrize("who", ["sender", "recipient"])
@pytest.mark.parametrize(
    "address",
    ["a" * 996 + "@b.test", "\xe9" * 498 + "@b.test"],
    ids=["1003 ascii bytes", "1003 bytes in 505 characters"],
)
def test_an_address_of_1003_bytes_is_refused_and_nothing_stays(
    root: QmailRoot, who: str, address: str
) -> None:
    assert len(address.encode()) == 1003
    before = queue_files(root)
    with pytest.raises(QueueError) as caught:
        enqueue(Queue(root), **envelope_with(who, address))
    assert caught.value.text == TOO_LONG == "envelope address too long for qq (#5.1.3)"
    assert caught.value.permanent
    assert queue_files(root) == before


@pytest.mark.parametrize("who", ["sender", "recipient"])
@pytest.mark.parametrize("bad", ["\0", "\n", "\r"], ids=["NUL", "LF", "CR"])
def test_nul_or_a_line_break_in_an_address_is_refused_and_nothing_stays(
    root: QmailRoot, who: str, bad: str
) -> None:
    address = f"a{bad}b@c.test"
    before = queue_files(root)
    with pytest.raises(QueueError) as caught:
        enqueue(Queue(root), **envelope_with(who, address))
    assert caught.value.text == BAD_ADDRESS
    assert caught.value.permanent
    assert queue_files(root) == before


# -- write errors: nothing half-written stays ---------------------------------


# enqueue's calls, in order: nextid (open, pread, pwrite, fsync); pid/ file (open,
# writev of the Received line and the message, ftruncate); intd (open, writev,
# ftruncate); both made durable (open, fsync each); link to mess, unlink pid, link
# to todo; mess/S and todo/ made durable (open, fsync each).
ENQUEUE_STEPS = {
    "writing the message": ("writev", 1),
    "ending the message file": ("ftruncate", 1),
    "creating intd": ("open", 3),
    "writing the envelope": ("writev", 2),
    "fsync of mess": ("fsync", 2),
    "fsync of intd": ("fsync", 3),
    "link pid to mess": ("link", 1),
    "link intd to todo": ("link", 2),
    "fsync of mess/S": ("fsync", 4),
    "fsync of todo/": ("fsync", 5),
}


@pytest.mark.parametrize(("call", "nth"), list(ENQUEUE_STEPS.values()), ids=list(ENQUEUE_STEPS))
@pytest.mark.parametrize(
    ("code", "text"),
    [
        (errno.ENOSPC, WRITE_ERROR),
        (errno.EFBIG, WRITE_ERROR),
        (errno.EDQUOT, WRITE_ERROR),
        (errno.EIO, WRITE_ERROR),
        (errno.EACCES, NO_QUEUE),
    ],
    ids=["ENOSPC", "EFBIG", "EDQUOT", "EIO", "EACCES"],
)
def test_a_failing_step_of_enqueue_undoes_everything(
    root: QmailRoot, call: str, nth: int, code: int, text: str
) -> None:
    queue = Queue(root)
    enqueue(queue)  # so that lock/nextid exists: its count may move, nothing else
    before = queue_files(root)
    with failing(call, code, nth=nth), pytest.raises(QueueError) as caught:
        enqueue(queue, message=b"Subject: big\n\n" + b"x" * 100_000)
    assert caught.value.text == text
    assert not caught.value.permanent
    assert without_nextid(queue_files(root)) == without_nextid(before)


# -- preprocessing (qmail-send's todo pass) ------------------------------------


def test_preprocess_writes_info_and_channel_files_and_drops_todo(root: QmailRoot) -> None:
    queue = Queue(root)
    msgid = enqueue(queue, recipients=("u@mx.example.org", "r@remote.test", "s@remote.test"))
    mess = root.mess(msgid).read_bytes()
    queue.preprocess(
        msgid, "a@b.test", ["u@mx.example.org"], ["r@remote.test", "s@remote.test"], NOW
    )
    s = msgid % 23
    assert (root.queue / f"info/{s}/{msgid}").read_bytes() == b"Fa@b.test\0"
    assert (root.queue / f"local/{s}/{msgid}").read_bytes() == b"Tu@mx.example.org\0"
    assert (root.queue / f"remote/{s}/{msgid}").read_bytes() == b"Tr@remote.test\0Ts@remote.test\0"
    assert not root.todo(msgid).exists()
    assert not root.intd(msgid).exists()
    assert root.mess(msgid).read_bytes() == mess
    assert queue.read_info(msgid) == ("a@b.test", NOW)  # info's mtime is the birth time
    assert queue.count() == (1, 0)


def test_preprocess_writes_no_channel_file_for_a_channel_without_recipients(
    root: QmailRoot,
) -> None:
    queue = Queue(root)
    msgid = enqueue(queue, sender="")
    queue.preprocess(msgid, "", [], ["r@remote.test"], NOW)
    assert root.info(msgid).read_bytes() == b"F\0"
    assert not root.channel("local", msgid).exists()
    assert queue.read_channel("local", msgid) is None


def test_preprocess_again_replaces_the_leftovers_of_an_interrupted_attempt(
    root: QmailRoot,
) -> None:
    queue = Queue(root)
    msgid = enqueue(queue)
    root.info(msgid).write_bytes(b"Fhalf")
    root.channel("remote", msgid).write_bytes(b"Tjunk@x\0Tcut")
    queue.preprocess(msgid, "a@b.test", ["u@mx.example.org"], [], NOW)
    assert root.info(msgid).read_bytes() == b"Fa@b.test\0"
    assert root.channel("local", msgid).read_bytes() == b"Tu@mx.example.org\0"
    assert not root.channel("remote", msgid).exists()


def test_a_message_whose_preprocessing_was_interrupted_is_not_yet_preprocessed(
    root: QmailRoot,
) -> None:
    """A crash between info and the removal of todo leaves both: todo wins (queue.md §6.2)."""
    queue = Queue(root)
    msgid = enqueue(queue)
    root.info(msgid).write_bytes(b"Fa@b.test\0")  # info done, local/ not yet written
    assert queue.todo_ids() == [msgid]
    assert queue.info_ids() == []


# -- records: marking done -------------------------------------------------------


def test_read_channel_gives_byte_offsets_of_the_records(root: QmailRoot) -> None:
    queue = Queue(root)
    msgid = enqueue(queue)
    queue.preprocess(msgid, "a@b.test", [], ["a@x.test", "b\xe9@y.test", "c@z.test"], NOW)
    found = queue.read_channel("remote", msgid)
    assert found is not None
    records, due = found
    assert [(r.offset, r.address, r.done) for r in records] == [
        (0, "a@x.test", False),
        (10, "b\xe9@y.test", False),
        (22, "c@z.test", False),
    ]
    assert due == NOW


def test_mark_done_turns_exactly_that_records_t_into_d(root: QmailRoot) -> None:
    queue = Queue(root)
    msgid = enqueue(queue)
    queue.preprocess(msgid, "a@b.test", [], ["a@x.test", "b\xe9@y.test", "c@z.test"], NOW)
    path = root.channel("remote", msgid)
    before = path.read_bytes()
    queue.mark_done("remote", msgid, 10)
    after = path.read_bytes()
    assert after == before[:10] + b"D" + before[11:]
    assert after == "Ta@x.test\0Db\xe9@y.test\0Tc@z.test\0".encode()
    queue.mark_done("remote", msgid, 10)  # twice is harmless
    found = queue.read_channel("remote", msgid)
    assert found is not None
    assert [r.done for r in found[0]] == [False, True, False]


def test_set_due_keeps_the_next_attempt_in_the_channel_files_mtime(root: QmailRoot) -> None:
    queue = Queue(root)
    msgid = enqueue(queue)
    queue.preprocess(msgid, "a@b.test", ["u@mx.example.org"], [], NOW)
    queue.set_due("local", msgid, NOW + 100.5)
    found = queue.read_channel("local", msgid)
    assert found is not None
    assert found[1] == NOW + 100.5
    queue.set_due("remote", msgid, NOW)  # no remote file: nothing to do, no error


def test_remove_message_removes_every_file_of_the_message(root: QmailRoot) -> None:
    queue = Queue(root)
    keep = enqueue(queue)
    msgid = enqueue(queue)
    queue.preprocess(msgid, "a@b.test", ["u@mx.example.org"], ["r@remote.test"], NOW)
    queue.append_bounce(msgid, "r@remote.test", "Sorry.\n")
    queue.set_held(msgid, True)
    queue.write_state(msgid, b"{}")
    queue.remove_message(msgid)
    assert set(queue_files(root)) == {
        "lock/nextid",
        f"mess/{keep % 23}/{keep}",
        f"todo/{keep}",
        f"intd/{keep}",
    }


# -- bounce/N (send.md §6.1) ------------------------------------------------------


def addbounce(recipient: bytes, report: bytes) -> bytes:
    """qmail-send.c's addbounce(), transliterated, as the reference."""
    text = bytearray(b"<" + recipient)
    for pos in range(len(text)):
        if text[pos] == 0x0A:
            text[pos] = 0x5F
    text += b">:\n" + report
    if report and not report.endswith(b"\n"):
        text += b"\n"
    pos = len(text) - 2
    while pos > 0:
        if text[pos] == 0x0A and text[pos - 1] == 0x0A:
            text[pos] = 0x2F
        pos -= 1
    return bytes(text + b"\n")


BOUNCE_ENTRIES = [
    (
        "u@x.test",
        "Sorry, no mailbox here by that name. (#5.1.1)\n",
        b"<u@x.test>:\nSorry, no mailbox here by that name. (#5.1.1)\n\n",
    ),
    ("u@x.test", "no newline at the end", b"<u@x.test>:\nno newline at the end\n\n"),
    ("u@x.test", "", b"<u@x.test>:\n\n"),
    ("a\nb@x.test", "Sorry.\n", b"<a_b@x.test>:\nSorry.\n\n"),
    ("u@x.test", "one\n\ntwo\n", b"<u@x.test>:\none\n/two\n\n"),
    ("u@x.test", "one\n\n\ntwo\n", b"<u@x.test>:\none\n//two\n\n"),
    ("u@x.test", "\nstarts blank\n", b"<u@x.test>:\n/starts blank\n\n"),
    ("u@x.test", "ends blank\n\n", b"<u@x.test>:\nends blank\n\n\n"),
    ("", "Sorry.\n", b"<>:\nSorry.\n\n"),
]


@pytest.mark.parametrize(("recipient", "report", "entry"), BOUNCE_ENTRIES)
def test_bounce_entry_is_qmail_sends(recipient: str, report: str, entry: bytes) -> None:
    assert bounce_entry(recipient, report) == entry
    assert addbounce(recipient.encode(), report.encode()) == entry


def test_bounce_entry_matches_qmail_send_on_any_text() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    text = st.text(alphabet=st.sampled_from("ab \n\t\xe9/"), max_size=40)

    @settings(max_examples=300, deadline=None, database=None)
    @given(recipient=text, report=text)
    def check(recipient: str, report: str) -> None:
        assert bounce_entry(recipient, report) == addbounce(recipient.encode(), report.encode())

    check()


def test_append_bounce_accumulates_entries_in_bounce_n(root: QmailRoot) -> None:
    queue = Queue(root)
    msgid = enqueue(queue)
    assert queue.read_bounce(msgid) is None
    queue.append_bounce(msgid, "a@x.test", "Sorry.\n")
    queue.append_bounce(msgid, "b@y.test", "Gone.\n\nReally.")
    assert (root.queue / "bounce" / str(msgid)).read_bytes() == (
        b"<a@x.test>:\nSorry.\n\n<b@y.test>:\nGone.\n/Really.\n\n"
    )
    queue.remove_bounce(msgid)
    assert queue.read_bounce(msgid) is None


# -- cleanup of crash leftovers (queue.md §6.4) -------------------------------------


def leftover(root: QmailRoot, msgid: int, *, intd: bool = False) -> None:
    """What a writer killed after step 3 (S2) or step 5 (S3) leaves."""
    root.mess(msgid).write_bytes(b"Received: (qmail 1 invoked by uid 0); x\npartial")
    if intd:
        root.intd(msgid).write_bytes(b"u0\0p1\0Fa@b")


def test_cleanup_removes_s2_and_s3_leftovers(root: QmailRoot) -> None:
    leftover(root, 7)
    leftover(root, 8, intd=True)
    removed = Queue(root).cleanup_orphans(time.time())
    assert set(removed) == {root.mess(7), root.mess(8), root.intd(8)}
    assert queue_files(root) == {}


def test_cleanup_removes_pid_files_of_dead_writers_only(root: QmailRoot) -> None:
    dead = root.queue / "pid" / f"{DEAD_PID}.{int(NOW)}.9"
    alive = root.queue / "pid" / f"{os.getppid()}.{int(NOW)}.10"
    dead.write_bytes(b"partial")
    alive.write_bytes(b"partial")
    assert Queue(root).cleanup_orphans(time.time()) == [dead]
    assert alive.exists()


def test_cleanup_never_removes_a_queued_message(root: QmailRoot) -> None:
    queue = Queue(root)
    queued = enqueue(queue)
    preprocessed = enqueue(queue)
    queue.preprocess(preprocessed, "a@b.test", ["u@mx.example.org"], [], NOW)
    queue.set_held(preprocessed, True)
    queue.append_bounce(preprocessed, "x@y.test", "Sorry.\n")
    queue.write_state(preprocessed, b"{}")
    before = queue_files(root)
    assert queue.cleanup_orphans(time.time()) == []
    assert queue_files(root) == before
    assert queued != preprocessed


@pytest.mark.parametrize("where", ["mess", "pid"])
def test_cleanup_never_removes_a_file_whose_writer_holds_its_lock(
    root: QmailRoot, where: str
) -> None:
    # a pid/ file whose name claims a dead owner, yet someone writes it
    pid_file = root.queue / "pid" / f"{DEAD_PID}.{int(NOW)}.11"
    path = root.mess(11) if where == "mess" else pid_file
    path.write_bytes(b"being written")
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert Queue(root).cleanup_orphans(time.time()) == []
        assert path.exists()
    finally:
        os.close(fd)
    assert Queue(root).cleanup_orphans(time.time()) == [path]


def test_cleanup_spares_leftovers_younger_than_min_age(root: QmailRoot) -> None:
    leftover(root, 12, intd=True)
    queue = Queue(root)
    assert queue.cleanup_orphans(time.time(), min_age=3600) == []
    assert set(queue.cleanup_orphans(time.time() + 3600, min_age=3600)) == {
        root.mess(12),
        root.intd(12),
    }


def test_cleanup_removes_files_of_a_message_that_is_gone(root: QmailRoot) -> None:
    for kind in ("intd", "bounce", "hold", "state"):
        (root.queue / kind / "13").write_bytes(b"x")
    assert len(Queue(root).cleanup_orphans(time.time())) == 4
    assert queue_files(root) == {}


def test_cleanup_removes_channel_files_left_by_an_interrupted_removal(root: QmailRoot) -> None:
    """remove_message unlinks info first (S5 -> S2); a crash right after it
    leaves local/ and remote/ files that nothing would ever read again."""
    queue = Queue(root)
    msgid = enqueue(queue)
    queue.preprocess(msgid, "a@b.test", ["u@mx.example.org"], ["r@remote.test"], NOW)
    root.info(msgid).unlink()
    queue.cleanup_orphans(time.time())
    assert without_nextid(queue_files(root)) == {}


# -- the trigger --------------------------------------------------------------------


def test_pull_trigger_without_a_reader_does_nothing(root: QmailRoot) -> None:
    assert stat.S_ISFIFO(root.trigger.stat().st_mode)
    started = time.monotonic()
    Queue(root).pull_trigger()
    assert time.monotonic() - started < 1


def test_pull_trigger_wakes_a_reader_with_one_byte(root: QmailRoot) -> None:
    reader = os.open(root.trigger, os.O_RDONLY | os.O_NONBLOCK)
    try:
        enqueue(Queue(root))
        assert os.read(reader, 100) == b"\0"
    finally:
        os.close(reader)


def test_pull_trigger_on_a_full_pipe_neither_blocks_nor_fails(root: QmailRoot) -> None:
    reader = os.open(root.trigger, os.O_RDONLY | os.O_NONBLOCK)
    writer = os.open(root.trigger, os.O_WRONLY | os.O_NONBLOCK)
    try:
        for _ in range(10_000):  # a pipe holds 64 KiB on Linux: bounded well above
            try:
                os.write(writer, b"\0" * 4096)
            except BlockingIOError:
                break
        else:
            pytest.fail("the trigger pipe never filled")
        Queue(root).pull_trigger()
    finally:
        os.close(writer)
        os.close(reader)


def test_pull_trigger_without_the_fifo_does_nothing(root: QmailRoot) -> None:
    root.trigger.unlink()
    Queue(root).pull_trigger()
    assert not root.trigger.exists()


def test_create_layout_makes_what_a_root_needs(tmp_path: Path) -> None:
    root = QmailRoot(tmp_path / "q")
    root.path.mkdir()
    queue = Queue(root)
    assert queue.missing_layout()
    queue.create_layout()
    assert queue.missing_layout() == []
    shutil.rmtree(root.queue / "mess" / "22")
    assert queue.missing_layout() == [root.queue / "mess" / "22"]


# -- recycled files (spare/) ------------------------------------------------------


def test_a_finished_messages_small_files_are_reused_for_the_next_one(root: QmailRoot) -> None:
    """On ext4 without a journal a new inode costs ~0.5 ms of CPU after many
    deletions; info/, local/ and todo/ files are renamed into spare/ and back."""
    queue = Queue(root)
    first = enqueue(queue)
    queue.preprocess(first, "a@b.test", ["u@mx.example.org"], [], NOW)
    inodes = {root.info(first).stat().st_ino, root.channel("local", first).stat().st_ino}
    mess_inode = root.mess(first).stat().st_ino
    queue.remove_message(first)
    spares = {p.stat().st_ino for p in (root.queue / "spare").iterdir()}
    assert inodes <= spares
    assert mess_inode not in spares  # a delivery may still be reading it
    second = enqueue(queue)
    queue.preprocess(second, "c@d.test", ["v@mx.example.org"], [], NOW)
    reused = {root.info(second).stat().st_ino, root.channel("local", second).stat().st_ino}
    assert reused & spares
    assert root.info(second).read_bytes() == b"Fc@d.test\0"  # nothing of the old content
    assert root.channel("local", second).read_bytes() == b"Tv@mx.example.org\0"


def test_a_reused_file_longer_than_the_new_content_is_cut_to_it(root: QmailRoot) -> None:
    """Reused files are written over, not emptied first: the end must go."""
    queue = Queue(root)
    big = enqueue(queue, message=b"Subject: big\n\n" + b"x" * 100_000 + b"\n")
    queue.preprocess(big, "a@b.test", ["u@mx.example.org"] * 50, [], NOW)
    queue.remove_message(big, reuse_mess=True)
    small = enqueue(queue, message=MESSAGE)
    queue.preprocess(small, "c@d.test", ["v@mx.example.org"], [], NOW)
    data = root.mess(small).read_bytes()
    assert data.endswith(MESSAGE)
    assert len(data) < 200
    assert root.channel("local", small).read_bytes() == b"Tv@mx.example.org\0"


def test_spare_files_are_bounded(root: QmailRoot, monkeypatch: pytest.MonkeyPatch) -> None:
    import core.queue

    monkeypatch.setattr(core.queue, "SPARE_MAX", 3)
    queue = Queue(root)
    for _ in range(4):
        msgid = enqueue(queue)
        queue.preprocess(msgid, "a@b.test", ["u@mx.example.org"], ["r@remote.test"], NOW)
        queue.remove_message(msgid)
    assert len(list((root.queue / "spare").iterdir())) <= 3


# -- cleanup beside live writers ------------------------------------------------


@pytest.mark.parametrize("routed", [False, True], ids=["enqueue", "enqueue_routed"])
def test_cleanup_at_any_step_of_a_live_writer_leaves_its_message_alone(
    root: QmailRoot, routed: bool
) -> None:
    """A starting core cleans up while `inject` may be writing: before every system
    call the writer makes, run the cleanup; it must remove nothing, and the
    message must still be committed whole."""
    from unittest import mock

    import core.durable
    import core.queue
    from tests.queue_faults import _Os

    writer = Queue(root)
    sweeps: list[list[Path]] = []
    inside = False

    def before(name: str, args: tuple[Any, ...]) -> None:
        nonlocal inside
        if inside:
            return
        inside = True
        try:
            sweeps.append(Queue(root).cleanup_orphans(time.time()))
        finally:
            inside = False

    hooked = _Os(before)
    with mock.patch.object(core.queue, "os", hooked), mock.patch.object(core.durable, "os", hooked):
        if routed:
            msgid = writer.enqueue_routed(
                MESSAGE,
                "a@b.test",
                ["u@mx.example.org"],
                ["r@remote.test"],
                uid=1000,
                pid=os.getpid(),
                invoked="invoked by uid 1000",
                now=NOW,
            )
        else:
            msgid = enqueue(writer, pid=os.getpid())
    assert len(sweeps) > 5
    assert all(not removed for removed in sweeps), sweeps
    assert root.mess(msgid).read_bytes().endswith(MESSAGE)
    if routed:
        assert root.info(msgid).read_bytes() == b"Fa@b.test\0"
        assert root.channel("local", msgid).read_bytes() == b"Tu@mx.example.org\0"
        assert root.channel("remote", msgid).read_bytes() == b"Tr@remote.test\0"
    else:
        assert root.todo(msgid).exists()


def test_enqueue_routed_commits_with_info_and_leaves_no_todo(root: QmailRoot) -> None:
    queue = Queue(root)
    msgid = queue.enqueue_routed(
        MESSAGE,
        "",
        ["u@mx.example.org"],
        [],
        uid=0,
        pid=7,
        invoked="invoked from network",
        now=NOW,
    )
    assert queue.info_ids() == [msgid]
    assert queue.read_info(msgid) == ("", NOW)
    assert not root.todo(msgid).exists()
    assert not root.channel("remote", msgid).exists()
    assert root.mess(msgid).read_bytes().startswith(b"Received: (qmail 7 invoked from network); ")
    assert queue.count() == (1, 0)
    assert not list((root.queue / "pid").iterdir())


def test_cleanup_removes_an_info_whose_mess_link_was_lost(root: QmailRoot) -> None:
    """enqueue_routed links mess then info; a file system that orders nothing may
    keep only the second after a crash. That message was never acknowledged."""
    queue = Queue(root)
    msgid = queue.enqueue_routed(
        MESSAGE, "a@b.test", ["u@mx.example.org"], [], uid=0, pid=7, invoked="x", now=NOW
    )
    root.mess(msgid).unlink()
    removed = queue.cleanup_orphans(time.time())
    assert root.info(msgid) in removed
    assert without_nextid(queue_files(root)) == {}
