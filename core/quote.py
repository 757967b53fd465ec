"""qmail's quote.c: quote an address's local part only when RFC 821/822 need it.

Used wherever qmail writes an address: Return-Path lines, bounce headers,
qmail-inject's generated fields. Works on text whose characters stand for
bytes (ASCII; anything from 128 up is always quoted, as quote.c does).
"""

from __future__ import annotations

# The characters quote.c's ok[] table lets through unquoted.
OK = frozenset(chr(c) for c in range(33, 127) if chr(c) not in '"(),:;<>@[\\]')


def need(box: str) -> bool:
    """quote_need(): empty, an unsafe character, or a leading, trailing or double dot."""
    if not box or any(ch not in OK for ch in box):
        return True
    return box[0] == "." or box[-1] == "." or ".." in box


def quote(box: str) -> str:
    if not need(box):
        return box
    escaped = "".join("\\" + ch if ch in '\r\n"\\' else ch for ch in box)
    return f'"{escaped}"'


def quote2(address: str) -> str:
    """quote() the part before the last '@'; the domain stays as it is."""
    if not address:
        return address
    at = address.rfind("@")
    if at < 0:
        return quote(address)
    return quote(address[:at]) + address[at:]
