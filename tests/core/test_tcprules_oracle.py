"""core.tcprules and the tcprules commands against ucspi-tcp's real programs.

The same rules give the same cdb bytes, the same messages and exit codes;
the same connections give the same tcprulescheck output, and `Rules.lookup`
decides what that output says.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.tcprules import Decision, Rules, RulesError
from qmailtui.tcprulescmd import tcprules_main, tcprulescheck_main

TCPRULES = Path("/usr/bin/tcprules")
TCPRULESCHECK = Path("/usr/bin/tcprulescheck")
TCPSERVER = Path("/usr/bin/tcpserver")

pytestmark = [
    pytest.mark.oracle,
    pytest.mark.skipif(
        not (TCPRULES.exists() and TCPRULESCHECK.exists()),
        reason="ucspi-tcp's tcprules and tcprulescheck are not installed (apt install ucspi-tcp)",
    ),
]
REPO = Path(__file__).resolve().parents[2]
OLD = b"0.:deny\n"  # what every cdb holds before a run, to see that a failure keeps it

Outcome = tuple[int, bytes, bytes | None, bool]  # exit code, stderr, the cdb, whether TMP exists


def fresh(directory: Path) -> Path:
    """An empty directory holding the OLD rules compiled by the real tcprules."""
    directory.mkdir(parents=True, exist_ok=True)
    for entry in directory.iterdir():
        entry.unlink()
    subprocess.run(
        [TCPRULES, "rules.cdb", "rules.tmp"], input=OLD, cwd=directory, check=True, timeout=10
    )
    return directory


def outcome(directory: Path, code: int, stderr: bytes) -> Outcome:
    cdb = directory / "rules.cdb"
    return (
        code,
        stderr,
        cdb.read_bytes() if cdb.exists() else None,
        (directory / "rules.tmp").exists(),
    )


def real_tcprules(directory: Path, rules: bytes, args: list[str] | None = None) -> Outcome:
    result = subprocess.run(
        [TCPRULES, *(args if args is not None else ["rules.cdb", "rules.tmp"])],
        input=rules,
        cwd=directory,
        capture_output=True,
        timeout=10,
        check=False,
    )
    assert result.stdout == b""
    return outcome(directory, result.returncode, result.stderr)


def our_tcprules(
    directory: Path, rules: bytes, monkeypatch: pytest.MonkeyPatch, args: list[str] | None = None
) -> Outcome:
    out, err = io.BytesIO(), io.BytesIO()
    with monkeypatch.context() as m:
        m.chdir(directory)  # the messages name the files as given
        code = tcprules_main(
            args if args is not None else ["rules.cdb", "rules.tmp"],
            stdin=io.BytesIO(rules),
            stdout=out,
            stderr=err,
        )
    assert out.getvalue() == b""
    return outcome(directory, code, err.getvalue())


def both_tcprules(
    tmp_path: Path, rules: bytes, monkeypatch: pytest.MonkeyPatch, args: list[str] | None = None
) -> tuple[Outcome, Outcome]:
    theirs = real_tcprules(fresh(tmp_path / "real"), rules, args)
    ours = our_tcprules(fresh(tmp_path / "ours"), rules, monkeypatch, args)
    return theirs, ours


VALID = {
    "qmail FAQ": b'127.:allow,RELAYCLIENT=""\n1.2.3.6:allow,RELAYCLIENT=""\n:allow\n',
    "qmqp": b"1.2.3.:allow\n:deny\n",
    "empty input": b"",
    "only comments and blanks": b"# nothing\n\n#:deny\n \t \n",
    "no final newline": b"127.:allow\n:deny",
    "every address form": (
        b'1.2.3.4:allow\n1.2.3.:deny\n1.2.3.40-42:deny,Z="z"\n10.2-3.:allow,X=/a"b/,Y=\'c\'\n'
        b'=host.example.com:allow\n=.example.com:allow,D=""\n=:deny\njoe@127.0.0.1:allow,W="joe"\n'
        b"joe@=h.example.com:deny\n@1.1.1.1:allow\n:allow\n"
    ),
    "odd ranges": (
        b"1.2.3.-2:allow\n1.2.3.4-:allow\n1.2.3.250-999:allow\n1.2.3.9-1:allow\n"
        b"1.2.3.04-05:allow\n18446744073709551617-3.:allow\n-:allow\n1.2.3.\x005-6:allow\n"
    ),
    "lines without a colon are ignored": b"garbage\n127.0.0.1 allow\n:allow\n",
    "trailing blanks": b"127.:allow  \t\n:deny\t\n",
    "odd settings": b':allow,="v",A,B="x",C=""\n1.:deny,X=\x00a\x00\n2.:allow,X="a\x00Db"\n',
    "duplicates, first wins": b'127.:allow,A="1"\n127.:deny\n127.:allow,A="3"\n',
    "a key hashing to 0": b"'O>!)1j:allow\n'O>!)2I:deny\n",
    "non-ascii bytes": '=höst.example:allow,N="ü"\n'.encode() + b"\xff\xfe.:deny\n",
    "many rules": b"".join(
        b'10.%d.%d.:allow,N="%d"\n' % (i // 256, i % 256, i) for i in range(3000)
    ),
}


@pytest.mark.parametrize("rules", VALID.values(), ids=VALID.keys())
def test_tcprules_writes_the_same_cdb_bytes(
    tmp_path: Path, rules: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs, ours = both_tcprules(tmp_path, rules, monkeypatch)
    assert theirs[:2] == (0, b"")
    assert ours == theirs
    assert (tmp_path / "ours" / "rules.cdb").stat().st_mode == (
        tmp_path / "real" / "rules.cdb"
    ).stat().st_mode


BAD = {
    "unknown keyword": b"1.2.3.4:permit\n",
    "space before a setting": b'1.2.3.4:allow ,X="a"\n',
    "unterminated value": b'1.2.3.4:allow,X="unterminated\n',
    "no quote": b"1.2.3.4:allow,X=\n",
    "lone comma": b"1.2.3.4:allow,\n",
    "allowx": b"1.2.3.4:allowx\n",
    "letters in a range": b"1.2.3.x-5:allow\n",
    "two dashes": b"1.2.3.4-5-6:allow\n",
    "crlf": b"127.:allow\r\n:deny\r\n",
    "colon only": b":\n",
    "second colon": b"a:b:allow\n",
    "nul in the line": b"a:allow\x00junk\n",
    "bad line after good ones": b"127.:allow\n" * 50 + b"oops:maybe\n:allow\n",
    "bad line after 8k of rules": b"1.2.3.4:deny\n" * 2000 + b"x:bad\n",
    "bad last line without newline": b"127.:allow\n:den",
}


@pytest.mark.parametrize("rules", BAD.values(), ids=BAD.keys())
def test_a_bad_line_gives_the_same_error_and_keeps_the_old_cdb(
    tmp_path: Path, rules: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs, ours = both_tcprules(tmp_path, rules, monkeypatch)
    assert theirs[0] == 100
    assert theirs[1].startswith(b"tcprules: fatal: unable to parse this line: ")
    assert ours == theirs  # same message, the old cdb untouched, TMP left behind
    # (tcprules' TMP may hold part of the new cdb; ours is empty: neither is to be read)


ARGUMENTS = {
    "no arguments": [],
    "one argument": ["rules.cdb"],
    "extra arguments are ignored": ["rules.cdb", "rules.tmp", "extra"],
    "TMP in a missing directory": ["rules.cdb", "missing/rules.tmp"],
    "TMP is a directory": ["rules.cdb", "."],
    "CDB in a missing directory": ["missing/rules.cdb", "rules.tmp"],
    "CDB is a directory": [".", "rules.tmp"],
    "CDB under a file": ["rules.cdb/x", "rules.tmp"],
    "empty CDB name": ["", "rules.tmp"],
    "empty TMP name": ["rules.cdb", ""],
    "TMP is CDB": ["rules.cdb", "rules.cdb"],
    "name too long": ["rules.cdb", "x" * 300],
}


@pytest.mark.parametrize("args", ARGUMENTS.values(), ids=ARGUMENTS.keys())
def test_usage_and_file_errors_are_the_same(
    tmp_path: Path, args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs, ours = both_tcprules(tmp_path, b"127.:allow\n:deny\n", monkeypatch, args)
    assert ours == theirs


# hypothesis: random rule files, mostly valid, some not

ADDRESSES = [
    "",
    "10.",
    "10.0.",
    "10.0.0.",
    "10.0.0.1",
    "10.0.0.2",
    "10.0.0.1-3",
    "10.0-1.",
    "10.0.0.-1",
    "10.0.0.3-2",
    "192.168.1.5",
    "=",
    "=a.example.com",
    "=.example.com",
    "=.com",
    "=b.example.org",
    "joe@10.0.0.1",
    "joe@=a.example.com",
    "@10.0.0.2",
    "=A.Example.com",
]
text = st.text(alphabet="aZ09.-=@ \"'/#,", max_size=6)


@st.composite
def rule_lines(draw: st.DrawFn) -> bytes:
    address = draw(st.sampled_from(ADDRESSES) | text.filter(lambda t: ":" not in t))
    kind = draw(st.sampled_from(["allow", "deny"]))
    settings_ = ""
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["RELAYCLIENT", "X", "Y", "TCPLOCALHOST", ""]))
        quote = draw(st.sampled_from(['"', '"', "'", "/"]))
        value = draw(st.text(alphabet="ab@ .=,", max_size=4)).replace(quote, "")
        settings_ += f",{name}={quote}{value}{quote}"
    line = f"{address}:{kind}{settings_}"
    line = draw(
        st.sampled_from(
            [
                line,
                line,
                line,
                line + draw(st.sampled_from([" ", "\t", " \t "])),
                "# " + line,
                "",
                draw(text),  # junk: ignored without a ':', refused with one
                line.replace(":", ": ", 1),
                line + "\r",
            ]
        )
    )
    return line.encode() + b"\n"


rule_files = st.lists(rule_lines(), max_size=12).map(b"".join) | st.binary(max_size=40)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rules=rule_files)
def test_random_rule_files_compile_like_tcprules(
    tmp_path: Path, rules: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs, ours = both_tcprules(tmp_path, rules, monkeypatch)
    assert ours == theirs


# tcprulescheck


def real_check(
    cdb: Path, ip: str | None, host: str | None, info: str | None
) -> tuple[int, bytes, bytes]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin")}
    for name, value in (("TCPREMOTEIP", ip), ("TCPREMOTEHOST", host), ("TCPREMOTEINFO", info)):
        if value is not None:
            env[name] = value
    result = subprocess.run(
        [TCPRULESCHECK, cdb], env=env, capture_output=True, timeout=10, check=False
    )
    return result.returncode, result.stdout, result.stderr


def our_check(
    cdb: Path, ip: str | None, host: str | None, info: str | None, *, as_arguments: bool
) -> tuple[int, bytes, bytes]:
    """Ours, given IP and HOST as arguments or, like the real one, in the environment."""
    env: dict[bytes, bytes] = {}
    argv = [str(cdb)]
    if as_arguments and ip is not None:
        argv += [ip] if host is None else [ip, host]
        host = None if len(argv) == 3 else host
        ip = None
    for name, value in ((b"TCPREMOTEIP", ip), (b"TCPREMOTEHOST", host), (b"TCPREMOTEINFO", info)):
        if value is not None:
            env[name] = value.encode()
    out, err = io.BytesIO(), io.BytesIO()
    code = tcprulescheck_main(argv, environ=env, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def decision_from(report: bytes) -> Decision:
    """What tcprulescheck's report says tcpserver does (which skips `+NAME` without '=')."""
    lines = report.decode("utf-8", "surrogateescape").split("\n")[:-1]
    if lines == ["default:", "allow connection"]:
        return Decision(True, (), None)
    assert lines[0].startswith("rule ")
    assert lines[0].endswith(":")
    env: list[tuple[str, str]] = []
    for line in lines[1:-1]:
        name, equals, value = line.removeprefix("set environment variable ").partition("=")
        if equals:
            env.append((name, value))
    return Decision(lines[-1] == "allow connection", tuple(env), lines[0][5:-1])


