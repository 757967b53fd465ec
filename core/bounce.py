"""Bounce and double-bounce messages in qmail-send's format (send.md §6.2), pure."""

from __future__ import annotations

from dataclasses import dataclass

from core.quote import quote, quote2
from core.timefmt import date822

SINGLE = (
    "I'm afraid I wasn't able to deliver your message to the following addresses.\n"
    "This is a permanent error; I've given up. Sorry it didn't work out.\n\n"
)
DOUBLE = "I tried to deliver a bounce message to this address, but the bounce bounced!\n\n"
TRUNCATED = "--- The rest of the message ({} bytes) was not included.\n"


def strip_verp(sender: str) -> str:
    """`owner-@host-@[]` -> `owner-@host`: a VERP sender's bounce goes to the list owner."""
    return sender[:-4] if len(sender) >= 5 and sender.endswith("-@[]") else sender


@dataclass(frozen=True, slots=True)
class Bounce:
    sender: str  # "" for a bounce, "#@[]" for a double bounce
    recipient: str
    message: bytes


def make_bounce(
    *,
    sender: str,
    reports: bytes,
    original: bytes,
    bouncefrom: str,
    bouncehost: str,
    doublebounce_recipient: str,
    now: float,
    max_bytes: int = 0,
) -> Bounce | None:
    """The bounce for a message whose failures are `reports` (bounce/N's bytes);
    None for a triple bounce, which qmail discards. Past `max_bytes` (0: never)
    only the original's header is attached."""
    sender = strip_verp(sender)
    if sender == "#@[]":
        return None
    single = sender != ""
    recipient = sender if single else doublebounce_recipient
    head = (
        f"Date: {date822(now)}\n"
        f"From: {quote(bouncefrom)}@{bouncehost}\n"
        f"To: {quote2(recipient)}\n"
        "Subject: failure notice\n\n"
        f"Hi. This is the qmail-send program at {bouncehost}.\n" + (SINGLE if single else DOUBLE)
    )
    below = (
        "--- Below this line is a copy of the message.\n\n"
        if single
        else "--- Below this line is the original bounce.\n\n"
    )
    attached = original
    tail = b""
    if max_bytes and len(original) > max_bytes:
        end = original.find(b"\n\n")
        attached = original[: end + 1] if end >= 0 else original[:max_bytes]
        tail = b"\n" + TRUNCATED.format(len(original) - len(attached)).encode()
    message = b"".join(
        [
            head.encode("utf-8", "surrogateescape"),
            reports,
            below.encode(),
            f"Return-Path: <{quote2(sender)}>\n".encode("utf-8", "surrogateescape"),
            attached,
            tail,
        ]
    )
    return Bounce("" if single else "#@[]", recipient, message)
