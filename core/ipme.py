"""This host's IP addresses, as qmail's ipme lists them: the addresses of its
interfaces (127.0.0.1, not all of 127/8), plus 0.0.0.0.

qmail asks the kernel with SIOCGIFCONF; Linux lists the same addresses as the
"/32 host LOCAL" entries of /proc/net/fib_trie, which needs no ioctl buffer
juggling. Elsewhere, or if /proc is not mounted, the loopback address and the
addresses the host name resolves to stand in.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from pathlib import Path

FIB_TRIE = Path("/proc/net/fib_trie")


def _from_fib_trie(text: str) -> set[str]:
    found: set[str] = set()
    previous = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|-- "):
            previous = stripped[4:]
        elif stripped == "/32 host LOCAL" and previous:
            found.add(previous)
    return found


def _fallback() -> set[str]:
    found = {"127.0.0.1"}
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            found.add(str(info[4][0]))
    except OSError:
        pass
    return found


@functools.cache
def addresses() -> frozenset[str]:
    """Cached for the process: interfaces rarely change, and qmail-smtpd too reads
    them once per connection at most."""
    try:
        found = _from_fib_trie(FIB_TRIE.read_text())
    except OSError:
        found = set()
    if not found:
        found = _fallback()
    valid = set()
    for text in found:
        try:
            valid.add(str(ipaddress.IPv4Address(text)))
        except ValueError:
            continue
    return frozenset(valid | {"0.0.0.0"})  # noqa: S104 - qmail counts 0.0.0.0 as local


def is_me(address: str) -> bool:
    return address in addresses()
