"""Real processes: `qmailtui serve` started and stopped by its pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.paths import QmailRoot
from tests.processes import no_world, serve_options


def qmailtui(
    *args: str,
    root: QmailRoot,
    stdin: bytes = b"",
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "qmailtui", "--root", str(root.path), *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


class Server:
    def __init__(self, root: QmailRoot) -> None:
        self.root = root
        no_world(root)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qmailtui", "serve", "--root", str(root.path), *serve_options()],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        self.ready = self.proc.stdout.readline().decode()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        path = self.root.log / "current"
        return path.read_text() if path.exists() else ""

    def wait_log(self, text: str, limit: float = 10.0) -> str:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            time.sleep(0.02)
        raise AssertionError(f"{text!r} not logged within {limit}s:\n{self.log()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise


@pytest.fixture
def server(root: QmailRoot) -> Iterator[Server]:
    s = Server(root)
    try:
        assert s.ready.startswith("ready "), s.proc.stderr.read().decode() if s.proc.stderr else ""
        yield s
    finally:
        s.stop()
        if s.proc.stdout:
            s.proc.stdout.close()
        if s.proc.stderr:
            s.proc.stderr.close()


def make_user(root: QmailRoot, name: str, maildir: bool = True) -> Path:
    """An assigned user with a home (and a Maildir). As root the user is nobody,
    who owns the home, since qmail never delivers as root."""
    from core import users
    from core.setup import maildirmake

    home = root.path.parent / "home" / name
    home.mkdir(parents=True, mode=0o700)
    if maildir:
        maildirmake(home / "Maildir")
    uid, gid = (65534, 65534) if os.getuid() == 0 else (os.getuid(), os.getgid())
    if os.getuid() == 0:
        for directory, _, names in os.walk(home):
            os.chown(directory, uid, gid)
            for n in names:
                os.chown(Path(directory) / n, uid, gid)
    lines = root.assign.read_text().splitlines()[:-1]
    lines.append(f"={name}:{name}:{uid}:{gid}:{home}:::")
    root.assign.write_text("\n".join(lines) + "\n.\n")
    assert not any(p.is_error for p in users.newu(root))
    return home