def agree(
    cdb: Path, ip: str | None, host: str | None, info: str | None, *, damaged: bool = False
) -> None:
    """Our tcprulescheck prints what the real one prints, and `Rules.lookup` decides
    what it says (for a damaged cdb: the same rule and verdict, or the same failure)."""
    theirs = real_check(cdb, ip, host, info)
    assert our_check(cdb, ip, host, info, as_arguments=False) == theirs
    assert our_check(cdb, ip, host, info, as_arguments=True) == theirs
    rules = Rules.load(cdb) if cdb.is_file() else None
    address = ip if ip is not None else "0.0.0.0"
    if theirs[0] != 0:
        if damaged and rules is not None:
            with pytest.raises(RulesError):
                rules.lookup(address, host, info)
        return
    assert rules is not None
    decision = rules.lookup(address, host, info)
    said = decision_from(theirs[1])
    assert (decision.allow, decision.key) == (said.allow, said.key)
    if damaged:
        return  # a value may hold a newline now: the report cannot be read back
    if decision.allow:
        assert decision.env == said.env
    else:  # tcprulescheck stops at the D; tcpserver sets them all, then closes
        assert decision.env[: len(said.env)] == said.env


RICH = VALID["every address form"] + b'10.:allow,A="1",A="2"\n10.1.:deny\n'
IPS = [
    None,
    "",
    "0.0.0.0",
    "1.2.3.4",
    "1.2.3.5",
    "1.2.3.41",
    "1.2.4.1",
    "10.2.0.1",
    "10.3.9.9",
    "10.4.0.1",
    "10.1.0.1",
    "127.0.0.1",
    "1.1.1.1",
    "9.9.9.9",
    "1.2.3.",
    "1..2",
]
HOSTS = [
    None,
    "",
    "host.example.com",
    "a.host.example.com",
    "example.com",
    ".example.com",
    "h.example.com",
    "other",
    "x..example.com",
]
INFOS = [None, "", "joe", "ann"]


