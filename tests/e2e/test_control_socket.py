"""The control socket of a running `qmailtui serve`, driven as a console
would: raw JSON lines, the event stream, configuration edits, garbage."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest

from core.paths import QmailRoot
from tests.e2e.conftest import Server, make_user, qmailtui

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


class Raw:
    def __init__(self, root: QmailRoot) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(20)
        self.sock.connect(str(root.control_socket))
        self.stream = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        self.send(json.dumps({"v": 1, "id": 1, "op": op, "args": args}).encode() + b"\n")
        return self.read()

    def read(self) -> dict[str, Any]:
        line = self.stream.readline()
        assert line, "the core closed the connection"
        return dict(json.loads(line))

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


def inject(root: QmailRoot, *rcpts: str) -> None:
    done = qmailtui("inject", *rcpts, root=root, stdin=b"Subject: t\n\nhi\n")
    assert done.returncode == 0, done.stderr


def test_a_subscriber_sees_a_message_arrive_be_delivered_and_leave(
    root: QmailRoot, server: Server
) -> None:
    make_user(root, "alice")
    raw = Raw(root)
    assert raw.call("subscribe")["result"] == {"subscribed": "all"}
    inject(root, "alice@mx.example.org")
    kinds: list[str] = []
    deadline = time.monotonic() + 20
    while "removed" not in kinds and time.monotonic() < deadline:
        event = raw.read()
        kinds.append(event["event"])
        if event["event"] == "delivery-finished":
            assert event["data"]["result"] == "K"
            assert event["data"]["recipient"] == "alice@mx.example.org"
    raw.close()
    for kind in ("queued", "delivery-started", "delivery-finished", "removed", "log"):
        assert kind in kinds, kinds
    assert kinds.index("queued") < kinds.index("delivery-started") < kinds.index("removed")


def test_a_subscriber_that_does_not_read_does_not_hold_up_the_core(
    root: QmailRoot, server: Server
) -> None:
    make_user(root, "alice")
    slow = Raw(root)
    assert slow.call("subscribe", kinds=["queued", "removed"], queue=10)["ok"]
    for _ in range(30):
        inject(root, "alice@mx.example.org")
    deadline = time.monotonic() + 30
    while qmailtui("queue", "list", "--json", root=root).stdout.strip():
        assert time.monotonic() < deadline, "the queue did not drain"
        time.sleep(0.1)
    first = slow.read()  # only the kinds asked for, or the marker of a loss
    assert first["event"] in ("queued", "removed", "lagged")
    slow.close()


def test_garbage_and_huge_lines_get_an_error_and_the_core_goes_on(
    root: QmailRoot, server: Server
) -> None:
    for junk in (b"not json\n", b"[1, 2]\n", b'{"v": 9, "op": "ping", "args": {}}\n'):
        raw = Raw(root)
        raw.send(junk)
        reply = raw.read()
        assert reply["ok"] is False
        assert reply["error"]["code"] == "bad-request"
        assert raw.stream.readline() == b""  # and disconnected
        raw.close()
    raw = Raw(root)
    try:
        raw.send(b"x" * (2 << 20) + b"\n")
        reply = raw.read()
        assert reply["error"]["code"] == "too-long"
    except (BrokenPipeError, ConnectionResetError):
        pass  # it hung up while we were still sending: as good
    raw.close()
    raw = Raw(root)
    assert raw.call("ping")["result"]["version"] == 1
    assert raw.call("no-such-op")["error"]["code"] == "unknown-op"
    raw.close()


def test_validate_and_write_config_over_the_socket(root: QmailRoot, server: Server) -> None:
    raw = Raw(root)
    bad = raw.call("validate", path="control/concurrencyremote", content="abc\n")["result"]
    assert bad["ok"] is False
    assert bad["problems"][0]["line"] == 1
    assert "not a number" in bad["problems"][0]["text"]
    assert not root.control_file("concurrencyremote").exists()  # nothing written to check
    refused = raw.call("write-config", path="control/concurrencyremote", content="abc\n")
    assert refused["result"]["written"] is False
    done = raw.call("write-config", path="control/concurrencyremote", content="3\n")["result"]
    assert done["written"] is True
    assert "+3" in done["diff"]
    assert done["reload"]["ok"] is True
    assert raw.call("snapshot")["result"]["concurrency"]["remote"]["max"] == 3
    for path in ("../queue/lock/trigger", "queue/mess/0/1", "control/../etc/x", "/etc/passwd"):
        answer = raw.call("write-config", path=path, content="x\n")
        assert answer["ok"] is False, path
        assert answer["error"]["code"] == "bad-request"
    rules = raw.call("write-config", path="etc/tcp.smtp", content="127.0.0.1:allow,X\n")
    assert rules["result"]["written"] is False
    assert rules["result"]["problems"][0]["line"] == 1
    raw.close()


def test_the_command_line_twins(root: QmailRoot, server: Server) -> None:
    bad = qmailtui("validate", "control/databytes", root=root, stdin=b"lots\n")
    assert bad.returncode == 1
    assert b"control/databytes:1: error:" in bad.stdout
    good = qmailtui("write-config", "control/databytes", root=root, stdin=b"1000000\n")
    assert good.returncode == 0, good.stderr
    assert b"+1000000" in good.stdout
    assert root.control_file("databytes").read_text() == "1000000\n"
    again = qmailtui("reload", root=root)
    assert again.returncode == 0
    assert b"configuration reloaded" in again.stdout
    snap = json.loads(qmailtui("snapshot", root=root).stdout)
    assert snap["running"] is True
    assert snap["config"]["ok"] is True


def test_retry_hold_release_and_delete_as_ops_of_their_own(root: QmailRoot, server: Server) -> None:
    (root.control / "smtproutes").write_text(":127.0.0.1:1\n")
    inject(root, "someone@far.test")
    raw = Raw(root)
    deadline = time.monotonic() + 20
    while (
        not (page := raw.call("list")["result"]["messages"])
        or not page[0]["recipients"][0]["attempts"]
    ):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    msgid = page[0]["id"]
    dry = raw.call("delete", ids=[msgid], dry_run=True)["result"]
    assert dry["dry_run"] is True
    assert dry["done"] == []
    assert raw.call("hold", ids=[msgid])["result"]["done"] == [msgid]
    assert raw.call("retry", ids=[msgid])["result"]["skipped"] == {
        str(msgid): "held: release it first"
    }
    assert raw.call("release", filter={"domain": "far.test"})["result"]["done"] == [msgid]
    assert raw.call("delete", ids=[msgid])["result"]["done"] == [msgid]
    assert raw.call("list")["result"]["total"] == 0
    raw.close()


def test_a_control_group_gets_a_0660_socket(root: QmailRoot) -> None:
    import os
    import stat

    from tests.processes import serving

    gid = os.getgid()
    with serving(root, extra=("--control-group", str(gid))):
        st = root.control_socket.stat()
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == gid
    refused = qmailtui("serve", "--control-group", "no-such-group-here", root=root)
    assert refused.returncode == 2
    assert b"--control-group no-such-group-here: no such group" in refused.stderr
    assert b"Traceback" not in refused.stderr
    bad = qmailtui("serve", "--smtp", "nonsense", root=root)
    assert (bad.returncode, bad.stderr) == (
        2,
        b"qmailtui: --smtp nonsense: expected ADDRESS:PORT (or off)\n",
    )


def test_qmailtui_events_follows_the_core(root: QmailRoot, server: Server) -> None:
    import subprocess
    import sys

    from tests.processes import read_line, stop

    follower = subprocess.Popen(
        [sys.executable, "-m", "qmailtui", "--root", str(root.path), "events", "--kinds", "queued"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert follower.stdout is not None
        line = b""
        for _ in range(10):  # until the follower has subscribed and sees one
            inject(root, "root@mx.example.org")
            line = read_line(follower.stdout, 2)
            if line:
                break
        event = json.loads(line)
        assert event["event"] == "queued"
        assert event["data"]["sender"].endswith("@mx.example.org")
    finally:
        stop(follower)
        if follower.stdout is not None:
            follower.stdout.close()
