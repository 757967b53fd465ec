"""qmail-smtpd: the SMTP session, as a state machine that does no I/O.

One `Session` serves one connection. A driver feeds it the client's bytes and
writes out what it answers; when a message is complete the session hands it
over (`Deliver`) and waits for the driver to report how queueing went. The
same session runs behind the built-in listener (core/listener.py), behind
`qmailtui smtpd` on standard input and output (tcpserver, inetd), and inside
`qmailtui smtpcheck`, so that all three answer alike.

Replies, their order and their texts are qmail-smtpd's (spec/smtpd.md); the
additions are ESMTP SIZE, STARTTLS, a command line length limit and SIZE=
on MAIL, each marked below.
"""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from core import ipme
from core.control import Config
from core.timefmt import date822

MAXHOPS = 100
ADDRESS_MAX = 900  # qmail-smtpd: addr.len (with its NUL) over 900 is a syntax error
LINE_MAX = 4096  # ours: qmail has no limit; a command line past this is refused
SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.@%+/=:-[]")

# qmail-smtpd's replies, byte for byte
OK = b"250 ok\r\n"
FLUSHED = b"250 flushed\r\n"
GO_AHEAD = b"354 go ahead\r\n"
UNIMPLEMENTED = b"502 unimplemented (#5.5.1)\r\n"
SYNTAX = b"555 syntax error (#5.5.4)\r\n"
WANT_MAIL = b"503 MAIL first (#5.5.1)\r\n"
WANT_RCPT = b"503 RCPT first (#5.5.1)\r\n"
VRFY = b"252 send some mail, i'll try my best\r\n"
HELP = b"214 qmailtui, a qmail-compatible mail host\r\n"
BAD_MAIL_FROM = b"553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)\r\n"
NO_GATEWAY = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
STRAY_LF = b"451 See https://cr.yp.to/docs/smtplf.html.\r\n"
TIMEOUT = b"451 timeout (#4.4.2)\r\n"
LOOPING = b"554 too many hops, this message is looping (#5.4.6)\r\n"
TOO_BIG = b"552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n"
# ours
LINE_TOO_LONG = b"500 line too long (#5.5.2)\r\n"
TLS_READY = b"220 ready to start TLS\r\n"
TLS_ARGUMENT = b"501 STARTTLS takes no argument (#5.5.4)\r\n"
TLS_AGAIN = b"503 TLS already started (#5.5.1)\r\n"


@dataclass(frozen=True, slots=True)
class Client:
    """What tcpserver (or tcp-env) tells qmail-smtpd about the connection."""

    remoteip: str = "unknown"
    remotehost: str = "unknown"
    remoteinfo: str | None = None
    local: str = "unknown"
    relayclient: str | None = None  # set-but-empty differs from unset
    databytes: int | None = None  # $DATABYTES overrides control/databytes

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Client:
        databytes = None
        if "DATABYTES" in env:
            databytes = _scan_ulong(env["DATABYTES"])
        return cls(
            remoteip=env.get("TCPREMOTEIP", "unknown"),
            remotehost=env.get("TCPREMOTEHOST", "unknown"),
            remoteinfo=env.get("TCPREMOTEINFO"),
            local=_first_set(env, "TCPLOCALHOST", "TCPLOCALIP", default="unknown"),
            relayclient=env.get("RELAYCLIENT"),
            databytes=databytes,
        )


def _first_set(env: Mapping[str, str], *names: str, default: str) -> str:
    """The first variable that is set, even to "" (qmail's env_get)."""
    for name in names:
        if name in env:
            return env[name]
    return default


def _scan_ulong(text: str) -> int:
    """scan_ulong: the leading digits, 0 if none."""
    digits = ""
    for ch in text:
        if not "0" <= ch <= "9":
            break
        digits += ch
    return int(digits) % 2**64 if digits else 0


