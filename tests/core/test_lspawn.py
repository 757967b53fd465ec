"""Local deliveries in their own process (qmail-lspawn), driven by the real child."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import pytest

from core.lspawn import CRASHED, LocalSpawner
from core.paths import QmailRoot
from core.queue import Queue
from tests.e2e.conftest import make_user

pytestmark = pytest.mark.timeout(60)


def queued(root: QmailRoot, rcpt: str) -> int:
    return Queue(root).enqueue_routed(
        b"Subject: s\n\nbody\n", "a@b.test", [rcpt], [], uid=0, pid=1, invoked="x", now=time.time()
    )


async def test_the_child_delivers_and_reports_like_qmail_local(root: QmailRoot) -> None:
    home = make_user(root, "alice")
    lost: list[str] = []
    spawner = LocalSpawner(root, lost.append)
    try:
        ok = await spawner.deliver("alice@mx.example.org", "a@b.test", queued(root, "x"), 0.0)
        nobody = await spawner.deliver("nobody@mx.example.org", "a@b.test", queued(root, "y"), 0.0)
    finally:
        await spawner.close()
    assert (ok.status, ok.text) == ("K", "did 1+0+0\n")
    assert (nobody.status, nobody.text) == ("D", "Sorry, no mailbox here by that name. (#5.1.1)\n")
    assert len(list((home / "Maildir/new").iterdir())) == 1
    assert lost == []


async def test_deliveries_in_lspawn_itself_mix_maildir_mbox_and_forward(root: QmailRoot) -> None:
    """The alias user's deliveries (or all of an unprivileged core's) run in
    lspawn: a Maildir line goes through its group commit, an mbox line through
    a thread, a forward is queued; many at once each get their own answer."""
    (root.alias / ".qmail-team").write_text("./Maildir/\n./team.mbox\n&someone@elsewhere.test\n")
    spawner = LocalSpawner(root, lambda why: None)
    try:
        results = await asyncio.gather(
            *(
                spawner.deliver("team@mx.example.org", "a@b.test", queued(root, f"t{i}"), 0.0)
                for i in range(8)
            )
        )
    finally:
        await spawner.close()
    for result in results:
        assert result.status == "K", result.text
        assert re.fullmatch(r"did 2\+1\+0\nqp \d+\n", result.text)
    assert len({r.text for r in results}) == 8  # eight forwards, eight queued messages
    assert len(list((root.alias / "Maildir/new").iterdir())) == 8
    assert (root.alias / "team.mbox").read_bytes().count(b"\nFrom ") == 7


async def test_lspawn_answers_every_delivery_it_holds_before_it_exits(root: QmailRoot) -> None:
    """Its input closed while deliveries are between two sync points (neither
    in a worker nor in the pool): each is still carried out and answered."""
    (root.alias / ".qmail-late").write_text("./Maildir/\n./late.mbox\n")
    spawner = LocalSpawner(root, lambda why: None)
    await spawner.start()
    tasks = [
        asyncio.ensure_future(
            spawner.deliver("late@mx.example.org", "a@b.test", queued(root, f"l{i}"), 0.0)
        )
        for i in range(8)
    ]
    await asyncio.sleep(0)  # every request written
    await spawner.close()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert [(r.status, r.text) for r in results] == [("K", "did 2+0+0\n")] * 8
    assert (root.alias / "late.mbox").read_bytes().count(b"\nFrom ") == 7


async def test_many_deliveries_at_once_each_get_their_own_answer(root: QmailRoot) -> None:
    make_user(root, "bob")
    spawner = LocalSpawner(root, lambda why: None)
    try:
        ids = [queued(root, "x") for _ in range(30)]
        rcpts = ["bob@mx.example.org" if i % 2 else "nobody@mx.example.org" for i in range(30)]
        results = await asyncio.gather(
            *(spawner.deliver(r, "a@b.test", i, 0.0) for r, i in zip(rcpts, ids, strict=True))
        )
    finally:
        await spawner.close()
    assert [r.status for r in results] == ["K" if i % 2 else "D" for i in range(30)]


async def test_a_child_that_dies_defers_what_it_held_and_a_new_one_takes_over(
    root: QmailRoot,
) -> None:
    home = make_user(root, "carol")
    lost: list[str] = []
    spawner = LocalSpawner(root, lost.append)
    try:
        await spawner.start()
        assert spawner._proc is not None
        os.kill(spawner._proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not lost:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        # -9; or 255 when asyncio's child watcher finds the pid already reaped
        assert re.search(r"lspawn exited with status (-9|255)$", lost[0]), lost
        after = await spawner.deliver("carol@mx.example.org", "a@b.test", queued(root, "x"), 0.0)
    finally:
        await spawner.close()
    assert after.status == "K"
    assert len(list((home / "Maildir/new").iterdir())) == 1
    assert CRASHED.status == "Z"  # what the deliveries in flight were told


async def test_a_delivery_in_flight_when_the_child_dies_is_deferred(root: QmailRoot) -> None:
    import fcntl

    home = make_user(root, "dave")
    (home / ".qmail").write_text("./Mailbox\n")
    mbox = os.open(home / "Mailbox", os.O_WRONLY | os.O_CREAT, 0o600)
    if os.getuid() == 0:
        os.chown(home / "Mailbox", 65534, 65534)  # the user's own mailbox
    fcntl.flock(mbox, fcntl.LOCK_EX)  # the delivery waits for this lock
    spawner = LocalSpawner(root, lambda why: None)
    try:
        task = asyncio.ensure_future(
            spawner.deliver("dave@mx.example.org", "a@b.test", queued(root, "x"), 0.0)
        )
        await asyncio.sleep(0.5)
        assert not task.done()
        assert spawner._proc is not None
        os.kill(spawner._proc.pid, signal.SIGKILL)
        result = await asyncio.wait_for(task, 10)
    finally:
        os.close(mbox)
        await spawner.close()
    # The delivery is deferred, so it will be tried again: never lost. (As root a
    # worker of that uid holds it and may still finish it: then it arrives twice,
    # qmail's choice over losing it.)
    assert result == CRASHED


# -- who delivers, and what they may do ---------------------------------------


def test_getpw_follows_qmail_getpw_rules(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import pwd

    from core import getpw

    homes = {"joe": tmp_path / "joe", "root": tmp_path / "root", "ftp": tmp_path / "ftp"}
    for home in homes.values():
        home.mkdir()
    owners = {"joe": 1000, "root": 0, "ftp": 14}
    me = os.getuid()

    def getpwnam(name: str) -> pwd.struct_passwd:
        if name not in homes:
            raise KeyError(name)
        uid = owners[name]
        return pwd.struct_passwd((name, "x", uid, 100, "", str(homes[name]), "/bin/sh"))

    monkeypatch.setattr(getpw.pwd, "getpwnam", getpwnam)
    # the home must be owned by the account: pretend joe's is, ftp's is not
    real_stat = os.stat

    def stat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        st = real_stat(path)  # type: ignore[arg-type]
        if str(path) == str(homes["joe"]):
            return os.stat_result((st.st_mode, 0, 0, 0, 1000, 100, 0, 0, 0, 0))
        return st

    monkeypatch.setattr(getpw.os, "stat", stat)
    joe = getpw.getpw("Joe-Foo-Bar")
    assert joe is not None
    assert (joe.user, joe.uid, joe.dash, joe.ext) == ("joe", 1000, "-", "Foo-Bar")
    assert getpw.getpw("joe") is not None
    assert getpw.getpw("joe").dash == ""  # type: ignore[union-attr]
    assert getpw.getpw("root") is None  # uid 0 is never a user
    assert getpw.getpw("ftp") is None or me == 14  # home owned by someone else
    assert getpw.getpw("x" * 40 + "-joe") is None  # only prefixes ending before a '-'


def test_an_unprivileged_core_runs_programs_only_for_its_own_uid(root: QmailRoot) -> None:
    from core import control, users
    from core.lspawn import Deliverer

    deliverer = Deliverer(root, Queue(root), lambda: control.load(root))
    deliverer.is_root = False
    mine = users.Owner("a", os.getuid(), os.getgid(), "/h", "", "", "users/assign:1")
    other = users.Owner("b", os.getuid() + 1, 0, "/h", "", "", "users/assign:2")
    rules = deliverer._rules(mine)
    assert rules is not None
    assert (rules.confine, rules.programs) == (True, True)
    rules = deliverer._rules(other)
    assert rules is not None
    assert (rules.confine, rules.programs) == (True, False)
    assert "is not root" in rules.why_no_programs
    deliverer.is_root = True
    assert (
        deliverer._rules(
            mine if os.getuid() == 0 else users.Owner("a", 0, 0, "/h", "", "", "users/assign:1")
        )
        is None
    )  # uid 0: never
    alias = users.Owner("alias", 0, 0, str(root.alias), "-", "x", "the alias user")
    rules = deliverer._rules(alias)
    assert rules is not None
    assert (rules.confine, rules.programs) == (True, False)


@pytest.mark.skipif(os.getuid() != 0, reason="workers for another uid need root")
def test_a_delivery_a_worker_holds_too_long_is_deferred_and_its_slot_freed(
    root: QmailRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker stuck in a delivery (a dead NFS mount, say) must not hold the
    delivery forever: past the time limit it is deferred, and a late answer
    is dropped."""
    import threading

    from core import asuser
    from core.local import Result

    monkeypatch.setattr(asuser, "HUNG", 0.5)
    monkeypatch.setattr(asuser, "SWEEP", 0.1)
    home = make_user(root, "dora")
    gate = home / "gate"
    wait = f"i=0; while [ ! -e {gate} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done"
    (home / ".qmail").write_text(f"|{wait}\n")
    os.chown(home / ".qmail", 65534, 65534)
    msgid = queued(root, "dora@mx.example.org")
    request = {
        "user": "dora",
        "home": str(home),
        "local": "dora",
        "dash": "",
        "ext": "",
        "host": "mx.example.org",
        "sender": "a@b.test",
        "defaultdelivery": "./Maildir/\n",
        "now": time.time(),
    }
    workers = asuser.UserWorkers(asuser.ForkServer())
    heard: list[Result] = []
    answered = threading.Event()

    def replied(result: Result) -> None:
        heard.append(result)
        answered.set()

    fd = os.open(root.mess(msgid), os.O_RDONLY)
    try:
        started = time.monotonic()
        workers.send(65534, 65534, request, fd, replied)
        assert answered.wait(5)
        assert heard == [asuser.TIMED_OUT]
        assert time.monotonic() - started >= 0.5
        gate.touch()  # the program ends; its late answer goes nowhere
        again: list[Result] = []
        answered_again = threading.Event()

        def replied_again(result: Result) -> None:
            again.append(result)
            answered_again.set()

        workers.send(65534, 65534, request, fd, replied_again)
        assert answered_again.wait(15)
        assert again[0].status == "K"
        assert len(heard) == 1
    finally:
        os.close(fd)
        workers.close()


