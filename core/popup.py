"""qmail-popup: the POP3 authorization state, as a session that does no I/O.

One `Popup` greets a connection and reads USER/PASS or APOP. When a login is
complete `handle` returns a `Login` instead of a reply: the driver checks it
(checkpassword on fd 3, `core.checkpassword`), then either hands the
connection to pop3d (`core.pop3d.Pop3d`, whose `start` answers PASS with
`+OK `) or sends `refused(returncode)`:

    popup = Popup("pop.example.org", pid=os.getpid(), now=int(time.time()))
    send(popup.greeting())
    for line in lines.feed(data):        # core.pop3d.Lines, kept for pop3d after
        result = popup.handle(line)
        if isinstance(result, Login):
            code = run_checkpassword(argv, result.user, result.password, result.timestamp, env)
            if code == 0: ...            # the session is pop3d's now
            else: send(popup.refused(code))
        elif isinstance(result, StartTLS):
            send(result.data); lines.clear(); handshake(); popup.tls_started()
        else:
            send(result)
        ...close when the reply says so

Replies, their texts and order are qmail-popup's (spec/pop3.md §1-§2,
notqmail 1.09's qmail-popup.c): `+OK ` with its space, `-ERR USER first`,
one authentication attempt per connection (`attempts`, qmail's 1 by
default). qmail-popup always exits 1, even after QUIT. Ours: CAPA (qmail
answers `-ERR authorization first`), STLS when `tls_available` (RFC 2595),
refusing logins before STLS when `tls_required`, and the line length limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.pop3d import LINE_MAX, LINE_TOO_LONG, OK, Reply, capabilities, split_command

ATTEMPTS = 1  # qmail-popup: one PASS or APOP, then exit whatever the answer

# qmail-popup's replies, byte for byte
SYNTAX = b"-ERR syntax error\r\n"
USER_FIRST = b"-ERR USER first\r\n"
AUTHORIZATION_FIRST = b"-ERR authorization first\r\n"
FAILED = b"-ERR authorization failed\r\n"  # checkpassword exited non-zero
CRASHED = b"-ERR aack, child crashed\r\n"  # checkpassword was killed by a signal
USAGE = b"-ERR usage: popup hostname subprogram\r\n"  # no HOSTNAME or no SUBPROGRAM
NO_PIPE = b"-ERR unable to open pipe\r\n"
NO_FORK = b"-ERR unable to fork\r\n"
NO_WRITE = b"-ERR unable to write pipe\r\n"
# ours
TLS_READY = b"+OK Begin TLS negotiation\r\n"
TLS_FIRST = b"-ERR STLS first\r\n"


@dataclass(frozen=True, slots=True)
class Login:
    """A complete USER/PASS or APOP, for checkpassword to judge."""

    user: bytes
    password: bytes = field(repr=False)  # PASS's argument, or APOP's digest
    timestamp: bytes  # the greeting's `<pid.time@host>`, brackets included
    apop: bool

    def fd3(self) -> bytes:
        """What qmail-popup writes to checkpassword's fd 3."""
        return self.user + b"\0" + self.password + b"\0" + self.timestamp + b"\0"


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Send `data` in the clear, drop buffered input, shake hands, then call
    `Popup.tls_started`."""

    data: bytes = TLS_READY


class Popup:
    """One authorization state: `greeting`, then `handle` each line."""

    def __init__(
        self,
        hostname: str | bytes,
        *,
        pid: int,
        now: int,
        tls_available: bool = False,
        tls_required: bool = False,
        attempts: int = ATTEMPTS,
    ) -> None:
        host = (
            hostname if isinstance(hostname, bytes) else hostname.encode("utf-8", "surrogateescape")
        )
        # pop3_greet(): fmt_uint(getpid()) "." fmt_ulong(now()) "@" hostname
        self.timestamp = b"<%d.%d@%s>" % (pid, now, host)
        self.tls_available = tls_available
        self.tls_required = tls_required
        self.tls = False
        self.closed = False
        self._attempts = attempts
        self._user: bytes | None = None  # seenuser and username
        self._checking = False  # a Login is with the driver

    def greeting(self) -> Reply:
        return Reply(b"+OK " + self.timestamp + b"\r\n")

    def handle(self, line: bytes) -> Reply | Login | StartTLS:
        """The answer to one command line (without its LF)."""
        if self.closed or self._checking:
            raise RuntimeError("Popup.handle while closed or waiting for checkpassword")
        if len(line) > LINE_MAX:
            return Reply(LINE_TOO_LONG)
        verb, arg = split_command(line)
        if verb in (b"user", b"pass", b"apop") and self.tls_required and not self.tls:
            return Reply(TLS_FIRST)
        if verb == b"user":
            if not arg:
                return Reply(SYNTAX)
            self._user = arg
            return Reply(OK)
        if verb == b"pass":
            if self._user is None:
                return Reply(USER_FIRST)
            if not arg:
                return Reply(SYNTAX)
            return self._login(self._user, arg, apop=False)
        if verb == b"apop":
            # the name runs to the first space; the digest is all after that one space
            if b" " not in arg:
                return Reply(SYNTAX)
            user, _, digest = arg.partition(b" ")
            return self._login(user, digest, apop=True)
        if verb == b"quit":
            self.closed = True
            return Reply(OK, close=True)
        if verb == b"noop":
            return Reply(OK)
        if verb == b"capa":  # ours
            can_login = not (self.tls_required and not self.tls)
            return Reply(capabilities(user=can_login, stls=self._offers_tls()))
        if verb == b"stls" and self._offers_tls():  # ours
            if arg:
                return Reply(SYNTAX)
            return StartTLS()
        return Reply(AUTHORIZATION_FIRST)

    def refused(self, returncode: int) -> Reply:
        """The reply once checkpassword said no: exit code != 0, or killed by a
        signal (a negative code, as subprocess reports it). qmail-popup then
        exits; with `attempts` left the client may start over from USER."""
        if returncode == 0:
            raise ValueError("checkpassword accepted the login")
        self._checking = False
        self._user = None
        self._attempts -= 1
        text = CRASHED if returncode < 0 else FAILED
        if self._attempts > 0:
            return Reply(text)
        self.closed = True
        return Reply(text, close=True)

    def tls_started(self) -> None:
        """After the handshake: a fresh authorization state (RFC 2595 §4)."""
        self.tls = True
        self._user = None

    def _offers_tls(self) -> bool:
        return self.tls_available and not self.tls

    def _login(self, user: bytes, password: bytes, *, apop: bool) -> Login:
        self._checking = True
        return Login(user, password, self.timestamp, apop)
