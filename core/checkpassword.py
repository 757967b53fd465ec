"""checkpassword: an external checker on fd 3, or users/passwd checked here.

`run_checkpassword` is qmail-popup's doanddie() (`spawn_checkpassword` and
`wait_exit` the same in two halves, for an event loop): the program gets
`user\\0password\\0timestamp\\0` on fd 3 (spec/pop3.md §3) and answers with its
exit code: 0 accepted (it has then run its own arguments, normally pop3d,
as the user), 1 refused, 2 misused, 111 temporary trouble; killed by a signal,
a negative code.

The built-in store is users/passwd, one `user:HASH` a line (INTERFACE.md),
HASH being `scrypt$n=N,r=R,p=P$SALT$DIGEST` (standard base64): scrypt costs
every guess 16 MiB and tens of milliseconds, and a random salt per user makes
equal passwords look different. Blank lines and lines starting with `#` are
kept as they are. A user who is not there costs the same scrypt as a wrong
password (against DUMMY), so timing does not tell who has an account.

APOP is not supported by the store: APOP's digest is MD5(timestamp +
password), which can only be checked with the password in the clear, and
keeping clear passwords is what a hash store is for not doing. An APOP login
checked here always fails, at the cost of a wrong password. An external
checkpassword program that keeps clear secrets can still do APOP.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import select
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from core.durable import replace_file
from core.errors import Problem, UserError, os_reason

FD = 3  # checkpassword reads the login here
SCHEME = "scrypt"
N, R, P = 2**14, 8, 1  # 16 MiB of memory per check (128 * N * R)
SALT_BYTES = 16
DIGEST_BYTES = 32
MAXMEM = 64 * 1024 * 1024  # hashlib's default (32 MiB) refuses a stored n=2**15
LOCK_WAIT = 10.0  # seconds set_password waits for another writer of users/
HASH = re.compile(rb"scrypt\$n=(\d{1,10}),r=(\d{1,4}),p=(\d{1,4})\$([^$]*)\$([^$]*)")
NAME = re.compile(rb"[^:\s#][^:\s]*")  # a user name: no ':', no white space, no leading '#'


# -- an external checkpassword program ------------------------------------------------


def run_checkpassword(
    argv: Sequence[str],
    user: bytes | str,
    password: bytes | str,
    timestamp: bytes | str,
    env: Mapping[str, str],
    *,
    stdin: int | None = None,
    stdout: int | None = None,
    timeout: float | None = None,
) -> int:
    """Run `argv` with the login on fd 3 and wait: its exit code.

    fd 0 and 1 are `stdin` and `stdout` (/dev/null when not given; the stdio
    `qmailtui popup` passes its own 0 and 1 so that the program's child serves
    the session, as under qmail-popup); fd 2 is inherited ([nq1.08]). A program
    that cannot be executed counts as exit 1, as qmail-popup's child does
    `_exit(1)` when execvp fails. After `timeout` seconds the program is
    killed (qmail waits for ever) and the answer is -SIGKILL.
    """
    login = _bytes(user) + b"\0" + _bytes(password) + b"\0" + _bytes(timestamp) + b"\0"
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        pid = spawn_checkpassword(argv, login, env, stdin=stdin, stdout=stdout)
    except OSError:
        return 1
    if deadline is not None and not _exits_by(pid, deadline):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return _reap(pid)


def spawn_checkpassword(
    argv: Sequence[str],
    login: bytes,
    env: Mapping[str, str],
    connection: int | None = None,
    *,
    stdin: int | None = None,
    stdout: int | None = None,
) -> int:
    """Start `argv` with `login` (`Login.fd3()`) waiting on its fd 3; its pid,
    for `wait_exit`. OSError when it cannot be started.

    `connection` is the program's fd 0 and fd 1 both (a socket to the client),
    unless `stdin` or `stdout` say otherwise; /dev/null for what none names.
    The login is in the pipe before the program starts, so nothing here ever
    blocks. A pipe holds 64 KiB; a checkpassword reads at most 512 bytes and
    the command line limit keeps logins far shorter, so anything past what
    the pipe takes is left out rather than waited for.
    """
    r, w = os.pipe()
    try:
        _offer(w, login)
        os.close(w)
        w = -1
        return _spawn(
            argv,
            env,
            r,
            stdin if stdin is not None else connection,
            stdout if stdout is not None else connection,
        )
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


async def wait_exit(pid: int) -> int:
    """The exit code of a child from `spawn_checkpassword`, without blocking
    the event loop (negative: killed by that signal). If the wait is cancelled
    the child is still reaped, by a thread, whenever it ends."""
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # an old kernel
        return await asyncio.shield(asyncio.to_thread(_reap, pid))
    ended: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        await ended
    except asyncio.CancelledError:
        threading.Thread(target=_reap, args=(pid,), daemon=True).start()
        raise
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    return _reap(pid)


def _spawn(
    argv: Sequence[str], env: Mapping[str, str], r: int, stdin: int | None, stdout: int | None
) -> int:
    """posix_spawn with fd 3 the pipe: unlike subprocess it can put a descriptor
    at a chosen number without a pre-exec hook (unsafe in a threaded server).
    Every source is first copied above 9 (close-on-exec), so no dup2 overwrites
    another's source."""
    copies: list[int] = []

    def high(fd: int) -> int:
        copies.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10))
        return copies[-1]

    try:
        null = os.open(os.devnull, os.O_RDWR)
        copies.append(null)
        actions: list[tuple[int, ...]] = [
            (os.POSIX_SPAWN_DUP2, high(null if stdin is None else stdin), 0),
            (os.POSIX_SPAWN_DUP2, high(null if stdout is None else stdout), 1),
            (os.POSIX_SPAWN_DUP2, high(r), FD),
        ]
        actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inherited()]
        return os.posix_spawnp(argv[0], list(argv), dict(env), file_actions=actions)
    finally:
        for fd in copies:
            os.close(fd)


