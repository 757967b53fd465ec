"""Records read into one kept buffer must be the records sent, each whole and
with its descriptors, however their sizes follow each other."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from core.fdpass import Records


def test_records_of_every_size_come_whole_and_in_order() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        records = Records(ours, 1 << 16)
        sizes = [1, 5000, 3, 1 << 16, 0, 17]
        for size in sizes:
            theirs.send(bytes([size % 251]) * size)
            got = records.recv()
            assert got == bytes([size % 251]) * size  # a short one after a long one: no tail
        theirs.close()
        assert records.recv() == b""


def test_descriptors_arrive_with_their_record(tmp_path: Path) -> None:
    path = tmp_path / "message"
    path.write_bytes(b"the message\n")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = os.open(path, os.O_RDONLY)
    try:
        with ours, theirs:
            records = Records(ours, 1024)
            socket.send_fds(theirs, [b'{"n": 1}'], [fd])
            theirs.send(b"no descriptor")
            data, fds = records.recv_fds(1)
            assert data == b'{"n": 1}'
            assert len(fds) == 1
            assert os.pread(fds[0], 100, 0) == b"the message\n"
            os.close(fds[0])
            assert records.recv_fds(1) == (b"no descriptor", [])
    finally:
        os.close(fd)