@dataclass(frozen=True, slots=True)
class Policy:
    """The control files qmail-smtpd reads, in one snapshot: every decision a
    session makes about an address comes from here."""

    greeting: str
    databytes: int
    timeout: int
    rcpthosts: frozenset[str] | None
    morercpthosts: frozenset[str] = frozenset()
    badmailfrom: frozenset[str] = frozenset()
    liphost: str | None = None
    tls: bool = False

    @classmethod
    def from_config(cls, config: Config, tls: bool = False) -> Policy:
        greeting = config.smtpgreeting if config.smtpgreeting is not None else config.me
        return cls(
            greeting=greeting or "",
            databytes=config.databytes,
            timeout=config.timeoutsmtpd,
            rcpthosts=config.rcpthosts,
            morercpthosts=config.morercpthosts or frozenset(),
            badmailfrom=config.badmailfrom,
            liphost=config.localiphost if config.localiphost is not None else config.me,
            tls=tls,
        )

    def badmailfrom_entry(self, address: str) -> str | None:
        """bmfcheck(): the whole address, then its `@domain`, case-insensitively."""
        if not self.badmailfrom:
            return None
        lowered = address.lower()
        if lowered in self.badmailfrom:
            return lowered
        at = lowered.rfind("@")
        if at >= 0 and lowered[at:] in self.badmailfrom:
            return lowered[at:]
        return None

    def rcpthosts_entry(self, address: str) -> tuple[str, str] | None:
        """rcpthosts(): (file, entry) that lets `address` in, or None.

        No `@` is allowed (qmail-send adds envnoathost). Else the domain, then
        each of its suffixes that starts with a dot, in rcpthosts and then in
        morercpthosts. Returns ("", "") when no rcpthosts exists at all, which
        qmail treats as "allow everything"; the listener refuses to run so.
        """
        if self.rcpthosts is None:
            return ("", "")
        at = address.rfind("@")
        if at < 0:
            return ("", "")
        host = address[at + 1 :].lower()
        for table, name in ((self.rcpthosts, "rcpthosts"), (self.morercpthosts, "morercpthosts")):
            for j in range(len(host)):
                if (j == 0 or host[j] == ".") and host[j:] in table:
                    return (name, host[j:])
        return None

    def localiphost(self, address: str) -> str:
        """An address at `[d.d.d.d]`, one of this host's IP addresses, is at
        localiphost instead (so that local delivery recognises it)."""
        if self.liphost is None:
            return address
        at = address.rfind("@")
        if at < 0 or address[at + 1 : at + 2] != "[":
            return address
        ip = _scan_bracket(address[at + 1 :])
        if ip is None or not ipme.is_me(ip):
            return address
        return address[: at + 1] + self.liphost


def _scan_bracket(text: str) -> str | None:
    """ip_scanbracket() over the whole text: `[d.d.d.d]` and nothing after it.
    Each part is taken modulo 256, as qmail stores it in a byte."""
    if not (text.startswith("[") and text.endswith("]")):
        return None
    parts = text[1:-1].split(".")
    if len(parts) != 4 or not all(p and p.isascii() and p.isdigit() for p in parts):
        return None
    return ".".join(str(int(p) % 256) for p in parts)


def parse_address(arg: str) -> str:
    """addrparse() without the localiphost step and the length check."""
    terminator = ">"
    lt = arg.find("<")
    if lt >= 0:
        arg = arg[lt + 1 :]
    else:  # "partner should go read rfc 821"
        terminator = " "
        colon = arg.find(":")
        arg = arg[colon + 1 :] if colon >= 0 else ""
        arg = arg.lstrip(" ")
    if arg.startswith("@"):  # a source route: up to and including the first ':'
        colon = arg.find(":")
        arg = arg[colon + 1 :] if colon >= 0 else ""
    out: list[str] = []
    escaped = quoted = False
    for ch in arg:
        if escaped:
            out.append(ch)
            escaped = False
        elif not quoted and ch == terminator:
            break
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        else:
            out.append(ch)
    return "".join(out)


def _size_parameter(arg: str) -> int | None:
    """RFC 1870's SIZE=n after the address, if given (ours: qmail ignores it)."""
    gt = arg.find(">")
    if gt < 0:
        return None
    for word in arg[gt + 1 :].split():
        key, _, value = word.partition("=")
        if key.upper() == "SIZE" and value.isascii() and value.isdigit():
            return int(value)
    return None


def _safe(text: str) -> str:
    data = text.encode("utf-8", "surrogateescape")
    return bytes(b if b in SAFE else 0x3F for b in data).decode("ascii")


def received_line(client: Client, helo: str | None, protocol: str, now: float) -> bytes:
    """received.c: the line qmail-smtpd puts first in every message it queues."""
    line = f"Received: from {_safe(client.remotehost)}"
    if helo is not None:
        line += f" (HELO {_safe(helo)})"
    line += " ("
    if client.remoteinfo is not None:
        line += f"{_safe(client.remoteinfo)}@"
    line += f"{_safe(client.remoteip)})\n  by {_safe(client.local)} with {protocol}; "
    line += date822(now) + "\n"
    return line.encode("ascii")