@pytest.mark.parametrize("ip", IPS)
def test_tcprulescheck_says_the_same_for_every_connection(tmp_path: Path, ip: str | None) -> None:
    cdb = tmp_path / "rules.cdb"
    subprocess.run([TCPRULES, cdb, tmp_path / "rules.tmp"], input=RICH, check=True, timeout=10)
    for host in HOSTS:
        for info in INFOS:
            agree(cdb, ip, host, info)


lookup_ips = st.sampled_from(
    ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.1.0.1", "10.0.0.0", "192.168.1.5", "11.0.0.1"]
)
lookup_hosts = st.sampled_from(
    [None, "", "a.example.com", "x.a.example.com", "b.example.org", "c.com", "zz"]
)
lookup_infos = st.sampled_from([None, "", "joe", "ann"])


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rules=st.lists(rule_lines(), max_size=12).map(b"".join),
    connections=st.lists(st.tuples(lookup_ips, lookup_hosts, lookup_infos), min_size=1, max_size=6),
)
def test_random_rules_answer_like_tcprulescheck(
    tmp_path: Path, rules: bytes, connections: list[tuple[str, str | None, str | None]]
) -> None:
    cdb = tmp_path / "rules.cdb"
    cdb.unlink(missing_ok=True)
    result = subprocess.run(
        [TCPRULES, cdb, tmp_path / "rules.tmp"],
        input=rules,
        capture_output=True,
        timeout=10,
        check=False,
    )
    if result.returncode != 0:
        return  # a refused file is the tcprules tests' business
    for ip, host, info in connections:
        agree(cdb, ip, host, info)


