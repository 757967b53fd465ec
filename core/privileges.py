"""Becoming another user for good, as qmail's programs do before they touch a
user's files or a byte from the network."""

from __future__ import annotations

import os


def become(uid: int, gid: int) -> None:
    """This uid and gid with no supplementary groups, real, effective and saved
    alike. Raises PermissionError rather than go on as root."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise PermissionError("refusing to run as root")
