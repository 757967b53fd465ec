"""The timeout table (qmail's tcpto.c, spec/remote.md §7), in qmail's own file
format at queue/lock/tcpto, so that what `qmail-tcpto` would print and what
we print agree, and a table qmail left behind reads the same.

Only connect *timeouts* count: a host that refuses is answering, so it is
not down. After two counted timeouts at least two minutes apart, with no
success between, an address is skipped for (60 + pid mod 32) x 64 seconds.
The core is the only writer; each call opens the file, locks it, and writes
back at most one 16-byte record, as tcpto.c does. Any trouble with the file
means "not down": the table is advice, never a reason to fail a delivery.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import struct
from dataclasses import dataclass
from pathlib import Path

SIZE = 1024
RECORD = 16
MAX_COUNT = 10
RECOUNT_AFTER = 120  # seconds: a timeout sooner after the last counted one is ignored


@dataclass(frozen=True, slots=True)
class Entry:
    ip: str
    count: int
    when: int  # Unix seconds of the last counted timeout
    down_until: float | None  # None: not skipped now


def _packed(ip: str) -> bytes | None:
    try:
        return ipaddress.IPv4Address(ip).packed
    except ValueError:
        return None


class Table:
    def __init__(self, path: Path, pid: int | None = None) -> None:
        self.path = path
        self.window = (60 + ((os.getpid() if pid is None else pid) & 31)) << 6

    def clear(self) -> None:
        """qmail-rspawn at start, and qmail-tcpok: every host may be tried again."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.pwrite(fd, bytes(SIZE), 0)
            os.ftruncate(fd, SIZE)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _open(self) -> tuple[int, bytearray] | None:
        """The locked descriptor and the whole records read, or None."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = bytearray(os.pread(fd, SIZE, 0))
        except OSError:
            os.close(fd)
            return None
        usable = len(data) - len(data) % RECORD
        if not usable:
            os.close(fd)
            return None
        return fd, data[:usable]

    def _down_until(self, record: bytes | bytearray) -> float | None:
        count = record[4]
        (when,) = struct.unpack_from("<I", record, 8)
        if count >= 2:
            return float(when + self.window)
        return None

    def down_until(self, ip: str, now: float) -> float | None:
        """When the address may be tried again, if it is skipped now."""
        packed = _packed(ip)
        opened = self._open() if packed is not None else None
        if opened is None or packed is None:
            return None
        fd, data = opened
        os.close(fd)
        for i in range(0, len(data), RECORD):
            if data[i : i + 4] == packed:
                until = self._down_until(data[i : i + RECORD])
                # tcpto.c compares now - when < window, in whole seconds
                return until if until is not None and int(now) < until else None
        return None

    def record(self, ip: str, timed_out: bool, now: float) -> None:
        """A connect attempt ended: a timeout counts, anything else clears."""
        packed = _packed(ip)
        opened = self._open() if packed else None
        if opened is None:
            return
        fd, data = opened
        try:
            slot = self._slot(data, packed or b"", timed_out, int(now))
            if slot is not None:
                os.pwrite(fd, bytes(data[slot : slot + RECORD]), slot)
        except OSError:
            pass
        finally:
            os.close(fd)

    @staticmethod
    def _slot(data: bytearray, packed: bytes, timed_out: bool, now: int) -> int | None:
        """Change `data` as tcpto_err does; the offset of the changed record."""
        n = len(data)
        for i in range(0, n, RECORD):
            if data[i : i + 4] != packed:
                continue
            if not timed_out:
                if data[i + 4] == 0:
                    return None
                data[i + 4] = 0
                return i
            (last,) = struct.unpack_from("<I", data, i + 8)
            if data[i + 4] and now < RECOUNT_AFTER + last:
                return None
            data[i + 4] = min(data[i + 4] + 1, MAX_COUNT)
            struct.pack_into("<I", data, i + 8, now & 0xFFFFFFFF)
            return i
        if not timed_out:
            return None
        free = next((i for i in range(0, n, RECORD) if data[i + 4] == 0), None)
        if free is None:  # the record whose timeouts matter least
            free = min(
                range(0, n, RECORD),
                key=lambda i: struct.unpack_from("<I", data, i + 8)[0] + (data[i + 4] << 10),
            )
        data[free : free + RECORD] = (
            packed + bytes(4) + struct.pack("<I", now & 0xFFFFFFFF) + bytes(4)
        )
        data[free + 4] = 1
        return free

    def entries(self, now: float) -> list[Entry]:
        """Every record with a count, as qmail-tcpto lists them."""
        opened = self._open()
        if opened is None:
            return []
        fd, data = opened
        os.close(fd)
        out = []
        for i in range(0, len(data), RECORD):
            record = data[i : i + RECORD]
            if record[4] == 0:
                continue
            (when,) = struct.unpack_from("<I", record, 8)
            until = self._down_until(record)
            out.append(
                Entry(
                    str(ipaddress.IPv4Address(bytes(record[:4]))),
                    record[4],
                    when,
                    until if until is not None and int(now) < until else None,
                )
            )
        return out


def describe(entry: Entry, now: float) -> str:
    """qmail-tcpto's line for one record."""
    ago = int(now) - entry.when
    return f"{entry.ip} timed out {ago} seconds ago; # recent timeouts: {entry.count}"
