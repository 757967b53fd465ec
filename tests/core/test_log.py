"""log/current: multilog's labels, qmail's safe printing, rotation at a size."""

from __future__ import annotations

import re
from pathlib import Path

from core.events import Events
from core.log import Log, read_lines, safe
from core.timefmt import parse_tai64n, tai64n
from tests.fakes import FakeClock

LABEL = re.compile(r"@4000000[0-9a-f]{17} ")


def test_every_line_starts_with_a_tai64n_label_of_the_clock(tmp_path: Path) -> None:
    clock = FakeClock(1_700_000_000.25)
    log = Log(tmp_path, clock=clock)
    log.line("new msg 1")
    log.close()
    line = (tmp_path / "current").read_text()
    assert LABEL.match(line)
    assert line == f"{tai64n(1_700_000_000.25)} new msg 1\n"
    assert abs(parse_tai64n(line.split()[0]) - 1_700_000_000.25) < 1e-6


def test_tai64n_matches_multilog_for_a_known_instant() -> None:
    # 2**62 + 10 + 1e9 seconds, 0 ns: the label tai64nlocal turns into 2001-09-09 01:46:40
    assert tai64n(1e9) == "@400000003b9aca0a00000000"


def test_safe_printing_follows_qmail_send() -> None:
    assert safe("did 1+0+0\n") == "did_1+0+0/"
    assert safe("100% sure\x01") == "100__sure_"


def test_log_rotates_at_its_size_and_keeps_a_bounded_number_of_files(tmp_path: Path) -> None:
    clock = FakeClock()
    log = Log(tmp_path, clock=clock, max_size=200, keep=3)
    for i in range(60):
        clock.advance(1)
        log.line(f"status: local {i}/10 remote 0/20")
        log.flush()
    log.close()
    rotated = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("@"))
    assert len(rotated) == 3
    assert all(name.endswith(".s") for name in rotated)
    assert (tmp_path / "current").stat().st_size <= 200
    lines = read_lines(tmp_path)
    assert lines[-1].endswith("status: local 59/10 remote 0/20")
    numbers = [int(re.search(r"local (\d+)/", line).group(1)) for line in lines]  # type: ignore[union-attr]
    assert numbers == sorted(numbers)  # oldest first, across rotated files


def test_log_lines_reach_subscribers(tmp_path: Path) -> None:
    events = Events()
    sub = events.subscribe(maxsize=2)
    log = Log(tmp_path, events=events)
    for i in range(3):
        log.line(f"line {i}")
    log.close()
    assert sub.lagged  # the oldest was dropped, and the reader is told so
    assert [e.data["text"] for e in sub.drain()] == ["line 1", "line 2"]
