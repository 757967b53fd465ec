"""unstuff() against the plain reading of qmail-smtpd's blast(): line by line,
a leading dot dropped unless a CR follows it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from core.smtpd import unstuff


def by_lines(region: bytes) -> bytes:
    text = region.replace(b"\r\n", b"\n")
    lines = text.split(b"\n")
    return b"\n".join(
        line[1:] if line[:1] == b"." and line[1:2] != b"\r" else line for line in lines
    )


@given(st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b".."]), max_size=30))
def test_unstuff_is_blast_line_by_line(parts: list[bytes]) -> None:
    region = b"".join(parts)
    assert unstuff(region) == by_lines(region)
