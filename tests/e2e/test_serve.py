"""`qmailtui serve` as an admin runs it: a real process, real signals."""

from __future__ import annotations

import json
import re
import signal
import time

import pytest

from core.paths import QmailRoot
from core.timefmt import parse_tai64n
from tests.e2e.conftest import Server, make_user, qmailtui

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def test_serve_says_ready_and_delivers_an_injected_message_within_a_second(
    root: QmailRoot, server: Server
) -> None:
    assert re.fullmatch(r"ready smtp=127\.0\.0\.1:\d+ pop3=off\n", server.ready)
    home = make_user(root, "alice")
    done = qmailtui("inject", "alice@mx.example.org", root=root, stdin=b"Subject: t\n\nhi\n")
    injected = time.time()
    assert done.returncode == 0, done.stderr
    log = server.wait_log("delivery 1: success: did_1+0+0/")
    label = re.search(r"^(@\w+) new msg 1$", log, re.MULTILINE)
    assert label, log
    assert parse_tai64n(label.group(1)) - injected < 1.0  # the trigger woke the core at once
    assert len(list((home / "Maildir/new").iterdir())) == 1


def test_a_second_core_on_the_same_root_is_refused_with_the_pid(
    root: QmailRoot, server: Server
) -> None:
    second = qmailtui("serve", root=root, timeout=30)
    assert second.returncode == 1
    assert second.stderr.decode() == f"qmailtui: another core is running (pid {server.pid})\n"
    assert second.stdout == b""


def test_term_stops_cleanly_with_exit_0(root: QmailRoot, server: Server) -> None:
    assert (root.run / "pid").read_text().strip() == str(server.pid)
    assert server.stop() == 0
    assert server.log().rstrip().endswith("status: exiting")
    assert not (root.run / "pid").exists()
    assert not (root.run / "control.sock").exists()


def test_hup_keeps_the_last_good_configuration_and_applies_a_good_one(
    root: QmailRoot, server: Server
) -> None:
    (root.control / "concurrencylocal").write_text("lots\n")
    server.proc.send_signal(signal.SIGHUP)
    server.wait_log("alert: control/concurrencylocal:1: error: not a number: 'lots'")
    assert server.proc.poll() is None
    (root.control / "concurrencylocal").write_text("3\n")
    server.proc.send_signal(signal.SIGHUP)
    server.wait_log("info: configuration reloaded")
    make_user(root, "bob")
    assert qmailtui("inject", "bob@mx.example.org", root=root, stdin=b"\n").returncode == 0
    server.wait_log("status: local 1/3 remote 0/20")


def test_alrm_retries_a_deferred_message_now(root: QmailRoot, server: Server) -> None:
    make_user(root, "carol", maildir=False)  # deferred: no Maildir
    assert qmailtui("inject", "carol@mx.example.org", root=root, stdin=b"\n").returncode == 0
    server.wait_log("deferral: Unable_to_chdir_to_maildir._(#4.2.1)/")
    server.proc.send_signal(signal.SIGALRM)
    deadline = time.monotonic() + 10
    while server.log().count("deferral: Unable_to_chdir") < 2:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    listed = qmailtui("queue", "list", "--json", root=root)
    entry = json.loads(listed.stdout)
    assert entry["recipients"][0]["attempts"] == 2
    assert entry["recipients"][0]["last_reply"] == "Unable to chdir to maildir. (#4.2.1)"


def test_serve_refuses_a_broken_configuration_naming_each_file_and_line(
    root: QmailRoot,
) -> None:
    (root.control / "concurrencyremote").write_text("abc\n")
    (root.control / "smtproutes").write_text("example.com:relay.test:25x\n")
    result = qmailtui("serve", root=root, timeout=30)
    assert result.returncode == 1
    err = result.stderr.decode()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert any(
        line.startswith("qmailtui: control/concurrencyremote:1: error: not a number: 'abc'")
        for line in lines
    ), err
    assert any(
        line.startswith("qmailtui: control/smtproutes:1: error: port '25x'") for line in lines
    )


def test_a_changed_users_assign_is_compiled_by_the_running_core(
    root: QmailRoot, server: Server
) -> None:
    home = make_user(root, "erin")  # compiled by newu here
    lines = root.assign.read_text().splitlines()
    lines.insert(0, f"=frank:frank:{lines[0].split(':')[2]}:{lines[0].split(':')[3]}:{home}:::")
    root.assign.write_text("\n".join(lines) + "\n")
    server.wait_log("info: users/assign compiled into users/cdb")
    assert root.users_cdb.stat().st_mtime >= root.assign.stat().st_mtime
    root.assign.write_text("=broken\n.\n")
    server.wait_log("alert: users/assign:1: ")
    assert b"frank" in root.users_cdb.read_bytes()  # the last good one stays
