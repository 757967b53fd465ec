"""core.checkpassword: the fd-3 protocol with small test programs, and users/passwd."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import socket
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from core import checkpassword
from core.checkpassword import (
    DUMMY,
    PasswordHash,
    hash_password,
    read_passwd,
    run_checkpassword,
    set_password,
    spawn_checkpassword,
    verify_password,
    wait_exit,
)
from core.errors import UserError

TIMEOUT = 20.0
LOGIN = b"alice\0secret\0<1.2@pop.example.org>\0"

# A checkpassword in Python: writes what it got on fd 3, its descriptors, $ONLY
# and its standard input to $OUT, prints to standard output, exits with $CODE.
CHECKER = """\
import json, os, sys
got = b""
while chunk := os.read(3, 65536):
    got += chunk
info = {
    "fd3": got.hex(),
    "fds": sorted(int(n) for n in os.listdir("/proc/self/fd")),
    "only": os.environ.get("ONLY"),
    "path": "PATH" in os.environ,
    "stdin": sys.stdin.read(),
}
open(os.environ["OUT"], "w").write(json.dumps(info))
print("to standard output", flush=True)
sys.exit(int(os.environ.get("CODE", "0")))
"""


@pytest.fixture
def checker(tmp_path: Path) -> list[str]:
    script = tmp_path / "checker.py"
    script.write_text(CHECKER)
    return [sys.executable, str(script)]


def run(argv: list[str], tmp_path: Path, **env: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "out.json"
    out.unlink(missing_ok=True)
    code = run_checkpassword(
        argv,
        "alice",
        b"secret",
        "<1.2@pop.example.org>",
        {"OUT": str(out), **env},
        timeout=TIMEOUT,
    )
    return code, json.loads(out.read_text()) if out.exists() else {}


# -- run_checkpassword ------------------------------------------------------------------------


def test_the_login_arrives_on_fd_3_as_qmail_popup_writes_it(
    checker: list[str], tmp_path: Path
) -> None:
    code, info = run(checker, tmp_path)
    assert code == 0
    assert bytes.fromhex(info["fd3"]) == LOGIN


@pytest.mark.parametrize("code", [1, 2, 111, 100])
def test_the_exit_code_is_the_answer(checker: list[str], tmp_path: Path, code: int) -> None:
    assert run(checker, tmp_path, CODE=str(code))[0] == code


def test_the_environment_is_exactly_the_one_given(checker: list[str], tmp_path: Path) -> None:
    os.environ["NOT_PASSED_ON"] = "x"
    try:
        _, info = run(checker, tmp_path, ONLY="this")
    finally:
        del os.environ["NOT_PASSED_ON"]
    assert (info["only"], info["path"]) == ("this", False)


def test_only_0_1_2_and_3_are_open_in_the_program(checker: list[str], tmp_path: Path) -> None:
    kept = os.open(tmp_path, os.O_RDONLY)  # the parent's own descriptors stay its own,
    inherited = os.open(tmp_path, os.O_RDONLY)
    os.set_inheritable(inherited, True)  # even one it would pass on, as from systemd
    try:
        _, info = run(checker, tmp_path)
    finally:
        os.close(kept)
        os.close(inherited)
    assert info["fds"] == [0, 1, 2, 3, 4]  # 4: listdir's own, on /proc/self/fd


def test_without_stdin_and_stdout_the_program_gets_dev_null(
    checker: list[str], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    _, info = run(checker, tmp_path)
    assert info["stdin"] == ""
    assert "to standard output" not in capfd.readouterr().out


def test_given_stdin_and_stdout_are_the_programs_0_and_1(
    checker: list[str], tmp_path: Path
) -> None:
    (tmp_path / "in").write_bytes(b"the client's first bytes\n")
    r, w = os.pipe()
    with open(tmp_path / "in", "rb") as stdin:
        code = run_checkpassword(
            checker,
            b"alice",
            b"secret",
            b"<1.2@pop.example.org>",
            {"OUT": str(tmp_path / "out.json")},
            stdin=stdin.fileno(),
            stdout=w,
            timeout=TIMEOUT,
        )
    os.close(w)
    with os.fdopen(r, "rb") as out:
        printed = out.read()
    assert code == 0
    assert printed == b"to standard output\n"
    assert json.loads((tmp_path / "out.json").read_text())["stdin"] == "the client's first bytes\n"


def test_a_program_killed_by_a_signal_gives_a_negative_code(tmp_path: Path) -> None:
    script = tmp_path / "crash"
    script.write_text("#!/bin/sh\nkill -SEGV $$\n")
    script.chmod(0o755)
    assert run([str(script)], tmp_path)[0] == -11


def test_a_program_that_cannot_run_counts_as_refusal(tmp_path: Path) -> None:
    assert run([str(tmp_path / "missing")], tmp_path)[0] == 1
    not_executable = tmp_path / "plain"
    not_executable.write_text("#!/bin/sh\nexit 0\n")
    assert run([str(not_executable)], tmp_path)[0] == 1


def test_a_program_found_on_path_runs(tmp_path: Path) -> None:
    code = run_checkpassword(["true"], "a", "b", "<c>", {}, timeout=TIMEOUT)
    assert code == 0
    assert run_checkpassword(["false"], "a", "b", "<c>", {}, timeout=TIMEOUT) == 1


def test_a_program_that_reads_little_or_nothing_does_not_hang_us(tmp_path: Path) -> None:
    script = tmp_path / "short"
    script.write_text("#!/bin/sh\nhead -c 512 <&3 >/dev/null\nexit 1\n")
    script.chmod(0o755)
    began = time.monotonic()
    code = run_checkpassword([str(script)], "a", b"p" * 1_000_000, "<c>", {}, timeout=TIMEOUT)
    assert code == 1
    assert run_checkpassword(["true"], "a", b"p" * 1_000_000, "<c>", {}, timeout=TIMEOUT) == 0
    assert time.monotonic() - began < TIMEOUT


def test_a_program_past_its_timeout_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "slow"
    script.write_text("#!/bin/sh\nexec sleep 30\n")
    script.chmod(0o755)
    began = time.monotonic()
    code = run_checkpassword([str(script)], "a", b"p" * 1_000_000, "<c>", {}, timeout=0.5)
    assert code == -9
    assert time.monotonic() - began < 5


async def test_spawn_and_wait_exit_serve_an_event_loop(checker: list[str], tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    with ours:
        try:
            pid = spawn_checkpassword(
                checker, LOGIN, {"OUT": str(tmp_path / "out.json"), "CODE": "3"}, theirs.fileno()
            )
        finally:
            theirs.close()
        ours.sendall(b"pipelined\n")
        ours.shutdown(socket.SHUT_WR)
        code = await asyncio.wait_for(wait_exit(pid), TIMEOUT)
        ours.settimeout(TIMEOUT)
        printed = ours.recv(1000)
    assert code == 3
    assert printed == b"to standard output\n"  # fd 1 is the connection
    info = json.loads((tmp_path / "out.json").read_text())
    assert bytes.fromhex(info["fd3"]) == LOGIN
    assert info["stdin"] == "pipelined\n"  # and so is fd 0


def reaped(pid: int) -> bool:
    """Whether someone else has reaped `pid` within TIMEOUT (it is no child of ours then)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:  # WNOWAIT: look, never reap it ourselves
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        time.sleep(0.05)
    return False


