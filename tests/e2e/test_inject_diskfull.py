"""A full disk while injecting: exit 111 with qmail's one line, and the queue
exactly as it was (spec/queue.md §6.1 step 4: a write error removes what was made).

Two ways to fill the disk: RLIMIT_FSIZE (writes fail with EFBIG, anywhere),
and a small tmpfs (a real ENOSPC; needs root to mount, skipped otherwise).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from core.paths import QmailRoot
from core.setup import init_root
from tests.processes import CLI, TIMEOUT, qmailtui, sendmail_command
from tests.queue_faults import queue_files

pytestmark = pytest.mark.slow

LIMIT = 64 * 1024
RCPT = "rcpt@mx.example.org"


def small_message(n: int) -> bytes:
    return f"From: a@b.test\nTo: {RCPT}\nSubject: earlier {n}\n\nkept {n}\n".encode()


def big_message(size: int) -> bytes:
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcd\n"
    return b"From: a@b.test\nSubject: big\n\n" + line * (size // len(line) + 1)


def inject_command(entry: str, root: QmailRoot) -> list[str]:
    if entry == "inject":
        return [*CLI, "inject", "--root", str(root.path), RCPT]
    return [*sendmail_command(), "--root", str(root.path), RCPT]


def run_inject(
    entry: str, root: QmailRoot, message: bytes, preexec: Callable[[], None] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        inject_command(entry, root),
        input=message,
        capture_output=True,
        timeout=TIMEOUT,
        preexec_fn=preexec,
        start_new_session=True,
        check=False,
    )


def file_size_limit() -> None:
    """In the child: writes past LIMIT bytes fail with EFBIG instead of killing it."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def queue_some(root: QmailRoot, count: int) -> None:
    for n in range(count):
        result = qmailtui(root, "inject", RCPT, stdin=small_message(n))
        assert result.returncode == 0, result.stderr


def assert_failed_like_qmail(result: subprocess.CompletedProcess[bytes]) -> None:
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 111, stderr
    assert stderr.count("\n") == 1, stderr
    assert "qq write error or disk full" in stderr
    assert "Traceback" not in stderr


def assert_unchanged(before: dict[str, bytes], after: dict[str, bytes]) -> None:
    """Same files, same bytes; only the id counter may have moved on."""
    assert sorted(after) == sorted(before)
    changed = [name for name in before if before[name] != after[name]]
    assert changed in ([], ["lock/nextid"])


@pytest.mark.parametrize("entry", ["inject", "sendmail"])
def test_a_write_error_exits_111_and_leaves_the_queue_as_it_was(
    root: QmailRoot, entry: str
) -> None:
    queue_some(root, 3)
    before = queue_files(root)
    result = run_inject(entry, root, big_message(4 * LIMIT), file_size_limit)
    assert_failed_like_qmail(result)
    assert_unchanged(before, queue_files(root))


def test_a_message_under_the_limit_still_goes_in(root: QmailRoot) -> None:
    result = run_inject("inject", root, small_message(9), file_size_limit)
    assert result.returncode == 0, result.stderr


# -- a real full file system ----------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs of our own, unmounted afterwards; skip where mounting is not allowed."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True, timeout=TIMEOUT, check=False)


def fill(directory: Path) -> None:
    """Take every free block of the file system holding `directory`."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(10_000):  # bounded: 40 MiB at most, far past the 1 MiB tmpfs
            try:
                os.write(fd, b"\0" * 4096)
            except OSError:
                break
    finally:
        os.close(fd)


@pytest.mark.parametrize("entry", ["inject", "sendmail"])
def test_enospc_exits_111_and_leaves_the_queue_as_it_was(tmpfs: Path, entry: str) -> None:
    root = init_root(tmpfs / "qmail", me="mx.example.org")
    queue_some(root, 3)
    before = queue_files(root)
    result = run_inject(entry, root, big_message(2 * 1024 * 1024))
    assert_failed_like_qmail(result)
    assert_unchanged(before, queue_files(root))


def test_enospc_on_a_fresh_queue_is_the_same_one_line(tmpfs: Path) -> None:
    """No message queued yet: the id counter itself cannot be written."""
    root = init_root(tmpfs / "qmail", me="mx.example.org")
    fill(tmpfs)
    result = run_inject("inject", root, small_message(0))
    assert_failed_like_qmail(result)
    left = queue_files(root)
    assert left in ({}, {"lock/nextid": b""})  # an empty counter reads as "rebuild"


def test_after_enospc_the_next_message_goes_in_once_there_is_room(tmpfs: Path) -> None:
    root = init_root(tmpfs / "qmail", me="mx.example.org")
    queue_some(root, 1)
    fill(tmpfs)
    assert_failed_like_qmail(run_inject("inject", root, small_message(1)))
    (tmpfs / "filler").unlink()
    result = run_inject("inject", root, small_message(2))
    assert result.returncode == 0, result.stderr
    assert len([n for n in queue_files(root) if n.startswith("todo/")]) == 2
