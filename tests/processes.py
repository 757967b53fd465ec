"""The real entry points in subprocesses, every wait bounded.

`qmailtui(root, ...)` runs one command; `serving(root)` runs `qmailtui serve`
until the block ends, then stops it with TERM by its pid (KILL if it does
not go). Commands run in a session of their own: with no controlling
terminal, nothing can stop and ask a question on /dev/tty.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from core.paths import QmailRoot

CLI = (sys.executable, "-m", "qmailtui")
TIMEOUT = 60.0


def qmailtui(
    root: QmailRoot, *args: str, stdin: bytes = b"", timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """`python -m qmailtui ARGS --root ROOT`, text output."""
    return subprocess.run(
        [*CLI, *args, "--root", str(root.path)],
        input=stdin.decode("utf-8", "surrogateescape"),
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
        check=False,
    )


def sendmail_command() -> list[str]:
    """The installed `qmailtui-sendmail` beside this interpreter, else its module."""
    script = Path(sys.executable).parent / "qmailtui-sendmail"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "qmailtui.sendmail"]


@functools.cache
def serve_options() -> tuple[str, ...]:
    """Keep a core off the well-known ports once `serve` can listen at all."""
    result = subprocess.run(
        [*CLI, "serve", "--help"], capture_output=True, text=True, timeout=TIMEOUT, check=True
    )
    options: list[str] = []
    if "--smtp" in result.stdout:
        options += ["--smtp", "127.0.0.1:0"]
    if "--pop3" in result.stdout:
        options += ["--pop3", "off"]
    return tuple(options)


def read_line(stream: object, timeout: float) -> bytes:
    """One line from a pipe, or b"" if none came within `timeout`."""
    fd = stream.fileno()  # type: ignore[attr-defined]
    data = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                break
            chunk = os.read(fd, 1)
            if not chunk:
                break
            data += chunk
    return data


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """TERM the process we started, by its pid; KILL it if it outlives `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise AssertionError(f"pid {proc.pid} ignored TERM for {timeout} s") from None
    return proc.returncode


@contextlib.contextmanager
def launched(argv: Sequence[str], errors: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A program for the block, in a session of its own, its standard output a
    pipe and its standard error appended to `errors`; then stopped by its pid."""
    with open(errors, "ab") as err:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        try:
            stop(proc)
        finally:
            if proc.stdout is not None:
                proc.stdout.close()


@contextlib.contextmanager
def tcpserver_port(
    argv: Sequence[str], errors: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """ucspi-tcp's `tcpserver -1 ...` for the block, and the port it printed."""
    with launched(argv, errors) as proc:
        assert proc.stdout is not None
        port = read_line(proc.stdout, 10)
        assert port.strip().isdigit(), (port, errors.read_text())
        yield proc, int(port)


@contextlib.contextmanager
def serving(
    root: QmailRoot, timeout: float = 30.0, extra: tuple[str, ...] = ()
) -> Iterator[subprocess.Popen[bytes]]:
    """`qmailtui serve --root ROOT`, up (its `ready` line read) for the block;
    the line is kept as `ready_line`, its ports as `ports`.
    With no smtproutes, remote deliveries go to 127.0.0.1:1 and defer at once:
    no test asks the world's DNS unless it routes mail itself."""
    no_world(root)
    errors = root.path.parent / "serve.stderr"
    argv = [*CLI, "serve", "--root", str(root.path), *serve_options(), *extra]
    with launched(argv, errors) as proc:
        assert proc.stdout is not None
        line = read_line(proc.stdout, timeout)
        if not line.startswith(b"ready "):
            raise AssertionError(
                f"serve did not get ready: {line!r}\n{errors.read_text(errors='replace')}"
            )
        proc.ready_line = line  # type: ignore[attr-defined]
        proc.ports = ready_ports(line.decode())  # type: ignore[attr-defined]
        yield proc


def ready_ports(line: str) -> dict[str, int]:
    """{"smtp": PORT, "pop3": PORT} from serve's ready line, for those not off."""
    return {name: int(port) for name, port in re.findall(r"(\w+)=[\d.]+:(\d+)", line)}


def no_world(root: QmailRoot) -> None:
    routes = root.control_file("smtproutes")
    if not routes.exists():
        routes.write_text(":127.0.0.1:1\n")


def wait_until(what: Callable[[], bool], timeout: float, message: str, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s: {message}")
        time.sleep(step)


def qstat(root: QmailRoot) -> tuple[int, int]:
    result = qmailtui(root, "qstat")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("messages in queue: "), result.stdout
    assert lines[1].startswith("messages in queue but not yet preprocessed: "), result.stdout
    return int(lines[0].rsplit(" ", 1)[1]), int(lines[1].rsplit(" ", 1)[1])


def add_maildir_user(root: QmailRoot, name: str) -> Path:
    """`=name:name:UID:GID:HOME:::` with a Maildir in HOME, compiled by `qmailtui newu`.

    As root the user is nobody (qmail never delivers as root) and owns HOME.
    """
    home = root.path.parent / "home" / name
    home.mkdir(parents=True)
    result = qmailtui(root, "maildirmake", str(home / "Maildir"))
    assert result.returncode == 0, result.stderr
    uid, gid = (65534, 65534) if os.getuid() == 0 else (os.getuid(), os.getgid())
    if os.getuid() == 0:
        for directory, _, names in os.walk(home):
            os.chown(directory, uid, gid)
            for n in names:
                os.chown(Path(directory) / n, uid, gid)
    lines = [line for line in root.assign.read_text().splitlines() if line != "."]
    lines.append(f"={name}:{name}:{uid}:{gid}:{home}:::")
    root.assign.write_text("\n".join(lines) + "\n.\n")
    result = qmailtui(root, "newu")
    assert result.returncode == 0, result.stderr
    return home / "Maildir"


def maildir_files(maildir: Path) -> list[Path]:
    return sorted(p for sub in ("new", "cur") for p in (maildir / sub).iterdir() if p.is_file())