def test_the_blocking_deliver_of_the_command_line_answers_in_place(root: QmailRoot) -> None:
    """No core, no lspawn process: Deliverer.deliver runs the same path and waits."""
    from core import control
    from core.lspawn import Deliverer

    (root.alias / ".qmail-box").write_text("./Maildir/\n./box.mbox\n")
    deliverer = Deliverer(root, Queue(root), lambda: control.load(root))
    try:
        result = deliverer.deliver("box@mx.example.org", "a@b.test", queued(root, "b"), 0.0)
        missing = deliverer.deliver("no-such@mx.example.org", "a@b.test", queued(root, "n"), 0.0)
    finally:
        deliverer.close()
    assert (result.status, result.text) == ("K", "did 2+0+0\n")
    assert len(list((root.alias / "Maildir/new").iterdir())) == 1
    assert missing.status == "D"


@pytest.mark.skipif(os.getuid() != 0, reason="the password database is asked only as root")
def test_a_slow_password_database_never_holds_up_other_deliveries(
    root: QmailRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """users/assign is read where a delivery is handed on; an address it does
    not know goes to the password database in a pool thread, since NSS may
    ask a directory server over the network."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from core import control, lspawn
    from core.asuser import ForkServer
    from core.durable import GroupCommit, ThreadGroupCommit
    from core.local import Result

    asked, release = threading.Event(), threading.Event()

    def slow_getpw(name: str) -> None:
        asked.set()
        release.wait(10)

    monkeypatch.setattr(lspawn, "getpw", slow_getpw)
    home = make_user(root, "fast")
    forks = ForkServer()
    group = GroupCommit()
    syncer = ThreadGroupCommit(group)
    deliverer = lspawn.Deliverer(root, Queue(root), lambda: control.load(root), forks, syncer)
    results: dict[str, Result] = {}
    answered = {"slow": threading.Event(), "fast": threading.Event()}

    def done(key: str):  # type: ignore[no-untyped-def]
        def record(result: Result) -> None:
            results[key] = result
            answered[key].set()

        return record

    try:
        with ThreadPoolExecutor(4) as pool:
            slow, fast = queued(root, "s"), queued(root, "f")
            deliverer.deliver_then("sys@x.test", "a@b.test", slow, 0.0, done("slow"), pool.submit)
            assert asked.wait(5)
            deliverer.deliver_then("fast@x.test", "a@b.test", fast, 0.0, done("fast"), pool.submit)
            assert answered["fast"].wait(5)
            assert results["fast"].status == "K"
            assert not answered["slow"].is_set()
            release.set()
            assert answered["slow"].wait(5)
    finally:
        release.set()
        deliverer.close()
        syncer.close()
        group.close()
    assert len(list((home / "Maildir/new").iterdir())) == 1


async def test_a_direct_delivery_reads_only_a_draft_in_pid(root: QmailRoot) -> None:
    """lspawn runs as root and opens the draft it is named: only a core's
    direct-delivery draft in the queue's pid/, never another file."""
    make_user(root, "alice")
    secret = root.path.parent / "secret"
    secret.write_bytes(b"Subject: not mail\n\n")
    elsewhere = root.queue / "pid" / "1.2.3"
    elsewhere.write_bytes(b"Subject: no\n\n")
    link = root.queue / "pid" / "1.2.4.direct"
    link.symlink_to(secret)
    spawner = LocalSpawner(root, lambda why: None)
    try:
        results = [
            await spawner.deliver("alice@mx.example.org", "a@b.test", 1, 0.0, draft=str(path))
            for path in (secret, elsewhere, link, root.queue / "pid" / ".." / "1.direct")
        ]
    finally:
        await spawner.close()
    for result in results:
        assert (result.status, result.text) == (
            "Z",
            "qmail-spawn unable to open message. (#4.3.0)\n",
        )
