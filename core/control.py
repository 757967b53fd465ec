"""Read and validate control/*: qmail 1.03's formats, defaults and fallbacks.

Every reader returns its value together with the problems it found, each
naming file and line, so that `check` can list them all, a reload can keep
the last good configuration, and a strict caller can raise the first one.
Where qmail silently reads junk as 0 or ignores a line (`concurrencyremote:
abc`, a port `25x`), that is an error here (INTERFACE.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import Problem
from core.paths import QmailRoot

HOSTNAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?")
LITERAL = re.compile(r"\[\d{1,3}(\.\d{1,3}){3}\]|\[ipv6:[0-9a-f:.]+\]")

# file -> literal default used when neither the file nor `me` gives a value
# (spec/control.md §3). None means "no default": the value is missing.
ME_DEFAULTS: dict[str, str | None] = {
    "bouncehost": "bouncehost",
    "defaultdomain": "defaultdomain",
    "defaulthost": "defaulthost",
    "doublebouncehost": "doublebouncehost",
    "envnoathost": "envnoathost",
    "idhost": "idhost",
    "plusdomain": "plusdomain",
    "helohost": None,
    "localiphost": None,
    "smtpgreeting": None,
}
LITERAL_DEFAULTS = {"bouncefrom": "MAILER-DAEMON", "doublebounceto": "postmaster"}
INT_DEFAULTS = {
    "concurrencylocal": 10,
    "concurrencyremote": 20,
    "queuelifetime": 604800,
    "databytes": 0,
    "timeoutsmtpd": 1200,
    "timeoutremote": 1200,
    "timeoutconnect": 60,
    # Not in qmail 1.03 (qmail-ldap's name): past this size a bounce carries only
    # the original's header. 0 attaches the whole message, as qmail 1.03 does.
    "bouncemaxbytes": 1_000_000,
    # Not qmail's files but the install guides' (tcpserver -c): SMTP connections
    # at once, and from one address (ours; tcpserver has no such limit).
    "concurrencyincoming": 40,
    "concurrencyperip": 20,
    # Ours: seconds a POP3 client may be silent (qmail-popup and qmail-pop3d
    # have 1200 built in).
    "timeoutpop3": 1200,
}
LIST_FILES = ("locals", "rcpthosts", "morercpthosts", "percenthack", "badmailfrom")
COLON_FILES = ("virtualdomains", "smtproutes")
KNOWN_FILES = frozenset(
    [
        *("me", "defaultdelivery", "morercpthosts.cdb", "servercert.pem", "qmqpservers"),
        *ME_DEFAULTS,
        *LITERAL_DEFAULTS,
        *INT_DEFAULTS,
        *LIST_FILES,
        *COLON_FILES,
    ]
)
CONCURRENCY_MAX = 1000  # qmail caps at conf-spawn (120); we have no spawn, but bound it
INT_MAX = 2**31 - 1  # control_readint stores the value in a C int; more wraps around


def _read_lines(path: Path, problems: list[Problem]) -> list[str] | None:
    """The file's lines, or None when it does not exist (qmail's "absent")."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        problems.append(Problem(path, None, "is a directory, not a file"))
        return None
    except OSError as e:
        problems.append(Problem(path, None, f"unable to read: {e.strerror or e}"))
        return None
    if b"\0" in data:
        problems.append(Problem(path, None, "contains a NUL byte"))
    text = data.decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _clean(line: str, path: Path, number: int, problems: list[Problem]) -> str:
    """qmail strips trailing space and tab; we also strip a DOS CR, and say so."""
    if line.endswith("\r"):
        problems.append(
            Problem(path, number, "line ends with a carriage return (DOS line end)", "warning")
        )
    return line.rstrip(" \t\r")


def _first_line(path: Path, problems: list[Problem]) -> tuple[str, int | None] | None:
    """(first line, its number) of a file; the number is None for an empty file."""
    lines = _read_lines(path, problems)
    if lines is None:
        return None
    if not lines:
        return "", None
    return _clean(lines[0], path, 1, problems), 1


def read_line(path: Path, problems: list[Problem]) -> str | None:
    """First line of a single-line file (control_readline); None if absent."""
    first = _first_line(path, problems)
    return None if first is None else first[0]


def read_int(path: Path, default: int, problems: list[Problem]) -> int:
    first = _first_line(path, problems)
    if first is None:
        return default
    value, number = first
    if not (value.isdigit() and value.isascii()):
        problems.append(
            Problem(
                path,
                number,
                f"not a number: {value!r}",
                hint=f"qmail would silently use {_qmail_int(value, default)}",
            )
        )
        return default
    # len() first: int() refuses strings of more than 4300 digits
    if len(value) > len(str(INT_MAX)) or int(value) > INT_MAX:
        problems.append(
            Problem(
                path,
                number,
                f"too large: more than {INT_MAX}",
                hint="qmail keeps it in a C int, where it wraps around",
            )
        )
        return default
    return int(value)


