"""A session on two file descriptors, as tcpserver or inetd hands one over:
the reading and writing that `qmailtui smtpd`, `popup` and `pop3d` share."""

from __future__ import annotations

import os
import select


def write_all(fd: int, data: bytes | bytearray, timeout: float | None = None) -> bool:
    """Everything written; False if the other end went away (or, with a
    timeout, took no more for that long)."""
    view = memoryview(data)
    while view:
        if timeout is not None:
            try:
                _, ready, _ = select.select([], [fd], [], timeout)
            except (InterruptedError, OSError):
                return False
            if not ready:
                return False
        try:
            view = view[os.write(fd, view) :]
        except OSError:
            return False
    return True


class Descriptors:
    """The client on two file descriptors."""

    def __init__(
        self, infd: int, outfd: int, timeout: float, write_timeout: float | None = None
    ) -> None:
        self.infd, self.outfd, self.timeout = infd, outfd, timeout
        self.write_timeout = write_timeout

    def send(self, data: bytes | bytearray) -> bool:
        return write_all(self.outfd, data, self.write_timeout)

    def recv(self) -> bytes | None:
        """What came in; b"" at the end or on an error; None after `timeout` idle."""
        try:
            ready, _, _ = select.select([self.infd], [], [], self.timeout)
        except (InterruptedError, OSError):
            return b""
        if not ready:
            return None
        try:
            return os.read(self.infd, 65536)
        except OSError:
            return b""