def count_hops(raw: bytes) -> int:
    """Received and Delivered lines in the header, as the client sent them
    (dot-stuffed lines do not count), up to MAXHOPS."""
    hops = 0
    start = 0
    end = len(raw)
    while start < end and hops < MAXHOPS:
        if raw.startswith(b"\r\n", start):
            break  # the empty line ends the header
        head = raw[start : start + 9].lower()
        if head.startswith(b"received") or head == b"delivered":
            hops += 1
        nl = raw.find(b"\n", start)
        if nl < 0:
            break
        start = nl + 1
    return hops


LEADING_DOT = re.compile(rb"^\.(?!\r)", re.MULTILINE)  # a line's first dot, not before a CR


def unstuff(region: bytes) -> bytes:
    """The message as qmail-smtpd's blast() stores it, from the data before the
    final `.` line (which ends with CRLF, and holds no bare LF): CRLF becomes
    LF, a leading dot is dropped unless a CR follows it, any other CR stays."""
    text = region.replace(b"\r\n", b"\n")
    if text.startswith(b".") or b"\n." in text:
        text = LEADING_DOT.sub(b"", text)
    return text


@dataclass(slots=True)
class Deliver:
    """A complete message for the driver to queue; it then calls
    `Session.queued` with the message id or the queue's error text."""

    sender: str
    recipients: list[str]
    message: bytes


class StartTLS:
    """The driver must start TLS now, then call `Session.tls_started`."""


class Close:
    """The driver must send what is pending and close the connection."""


Action = Deliver | StartTLS | Close | None


@dataclass(slots=True)
class Transaction:
    sender: str
    barf: bool  # the sender matched badmailfrom: every RCPT is refused
    recipients: list[str] = field(default_factory=list)


_COMMANDS = ("helo", "ehlo", "mail", "rcpt", "data", "rset", "noop", "vrfy", "help", "quit")