def _inherited() -> list[int]:
    """Descriptors above 3 that an exec would pass on: the few this process got
    at its own start (Python's are not inheritable, PEP 446), such as a socket
    from systemd. The checkpassword program gets only 0 to 3, as under qmail."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return []
    found = []
    for name in names:
        fd = int(name)
        with contextlib.suppress(OSError):  # listdir's own descriptor is closed by now
            if fd > FD and os.get_inheritable(fd):
                found.append(fd)
    return found


def _offer(fd: int, data: bytes) -> None:
    """Put as much of `data` in the pipe as it takes now (all of a real login)."""
    os.set_blocking(fd, False)
    view = memoryview(data)
    with contextlib.suppress(BlockingIOError):
        while view:
            view = view[os.write(fd, view) :]


def _reap(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _exits_by(pid: int, deadline: float) -> bool:
    """Whether the child has exited (or exits) before `deadline`; it stays unreaped."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # an old kernel: poll
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            time.sleep(0.01)
        return False
    try:
        ready, _, _ = select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
        return bool(ready)
    finally:
        os.close(pidfd)


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


# -- users/passwd ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PasswordHash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def format(self) -> str:
        salt = base64.b64encode(self.salt).decode("ascii")
        digest = base64.b64encode(self.digest).decode("ascii")
        return f"{SCHEME}$n={self.n},r={self.r},p={self.p}${salt}${digest}"

    @classmethod
    def parse(cls, text: bytes) -> PasswordHash | None:
        match = HASH.fullmatch(text)
        if match is None:
            return None
        n, r, p = (int(match[i]) for i in (1, 2, 3))
        if n < 2 or n & (n - 1) or not r or not p or 128 * n * r > MAXMEM:
            return None
        try:
            salt = base64.b64decode(match[4], validate=True)
            digest = base64.b64decode(match[5], validate=True)
        except binascii.Error:
            return None
        if not salt or len(digest) < 16:
            return None
        return cls(n, r, p, salt, digest)

    def hash(self, password: bytes) -> bytes:
        return hashlib.scrypt(
            password,
            salt=self.salt,
            n=self.n,
            r=self.r,
            p=self.p,
            maxmem=MAXMEM,
            dklen=len(self.digest),
        )