def _qmail_int(value: str, default: int) -> str:
    """What qmail's scan_ulong makes of `value`: its leading ASCII digits, else `default`."""
    digits = re.match(r"[0-9]*", value)
    if not digits or not digits.group():
        return str(default)
    if len(digits.group()) > len(str(INT_MAX)):
        return "a number that overflowed"
    return str(int(digits.group()))


def read_list(path: Path, problems: list[Problem]) -> list[tuple[int, str]] | None:
    """(line number, entry) of a list file (control_readfile); None if absent."""
    lines = _read_lines(path, problems)
    if lines is None:
        return None
    entries = []
    for number, raw in enumerate(lines, 1):
        text = _clean(raw, path, number, problems)
        if not text or text.startswith("#"):
            continue
        if text[0] in " \t":
            problems.append(
                Problem(
                    path,
                    number,
                    f"leading white space: {text!r} never matches",
                    "warning",
                    hint="qmail keeps leading spaces as part of the entry; remove them",
                )
            )
        entries.append((number, text))
    return entries


def _check_domain(path: Path, number: int, name: str, problems: list[Problem]) -> None:
    if name[:1] in (" ", "\t"):
        return  # read_list has said why this entry never matches
    bare = name[1:] if name.startswith(".") else name
    if name.startswith("*"):
        suffix = name.lstrip("*")
        hint = (
            f"write {suffix!r} for every subdomain and {suffix[1:]!r} for the domain itself"
            if suffix.startswith(".") and len(suffix) > 1
            else "remove the '*'"
        )
        problems.append(
            Problem(
                path,
                number,
                f"{name!r}: '*' is not a wildcard in qmail and never matches",
                "warning",
                hint=hint,
            )
        )
    elif not (HOSTNAME.fullmatch(bare.lower()) or LITERAL.fullmatch(bare.lower())):
        problems.append(Problem(path, number, f"not a domain name: {name!r}", "warning"))


@dataclass(frozen=True, slots=True)
class Route:
    """One smtproutes line: `domain:relay[:port]`; relay "" means "use MX"."""

    domain: str
    relay: str
    port: int | None
    line: int

    @property
    def text(self) -> str:
        """The line as smtproutes holds it."""
        port = "" if self.port is None else f":{self.port}"
        return f"{self.domain}:{self.relay}{port}"


@dataclass(frozen=True, slots=True)
class Config:
    """One consistent snapshot of control/*, with qmail's fallbacks applied."""

    me: str | None
    locals: frozenset[str]
    rcpthosts: frozenset[str] | None
    morercpthosts: frozenset[str] | None
    percenthack: frozenset[str]
    virtualdomains: dict[str, str]
    badmailfrom: frozenset[str]
    smtproutes: tuple[Route, ...]
    concurrencylocal: int
    concurrencyremote: int
    queuelifetime: int
    databytes: int
    timeoutsmtpd: int
    timeoutremote: int
    timeoutconnect: int
    bouncefrom: str
    bouncehost: str
    doublebounceto: str
    doublebouncehost: str
    envnoathost: str
    idhost: str
    defaultdomain: str
    defaulthost: str
    plusdomain: str
    helohost: str | None
    localiphost: str | None
    smtpgreeting: str | None
    defaultdelivery: tuple[str, ...]
    bouncemaxbytes: int = 1_000_000
    concurrencyincoming: int = 40
    concurrencyperip: int = 20
    timeoutpop3: int = 1200
    problems: tuple[Problem, ...] = field(default=(), compare=False)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.is_error]

    def is_local(self, domain: str) -> bool:
        return domain.lower() in self.locals

    def smtproute(self, host: str) -> Route | None:
        """The smtproutes line qmail-remote uses for `host` (remote.md §2), if any.

        Keys: the host, each suffix from a `.` (longest first), then `` (the
        default). The last line for a key wins, as constmap does. A route
        whose relay is "" means "use MX" and still ends the search.
        """
        table = {route.domain: route for route in self.smtproutes}
        host = host.lower()
        keys = [host, *(host[i:] for i in range(len(host)) if host[i] == "."), ""]
        for key in keys:
            if key in table:
                return table[key]
        return None