class Session:
    """One SMTP conversation. `out` holds what to send; `feed` what came in;
    `step` runs commands until it needs more input (None) or the driver."""

    def __init__(
        self,
        policy: Policy,
        client: Client,
        *,
        clock: Callable[[], float] = time.time,
        on_decision: Callable[[str, object], None] | None = None,
    ) -> None:
        self.policy = policy
        self.client = client
        self.clock = clock
        self.on_decision = on_decision  # smtpcheck: why each reply was given
        self.out = bytearray()
        self.buf = bytearray()
        self.helo: str | None = None  # the HELO argument, when it differs from remotehost
        self.transaction: Transaction | None = None
        self.tls = False
        self.closed = False
        self.quit = False  # closed by QUIT (qmail-smtpd exits 0), not by an error
        self.databytes = client.databytes if client.databytes is not None else policy.databytes
        self._skipping = False  # inside a command line that is too long
        self._data: _Data | None = None
        self._waiting = False  # a Deliver is with the driver

    # -- the driver's side ------------------------------------------------------

    def start(self) -> None:
        self.out += b"220 " + self._greeting() + b" ESMTP\r\n"

    def feed(self, data: bytes | memoryview) -> None:
        self.buf += data

    def step(self) -> Action:
        while not self.closed and not self._waiting:
            if self._data is not None:
                action = self._data_step()
                if action is not None or self._data is not None:
                    return action
                continue
            line = self._next_line()
            if line is None:
                return None
            action = self._command(line)
            if action is not None:
                return action
        return None

    def queued(self, msgid: int | None, error: str | None = None) -> None:
        """The driver's report for the last Deliver: an id, or qmail-queue's
        error text with its letter (`Zqq write error or disk full (#4.3.0)`)."""
        self._waiting = False
        if error is None:
            self.out += b"250 ok %d qp %d\r\n" % (int(self.clock()), msgid or 0)
        else:
            code = b"554 " if error.startswith("D") else b"451 "
            self.out += code + error[1:].encode("utf-8", "surrogateescape") + b"\r\n"

    def timed_out(self) -> None:
        self.out += TIMEOUT
        self.closed = True

    def tls_started(self) -> None:
        """After the handshake: the state right after the greeting, and nothing
        read before it (RFC 3207; no commands smuggled in with STARTTLS)."""
        self.tls = True
        self.helo = None
        self.transaction = None
        self.buf.clear()

    # -- commands ----------------------------------------------------------------

    def _greeting(self) -> bytes:
        return self.policy.greeting.encode("utf-8", "surrogateescape")

    def _next_line(self) -> bytes | None:
        nl = self.buf.find(b"\n")
        if nl < 0:
            if len(self.buf) > LINE_MAX:
                del self.buf[:]
                if not self._skipping:
                    self._skipping = True
            return None
        line = bytes(self.buf[:nl])
        del self.buf[: nl + 1]
        if self._skipping or len(line) > LINE_MAX:
            self._skipping = False
            self.out += LINE_TOO_LONG
            return self._next_line()
        if line.endswith(b"\r"):
            line = line[:-1]
        return line

    def _command(self, raw: bytes) -> Action:
        raw = raw.split(b"\0", 1)[0]  # a C string ends at NUL
        line = raw.decode("utf-8", "surrogateescape")
        space = line.find(" ")
        verb = (line if space < 0 else line[:space]).lower()
        arg = "" if space < 0 else line[space + 1 :].lstrip(" ")
        if verb not in _COMMANDS:
            if verb == "starttls" and self.policy.tls:
                return self._starttls(arg)
            self.out += UNIMPLEMENTED
            return None
        if verb == "data":
            return self._begin_data()
        if verb == "quit":
            self.out += b"221 " + self._greeting() + b"\r\n"
            self.closed = self.quit = True
            return Close()
        getattr(self, "_" + verb)(arg)
        return None

    def _helo(self, arg: str) -> None:
        self.out += b"250 " + self._greeting() + b"\r\n"
        self._dohelo(arg)

    def _ehlo(self, arg: str) -> None:
        lines = [self._greeting(), b"PIPELINING", b"8BITMIME"]
        lines.append(b"SIZE %d" % self.databytes if self.databytes else b"SIZE")  # ours
        if self.policy.tls and not self.tls:
            lines.append(b"STARTTLS")  # ours
        self.out += b"".join(b"250-" + line + b"\r\n" for line in lines[:-1])
        self.out += b"250 " + lines[-1] + b"\r\n"
        self._dohelo(arg)

    def _dohelo(self, arg: str) -> None:
        self.transaction = None
        self.helo = arg if arg.lower() != self.client.remotehost.lower() else None

    def _rset(self, arg: str) -> None:
        self.transaction = None
        self.out += FLUSHED

    def _noop(self, arg: str) -> None:
        self.out += OK

    def _vrfy(self, arg: str) -> None:
        self.out += VRFY

    def _help(self, arg: str) -> None:
        self.out += HELP

    def _address(self, arg: str) -> str | None:
        address = self.policy.localiphost(parse_address(arg))
        if len(address.encode("utf-8", "surrogateescape")) + 1 > ADDRESS_MAX:
            return None
        return address

    def _mail(self, arg: str) -> None:
        address = self._address(arg)
        if address is None:
            self.out += SYNTAX
            return
        size = _size_parameter(arg)
        if size is not None and self.databytes and size > self.databytes:
            self._decide("size", size)
            self.out += TOO_BIG
            return
        bad = self.policy.badmailfrom_entry(address)
        self._decide("badmailfrom", bad)
        self.transaction = Transaction(address, bad is not None)
        self.out += OK

    def _rcpt(self, arg: str) -> None:
        if self.transaction is None:
            self.out += WANT_MAIL
            return
        address = self._address(arg)
        if address is None:
            self.out += SYNTAX
            return
        if self.transaction.barf:
            self.out += BAD_MAIL_FROM
            return
        if self.client.relayclient is not None:
            self._decide("relayclient", self.client.relayclient)
            address += self.client.relayclient
        else:
            entry = self.policy.rcpthosts_entry(address)
            self._decide("rcpthosts", entry)
            if entry is None:
                self.out += NO_GATEWAY
                return
        self.transaction.recipients.append(address)
        self.out += OK

    def _starttls(self, arg: str) -> Action:
        if self.tls:
            self.out += TLS_AGAIN
            return None
        if arg:
            self.out += TLS_ARGUMENT
            return None
        self.out += TLS_READY
        self.buf.clear()  # anything sent with STARTTLS was sent in the clear: drop it
        return StartTLS()

    def _decide(self, what: str, value: object) -> None:
        if self.on_decision is not None:
            self.on_decision(what, value)

    # -- DATA ----------------------------------------------------------------------

    def _begin_data(self) -> Action:
        transaction = self.transaction
        if transaction is None:
            self.out += WANT_MAIL
            return None
        if not transaction.recipients:
            self.out += WANT_RCPT
            return None
        self.transaction = None
        self.out += GO_AHEAD
        protocol = "ESMTPS" if self.tls else "SMTP"
        received = received_line(self.client, self.helo, protocol, self.clock())
        self._data = _Data(transaction, received, self.databytes)
        return None

    def _data_step(self) -> Action:
        data = self._data
        assert data is not None
        end = data.take(self.buf)
        if end == _STRAY:
            self._data = None
            self.out += STRAY_LF
            self.closed = True
            return Close()
        if end == _MORE:
            return None
        region, rest = data.split(end)
        self.buf += rest
        self._data = None
        hops = data.hops if data.hops is not None else count_hops(region)
        if hops >= MAXHOPS:
            self.out += LOOPING
            return None
        if data.overflow:
            self.out += TOO_BIG
            return None
        message = unstuff(region)
        if self.databytes and len(message) > self.databytes:
            self.out += TOO_BIG
            return None
        self._waiting = True
        t = data.transaction
        return Deliver(t.sender, t.recipients, data.received + message)


