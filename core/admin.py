"""What an administrator asks of the queue: filters, listings, "why is it stuck".

Pure functions over the scheduler's Message records, so that a running core
and the command line with no core running give the same answers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from core import retry
from core.control import Config
from core.send import Message, Recipient
from core.timefmt import iso, qread_date

AGE = re.compile(r"(\d+)([smhdw]?)")
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
STATES = ("pending", "held")


def parse_age(text: str) -> float:
    """`30m`, `2h`, `3d` (a bare number is seconds); ValueError otherwise."""
    match = AGE.fullmatch(text.strip().lower())
    if not match:
        raise ValueError(f"not an age: {text!r} (want a number and s, m, h, d or w, e.g. 2h)")
    return float(int(match.group(1)) * UNITS[match.group(2)])


@dataclass(frozen=True, slots=True)
class Filter:
    """INTERFACE.md's queue filters; all given conditions must hold."""

    all: bool = False
    sender: str | None = None
    recipient: str | None = None
    domain: str | None = None
    older_than: float | None = None  # seconds
    state: str | None = None  # "pending" or "held"

    @property
    def is_empty(self) -> bool:
        return not self.all and self == Filter()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Filter:
        state = data.get("state")
        if state is not None and state not in STATES:
            raise ValueError(f"unknown state {state!r}: want pending or held")
        older = data.get("older_than")
        return cls(
            all=bool(data.get("all", False)),
            sender=data.get("sender"),
            recipient=data.get("recipient"),
            domain=data.get("domain"),
            older_than=parse_age(older) if isinstance(older, str) else older,
            state=state,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "all": self.all,
            "sender": self.sender,
            "recipient": self.recipient,
            "domain": self.domain,
            "older_than": self.older_than,
            "state": self.state,
        }


def _address_matches(pattern: str, address: str) -> bool:
    """`@domain` matches every address at that domain; otherwise the whole address."""
    pattern, address = pattern.lower(), address.lower()
    if pattern.startswith("@"):
        return address.endswith(pattern)
    return address == pattern


def matches(message: Message, flt: Filter, now: float, config: Config) -> bool:
    if flt.state == "held" and not message.held:
        return False
    if flt.state == "pending" and message.held:
        return False
    if flt.sender is not None and not _address_matches(flt.sender, message.sender):
        return False
    if flt.older_than is not None and now - message.birth < flt.older_than:
        return False
    pending = message.pending()
    if flt.recipient is not None and not any(
        _address_matches(flt.recipient, a) for r in pending for a in _names(r, config)
    ):
        return False
    if flt.domain is not None:
        domain = flt.domain.lower().lstrip("@")
        if not any(
            a.rpartition("@")[2].lower() == domain for r in pending for a in _names(r, config)
        ):
            return False
    return True


def _names(recipient: Recipient, config: Config) -> tuple[str, ...]:
    """The recipient as recorded and, for a virtual domain, as it was addressed."""
    from core.rewrite import unvirtual

    original = unvirtual(config, recipient.address)
    return (recipient.address,) if original == recipient.address else (recipient.address, original)


def select(
    messages: Iterable[Message], ids: list[int] | None, flt: Filter, now: float, config: Config
) -> list[Message]:
    chosen = [
        m
        for m in messages
        if (ids is None or m.id in ids) and not m.removed and matches(m, flt, now, config)
    ]
    return sorted(chosen, key=lambda m: m.id)


def recipient_state(r: Recipient) -> str:
    if r.bounced:
        return "bounced"
    return "done" if r.done else "pending"


def next_attempt(message: Message, r: Recipient) -> float | None:
    if r.done or r.attempts == 0:
        return None
    if r.channel in message.passes:
        return message.passes[r.channel].next_due
    return message.due.get(r.channel)


def message_json(message: Message, config: Config) -> dict[str, Any]:
    return {
        "id": message.id,
        "queued": iso(message.birth),
        "size": message.size,
        "sender": message.sender,
        "held": message.held,
        "preprocessed": message.preprocessed,
        "recipients": [
            {
                "address": r.address,
                "channel": r.channel,
                "state": recipient_state(r),
                "attempts": r.attempts,
                "last_reply": r.last_reply,
                "next_attempt": iso(next_attempt(message, r)),
                "in_progress": r.busy,
            }
            for r in sorted(message.recipients, key=lambda r: r.channel != "local")
        ],
        "expires": iso(message.birth + config.queuelifetime),
    }


def _printable(text: str) -> str:
    """qmail-qread's printing: every byte outside 32..126 becomes one `_`."""
    data = text.encode("utf-8", "surrogateescape")
    return "".join(chr(b) if 32 <= b <= 126 else "_" for b in data)


def qread(messages: Iterable[tuple[Message, bool]]) -> str:
    """qmail-qread's exact text for (message, is it bouncing) pairs (queue.md §7).

    Held messages say ` held` at the end of their first line, and messages not
    yet preprocessed say ` (not yet preprocessed)`: qmail knows neither.
    """
    out = []
    for message, bouncing in messages:
        line = (
            f"{qread_date(message.birth)} GMT  #{message.id}  {message.size}"
            f"  <{_printable(message.sender)}> "
        )
        if bouncing:
            line += " bouncing"
        if message.held:
            line += " held"
        if not message.preprocessed:
            line += " (not yet preprocessed)"
        out.append(line)
        for r in sorted(message.recipients, key=lambda r: r.channel != "local"):
            prefix = "  done" if r.done else ""
            out.append(f"{prefix}\t{r.channel}\t{_printable(r.address)}")
    return "".join(line + "\n" for line in out)


def why(message: Message, config: Config, now: float) -> list[str]:
    """A few sentences saying why the message is still here."""
    lines = []
    expires = message.birth + config.queuelifetime
    if message.held:
        lines.append("held by the postmaster: nothing is delivered until it is released")
    if not message.preprocessed:
        lines.append("queued, not yet preprocessed (is the core running?)")
    for channel in message.channels():
        pending = message.pending(channel)
        if not pending:
            continue
        limit = config.concurrencylocal if channel == "local" else config.concurrencyremote
        if limit == 0:
            lines.append(f"control/concurrency{channel} is 0: the {channel} channel is held")
        if channel in message.passes:
            lines.append(f"{channel}: a delivery pass is running now")
        elif channel in message.due:
            when = message.due[channel]
            if when <= now:
                lines.append(f"{channel}: due now, waiting for a free delivery slot")
            else:
                lines.append(f"{channel}: next attempt at {iso(when)} (qmail's retry schedule)")
        for r in pending:
            if r.last_reply:
                lines.append(f"  {r.address}: {r.attempts} attempt(s), last: {r.last_reply}")
    if retry.is_expired(message.birth, now, config.queuelifetime):
        lines.append(
            f"past its queue lifetime ({iso(expires)}): the next attempt is the last,"
            " then it bounces"
        )
    return lines