def line_value(root: QmailRoot, name: str, me: str | None, problems: list[Problem]) -> str | None:
    """A single-line control with qmail's default chain: file, then `me`, then literal."""
    value = read_line(root.control_file(name), problems)
    if value is not None:
        return value
    if name in LITERAL_DEFAULTS:
        return LITERAL_DEFAULTS[name]
    if me is not None:
        return me
    return ME_DEFAULTS.get(name)


def read_me(root: QmailRoot, problems: list[Problem]) -> str | None:
    return read_line(root.control_file("me"), problems)


def _colon_list(path: Path, problems: list[Problem]) -> list[tuple[int, str, str]] | None:
    entries = read_list(path, problems)
    if entries is None:
        return None
    out = []
    for number, text in entries:
        if ":" not in text:
            problems.append(
                Problem(path, number, f"no ':' in {text!r}; qmail ignores this line", "warning")
            )
            continue
        key, value = text.split(":", 1)
        out.append((number, key, value))
    return out


def _virtualdomains(root: QmailRoot, problems: list[Problem]) -> dict[str, str]:
    path = root.control_file("virtualdomains")
    table: dict[str, str] = {}
    for number, key, prepend in _colon_list(path, problems) or []:
        key = key.lower()
        if key.startswith("*"):
            _check_domain(path, number, key, problems)
        elif key:
            domain = key.rsplit("@", 1)[-1]
            _check_domain(path, number, domain, problems)
        if "@" in prepend or any(c in prepend for c in " \t/"):
            problems.append(
                Problem(path, number, f"bad prepend {prepend!r}: want a local part such as 'joe'")
            )
            continue
        table[key] = prepend  # the last line for a key wins, as constmap does
    return table


def _qmail_port(text: str) -> str:
    """The port qmail-remote makes of `text`: scan_ulong (no digits = 0), in 16 bits."""
    digits = re.match(r"[0-9]*", text)
    found = digits.group() if digits else ""
    if len(found) > 18:
        return "a number that overflowed"
    return str(int(found or "0") % 65536)


def _smtproutes(root: QmailRoot, problems: list[Problem]) -> tuple[Route, ...]:
    path = root.control_file("smtproutes")
    routes = []
    for number, domain, value in _colon_list(path, problems) or []:
        relay, has_port, port_text = value.partition(":")
        port: int | None = None
        if has_port:
            # qmail-remote reads `relay:` and `relay:abc` as port 0, `relay:25x` as 25
            if not (port_text.isdigit() and port_text.isascii() and len(port_text) <= 5) or not (
                0 < int(port_text) < 65536
            ):
                problems.append(
                    Problem(
                        path,
                        number,
                        f"port {port_text!r} is not a number from 1 to 65535",
                        hint=f"qmail would use port {_qmail_port(port_text)}",
                    )
                )
                continue
            port = int(port_text)
            if not relay:
                problems.append(
                    Problem(
                        path,
                        number,
                        f"no relay host before the port in {value!r}",
                        hint="qmail would look up an empty host name; write relay:port",
                    )
                )
                continue
        if domain:
            _check_domain(path, number, domain, problems)
        if relay:
            host = relay[1:-1] if relay.startswith("[") and relay.endswith("]") else relay
            if not (HOSTNAME.fullmatch(host.lower()) or LITERAL.fullmatch(relay.lower())):
                problems.append(Problem(path, number, f"not a host name: {relay!r}"))
                continue
        routes.append(Route(domain.lower(), relay, port, number))
    return tuple(routes)


def _domains(root: QmailRoot, name: str, problems: list[Problem]) -> frozenset[str] | None:
    path = root.control_file(name)
    entries = read_list(path, problems)
    if entries is None:
        return None
    for number, text in entries:
        _check_domain(path, number, text, problems)
    return frozenset(text.lower() for _, text in entries)


def _badmailfrom(root: QmailRoot, problems: list[Problem]) -> frozenset[str]:
    """Whole addresses and `@domain` lines (control.md §4.1); no wildcards."""
    path = root.control_file("badmailfrom")
    entries = read_list(path, problems) or []
    for number, text in entries:
        if text[:1] in (" ", "\t"):
            continue  # read_list has said why it never matches
        if "*" in text:
            problems.append(
                Problem(
                    path,
                    number,
                    f"{text!r}: '*' is not a wildcard in badmailfrom and never matches",
                    "warning",
                    hint="write @domain to refuse every sender at that domain",
                )
            )
        elif "@" not in text:
            problems.append(
                Problem(
                    path,
                    number,
                    f"{text!r} has no '@': it matches only a sender address written exactly so",
                    "warning",
                    hint=f"write {'@' + text.lstrip('.')!r} to refuse every sender at that domain",
                )
            )
    return frozenset(text.lower() for _, text in entries)