_STRAY = -2
_MORE = -1
_FIRST = -3  # the data is only the final "." line


class _Data:
    """The message being received: raw bytes kept until the end is seen.

    The end is the first CR LF `.` CR LF (or `.` CR LF as the very first line);
    a LF without a CR before it, anywhere before that, is a stray newline.
    Once the raw data is more than twice `databytes` plus a little, the
    message cannot fit (at most half the raw bytes vanish: the CRs of CRLFs and
    stuffed dots), so only a short tail is kept to find the end.
    """

    __slots__ = (
        *("checked", "databytes", "dropped", "hops"),
        *("overflow", "raw", "received", "transaction"),
    )

    def __init__(self, transaction: Transaction, received: bytes, databytes: int) -> None:
        self.transaction = transaction
        self.received = received
        self.databytes = databytes
        self.raw = bytearray()
        self.checked = 0  # raw[:checked] holds no stray LF and no end
        self.dropped = 0  # raw bytes let go of (overflow)
        self.hops: int | None = None  # counted before letting go of the header
        self.overflow = False

    def take(self, buf: bytearray) -> int:
        """Move `buf` in; the index in raw where the final CRLF.CRLF begins,
        _FIRST, _MORE or _STRAY."""
        raw = self.raw
        raw += buf
        buf.clear()
        if not self.dropped and self.checked == 0:
            if raw.startswith(b".\r\n"):
                return _FIRST
            if len(raw) < 3 and b".\r\n".startswith(raw):
                return _MORE
        at = raw.find(b"\r\n.\r\n", max(0, self.checked - 4))
        limit = at + 2 if at >= 0 else len(raw)
        begin = self.checked
        if limit > begin:
            lfs = raw.count(b"\n", begin, limit)
            if lfs and lfs != raw.count(b"\r\n", max(0, begin - 1), limit):
                return _STRAY
        if at >= 0:
            return at
        self.checked = len(raw)
        if self.databytes and not self.overflow and len(raw) > 2 * self.databytes + 64:
            self.hops = count_hops(bytes(raw))
            self.overflow = True
        if self.overflow and len(raw) > 65536:
            self.dropped += len(raw) - 4
            del raw[:-4]
            self.checked = 4
        return _MORE

    def split(self, end: int) -> tuple[bytes, bytes]:
        """(the data before the final `.` line, with its CRLF; what follows it)."""
        if end == _FIRST:
            return b"", bytes(self.raw[3:])
        return bytes(self.raw[: end + 2]), bytes(self.raw[end + 5 :])


def server_tls(pem: Path) -> tuple[ssl.SSLContext | None, str | None]:
    """STARTTLS's context from control/servercert.pem, which holds the
    certificate and its key as the qmail TLS patch keeps them: (context, None);
    (None, why) when it does not load; (None, None) when there is no file."""
    if not pem.exists():
        return None, None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile=str(pem))
    except (OSError, ssl.SSLError) as e:
        return None, str(e)
    return context, None
