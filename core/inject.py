"""qmail-inject's message preparation: header completion, address rewriting, envelope.

A pure port of notqmail 1.09's qmail-inject.c with token822.c, headerbody.c,
hfield.c, newfield.c and quote.c (spec/inject.md): no files, no clock, no pid
lookups. The caller hands in the control values, the environment, the time and
the pid, and gets back the finished message and the envelope. The
`qmailtui-sendmail` entry point imports this module once per message, from cron,
so it imports only cheap standard modules.

The code follows the C closely, on purpose: qmail's output is the
specification, and its quirks are part of it. Addresses are parsed from right
to left, as token822_addrlist does, so the recipients of one field come out in
reverse order (`To: a, b` queues b before a), the *last* address of a
Return-Path field becomes the envelope sender, and a recipient field that fails
to parse midway has already contributed the addresses to the right of the fault.

Text is handled as latin-1 strings, one character per byte, so 8-bit headers
survive byte for byte; strings that cross the interface (environment values,
arguments, the envelope) use the process convention instead: bytes decoded as
UTF-8 with surrogateescape, as `os.environ`, `sys.argv` and core/queue.py do.

Deliberate differences from qmail-inject:

1. CRLF line ends in the input become LF before anything else. Web
   applications often hand sendmail CRLF text; qmail would keep each CR and
   the message would go out with `\\r\\r\\n` line ends.
2. An empty input raises InjectError("empty message", 100), where qmail queues
   a message made only of the fields it adds; input containing a NUL byte
   raises InjectError("message contains a NUL byte; SMTP cannot carry it", 100),
   as no SMTP server would accept it intact.

Mail-Followup-To (QMAILMFTFILE) is not implemented: it would need a file read,
and this module does no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from core.quote import need as need_quotes
from core.quote import quote2
from core.timefmt import date822

__all__ = [
    "InjectError",
    "InjectSettings",
    "Prepared",
    "prepare",
    "quote_address",
    "return_path",
    "settings_from",
]

LINELEN = 80  # qmail-inject.c: where token822_unparse folds address lists

# token822.h's token types; the numbers do not matter, only the names.
ATOM, QUOTE, LITERAL, COMMENT, LEFT, RIGHT, AT, COMMA, SEMI, COLON, DOT = range(1, 12)

Token = tuple[int, str]
Rewrite = Callable[[list[Token]], None]

_PUNCT = {".": DOT, ",": COMMA, "@": AT, "<": LEFT, ">": RIGHT, ":": COLON, ";": SEMI}
_PUNCT_TEXT = {kind: char for char, kind in _PUNCT.items()}
_NOT_ATOM = frozenset(' \t\r\n([<>;:@,."')  # atomok(): ')' ']' '\' may continue an atom
_ESCAPED = frozenset('"[]()\\\r\n')  # unparse puts a backslash before these
_WORDS = (COMMENT, ATOM, QUOTE, AT, DOT)  # what may precede `<` as a phrase
_COMMA: Token = (COMMA, "")
_DELIMITERS = {QUOTE: ('"', '"'), LITERAL: ("[", "]"), COMMENT: ("(", ")")}

# quote.c's table: bytes allowed unquoted in a local part (besides the dot rules).
# hfield.c: the fields qmail-inject knows, by lower-case name.
_RECIPIENT_FIELDS = frozenset({"to", "cc", "bcc", "apparently-to"})
_RESENT_RECIPIENT_FIELDS = frozenset({"resent-to", "resent-cc", "resent-bcc"})
_SENDER_FIELDS = frozenset(
    {
        "sender",
        "from",
        "reply-to",
        "return-receipt-to",
        "errors-to",
        "resent-sender",
        "resent-from",
        "resent-reply-to",
    }
)
_RESENT_FIELDS = frozenset(
    {
        "resent-sender",
        "resent-from",
        "resent-reply-to",
        "resent-to",
        "resent-cc",
        "resent-bcc",
        "resent-date",
        "resent-message-id",
    }
)
_KNOWN_FIELDS = (
    _RECIPIENT_FIELDS
    | _RESENT_RECIPIENT_FIELDS
    | _SENDER_FIELDS
    | _RESENT_FIELDS
    | {
        "date",
        "message-id",
        "subject",
        "received",
        "return-path",
        "delivered-to",
        "content-length",
        "content-type",
        "content-transfer-encoding",
        "notice-requested-upon-delivery-to",
        "mail-followup-to",
    }
)
_DROPPED_FIELDS = frozenset({"bcc", "resent-bcc", "return-path", "content-length"})

_MODES = frozenset("aAhH")


class InjectError(Exception):
    """qmail-inject would stop here.

    `message` is the text qmail prints after `qmail-inject: fatal: `, without the
    final newline: print it with one. (For a header field that does not parse it
    spans two lines, as in qmail; for an unparsable -f or control value qmail
    itself forgets the final newline.) `code` is the exit status, 100
    (permanent) or 111; everything `prepare` refuses is permanent.
    """

    def __init__(self, message: str, code: int = 100) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True, slots=True)
class InjectSettings:
    """The four control values qmail-inject reads (spec §2), environment applied."""

    defaulthost: str
    defaultdomain: str
    plusdomain: str
    idhost: str


@dataclass(frozen=True, slots=True)
class Prepared:
    """The completed message (LF line ends, no Return-Path line) and its envelope."""

    message: bytes
    sender: str  # bare; "" for the null sender
    recipients: list[str]


_SETTING_VARIABLES = (
    ("defaulthost", "QMAILDEFAULTHOST"),
    ("defaultdomain", "QMAILDEFAULTDOMAIN"),
    ("plusdomain", "QMAILPLUSDOMAIN"),
    ("idhost", "QMAILIDHOST"),
)


def settings_from(control: Mapping[str, str], env: Mapping[str, str]) -> InjectSettings:
    """control has the already-resolved values (file, else `me`, else literal) for the
    keys defaulthost, defaultdomain, plusdomain, idhost; env overrides them with
    QMAILDEFAULTHOST, QMAILDEFAULTDOMAIN, QMAILPLUSDOMAIN, QMAILIDHOST (spec §2).

    A variable set to the empty string still wins, as env_get() returns it; a key
    missing from `control` falls back to qmail's last resort, the key itself.
    """
    values = {key: env.get(var, control.get(key, key)) for key, var in _SETTING_VARIABLES}
    return InjectSettings(**values)


def _internal(text: str) -> str:
    """A process string (UTF-8, surrogateescape) as latin-1 text; C stops at a NUL."""
    return text.split("\0", 1)[0].encode("utf-8", "surrogateescape").decode("latin-1")


def _external(text: str) -> str:
    """Latin-1 text back to the process convention (core/queue.py's)."""
    return text.encode("latin-1").decode("utf-8", "surrogateescape")


# --- token822.c -------------------------------------------------------------------


def _parse(text: str) -> list[Token] | None:
    """token822_parse: RFC 822 tokens, or None where qmail's parser gives up.

    As in qmail, nested parentheses are dropped from a comment's text, a
    backslash escapes the next byte everywhere, and an atom holding a control
    byte, an 8-bit byte, `)`, `]` or `\\` becomes a quoted string.
    """
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in _PUNCT:
            tokens.append((_PUNCT[ch], ""))
        elif ch in " \t\r\n":
            pass
        elif ch in ")]":
            return None
        elif ch in '("[':
            kind, close = {"(": (COMMENT, ")"), '"': (QUOTE, '"'), "[": (LITERAL, "]")}[ch]
            chars: list[str] = []
            level = 1
            while level:
                i += 1
                if i >= n:
                    return None
                ch = text[i]
                if ch == "(" and kind == COMMENT:
                    level += 1
                elif ch == close:
                    level -= 1
                else:
                    if ch == "\\":
                        i += 1
                        if i >= n:
                            return None
                        ch = text[i]
                    chars.append(ch)
            tokens.append((kind, "".join(chars)))
        else:
            chars = []
            while True:
                if text[i] == "\\":
                    i += 1
                    if i >= n:
                        break
                chars.append(text[i])
                i += 1
                if i >= n or text[i] in _NOT_ATOM:
                    break
            atom = "".join(chars)
            tokens.append((QUOTE if _needs_quoting_as_atom(atom) else ATOM, atom))
            continue  # i already points past the atom
        i += 1
    return tokens


def _needs_quoting_as_atom(atom: str) -> bool:
    """atomcheck(): bytes qmail will not write bare in an atom."""
    return any(ord(ch) < 32 or ord(ch) > 126 or ch in ")]\\" for ch in atom)


def _needspace(last: int, new: int) -> bool:
    if not last:
        return False
    if last in (COLON, COMMA) or new == LEFT:
        return True
    words = (ATOM, LITERAL, QUOTE, COMMENT)
    return last in words and new in words


def _unparse(tokens: Sequence[Token], linelen: int = LINELEN) -> str:
    """token822_unparse: tokens back to text ending in a newline.

    Every comma is written as `,\\n  `; at the next comma (or the end) the
    previous break is joined into `, ` again if the line so far, break
    included, is at most `linelen` bytes. That is qmail's folding, reproduced
    step by step because its off-by-two measure decides where lines break.
    """
    buf: list[str] = []
    line_start = 0
    pending: int | None = None  # index of the last break still written as "\n "

    def fold() -> None:
        nonlocal line_start, pending
        end = len(buf)
        if pending is not None and end - line_start <= linelen:
            del buf[pending : pending + 2]
            buf.extend("\n ")
            pending = end - 2
        else:
            if pending is not None:
                line_start = pending + 1
            pending = end
            buf.extend("\n ")

    last = 0
    for kind, text in tokens:
        if _needspace(last, kind):
            buf.append(" ")
        last = kind
        if kind == COMMA:
            buf.append(",")
            fold()
        elif kind in _PUNCT_TEXT:
            buf.append(_PUNCT_TEXT[kind])
        else:
            opener, closer = _DELIMITERS.get(kind, ("", ""))
            buf.extend(opener)  # one character per element: fold() counts them
            for ch in text:
                if ch in _ESCAPED:
                    buf.append("\\")
                buf.append(ch)
            buf.extend(closer)
    fold()
    return "".join(buf[:-1])


def _unquote(tokens: Sequence[Token]) -> str:
    """token822_unquote: the bare address (comments dropped, quotes removed)."""
    parts: list[str] = []
    for kind, text in tokens:
        if kind in _PUNCT_TEXT:
            parts.append(_PUNCT_TEXT[kind])
        elif kind == LITERAL:
            parts.append(f"[{text}]")
        elif kind in (ATOM, QUOTE):
            parts.append(text)
    return "".join(parts)


def _addrlist(tokens: list[Token], rewrite: Rewrite) -> list[Token] | None:
    """token822_addrlist: rewrite each address of a `Name: list` field.

    Works from right to left as qmail does ("rfc 822 address lists are easy to
    parse from right to left"); `rewrite` sees each address in reversed token
    order and may change it in place. A word after a complete address without
    a comma starts a new address and gets one (`djb fred` -> `djb, fred`).
    None means the list does not parse; addresses to the right of the fault
    have been rewritten (and recorded) by then, as in qmail.
    """
    out: list[Token] = []
    addr: list[Token] = []
    in_group = False
    word_ok = True
    begin = 2  # skip the field name and its colon
    t = len(tokens) - 1

    def flush(comma: bool = False) -> None:
        if addr:
            rewrite(addr)
            out.extend(addr)
            addr.clear()
            if comma:
                out.append(_COMMA)

    while t >= begin:
        kind = tokens[t][0]
        if kind == SEMI:
            flush(comma=True)
            if in_group:
                return None
            in_group = True
            word_ok = True
        elif kind == COLON:
            flush()
            if not in_group:
                return None
            in_group = False
            while t >= begin and tokens[t][0] != COMMA:
                out.append(tokens[t])
                t -= 1
            if t >= begin:
                out.append(tokens[t])
                t -= 1
            word_ok = True
            continue
        elif kind == RIGHT:
            flush(comma=True)
            out.append(tokens[t])
            t -= 1
            while t >= begin and tokens[t][0] != LEFT:
                addr.append(tokens[t])
                t -= 1
            rewrite(addr)  # even when empty: <> is an address
            out.extend(addr)
            addr.clear()
            if t < begin:
                return None
            out.append(tokens[t])
            t -= 1
            while t >= begin and tokens[t][0] in _WORDS:
                out.append(tokens[t])
                t -= 1
            word_ok = False
            continue
        elif kind in (ATOM, QUOTE, LITERAL):
            if not word_ok:
                flush(comma=True)
            word_ok = False
            addr.append(tokens[t])
            t -= 1
            continue
        elif kind == COMMENT:
            pass  # lexically a space: does not change word_ok
        elif kind == COMMA:
            flush()
            word_ok = True
        else:  # AT, DOT, LEFT
            word_ok = True
            addr.append(tokens[t])
            t -= 1
            continue
        out.append(tokens[t])
        t -= 1
    flush()
    out.extend(reversed(tokens[: t + 1]))
    out.reverse()
    return out


def quote_address(address: str) -> str:
    """An envelope address as qmail writes it in `Return-Path: <...>`."""
    return _external(quote2(_internal(address)))


def return_path(sender: str) -> bytes:
    """The `Return-Path:` line `qmail-inject -n` prints before the message."""
    return f"Return-Path: <{quote2(_internal(sender))}>\n".encode("latin-1")


# --- hfield.c ---------------------------------------------------------------------


def _field_name(field: str) -> str | None:
    """hfield_known(): the lower-case name of a field qmail-inject knows."""
    colon = field.find(":")
    if colon < 0:
        return None
    name = field[:colon].rstrip(" \t").lower()
    return name if name in _KNOWN_FIELDS else None


def _field_valid(line: str) -> bool:
    """hfield_valid(): a name of bytes 33-126, optional spaces or tabs, a colon."""
    colon = line.find(":")
    if colon < 0:
        return False
    name = line[:colon].rstrip(" \t")
    return bool(name) and all(32 < ord(ch) < 127 for ch in name)


# --- headerbody.c -----------------------------------------------------------------


def _split(text: str) -> tuple[list[str], str | None]:
    """headerbody(): the header fields (continuations joined) and the body.

    The body includes the separating empty line; when the header ends at a line
    that is not a field, qmail inserts that empty line. None means there is no
    body, and then no empty line is added either.
    """
    fields: list[str] = []
    field: str | None = None
    pos, n = 0, len(text)
    while pos < n:
        end = text.find("\n", pos)
        end = n if end < 0 else end + 1
        line = text[pos:end]
        if not line.endswith("\n"):
            line += "\n"  # getsa(): a last line without newline gets one
        if field is not None:
            if line[0] in " \t":
                field += line
                pos = end
                continue
            fields.append(field)
            field = None
        if line == "\n":
            return fields, _body(text, pos)
        if line.startswith("From "):
            field = "MBOX-Line: " + line
        elif _field_valid(line):
            field = line
        else:
            return fields, "\n" + _body(text, pos)
        pos = end
    if field is not None:
        fields.append(field)
    return fields, None


def _body(text: str, pos: int) -> str:
    body = text[pos:]
    return body if body.endswith("\n") else body + "\n"


# --- qmail-inject.c ---------------------------------------------------------------


class _Rewriter:
    """rwgeneric() with the settings parsed as qmail-inject's getcontrols() does."""

    def __init__(self, settings: InjectSettings) -> None:
        self.defaultdomain = self._tokens("." + _internal(settings.defaultdomain))
        self.defaulthost = self._tokens("@" + _internal(settings.defaulthost))
        self.plusdomain = self._tokens("." + _internal(settings.plusdomain))

    @staticmethod
    def _tokens(text: str) -> list[Token]:
        tokens = _parse(text)
        if tokens is None:
            raise InjectError(f"unable to parse this line:\n{_external(text)}")
        return tokens

    def rewrite(self, addr: list[Token]) -> None:
        """Spec §5 on one address, its tokens in reversed order (addr[0] is the last)."""
        if not addr:
            return  # <>
        if len(addr) >= 2 and addr[1][0] == AT and addr[0] == (LITERAL, ""):
            return  # <foo@[]>, the VERP placeholder
        if addr[-1][0] == AT:  # source route: drop up to and including the colon
            while addr and addr.pop()[0] != COLON:
                pass
            if not addr:
                return
        if addr[0][0] == DOT:
            del addr[0]
            if not addr:
                return
        if addr[0][0] == AT:
            del addr[0]
            if not addr:
                return
        if all(kind != AT for kind, _ in addr):
            addr[0:0] = self.defaulthost[::-1]
        kind, text = addr[0]
        if kind == ATOM and text.endswith("+"):
            addr[0] = (ATOM, text[:-1])
            addr[0:0] = self.plusdomain[::-1]
        host = self._host(addr)
        if all(kind not in (DOT, LITERAL) for kind, _ in host):
            addr[0:0] = self.defaultdomain[::-1]

    @staticmethod
    def _host(addr: list[Token]) -> list[Token]:
        for index, (kind, _) in enumerate(addr):
            if kind == AT:
                return addr[:index]
        return addr


def _unquote_reversed(addr: list[Token]) -> str:
    return _unquote(addr[::-1])


def _env(env: Mapping[str, str], *names: str) -> str | None:
    """The first variable set, even to "", as qmail's env_get chain does."""
    for name in names:
        if name in env:
            return _internal(env[name])
    return None


def _message_id(idhost: str, when: int, pid: int) -> str:
    t = time.gmtime(when)
    stamp = f"{t.tm_year}{t.tm_mon:02d}{t.tm_mday:02d}{t.tm_hour:02d}{t.tm_min:02d}{t.tm_sec:02d}"
    return f"Message-ID: <{stamp}.{pid}.qmail@{idhost}>\n"


class _Injection:
    """One run of qmail-inject: the state its globals hold, and its steps."""

    def __init__(
        self, env: Mapping[str, str], settings: InjectSettings, now: float, pid: int
    ) -> None:
        self.rewriter = _Rewriter(settings)
        self.idhost = _internal(settings.idhost)
        self.starttime = int(now)
        self.pid = pid
        letters = env.get("QMAILINJECT", "")
        self.name_comment = "c" in letters
        self.delete_sender = "s" in letters
        self.delete_from = "f" in letters
        self.delete_messid = "i" in letters
        self.hack_recip = "r" in letters
        self.hack_mess = "m" in letters
        self.mailhost = _env(env, "QMAILHOST", "MAILHOST")
        self.mailrhost = _env(env, "QMAILSHOST")
        if self.mailrhost is None:
            self.mailrhost = self.mailhost
        user = _env(env, "QMAILUSER", "MAILUSER", "USER", "LOGNAME")
        self.mailuser = "anonymous" if user is None else user  # "" stays: From: ""@host
        ruser = _env(env, "QMAILSUSER")
        self.mailruser = self.mailuser if ruser is None else ruser
        self.fullname = _env(env, "QMAILNAME", "MAILNAME", "NAME")
        self.sender: str | None = None
        self.seen: set[str] = set()
        self.header_recipients: list[str] = []
        self.resent_recipients: list[str] = []

    # rewrite callbacks (rwsender, rwreturn, rwhr, rwtocc, rwhrr)

    def rw_sender(self, addr: list[Token]) -> None:
        self.rewriter.rewrite(addr)

    def rw_return(self, addr: list[Token]) -> None:
        self.rewriter.rewrite(addr)
        if self.sender is None:
            self.sender = _unquote_reversed(addr) + ("-@[]" if self.hack_recip else "")

    def rw_recipient(self, addr: list[Token]) -> None:
        self.rewriter.rewrite(addr)
        self.header_recipients.append(_unquote_reversed(addr))

    def rw_resent_recipient(self, addr: list[Token]) -> None:
        self.rewriter.rewrite(addr)
        self.resent_recipients.append(_unquote_reversed(addr))

    def set_envelope_sender(self, value: str) -> None:
        """-f: quoted, rewritten, unquoted; wins over Return-Path and QMAILINJECT=r."""
        quoted = quote2(_internal(value))
        tokens = _parse(quoted)
        if tokens is None:
            raise InjectError(f"unable to parse this line:\n{_external(quoted)}")
        tokens.reverse()
        self.rewriter.rewrite(tokens)
        self.sender = _unquote_reversed(tokens)

    def argument_recipient(self, value: str) -> str:
        """dorecip(): any string is a local part; the part after the last @ must parse."""
        tokens = _parse(quote2(_internal(value)))
        if tokens is None:
            raise InjectError(f"unable to parse address: {value}")
        tokens.reverse()
        self.rewriter.rewrite(tokens)
        return _unquote_reversed(tokens)

    def header_field(self, field: str) -> str | None:
        """doheaderfield(): the field as it goes out, or None when it is removed."""
        name = _field_name(field)
        if (
            (self.delete_from and name == "from")
            or (self.delete_messid and name == "message-id")
            or (self.delete_sender and name == "return-path")
        ):
            return None
        if name is not None:
            self.seen.add(name)
        # qmail checks hfield_valid() here too ("invalid header field"), but
        # headerbody() only hands over valid fields, and so does _split().
        rewrite: Rewrite | None = None
        may_fail = True
        if name in _RECIPIENT_FIELDS:
            rewrite = self.rw_recipient
        elif name in _RESENT_RECIPIENT_FIELDS:
            rewrite = self.rw_resent_recipient
        elif name == "return-path":
            rewrite, may_fail = self.rw_return, False
        elif name in _SENDER_FIELDS:
            rewrite, may_fail = self.rw_sender, False
        if rewrite is not None:
            tokens = _parse(field)
            rewritten = _addrlist(tokens, rewrite) if tokens is not None else None
            if rewritten is not None:
                field = _unparse(rewritten)
            elif not may_fail:  # since notqmail 1.08 only sender fields abort
                raise _unparsable(field)
        return None if name in _DROPPED_FIELDS else field

    def default_from(self) -> str:
        """defaultfrommake(): `From: "Name" <user@host>`, rewritten like any sender."""
        tokens: list[Token] = [(ATOM, "From"), (COLON, "")]
        named = self.fullname is not None and not self.name_comment
        if named:
            tokens += [(QUOTE, self.fullname or ""), (LEFT, "")]
        tokens.append((QUOTE if need_quotes(self.mailuser) else ATOM, self.mailuser))
        if self.mailhost is not None:
            tokens += [(AT, ""), (ATOM, self.mailhost)]
        if named:
            tokens.append((RIGHT, ""))
        if self.fullname is not None and self.name_comment:
            tokens.append((COMMENT, self.fullname))
        return self._rebuild(tokens, self.rw_sender)

    def default_return_path(self) -> str:
        """dodefaultreturnpath(): the envelope sender from QMAILSUSER/QMAILSHOST."""
        user = self.mailruser
        if self.hack_mess:
            user += f"-{self.starttime}.{self.pid}"
        if self.hack_recip:
            user += "-"
        tokens: list[Token] = [(ATOM, "Return-Path"), (COLON, ""), (QUOTE, user)]
        if self.mailrhost is not None:
            tokens += [(AT, ""), (ATOM, self.mailrhost)]
        self._rebuild(tokens, self.rw_return)
        return self.sender or ""  # rw_return has set it: the quoted user is an address

    @staticmethod
    def _rebuild(tokens: list[Token], rewrite: Rewrite) -> str:
        """Unparse, parse back and rewrite, as qmail-inject does with its own fields."""
        text = _unparse(tokens)
        parsed = _parse(text)
        rewritten = _addrlist(parsed, rewrite) if parsed is not None else None
        if rewritten is None:
            raise _unparsable(text)
        return _unparse(rewritten)

    def added_fields(self) -> list[str]:
        """finishheader(): the fields put before the original ones (spec §6)."""
        date = f"Date: {date822(self.starttime)}\n"
        message_id = _message_id(self.idhost, self.starttime, self.pid)
        if self.seen & _RESENT_FIELDS:
            added = []
            if "resent-date" not in self.seen:
                added.append("Resent-" + date)
            if "resent-message-id" not in self.seen:
                added.append("Resent-" + message_id)
            if "resent-from" not in self.seen:
                added.append("Resent-" + self.default_from())
            if not self.seen & {"resent-to", "resent-cc"}:
                added.append("Resent-Cc: recipient list not shown: ;\n")
            return added
        added = []
        if "date" not in self.seen:
            added.append(date)
        if "message-id" not in self.seen:
            added.append(message_id)
        if "from" not in self.seen:
            added.append(self.default_from())
        if not self.seen & {"to", "cc"}:
            added.append("Cc: recipient list not shown: ;\n")
        return added


def _unparsable(field: str) -> InjectError:
    """doordie(): the field is quoted whole; the caller's line end replaces its own."""
    text = _external(field).removesuffix("\n")
    return InjectError(f"unable to parse this line:\n{text}")


def prepare(
    raw: bytes,
    *,
    mode: str = "A",
    args: Sequence[str] = (),
    sender: str | None = None,
    env: Mapping[str, str],
    settings: InjectSettings,
    now: float,
    pid: int,
) -> Prepared:
    """mode is qmail-inject's a/A/h/H letter; args the argument recipients; sender the -f
    value (None when not given); env the process environment (QMAILUSER, MAILUSER, USER,
    LOGNAME, QMAILHOST, MAILHOST, QMAILNAME, MAILNAME, NAME, QMAILSUSER, QMAILSHOST,
    QMAILINJECT letters c s f i r m, QMAILMFTFILE is NOT needed: skip Mail-Followup-To);
    now/pid feed Date: and Message-ID: exactly as qmail-inject formats them.

    After our own two refusals (empty input, NUL byte), errors come in
    qmail-inject's order: the control values, then -f, then the arguments, then
    the header. A mode outside a/A/h/H is the caller's bug (qmail exits 100
    without a word) and raises ValueError.
    """
    if mode not in _MODES:
        raise ValueError(f"qmail-inject has no mode {mode!r}; use one of a, A, h, H")
    if not raw:
        raise InjectError("empty message")
    if b"\0" in raw:
        raise InjectError("message contains a NUL byte; SMTP cannot carry it")

    run = _Injection(env, settings, now, pid)
    if sender is not None:
        run.set_envelope_sender(sender)
    if mode == "A":
        mode = "a" if args else "h"
    recipients = [run.argument_recipient(arg) for arg in args] if mode != "h" else []

    fields, body = _split(raw.replace(b"\r\n", b"\n").decode("latin-1"))
    kept = [out for field in fields if (out := run.header_field(field)) is not None]
    envelope_sender = run.sender if run.sender is not None else run.default_return_path()
    parts = [*run.added_fields(), *kept]
    if body is not None:
        parts.append(body)

    if mode != "a":
        resent = bool(run.seen & _RESENT_FIELDS)
        recipients += run.resent_recipients if resent else run.header_recipients
    return Prepared(
        message="".join(parts).encode("latin-1"),
        sender=_external(envelope_sender),
        recipients=[_external(r) for r in recipients],
    )