# What an unknown user is checked against: the cost of a real entry, never a match.
DUMMY = PasswordHash(N, R, P, b"\0" * SALT_BYTES, b"\0" * DIGEST_BYTES)


def hash_password(password: bytes | str, *, n: int = N, r: int = R, p: int = P) -> PasswordHash:
    salted = PasswordHash(n, r, p, secrets.token_bytes(SALT_BYTES), b"\0" * DIGEST_BYTES)
    return PasswordHash(n, r, p, salted.salt, salted.hash(_bytes(password)))


def read_passwd(path: Path) -> tuple[dict[bytes, PasswordHash], list[Problem]]:
    """users/passwd as {user: hash}; a missing file is an empty store. A line
    that is not `user:HASH` is a problem and counts for nobody; for a user named
    twice the first line counts."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}, []
    entries: dict[bytes, PasswordHash] = {}
    problems: list[Problem] = []
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip() or line.startswith(b"#"):
            continue
        user, colon, text = line.partition(b":")
        parsed = PasswordHash.parse(text) if colon and NAME.fullmatch(user) else None
        if parsed is None:
            problems.append(Problem(path, number, "not user:scrypt$n=N,r=R,p=P$SALT$DIGEST"))
        elif user in entries:
            problems.append(Problem(path, number, f"{_text(user)} again: the first line counts"))
        else:
            entries[user] = parsed
    return entries, problems


def verify_password(
    path: Path, user: bytes | str, password: bytes | str, *, apop_timestamp: bytes | None = None
) -> bool:
    """Whether `password` is `user`'s in users/passwd; in the same time whether
    or not the user exists. With `apop_timestamp`, `password` is an APOP digest,
    which this store cannot check (module docstring): always False. An OSError
    other than a missing file is raised: the caller's temporary failure."""
    entries, _ = read_passwd(path)
    secret = _bytes(password)
    entry = entries.get(_bytes(user))
    usable = entry is not None and apop_timestamp is None and bool(secret)
    check = entry if entry is not None and usable else DUMMY
    matches = hmac.compare_digest(check.hash(secret), check.digest)
    return usable and matches


def set_password(path: Path, user: bytes | str, password: bytes | str) -> None:
    """Give `user` a new salt and hash in users/passwd, keeping every other
    line. The file is replaced in one rename (mode 0600, fsynced) while holding
    an flock on its directory, so two writers never lose each other's change."""
    name, secret = _bytes(user), _bytes(password)
    if not NAME.fullmatch(name):
        raise UserError(f"not a user name: {_text(name)!r}", path=path)
    if not secret:
        raise UserError("empty password", path=path)
    if any(c in secret for c in b"\0\r\n"):
        raise UserError("a POP3 password cannot hold NUL, CR or LF", path=path)
    entry = hash_password(secret).format().encode("ascii")
    try:
        with _locked(path.parent):
            try:
                old = path.read_bytes().split(b"\n")
            except FileNotFoundError:
                old = []
            if old and old[-1] == b"":
                old.pop()
            lines: list[bytes] = []
            for line in old:
                if line.partition(b":")[0] != name:
                    lines.append(line)
                elif entry:
                    lines.append(name + b":" + entry)
                    entry = b""
            if entry:
                lines.append(name + b":" + entry)
            data = b"".join(line + b"\n" for line in lines)
            replace_file(path.with_name(path.name + ".tmp"), path, data, mode=0o600)
    except OSError as e:
        raise UserError(f"unable to write: {os_reason(e)}", path=path) from e


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")
