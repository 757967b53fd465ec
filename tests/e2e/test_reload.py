"""Live reload: edits to the configuration reach a running `qmailtui serve`
without a signal, however the editor saves, and a bad edit changes nothing."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from core.paths import QmailRoot
from tests.e2e.conftest import Server, qmailtui

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def remote_max(root: QmailRoot) -> int:
    done = qmailtui("queue", "destinations", "--json", root=root)
    assert done.returncode == 0, done.stderr
    return int(json.loads(done.stdout)["concurrency"]["remote_max"])


def wait_for(what: object, expected: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(1000):
        got = what()  # type: ignore[operator]
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert got == expected


def save_by_rename(path: os.PathLike[str], text: str) -> None:
    """What vim and most editors do: a new file renamed over the old one."""
    tmp = f"{os.fspath(path)}.swp~"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def test_an_edit_saved_in_place_or_by_rename_applies_within_seconds(
    root: QmailRoot, server: Server
) -> None:
    path = root.control_file("concurrencyremote")
    assert remote_max(root) == 20
    path.write_text("7\n")
    wait_for(lambda: remote_max(root), 7)
    save_by_rename(path, "9\n")
    wait_for(lambda: remote_max(root), 9)
    for n in range(5):  # a burst of writes: one reload once they stop
        path.write_text(f"{11 + n}\n")
    wait_for(lambda: remote_max(root), 15)
    log = server.log()
    assert "info: changed: control/concurrencyremote" in log
    assert "listening for SMTP" not in log  # a reload keeps the listener it has


def test_a_bad_edit_is_refused_and_the_old_value_stays(root: QmailRoot, server: Server) -> None:
    path = root.control_file("concurrencyremote")
    path.write_text("5\n")
    wait_for(lambda: remote_max(root), 5)
    path.write_text("abc\n")
    server.wait_log("alert: control/concurrencyremote:1: error: not a number: 'abc'")
    assert remote_max(root) == 5


def test_a_tcp_rules_edit_denies_new_connections(root: QmailRoot, server: Server) -> None:
    port = int(server.ready.split("smtp=")[1].split()[0].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as before:
        assert before.recv(100).startswith(b"220 ")
    (root.etc / "tcp.smtp").write_text("127.0.0.1:deny\n")
    server.wait_log("info: configuration reloaded")

    def refused() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as after:
            return after.recv(100) == b""

    wait_for(refused, True)
    (root.etc / "tcp.smtp").write_text("127.0.0.1:deny\n:allow,\n")  # a syntax error
    server.wait_log("etc/tcp.smtp:2: ")
    assert refused()  # the last good rules stay
