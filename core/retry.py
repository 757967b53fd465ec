"""When to try a recipient again: qmail-send's schedule (send.md §4), pure."""

from __future__ import annotations

import math

CHANSKIP = {"local": 10, "remote": 20}
EXPIRED_TEXT = "I'm not going to try again; this message has been in the queue too long.\n"


def next_attempt(birth: float, now: float, channel: str) -> float:
    """birth + (floor(sqrt(now - birth)) + chanskip)^2, computed when a pass starts."""
    age = int(now - birth) if now >= birth else 0
    return birth + (math.isqrt(age) + CHANSKIP[channel]) ** 2


def is_expired(birth: float, now: float, lifetime: int) -> bool:
    """A pass that starts after the lifetime is the last one: deferrals become bounces."""
    return now > birth + lifetime