async def test_a_cancelled_wait_still_reaps_the_child(tmp_path: Path) -> None:
    pid = spawn_checkpassword(["sleep", "0.3"], LOGIN, {"PATH": os.environ["PATH"]})
    waiting = asyncio.ensure_future(wait_exit(pid))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await asyncio.to_thread(reaped, pid)


def test_spawn_says_when_the_program_cannot_start(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        spawn_checkpassword([str(tmp_path / "missing")], LOGIN, {})


# -- users/passwd -----------------------------------------------------------------------------

CHEAP = PasswordHash(2**4, 1, 1, b"salt", b"\0" * 32)


def test_a_password_set_is_a_password_verified(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    set_password(path, "alice", "correct horse")
    assert verify_password(path, "alice", "correct horse")
    assert verify_password(path, b"alice", b"correct horse")
    assert not verify_password(path, "alice", "correct hors")
    assert not verify_password(path, "Alice", "correct horse")
    assert not verify_password(path, "bob", "correct horse")


def test_the_file_holds_one_scrypt_line_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    old_umask = os.umask(0)
    try:
        set_password(path, "alice", "pw")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert re.fullmatch(
        r"alice:scrypt\$n=16384,r=8,p=1\$[A-Za-z0-9+/=]{24}\$[A-Za-z0-9+/=]{44}\n", text
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passwd"]  # no temporary left


def test_each_setting_draws_a_new_salt(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    set_password(path, "alice", "same")
    first = path.read_text()
    set_password(path, "alice", "same")
    second = path.read_text()
    assert first != second
    set_password(path, "bob", "same")
    entries, _ = read_passwd(path)
    assert entries[b"alice"].salt != entries[b"bob"].salt
    assert entries[b"alice"].digest != entries[b"bob"].digest


def test_setting_keeps_every_other_line_in_place(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    other = "bob:" + CHEAP.format()
    path.write_text(f"# POP3 users\n{other}\n\nalice:old\ncarol:junk\nalice:older\n")
    set_password(path, "alice", "new")
    lines = path.read_text().split("\n")
    assert lines[:3] == ["# POP3 users", other, ""]
    assert lines[3].startswith("alice:scrypt$")
    assert lines[4:] == ["carol:junk", ""]  # a second alice line goes with the first
    assert verify_password(path, "alice", "new")


@pytest.mark.parametrize("user", ["", "a:b", "a b", "#alice", "al\nice", "tab\there"])
def test_a_user_name_that_cannot_be_a_line_is_refused(tmp_path: Path, user: str) -> None:
    with pytest.raises(UserError, match="not a user name"):
        set_password(tmp_path / "passwd", user, "pw")
    assert not (tmp_path / "passwd").exists()


@pytest.mark.parametrize("password", [b"", b"a\nb", b"a\rb", b"a\0b"])
def test_a_password_no_client_could_send_is_refused(tmp_path: Path, password: bytes) -> None:
    with pytest.raises(UserError):
        set_password(tmp_path / "passwd", "alice", password)
    assert not (tmp_path / "passwd").exists()


def test_an_unwritable_directory_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unable to write: file does not exist"):
        set_password(tmp_path / "no-such-dir" / "passwd", "alice", "pw")


def test_writers_at_the_same_time_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    users = [f"user{i}" for i in range(8)]
    threads = [threading.Thread(target=set_password, args=(path, u, u + "pw")) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    entries, problems = read_passwd(path)
    assert sorted(entries) == sorted(u.encode() for u in users)
    assert problems == []
    assert all(verify_password(path, u, u + "pw") for u in users[:2])


def test_stored_parameters_are_used_for_checking(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    cheap = hash_password("pw", n=2**4, r=2, p=1)
    path.write_text(f"alice:{cheap.format()}\n")
    assert read_passwd(path)[0][b"alice"] == cheap
    assert verify_password(path, "alice", "pw")
    assert not verify_password(path, "alice", "pW")


def test_bad_lines_are_problems_with_their_numbers(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    good = CHEAP.format()
    path.write_text(
        f"alice:{good}\n"
        "no colon here\n"
        "bob:md5$abc\n"
        f"carol:{good.replace('n=16', 'n=15')}\n"  # n not a power of two
        f"dave:{good[:-4]}!!!!\n"  # not base64
        f"alice:{good}\n"
        f":{good}\n"
    )
    entries, problems = read_passwd(path)
    assert sorted(entries) == [b"alice"]
    assert [(p.line, p.message.split(":")[0]) for p in problems] == [
        (2, "not user"),
        (3, "not user"),
        (4, "not user"),
        (5, "not user"),
        (6, "alice again"),
        (7, "not user"),
    ]
    assert not verify_password(path, "bob", "anything")


def test_a_missing_file_is_an_empty_store(tmp_path: Path) -> None:
    assert read_passwd(tmp_path / "passwd") == ({}, [])
    assert not verify_password(tmp_path / "passwd", "alice", "pw")


class ScryptCalls:
    """hashlib.scrypt, recording the cost of each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int, int, int]] = []
        self.scrypt = hashlib.scrypt

    def __call__(self, password: bytes, **kw: Any) -> bytes:
        self.calls.append((kw["n"], kw["r"], kw["p"], kw["dklen"], len(kw["salt"])))
        return self.scrypt(password, **kw)


@pytest.mark.parametrize(
    ("user", "password", "apop"),
    [
        ("bob", "pw", None),  # no such user
        ("alice", "wrong", None),
        ("alice", "right", b"<1.2@h>"),  # APOP: the store cannot check a digest
        ("alice", "", None),
        ("", "pw", None),
    ],
)
def test_every_refusal_costs_one_scrypt_of_the_same_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user: str, password: str, apop: bytes | None
) -> None:
    path = tmp_path / "passwd"
    set_password(path, "alice", "right")
    calls = ScryptCalls()
    monkeypatch.setattr(checkpassword.hashlib, "scrypt", calls)
    assert not verify_password(path, user, password, apop_timestamp=apop)
    assert verify_password(path, "alice", "right")
    refused, accepted = calls.calls
    assert refused == accepted == (DUMMY.n, DUMMY.r, DUMMY.p, len(DUMMY.digest), len(DUMMY.salt))


def test_an_unknown_user_takes_as_long_as_a_wrong_password(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    set_password(path, "alice", "right")

    def fastest(user: str) -> float:
        best = float("inf")
        for _ in range(5):
            began = time.perf_counter()
            verify_password(path, user, "wrong")
            best = min(best, time.perf_counter() - began)
        return best

    wrong, unknown = fastest("alice"), fastest("nobody")
    assert 0.5 < unknown / wrong < 2, (wrong, unknown)