def test_unreadable_rules_files_give_the_same_error(tmp_path: Path) -> None:
    for name in ("missing.cdb", "missing/x.cdb", "/dev/null"):
        agree(tmp_path / name, "1.2.3.4", None, None)
    (tmp_path / "empty.cdb").write_bytes(b"")
    agree(tmp_path / "empty.cdb", "1.2.3.4", "h.example.com", "joe")
    # A directory as the rules file crashes tcprulescheck 0.88 (it reads through a
    # failed mmap); ours says "is a directory", exit 111.
    assert our_check(tmp_path, "1.2.3.4", None, None, as_arguments=False) == (
        111,
        b"",
        f"tcprulescheck: fatal: unable to read {tmp_path}: is a directory\n".encode(),
    )


def test_usage_is_the_same() -> None:
    result = subprocess.run([TCPRULESCHECK], capture_output=True, timeout=10, check=False)
    out, err = io.BytesIO(), io.BytesIO()
    assert (
        tcprulescheck_main([], environ={}, stdout=out, stderr=err),
        out.getvalue(),
        err.getvalue(),
    ) == (
        result.returncode,
        result.stdout,
        result.stderr,
    )


@pytest.fixture(scope="module")
def rich_cdb(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    directory = tmp_path_factory.mktemp("rich")
    subprocess.run([TCPRULES, "r.cdb", "r.tmp"], input=RICH, cwd=directory, check=True, timeout=10)
    return (directory / "r.cdb").read_bytes()


def test_truncated_cdbs_fail_for_the_same_connections(tmp_path: Path, rich_cdb: bytes) -> None:
    cdb = tmp_path / "cut.cdb"
    lengths = sorted(
        {1, 8, 100, 1000, 2047, 2048, 2100, len(rich_cdb) // 2}
        | {len(rich_cdb) - n for n in (1, 4, 8, 40, 200)}
    )
    for length in lengths:
        cdb.write_bytes(rich_cdb[:length])
        for ip, host in (("1.2.3.41", None), ("10.2.0.1", "h.example.com"), ("9.9.9.9", "other")):
            agree(cdb, ip, host, "joe", damaged=True)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    changes=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
    ip=st.sampled_from(IPS[3:]),
    host=st.sampled_from(HOSTS),
)
def test_damaged_cdbs_answer_or_fail_like_tcprulescheck(
    tmp_path: Path, rich_cdb: bytes, changes: list[tuple[int, int]], ip: str, host: str | None
) -> None:
    data = bytearray(rich_cdb)
    for where, byte in changes:
        data[where % len(data)] = byte
    cdb = tmp_path / "damaged.cdb"
    cdb.write_bytes(bytes(data))
    agree(cdb, ip, host, None, damaged=True)


# the command as a process, and tcpserver applying a decision


def test_the_command_reads_standard_input_like_tcprules(tmp_path: Path) -> None:
    rules = VALID["every address form"]
    command = [sys.executable, "-m", "qmailtui.tcprulescmd", "tcprules", "o.cdb", "o.tmp"]
    ours = subprocess.run(
        command,
        input=rules,
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    theirs = subprocess.run(
        [TCPRULES, "t.cdb", "t.tmp"],
        input=rules,
        cwd=tmp_path,
        capture_output=True,
        timeout=10,
        check=False,
    )
    assert (ours.returncode, ours.stdout, ours.stderr) == (0, b"", b"")
    assert (theirs.returncode, theirs.stdout, theirs.stderr) == (0, b"", b"")
    assert (tmp_path / "o.cdb").read_bytes() == (tmp_path / "t.cdb").read_bytes()
    bad = subprocess.run(
        command,
        input=b":allow\nnope:nope\n",
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert (bad.returncode, bad.stderr) == (
        100,
        b"tcprules: fatal: unable to parse this line: nope:nope\n",
    )


def serve_once(directory: Path, rules: bytes) -> bytes:
    """What a program run by the real tcpserver -x sees: its environment, or b"" when denied."""
    subprocess.run([TCPRULES, "r.cdb", "r.tmp"], input=rules, cwd=directory, check=True, timeout=10)
    command = [TCPSERVER, "-1", "-R", "-H", "-l", "local.example", "-x", "r.cdb", "127.0.0.1", "0"]
    with subprocess.Popen(
        [*command, "env"],
        cwd=directory,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={"PATH": os.environ.get("PATH", "/usr/bin")},
    ) as server:
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())  # -1: tcpserver prints the port it bound
            deadline = time.monotonic() + 10
            seen = b""
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                while time.monotonic() < deadline:
                    chunk = client.recv(65536)
                    if not chunk:
                        break
                    seen += chunk
            return seen
        finally:
            server.terminate()
            server.wait(timeout=10)


@pytest.mark.skipif(not TCPSERVER.exists(), reason="ucspi-tcp's tcpserver is not installed")
def test_tcpserver_applies_the_decision_lookup_returns(tmp_path: Path) -> None:
    rules = b'127.0.0.1:allow,RELAYCLIENT="",X="1",X="2",TCPLOCALHOST="movie.edu"\n:deny\n'
    seen = dict(line.split("=", 1) for line in serve_once(tmp_path, rules).decode().splitlines())
    (tmp_path / "o.cdb").write_bytes((tmp_path / "r.cdb").read_bytes())
    decision = Rules.load(tmp_path / "o.cdb").lookup("127.0.0.1")
    assert decision.allow
    for name, value in dict(decision.env).items():  # the last setting of a name wins
        assert seen[name] == value
    assert seen["X"] == "2"
    assert seen["TCPLOCALHOST"] == "movie.edu"
    denied = b'127.0.0.1:deny,X="1"\n:allow\n'
    assert serve_once(tmp_path, denied) == b""
    assert Rules.load(tmp_path / "r.cdb").lookup("127.0.0.1").allow is False
