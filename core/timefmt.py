"""Time stamps in qmail's and daemontools' formats."""

from __future__ import annotations

import time

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
TAI_OFFSET = 4611686018427387914  # 2**62 + 10: TAI64 label of the Unix epoch, as multilog


def date822(when: float) -> str:
    """`26 Sep 1995 04:46:54 -0000`: qmail's date822fmt, always UTC."""
    t = time.gmtime(when)
    return (
        f"{t.tm_mday} {MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} -0000"
    )


def qread_date(when: float) -> str:
    """date822 without the zone, as qmail-qread prints it."""
    return date822(when)[: -len(" -0000")]


def mbox_date(when: float) -> str:
    """`Wed Jan 03 01:05:34 1996`: qmail-local's From_ line date (day zero-padded)."""
    t = time.gmtime(when)
    return (
        f"{DAYS[t.tm_wday]} {MONTHS[t.tm_mon - 1]} {t.tm_mday:02d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {t.tm_year}"
    )


def tai64n(when: float) -> str:
    """`@4000000065a1b2c31a2b3c4d`: the label multilog puts before each line."""
    seconds = int(when)
    nano = int((when - seconds) * 1e9)
    return f"@{seconds + TAI_OFFSET:016x}{nano:08x}"


def parse_tai64n(label: str) -> float:
    seconds = int(label[1:17], 16) - TAI_OFFSET
    return seconds + int(label[17:25], 16) / 1e9


def iso(when: float | None) -> str | None:
    """ISO 8601 UTC with a Z, as the JSON output promises."""
    if when is None:
        return None
    t = time.gmtime(when)
    return (
        f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}Z"
    )
