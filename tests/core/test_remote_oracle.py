"""Ours against notqmail's qmail-remote, on the same servers: per recipient,
the letter and text qmail-send would log (qmail-rspawn's mapping of
qmail-remote's reports, one recipient per run, as qmail runs it)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from core.remote import deliver
from tests.core.test_remote import MESSAGE, Sink, raw_server, route, sink

pytestmark = pytest.mark.oracle


def rspawn(output: bytes) -> tuple[str, str]:
    """qmail-rspawn's report for a single-recipient qmail-remote run."""
    reports = [r.decode() for r in output.split(b"\0")[:-1]]
    message = reports[-1]
    if len(reports) == 1:  # failed before RCPT: only the message report
        return message[0], message[1:]
    first = reports[0]
    if first[0] == "r":
        return message[0], message[1:]
    return ("D" if first[0] == "h" else "Z"), first[1:] + message[1:]


def theirs(oracle: Path, tmp_path: Path, port: int, rcpt: str) -> tuple[str, str]:
    inst = tmp_path / "inst"
    (inst / "control").mkdir(parents=True, exist_ok=True)
    (inst / "control" / "me").write_text("mx.example.org\n")
    (inst / "control" / "smtproutes").write_text(f"example.test:127.0.0.1:{port}\n")
    done = subprocess.run(
        [str(oracle / "qmail-remote"), "example.test", "a@b.test", rcpt],
        input=MESSAGE,
        capture_output=True,
        cwd=inst,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done
    return rspawn(done.stdout)


async def ours(port: int, rcpt: str) -> tuple[str, str]:
    [result] = await deliver(
        route(port),
        "a@b.test",
        [rcpt],
        MESSAGE,
        helohost="mx.example.org",
        timeoutconnect=5,
        timeoutremote=10,
    )
    return result.status, result.text


CASES = {
    "accepted": (Sink(), "u@example.test"),
    "recipient 550": (Sink(rcpt={"gone@example.test": "550 no such user"}), "gone@example.test"),
    "recipient 450": (Sink(rcpt={"busy@example.test": "450 try later"}), "busy@example.test"),
    "sender 553": (Sink(mail="553 sorry"), "u@example.test"),
    "sender 451": (Sink(mail="451 not now"), "u@example.test"),
    "message 554": (Sink(data="554 no thanks"), "u@example.test"),
    "message 452": (Sink(data="452 full"), "u@example.test"),
}


@pytest.mark.parametrize("name", CASES)
async def test_same_result_as_qmail_remote(name: str, oracle: Path, tmp_path: Path) -> None:
    handler, rcpt = CASES[name]
    with sink(handler) as port:
        expected = theirs(oracle, tmp_path, port, rcpt)
        got = await ours(port, rcpt)
    assert got == expected


@pytest.mark.parametrize("greeting", [b"554 go away\r\n", b"421 busy\r\n"])
async def test_same_result_for_a_bad_greeting(
    greeting: bytes, oracle: Path, tmp_path: Path
) -> None:
    with raw_server(greeting) as port:
        expected = theirs(oracle, tmp_path, port, "u@example.test")
        got = await ours(port, "u@example.test")
    assert got == expected


# -- the timeout table: same skips, same bytes left in queue/lock/tcpto -----------------


def table(ip: str, count: int, when: int) -> bytes:
    import ipaddress
    import struct

    record = ipaddress.IPv4Address(ip).packed + bytes([count, 0, 0, 0])
    record += struct.pack("<I", when) + bytes(4)
    return record + bytes(1024 - 16)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


TABLES = {
    "recently timed out twice: skipped": (2, 0, True),
    "timed out twice long ago: tried, cleared": (2, -10_000, True),
    "timed out once: tried, cleared": (1, 0, True),
    "refused: cleared like a success": (1, 0, False),
}


@pytest.mark.parametrize("name", TABLES)
async def test_the_timeout_table_as_qmail_remote_reads_and_writes_it(
    name: str, oracle: Path, tmp_path: Path
) -> None:
    import time

    from core.tcpto import Table

    count, age, listening = TABLES[name]
    start = table("127.0.0.1", count, int(time.time()) + age)
    lock = tmp_path / "inst" / "queue" / "lock"
    lock.mkdir(parents=True)
    ours_file = tmp_path / "ours.tcpto"
    with sink(Sink()) as port:
        port = port if listening else free_port()
        (lock / "tcpto").write_bytes(start)
        expected = theirs(oracle, tmp_path, port, "u@example.test")
        ours_file.write_bytes(start)
        [result] = await deliver(
            route(port),
            "a@b.test",
            ["u@example.test"],
            MESSAGE,
            helohost="mx.example.org",
            timeoutconnect=5,
            timeoutremote=10,
            tcpto=Table(ours_file),
        )
    assert (result.status, result.text) == expected
    assert ours_file.read_bytes() == (lock / "tcpto").read_bytes()
