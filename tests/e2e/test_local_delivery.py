"""Local delivery through the real core: programs, forwards, mbox, loops, safety."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from core.paths import QmailRoot
from tests.e2e.conftest import Server, make_user, qmailtui

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
AS_ROOT = os.getuid() == 0


def own(path: Path) -> None:
    """Files a user would have written himself are his."""
    if AS_ROOT:
        os.chown(path, 65534, 65534)


def dotqmail(home: Path, name: str, text: str, mode: int = 0o644) -> Path:
    path = home / name
    path.write_text(text)
    path.chmod(mode)
    own(path)
    return path


def inject(root: QmailRoot, rcpt: str, body: bytes, sender: str = "sender@client.test") -> None:
    done = qmailtui("inject", "-f", sender, rcpt, root=root, stdin=body)
    assert done.returncode == 0, done.stderr


def wait_file(path: Path, limit: float = 15.0) -> Path:
    deadline = time.monotonic() + limit
    while not path.exists() or path.stat().st_size == 0:
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    time.sleep(0.1)
    return path


def inbox(maildir: Path, count: int = 1, limit: float = 15.0) -> list[bytes]:
    deadline = time.monotonic() + limit
    while len(list((maildir / "new").iterdir())) < count:
        assert time.monotonic() < deadline, f"{maildir} has fewer than {count} messages"
        time.sleep(0.05)
    return [p.read_bytes() for p in sorted((maildir / "new").iterdir())]


def test_a_program_gets_the_message_and_qmails_environment(root: QmailRoot, server: Server) -> None:
    home = make_user(root, "alice")
    names = "SENDER NEWSENDER RECIPIENT USER HOME HOST HOST2 HOST3 HOST4 LOCAL EXT EXT2 EXT3 EXT4"
    script = "".join(f'echo "{n}=${n}"; ' for n in names.split())
    dotqmail(home, ".qmail-lists-qmail-dev", f"|({script} echo ---; cat) > got\n")
    lines = root.assign.read_text().splitlines()
    user = lines[0].split(":")
    lines.insert(0, f"+alice-:alice:{user[2]}:{user[3]}:{home}:-::")
    root.assign.write_text("\n".join(lines) + "\n")
    assert qmailtui("newu", root=root).returncode == 0
    inject(root, "alice-lists-qmail-dev@mx.example.org", b"Subject: prog\n\nhello\n")
    got = wait_file(home / "got").read_text()
    env, _, message = got.partition("---\n")
    values = dict(line.split("=", 1) for line in env.splitlines())
    assert values["SENDER"] == values["NEWSENDER"] == "sender@client.test"
    assert values["RECIPIENT"] == "alice-lists-qmail-dev@mx.example.org"
    assert values["LOCAL"] == "alice-lists-qmail-dev"
    assert (values["EXT"], values["EXT2"], values["EXT3"], values["EXT4"]) == (
        "lists-qmail-dev",
        "qmail-dev",
        "dev",
        "",
    )
    assert (values["HOST"], values["HOST2"], values["HOST3"], values["HOST4"]) == (
        "mx.example.org",
        "mx.example",
        "mx",
        "mx",
    )
    assert values["USER"] == "alice"
    assert values["HOME"] == str(home)
    assert message.startswith("Received: (qmail ")  # no Return-Path/Delivered-To for programs
    assert message.endswith("Subject: prog\n\nhello\n")
    if AS_ROOT:
        assert (home / "got").stat().st_uid == 65534  # it ran as the user, never as root
    server.wait_log("success: did_0+0+1/")


def test_a_slow_program_never_holds_up_the_same_users_other_deliveries(
    root: QmailRoot, server: Server
) -> None:
    """One user's deliveries share one delivery process when the core runs as
    root: a program that takes its time must not stop the Maildir deliveries
    behind it, nor an mbox delivery."""
    home = make_user(root, "dave")
    gate = home / "gate"
    wait = f"i=0; while [ ! -e {gate} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done"
    dotqmail(home, ".qmail-slow", f"|echo s > started; {wait}; echo f > finished\n")
    dotqmail(home, ".qmail-box", "./mbox\n")
    lines = root.assign.read_text().splitlines()
    user = lines[-2].split(":")
    lines.insert(0, f"+dave-:dave:{user[2]}:{user[3]}:{home}:-::")
    root.assign.write_text("\n".join(lines) + "\n")
    assert qmailtui("newu", root=root).returncode == 0
    inject(root, "dave-slow@mx.example.org", b"Subject: slow\n\nbody\n")
    wait_file(home / "started")
    for i in range(5):
        inject(root, "dave@mx.example.org", b"Subject: %d\n\nbody\n" % i)
    inject(root, "dave-box@mx.example.org", b"Subject: box\n\nbody\n")
    assert len(inbox(home / "Maildir", 5)) == 5
    assert b"Subject: box" in wait_file(home / "mbox").read_bytes()
    assert not (home / "finished").exists()
    gate.touch()
    wait_file(home / "finished")
    server.wait_log("success: did_0+0+1/")


def test_a_forward_keeps_the_sender_and_adds_delivered_to(root: QmailRoot, server: Server) -> None:
    home = make_user(root, "bob")
    carol = make_user(root, "carol")
    dotqmail(home, ".qmail", "&carol@mx.example.org\n")
    inject(root, "bob@mx.example.org", b"Subject: fwd\n\nbody\n")
    [message] = inbox(carol / "Maildir")
    assert message.startswith(
        b"Return-Path: <sender@client.test>\nDelivered-To: carol@mx.example.org\nReceived: (qmail "
    )
    assert b"\nDelivered-To: bob@mx.example.org\nReceived: (qmail " in message
    server.wait_log("success: did_0+1+0/qp_")


def test_a_forwarding_loop_bounces_as_looping(root: QmailRoot, server: Server) -> None:
    home = make_user(root, "dave")
    sender = make_user(root, "erin")
    dotqmail(home, ".qmail", "&dave@mx.example.org\n")
    inject(root, "dave@mx.example.org", b"Subject: loop\n\n", sender="erin@mx.example.org")
    [bounce] = inbox(sender / "Maildir")
    assert b"This message is looping: it already has my Delivered-To line. (#5.4.6)" in bounce


def test_mbox_delivery_quotes_from_lines(root: QmailRoot, server: Server) -> None:
    home = make_user(root, "frank")
    dotqmail(home, ".qmail", "./Mailbox\n")
    inject(root, "frank@mx.example.org", b"Subject: m\n\nFrom the start\n>From again\nend")
    text = wait_file(home / "Mailbox").read_bytes()
    assert text.startswith(b"From sender@client.test ")
    assert b"\nReturn-Path: <sender@client.test>\nDelivered-To: frank@mx.example.org\n" in text
    assert b"\n>From the start\n>>From again\nend\n\n" in text
    assert text.endswith(b"end\n\n")


@pytest.mark.parametrize(
    ("code", "outcome"),
    [(0, "success"), (99, "success"), (100, "failure"), (64, "failure"), (111, "deferral")],
)
def test_program_exit_codes_mean_what_qmail_says(
    root: QmailRoot, server: Server, code: int, outcome: str
) -> None:
    home = make_user(root, "gina")
    dotqmail(home, ".qmail", f"|echo said {code}; exit {code}\n")
    inject(root, "gina@mx.example.org", b"\n")
    log = server.wait_log(f"delivery 1: {outcome}: ")
    assert f"delivery 1: {outcome}: said_{code}/" in log


def test_a_program_before_a_failing_line_still_ran_and_99_stops(
    root: QmailRoot, server: Server
) -> None:
    home = make_user(root, "hank")
    dotqmail(home, ".qmail", "|touch first\n|exit 99\n|touch never\n./Maildir/\n")
    inject(root, "hank@mx.example.org", b"\n")
    server.wait_log("delivery 1: success: did_0+0+2/")
    assert (home / "first").exists()
    assert not (home / "never").exists()
    assert not list((home / "Maildir/new").iterdir())


def test_a_writable_dotqmail_or_home_defers(root: QmailRoot, server: Server) -> None:
    home = make_user(root, "ivan")
    dotqmail(home, ".qmail", "./Maildir/\n", mode=0o666)
    inject(root, "ivan@mx.example.org", b"\n")
    server.wait_log("delivery 1: deferral: Uh-oh:_.qmail_file_is_writable._(#4.7.0)/")


@pytest.mark.skipif(not AS_ROOT, reason="only a core run as root can be asked to deliver as root")
def test_a_user_assigned_uid_0_is_never_delivered_as_root(root: QmailRoot, server: Server) -> None:
    home = root.path.parent / "home" / "toor"
    home.mkdir(parents=True, mode=0o700)
    root.assign.write_text(f"=toor:toor:0:0:{home}:::\n.\n")
    assert qmailtui("newu", root=root).returncode == 1  # we refuse to compile it...
    # ...but qmail-newu does not: a users/cdb made by qmail's own tools may hold it.
    import io

    import cdblib

    data = io.BytesIO()
    with cdblib.Writer(data) as cdb:
        cdb.put(b"!toor\0", b"toor\0" + b"0\0" + b"0\0" + str(home).encode() + b"\0\0")
        cdb.put(b"", b"")
    root.users_cdb.write_bytes(data.getvalue())
    inject(root, "toor@mx.example.org", b"\n")
    server.wait_log("deferral: Not_allowed_to_perform_deliveries_as_root./")


def test_a_dotqmail_line_cannot_write_outside_an_unprivileged_users_home(
    root: QmailRoot, server: Server, tmp_path: Path
) -> None:
    """As root the user's own rights stop it; unprivileged, the core refuses it."""
    home = make_user(root, "judy")
    outside = tmp_path / "outside"
    outside.mkdir()
    dotqmail(home, ".qmail", f"{outside}/Mailbox\n../../escape\n")
    inject(root, "judy@mx.example.org", b"\n")
    log = server.wait_log("delivery 1: deferral: ")
    assert not (outside / "Mailbox").exists()
    if not AS_ROOT:
        assert "is_outside_the_home_directory" in log
