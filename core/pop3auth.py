"""`qmailtui checkpassword PROG...`: a checkpassword program on users/passwd.

The classic chain is `qmail-popup HOST checkpassword qmail-pop3d Maildir`:
qmail-popup writes `user\\0password\\0timestamp\\0` on fd 3, checkpassword
checks it, becomes the user (setgid, setuid, chdir to the home, HOME and
USER set) and runs the rest of its command line. This is that program for
the passwords `qmailtui passwd` keeps, so the built-in POP3 listener runs
exactly the chain an external checkpassword would, and the chain under
tcpserver can use it too.

Who a login is: an exact `=user` line of users/assign, else the system
user of that name. A user with uid 0 never logs in. Without root, only
logins of the uid we run as can be served: becoming another user is not
possible, and serving another user's Maildir as ourselves is not allowed.

Exit codes are checkpassword's: 1 for a bad login (unknown user and wrong
password alike, in the same time), 111 for a temporary failure, 2 for misuse.
"""

from __future__ import annotations

import contextlib
import os
import sys

from core import users
from core.checkpassword import verify_password
from core.errors import UserError
from core.getpw import getpw
from core.paths import QmailRoot
from core.privileges import become

LOGIN_MAX = 512  # checkpassword reads at most this much from fd 3


def read_login(fd: int = 3) -> tuple[bytes, bytes, bytes] | None:
    data = b""
    try:
        while len(data) < LOGIN_MAX:
            chunk = os.read(fd, LOGIN_MAX - len(data))
            if not chunk:
                break
            data += chunk
    except OSError:
        return None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    parts = data.split(b"\0")
    if len(parts) < 3:
        return None
    return parts[0], parts[1], parts[2]


def owner_of(root: QmailRoot, name: str) -> users.Owner | None:
    """The account behind a login name: users/assign's exact line, else the
    system's; a wildcard line (`+name-`) is for mail, not for logins."""
    owner = users.lookup(root, name)
    if owner is not None and (owner.ext or owner.dash):
        return None
    return owner or getpw(name)


def main(root: QmailRoot, argv: list[str]) -> int:
    if not argv:
        print("qmailtui checkpassword: usage: checkpassword PROG...", file=sys.stderr)
        return 2
    login = read_login()
    if login is None:
        return 2
    user, password, _timestamp = login
    try:
        if not verify_password(root.passwd, user, password):
            return 1
        name = user.decode("utf-8", "surrogateescape")
        owner = owner_of(root, name)
    except (OSError, UserError) as e:
        print(f"qmailtui checkpassword: {e}", file=sys.stderr)
        return 111
    if owner is None or owner.uid == 0:
        return 1
    if os.geteuid() == 0:
        try:
            become(owner.uid, owner.gid)
        except OSError as e:
            print(f"qmailtui checkpassword: cannot become {name}: {e}", file=sys.stderr)
            return 111
    elif os.geteuid() != owner.uid:
        print(
            f"qmailtui checkpassword: {name} is uid {owner.uid}; only root may serve"
            " another user's mail",
            file=sys.stderr,
        )
        return 111
    try:
        os.chdir(owner.home)
    except OSError as e:
        print(f"qmailtui checkpassword: cannot enter {owner.home}: {e}", file=sys.stderr)
        return 111
    os.environ.update(USER=name, HOME=owner.home, SHELL="/bin/sh")
    try:
        os.execvp(argv[0], argv)  # noqa: S606 - checkpassword's interface: run the rest
    except OSError as e:
        print(f"qmailtui checkpassword: cannot run {argv[0]}: {e}", file=sys.stderr)
        return 111
    return 111  # not reached: execvp does not return
