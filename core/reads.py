"""Reads on asyncio transports that do not cost a memory mapping each.

asyncio reads a socket or a pipe into a new bytes object of `max_size` bytes
(256 KB) and then shrinks it to what came. Past malloc's mmap threshold that
is an mmap, an mremap and a munmap for every read, and the munmap of a process
with threads makes the kernel interrupt every CPU it ran on to flush its TLB.
Where what comes is small (SMTP replies, lspawn's report lines), a smaller
read size keeps the buffer on the heap."""

from __future__ import annotations

from typing import Any

SMALL = 1 << 16  # below glibc's smallest mmap threshold (128 KB)


def small_reads(transport: Any, size: int = SMALL) -> None:
    """Make `transport` read at most `size` bytes at a time, where it lets us
    (`max_size` is asyncio's own attribute of its socket and pipe transports:
    without it, nothing changes)."""
    if transport is not None and hasattr(transport, "max_size"):
        transport.max_size = size
