"""qmail-getpw: a local part's owner from the system password database (local.md §4).

Tried after users/assign: the longest prefix of the local part ending at its
end or before a '-', lowercased, that names an account whose uid is not 0 and
whose home directory exists and is owned by that uid.
"""

from __future__ import annotations

import os
import pwd

from core.users import Owner

PREFIX_MAX = 32  # qmail-getpw skips prefixes of 32 characters or more


def _lower(text: str) -> str:
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in text)


def getpw(local: str) -> Owner | None:
    ends = [len(local)] + [i for i in range(len(local) - 1, 0, -1) if local[i] == "-"]
    for end in ends:
        if end >= PREFIX_MAX:
            continue
        name = _lower(local[:end])
        try:
            account = pwd.getpwnam(name)
        except (KeyError, UnicodeEncodeError, ValueError):
            continue
        if account.pw_uid == 0:
            continue
        try:
            st = os.stat(account.pw_dir)
        except OSError:
            continue
        if st.st_uid != account.pw_uid:
            continue
        dash, ext = ("", "") if end == len(local) else ("-", local[end + 1 :])
        return Owner(
            user=account.pw_name,
            uid=account.pw_uid,
            gid=account.pw_gid,
            home=account.pw_dir,
            dash=dash,
            ext=ext,
            source=f"system user {account.pw_name} (password database)",
        )
    return None
