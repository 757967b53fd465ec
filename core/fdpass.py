"""Records and descriptors over Unix sockets: what lspawn, its uid workers and
the SMTP workers pass to each other (SCM_RIGHTS)."""

from __future__ import annotations

import array
import socket

INT = array.array("i").itemsize


def descriptors(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors an SCM_RIGHTS message carried (a truncated one's whole ones)."""
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", data[: len(data) - len(data) % INT]))
    return fds


class Records:
    """SOCK_SEQPACKET records read into one buffer kept for the socket.

    socket.recv(n) and socket.recv_fds(sock, n, ...) allocate n bytes for every
    record: for a limit of a megabyte that is an mmap, an mremap and a munmap
    per delivery. The buffer here is allocated once; its pages are touched
    only as far as records reach."""

    def __init__(self, sock: socket.socket, size: int) -> None:
        self.sock = sock
        self._buffer = bytearray(size)
        self._view = memoryview(self._buffer)

    def recv(self) -> bytes:
        """The next record; b"" at the end."""
        n = self.sock.recv_into(self._buffer)
        return bytes(self._view[:n])

    def recv_fds(self, maxfds: int) -> tuple[bytes, list[int]]:
        """The next record and the descriptors it carries (at most `maxfds`)."""
        n, ancillary, _, _ = self.sock.recvmsg_into([self._buffer], socket.CMSG_SPACE(maxfds * INT))
        return bytes(self._view[:n]), descriptors(ancillary)