def _defaultdelivery(root: QmailRoot, problems: list[Problem]) -> tuple[str, ...]:
    path = root.control_file("defaultdelivery")
    lines = _read_lines(path, problems)
    if lines is None:
        return ("./Maildir/",)
    kept = tuple(line.rstrip("\r") for line in lines if line.strip() and not line.startswith("#"))
    if not kept:
        problems.append(
            Problem(path, None, "no delivery instruction: every local delivery would be lost")
        )
        return ("./Maildir/",)
    return kept


def _unknown_files(root: QmailRoot, problems: list[Problem]) -> None:
    """A misspelt control file is silently ignored by qmail; say so here."""
    import difflib

    try:
        names = sorted(p.name for p in root.control.iterdir() if p.is_file())
    except OSError:
        return
    for name in names:
        if name in KNOWN_FILES or "." in name or name.endswith("~") or name.startswith("#"):
            continue  # other software's files, editors' backups
        close = difflib.get_close_matches(name, sorted(KNOWN_FILES), n=1, cutoff=0.8)
        if close:
            problems.append(
                Problem(
                    root.control_file(name),
                    None,
                    f"no program reads this file; did you mean control/{close[0]}?",
                    "warning",
                )
            )


def load(root: QmailRoot) -> Config:
    """Read every control file. Never raises for content; see Config.problems."""
    problems: list[Problem] = []
    if not root.control.is_dir():
        problems.append(Problem(root.control, None, "missing directory"))
    me: str | None = None
    first = _first_line(root.control_file("me"), problems)
    if first is None:
        problems.append(
            Problem(
                root.control_file("me"),
                None,
                "missing: this host's name is unknown",
                hint="write the fully qualified host name in it",
            )
        )
    else:
        me, number = first
        if not HOSTNAME.fullmatch(me.lower()):
            problems.append(Problem(root.control_file("me"), number, f"not a host name: {me!r}"))
    _unknown_files(root, problems)

    def lv(name: str) -> str | None:
        return line_value(root, name, me, problems)

    def single(name: str) -> str:
        # An empty file is present: its "" stands, no default applies (control.md §1.1).
        value = lv(name)
        return name if value is None else value  # None only when it has no default

    def iv(name: str) -> int:
        return read_int(root.control_file(name), INT_DEFAULTS[name], problems)

    locals_ = _domains(root, "locals", problems)
    if locals_ is None:
        locals_ = frozenset([me.lower()]) if me else frozenset()
    percenthack = _domains(root, "percenthack", problems) or frozenset()
    concurrency = {}
    for name in ("concurrencylocal", "concurrencyremote"):
        value = iv(name)
        if value > CONCURRENCY_MAX:
            problems.append(
                Problem(root.control_file(name), 1, f"{value} is more than {CONCURRENCY_MAX}")
            )
            value = CONCURRENCY_MAX
        concurrency[name] = value
    timeoutsmtpd = iv("timeoutsmtpd") or 1  # qmail-smtpd turns 0 into 1
    return Config(
        me=me,
        locals=locals_,
        rcpthosts=_domains(root, "rcpthosts", problems),
        morercpthosts=_domains(root, "morercpthosts", problems),
        percenthack=percenthack,
        virtualdomains=_virtualdomains(root, problems),
        badmailfrom=_badmailfrom(root, problems),
        smtproutes=_smtproutes(root, problems),
        concurrencylocal=concurrency["concurrencylocal"],
        concurrencyremote=concurrency["concurrencyremote"],
        queuelifetime=iv("queuelifetime"),
        databytes=iv("databytes"),
        timeoutsmtpd=timeoutsmtpd,
        timeoutremote=iv("timeoutremote"),
        timeoutconnect=iv("timeoutconnect"),
        bouncefrom=single("bouncefrom"),
        bouncehost=single("bouncehost"),
        doublebounceto=single("doublebounceto"),
        doublebouncehost=single("doublebouncehost"),
        envnoathost=single("envnoathost"),
        idhost=single("idhost"),
        defaultdomain=single("defaultdomain"),
        defaulthost=single("defaulthost"),
        plusdomain=single("plusdomain"),
        helohost=lv("helohost"),
        localiphost=lv("localiphost"),
        smtpgreeting=lv("smtpgreeting"),
        defaultdelivery=_defaultdelivery(root, problems),
        bouncemaxbytes=iv("bouncemaxbytes"),
        concurrencyincoming=max(1, iv("concurrencyincoming")),
        concurrencyperip=max(1, iv("concurrencyperip")),
        timeoutpop3=max(1, iv("timeoutpop3")),
        problems=tuple(problems),
    )
