"""Reading the queued message through an open descriptor, as a uid worker gets
it: the loop check and the copy must give what reading it as a file gives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.local import is_looping
from core.maildir import COPY_CHUNK, _copy

DT = b"Delivered-To: alice@example.org\n"

MESSAGES = {
    "in the header": b"Subject: a\n" + DT + b"\nbody\n",
    "first line": DT + b"\nbody\n",
    "only in the body": b"Subject: a\n\n" + DT,
    "no header at all": b"\n" + DT,
    "header without body": b"Subject: a\n" + DT,
    "last line of one byte": b"Subject: a\nx",
    "after a one-byte last line": b"x",
    "CRLF lines are not blank": b"Subject: a\r\n\r\n" + DT,
    "empty": b"",
    "header past the first read": b"X: " + b"y" * COPY_CHUNK + b"\n" + DT + b"\nbody\n",
    "blank line right at the read's end": b"X: " + b"y" * (COPY_CHUNK - 5) + b"\n\n" + DT,
}


@pytest.mark.parametrize("data", list(MESSAGES.values()), ids=list(MESSAGES))
def test_the_loop_check_on_a_descriptor_agrees_with_reading_lines(
    tmp_path: Path, data: bytes
) -> None:
    path = tmp_path / "mess"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 7, os.SEEK_SET)  # wherever the descriptor was left
        assert is_looping(fd, DT) == is_looping(path, DT)
    finally:
        os.close(fd)
    expected = False
    for line in data.splitlines(keepends=True):
        if len(line) <= 1:
            break
        if line == DT:
            expected = True
            break
    assert is_looping(path, DT) == expected


@pytest.mark.parametrize("size", [0, 1, 5000, COPY_CHUNK, 3 * COPY_CHUNK + 17])
@pytest.mark.parametrize("elsewhere", [False, True], ids=["same file system", "to /dev/shm"])
def test_copying_from_a_descriptor_gives_the_whole_message_after_the_header(
    tmp_path: Path, size: int, elsewhere: bool
) -> None:
    if elsewhere and not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    data = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    source = tmp_path / "mess"
    source.write_bytes(data)
    out_dir = Path("/dev/shm") if elsewhere else tmp_path
    out = out_dir / f"qmailtui-copy-{os.getpid()}-{size}"
    src = os.open(source, os.O_RDONLY)
    dst = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.lseek(src, size // 2, os.SEEK_SET)
        os.write(dst, b"Return-Path: <>\n")
        _copy(dst, src)
        os.close(dst)
        dst = -1
        assert out.read_bytes() == b"Return-Path: <>\n" + data
    finally:
        os.close(src)
        if dst >= 0:
            os.close(dst)
        out.unlink()
