"""core.users against the real qmail-newu: the same users/cdb, byte for byte."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.paths import QmailRoot
from core.users import compile_cdb, newu, parse_assign

BAD_FORMAT = b"qmail-newu: fatal: bad format in users/assign\n"


def qmail_newu(oracle: Path, instance: Path, assign: bytes) -> subprocess.CompletedProcess[bytes]:
    """Run the real qmail-newu on `assign` in `instance` (its qmail home is '.')."""
    (instance / "users").mkdir(parents=True, exist_ok=True)
    (instance / "users" / "assign").write_bytes(assign)
    return subprocess.run(
        [str(oracle / "qmail-newu")], cwd=instance, capture_output=True, timeout=30, check=False
    )


def ours(assign: bytes) -> bytes:
    assignments, problems = parse_assign(assign, Path("users/assign"))
    assert [p for p in problems if p.is_error] == []
    return compile_cdb(assignments)


VALID = {
    "manual example": (
        b"+:alias:7790:2108:/var/qmail/alias:-::\n"
        b"+joe-:joe:507:100:/home/joe:-::\n"
        b"=joe:joe:507:100:/home/joe:::\n"
        b".\n"
    ),
    "oracle README": (
        b"=alice:alice:1000:1000:/srv/mail/alice:::\n+list-:lists:1001:1001:/srv/lists:-::\n.\n"
    ),
    "only the dot": b".\n",
    "dot without newline": b"=a:u:1:1:/h:::\n.",
    "lines after the dot": b"=a:u:1:1:/h:::\n.end\n=b:u:1:1:/h:::\n\ngarbage\n",
    "mixed case and duplicates": (
        b"=Joe:first:1:1:/h:::\n=JOE:second:2:2:/h:::\n+Joe-X:w:3:3:/w:-:pre:\n"
        b"+joe-x:w2:4:4:/w:-::\n+ax:a:5:5:/a:-::\n.\n"
    ),
    "leading zeros and gid 0": b"=a:u:0507:000:/h:::\n.\n",
    "text after the seventh colon": b"=a:u:1:1:/h:-:e:trailing:junk:\n.\n",
    "empty fields": b"=a::1:1::::\n+::2:2::::\n.\n",
    "other first character reads as =": b"xkey:u:1:1:/h:::\n.\n",
    "non-ascii and non-utf8": "=JÖE:jö:1:1:/hö:::\n".encode() + b"+caf\xc9:u:1:1:/h\xff:-::\n.\n",
    "CRLF line ends": b"=a:u:1:1:/h:::\r\n+b-:u:1:1:/h:-::\r\n.\r\n",
    "many wildcards": b"".join(
        b"+k%d%c:u:%d:1:/h:-:p%d:\n" % (n, b"-._xyzAB"[n % 8], n + 1, n) for n in range(300)
    )
    + b".\n",
}


@pytest.mark.parametrize("assign", VALID.values(), ids=VALID.keys())
def test_compile_cdb_writes_what_qmail_newu_writes(
    oracle: Path, tmp_path: Path, assign: bytes
) -> None:
    result = qmail_newu(oracle, tmp_path, assign)
    assert (result.returncode, result.stderr) == (0, b"")
    assert ours(assign) == (tmp_path / "users" / "cdb").read_bytes()


@pytest.mark.parametrize("assign", VALID.values(), ids=VALID.keys())
def test_newu_writes_the_same_file_as_qmail_newu(
    oracle: Path, tmp_path: Path, assign: bytes
) -> None:
    qmail_newu(oracle, tmp_path / "qmail", assign)
    root = QmailRoot(tmp_path / "ours")
    root.users.mkdir(parents=True)
    root.assign.write_bytes(assign)
    assert [p for p in newu(root) if p.is_error] == []
    theirs = tmp_path / "qmail" / "users" / "cdb"
    assert root.users_cdb.read_bytes() == theirs.read_bytes()
    assert root.users_cdb.stat().st_mode & 0o777 == theirs.stat().st_mode & 0o777 == 0o644


MALFORMED = {
    "empty file": b"",
    "no dot line": b"=a:u:1:1:/h:::\n",
    "last line unterminated": b"=a:u:1:1:/h:::",
    "blank line": b"=a:u:1:1:/h:::\n\n.\n",
    "comment without colons": b"# the users\n.\n",
    "no colon": b"=a\n.\n",
    "colon first": b":a:u:1:1:/h:::\n.\n",
    "five fields": b"=a:u:1:1:/h::\n.\n",
    "NUL byte": b"=a:u\0:1:1:/h:::\n.\n",
    "bad line after good ones": b"=a:u:1:1:/h:::\n+b:u:1:1:/h:-::\nbad\n.\n",
}


@pytest.mark.parametrize("assign", MALFORMED.values(), ids=MALFORMED.keys())
def test_both_refuse_a_malformed_file_and_keep_the_old_cdb(
    oracle: Path, tmp_path: Path, assign: bytes
) -> None:
    old = VALID["manual example"]
    qmail_newu(oracle, tmp_path / "qmail", old)
    result = qmail_newu(oracle, tmp_path / "qmail", assign)
    assert (result.returncode, result.stderr) == (111, BAD_FORMAT)
    assert (tmp_path / "qmail" / "users" / "cdb").read_bytes() == ours(old)

    root = QmailRoot(tmp_path / "ours")
    root.users.mkdir(parents=True)
    root.assign.write_bytes(old)
    newu(root)
    root.assign.write_bytes(assign)
    assert any(p.is_error for p in newu(root))
    assert root.users_cdb.read_bytes() == ours(old)
    # qmail-newu leaves a partial users/cdb.tmp behind; we leave nothing
    assert (tmp_path / "qmail" / "users" / "cdb.tmp").exists()
    assert not (root.users / "cdb.tmp").exists()


# qmail-newu accepts these, but qmail-lspawn would deliver as root (junk reads as
# 0) or to an address nobody meant: we refuse them (spec/local.md §3.1).
STRICTER = {
    "junk uid": b"=a:u:x:1:/h:::\n.\n",
    "empty gid": b"=a:u:1::/h:::\n.\n",
    "uid 0": b"=a:u:0:1:/h:::\n.\n",
    "commented-out line": b"#=a:u:1:1:/h:::\n.\n",
}


@pytest.mark.parametrize("assign", STRICTER.values(), ids=STRICTER.keys())
def test_we_refuse_what_qmail_newu_accepts_but_cannot_work(
    oracle: Path, tmp_path: Path, assign: bytes
) -> None:
    assert qmail_newu(oracle, tmp_path, assign).returncode == 0
    _, problems = parse_assign(assign, Path("users/assign"))
    assert [p.line for p in problems if p.is_error] == [1]


field = st.text(alphabet="abAZ09-._/é", max_size=5)


@st.composite
def assign_files(draw: st.DrawFn) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from("=+"))
        uid = draw(st.integers(1, 2**32 - 2).map(str) | st.integers(1, 99).map(lambda n: f"0{n}"))
        gid = draw(st.integers(0, 2**32 - 2).map(str))
        home = "/" + draw(field)
        lines.append(
            f"{kind}{draw(field)}:{draw(field)}:{uid}:{gid}:{home}:{draw(field)}:{draw(field)}:"
            + draw(st.sampled_from(["", "tail", "x:y"]))
        )
    end = draw(st.sampled_from([".\n", ".", ".\nafter\n"]))
    return "".join(f"{line}\n" for line in lines).encode() + end.encode()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(assign=assign_files())
def test_random_assign_files_compile_like_qmail_newu(
    oracle: Path, tmp_path: Path, assign: bytes
) -> None:
    instance = tmp_path / "instance"
    shutil.rmtree(instance, ignore_errors=True)
    result = qmail_newu(oracle, instance, assign)
    assert result.returncode == 0
    assert ours(assign) == (instance / "users" / "cdb").read_bytes()
