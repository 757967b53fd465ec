"""The timeout table's rules (spec/remote.md §7), with the clock given."""

from __future__ import annotations

from pathlib import Path

from core.tcpto import SIZE, Table, describe

NOW = 1_800_000_000.0


def fresh(tmp_path: Path, pid: int = 0) -> Table:
    t = Table(tmp_path / "tcpto", pid=pid)
    t.clear()
    return t


def test_two_timeouts_two_minutes_apart_mark_an_address_down_for_the_window(
    tmp_path: Path,
) -> None:
    t = fresh(tmp_path, pid=5)  # window (60 + 5) * 64 = 4160 s
    t.record("192.0.2.1", True, NOW)
    assert t.down_until("192.0.2.1", NOW) is None  # one timeout is not enough
    t.record("192.0.2.1", True, NOW + 60)  # under two minutes later: not counted
    assert [e.count for e in t.entries(NOW + 60)] == [1]
    t.record("192.0.2.1", True, NOW + 120)
    assert t.down_until("192.0.2.1", NOW + 121) == NOW + 120 + 4160
    assert t.down_until("192.0.2.1", NOW + 120 + 4160) is None
    assert t.down_until("192.0.2.2", NOW + 121) is None
    [entry] = t.entries(NOW + 130)
    assert describe(entry, NOW + 130) == "192.0.2.1 timed out 10 seconds ago; # recent timeouts: 2"


def test_a_connection_that_worked_or_was_refused_clears_the_count(tmp_path: Path) -> None:
    t = fresh(tmp_path)
    t.record("192.0.2.1", True, NOW)
    t.record("192.0.2.1", True, NOW + 200)
    t.record("192.0.2.1", False, NOW + 300)
    assert t.down_until("192.0.2.1", NOW + 301) is None
    assert t.entries(NOW + 301) == []


def test_a_full_table_gives_up_the_record_that_matters_least(tmp_path: Path) -> None:
    t = fresh(tmp_path)
    for i in range(SIZE // 16):
        t.record(f"192.0.2.{i}", True, NOW + i)
    t.record("198.51.100.1", True, NOW + 1000)
    ips = {e.ip for e in t.entries(NOW + 1000)}
    assert "198.51.100.1" in ips
    assert "192.0.2.0" not in ips  # the oldest single timeout went
    assert len(ips) == SIZE // 16


def test_a_missing_or_short_table_means_nothing_is_down(tmp_path: Path) -> None:
    t = Table(tmp_path / "absent")
    t.record("192.0.2.1", True, NOW)  # no file: nothing to write to, no error
    assert t.down_until("192.0.2.1", NOW) is None
    (tmp_path / "short").write_bytes(b"\x01\x02")
    assert Table(tmp_path / "short").entries(NOW) == []
