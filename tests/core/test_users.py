"""users/assign parsing, users/cdb compiling, and qmail-lspawn's owner look-up."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import cdblib
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import ExitCode, UserError
from core.paths import QmailRoot
from core.users import Assignment, Owner, compile_cdb, lookup, newu, parse_assign

ASSIGN = Path("users/assign")

# qmail-users(5)'s example
MANUAL = (
    b"+:alias:7790:2108:/var/qmail/alias:-::\n"
    b"+joe-:joe:507:100:/home/joe:-::\n"
    b"=joe:joe:507:100:/home/joe:::\n"
    b".\n"
)


@pytest.fixture
def qroot(tmp_path: Path) -> QmailRoot:
    root = QmailRoot(tmp_path / "qmail")
    root.users.mkdir(parents=True)
    return root


def write_assign(root: QmailRoot, data: bytes, *, mtime: int | None = None) -> None:
    root.assign.write_bytes(data)
    if mtime is not None:
        os.utime(root.assign, ns=(mtime, mtime))


def errors(data: bytes) -> list[tuple[int | None, str]]:
    _, problems = parse_assign(data, ASSIGN)
    return [(p.line, p.message) for p in problems if p.is_error]


def warnings(data: bytes) -> list[tuple[int | None, str]]:
    _, problems = parse_assign(data, ASSIGN)
    return [(p.line, p.message) for p in problems if not p.is_error]


# --- parsing ---------------------------------------------------------------


def test_the_manual_example_parses_to_three_assignments() -> None:
    assignments, problems = parse_assign(MANUAL, ASSIGN)
    assert problems == []
    assert assignments == [
        Assignment(True, "", "alias", 7790, 2108, "/var/qmail/alias", "-", "", 1),
        Assignment(True, "joe-", "joe", 507, 100, "/home/joe", "-", "", 2),
        Assignment(False, "joe", "joe", 507, 100, "/home/joe", "", "", 3),
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param(
            b"=joe:joe:507:100:/home/joe:::",
            Assignment(False, "joe", "joe", 507, 100, "/home/joe", "", "", 1),
            id="simple",
        ),
        pytest.param(
            b"+list-:lists:1001:1001:/srv/lists:-:pre-:",
            Assignment(True, "list-", "lists", 1001, 1001, "/srv/lists", "-", "pre-", 1),
            id="wildcard with a pre",
        ),
        pytest.param(
            b"+:alias:7790:2108:/a:-::",
            Assignment(True, "", "alias", 7790, 2108, "/a", "-", "", 1),
            id="catch-all",
        ),
        pytest.param(
            b"=Joe.Shmoe:joe:503:78:/home/joe:::",
            Assignment(False, "joe.shmoe", "joe", 503, 78, "/home/joe", "", "", 1, "Joe.Shmoe"),
            id="key lower-cased, spelling kept",
        ),
        pytest.param(
            b"=joe:joe:507:100:/home/joe:::anything: at all",
            Assignment(False, "joe", "joe", 507, 100, "/home/joe", "", "", 1),
            id="text after the seventh colon ignored",
        ),
        pytest.param(
            b"=joe:joe:0507:000:/home/joe:::",
            Assignment(False, "joe", "joe", 507, 0, "/home/joe", "", "", 1, None, "0507", "000"),
            id="leading zeros kept for the cdb; gid 0 allowed",
        ),
        pytest.param(
            b"=:nobody:9:9:/n:::",
            Assignment(False, "", "nobody", 9, 9, "/n", "", "", 1),
            id="empty simple key",
        ),
        pytest.param(
            b"=J\xc3\x96E:j:1:1:/j:::",
            Assignment(False, "j\xd6e", "j", 1, 1, "/j", "", "", 1, "J\xd6E"),
            id="only ASCII is lower-cased, as case_lowerb",
        ),
        pytest.param(
            b"=joe:joe:1:1:/home/joe:::\r",
            Assignment(False, "joe", "joe", 1, 1, "/home/joe", "", "", 1),
            id="a CR after the seventh colon is ignored",
        ),
    ],
)
def test_a_valid_line_parses_to(line: bytes, expected: Assignment) -> None:
    assignments, problems = parse_assign(line + b"\n.\n", ASSIGN)
    assert [p for p in problems if p.is_error] == []
    assert assignments == [expected]


def test_non_utf8_bytes_survive() -> None:
    assignments, _ = parse_assign(b"=caf\xe9:u:1:1:/h\xff:::\n.\n", ASSIGN)
    assert assignments[0].cdb_key == b"!caf\xe9\0"
    assert assignments[0].cdb_value == b"u\x001\x001\x00/h\xff\0\0"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b".\n", id="only the dot"),
        pytest.param(b".", id="dot without newline"),
        pytest.param(b"=a:u:1:1:/h:::\n.", id="final dot without newline"),
        pytest.param(b"=a:u:1:1:/h:::\n.anything\n", id="any line starting with a dot ends it"),
    ],
)
def test_the_end_line_is_any_line_starting_with_a_dot(data: bytes) -> None:
    assert errors(data) == []


def test_lines_after_the_dot_are_ignored_with_a_warning() -> None:
    data = b"=a:u:1:1:/h:::\n.\n\n=b:u:1:1:/h:::\n"
    assignments, problems = parse_assign(data, ASSIGN)
    assert [a.key for a in assignments] == ["a"]
    assert [(p.line, p.severity) for p in problems] == [(4, "warning")]


@pytest.mark.parametrize(
    ("data", "line", "fragment"),
    [
        pytest.param(b"", None, "no '.' line", id="empty file"),
        pytest.param(b"=a:u:1:1:/h:::\n", None, "no '.' line", id="no dot line"),
        pytest.param(b"=a:u:1:1:/h:::", 1, "no newline", id="last line unterminated"),
        pytest.param(b"=a:u:1:1:/h:::\n\n.\n", 2, "blank line", id="blank line"),
        pytest.param(b"# users\n.\n", 1, "comment", id="comment"),
        pytest.param(b"#=a:u:1:1:/h:::\n.\n", 1, "comment", id="commented-out assignment"),
        pytest.param(b"=a:u:1:1:/h:::\n=b\n.\n", 2, "no ':'", id="no colon"),
        pytest.param(b":a:u:1:1:/h:::\n.\n", 1, "starts with ':'", id="colon first"),
        pytest.param(b"=a:u:1:1:/h::\n.\n", 1, "5 of the 6 fields", id="five fields"),
        pytest.param(b"=a:u\0:1:1:/h:::\n.\n", 1, "NUL", id="NUL byte"),
        pytest.param(b"=a:u:x:1:/h:::\n.\n", 1, "uid 'x' is not a decimal", id="junk uid"),
        pytest.param(b"=a:u::1:/h:::\n.\n", 1, "uid '' is not a decimal", id="empty uid"),
        pytest.param(b"=a:u:12x:1:/h:::\n.\n", 1, "uid '12x'", id="uid with a tail"),
        pytest.param(b"=a:u:1:-1:/h:::\n.\n", 1, "gid '-1' is not a decimal", id="negative gid"),
        pytest.param(b"=a:u:0:1:/h:::\n.\n", 1, "uid 0", id="root"),
        pytest.param(b"=a:u:000:1:/h:::\n.\n", 1, "uid 0", id="root spelt 000"),
        pytest.param(b"=a:u:4294967295:1:/h:::\n.\n", 1, "out of range", id="uid -1"),
        pytest.param(b"=a:u:1:99999999999:/h:::\n.\n", 1, "gid 99999999999 is out", id="big gid"),
    ],
)
def test_a_format_error_is_reported_with_its_line(
    data: bytes, line: int | None, fragment: str
) -> None:
    found = errors(data)
    assert len(found) == 1, found
    assert found[0][0] == line
    assert fragment in found[0][1]


def test_every_bad_line_is_reported_not_only_the_first() -> None:
    data = b"=a:u:1:1:/h:::\nbad\n=b:u:0:1:/h:::\n\n=c:u:1:1:/h:::\n.\n"
    assert [line for line, _ in errors(data)] == [2, 3, 4]


def test_a_line_with_an_error_is_not_an_assignment() -> None:
    assignments, _ = parse_assign(b"=a:u:0:1:/h:::\n=b:u:1:1:/h:::\n.\n", ASSIGN)
    assert [a.key for a in assignments] == ["b"]


@pytest.mark.parametrize(
    ("data", "line", "fragment"),
    [
        pytest.param(b"=a:u:1:1:home:::\n.\n", 1, "not absolute", id="relative home"),
        pytest.param(b"xa:u:1:1:/h:::\n.\n", 1, "read as '='", id="other first character"),
        pytest.param(
            b"=a:u:1:1:/h:::\n=A:v:2:2:/h:::\n.\n", 2, "as line 1, which wins", id="duplicate"
        ),
        pytest.param(
            b"+a-:u:1:1:/h:-::\n+A-:v:2:2:/h:-::\n.\n", 2, "as line 1", id="duplicate wildcard"
        ),
        pytest.param(b"+Joe-X:u:1:1:/h:-::\n.\n", 1, "never matches", id="upper-case wildcard end"),
    ],
)
def test_a_suspicious_line_is_a_warning(data: bytes, line: int, fragment: str) -> None:
    assert errors(data) == []
    found = warnings(data)
    assert len(found) == 1, found
    assert found[0][0] == line
    assert fragment in found[0][1]


def test_simple_and_wildcard_keys_do_not_clash() -> None:
    assert warnings(b"=joe:u:1:1:/h:::\n+joe:v:2:2:/h:-::\n.\n") == []


def test_an_upper_case_wildcard_end_is_fine_when_another_wildcard_ends_in_lower_case() -> None:
    assert warnings(b"+Joe-X:u:1:1:/h:-::\n+ax:v:2:2:/h:-::\n.\n") == []


# --- compiling -------------------------------------------------------------


def records(cdb: bytes) -> list[tuple[bytes, bytes]]:
    return [(bytes(k), bytes(v)) for k, v in cdblib.Reader(data=cdb).iteritems()]


def test_the_cdb_holds_qmail_newu_records_in_order() -> None:
    assignments, _ = parse_assign(
        b"=alice:alice:1000:1000:/srv/mail/alice:::\n+list-:lists:1001:1001:/srv/lists:-::\n.\n",
        ASSIGN,
    )
    assert records(compile_cdb(assignments)) == [
        (b"!alice\0", b"alice\x001000\x001000\x00/srv/mail/alice\0\0"),
        (b"!list-", b"lists\x001001\x001001\x00/srv/lists\0-\0"),
        (b"", b"-"),
    ]


def test_wildcard_end_characters_are_listed_once_as_written_in_order() -> None:
    assignments, _ = parse_assign(
        b"+:a:1:1:/h:-::\n+b-:a:1:1:/h:-::\n+C:a:1:1:/h:-::\n+d-:a:1:1:/h:-::\n"
        b"=e-:a:1:1:/h:::\n+fc:a:1:1:/h:-::\n.\n",
        ASSIGN,
    )
    assert records(compile_cdb(assignments))[-1] == (b"", b"-Cc")


def test_duplicates_are_all_written_and_the_first_is_found() -> None:
    assignments, _ = parse_assign(b"=a:first:1:1:/h:::\n=A:second:2:2:/h:::\n.\n", ASSIGN)
    cdb = cdblib.Reader(data=compile_cdb(assignments))
    assert list(cdb.gets(b"!a\0")) == [b"first\x001\x001\0/h\0\0", b"second\x002\x002\0/h\0\0"]


def test_an_empty_assign_file_compiles_to_the_wildcard_record_alone() -> None:
    cdb = compile_cdb([])
    assert len(cdb) == 2048 + 8 + 2 * 8  # header, the record, its 2-slot table
    assert records(cdb) == [(b"", b"")]


# --- newu ------------------------------------------------------------------


def test_newu_writes_users_cdb_mode_0644_and_no_tmp(qroot: QmailRoot) -> None:
    write_assign(qroot, MANUAL)
    assert newu(qroot) == []
    assert qroot.users_cdb.read_bytes() == compile_cdb(parse_assign(MANUAL, ASSIGN)[0])
    assert qroot.users_cdb.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in qroot.users.iterdir()) == ["assign", "cdb"]


def test_newu_refuses_a_bad_file_and_leaves_the_old_cdb(qroot: QmailRoot) -> None:
    write_assign(qroot, MANUAL)
    newu(qroot)
    before = qroot.users_cdb.read_bytes()
    write_assign(qroot, b"=a:u:1:1:/h:::\nbad\n")
    problems = newu(qroot)
    assert [(p.line, p.is_error) for p in problems] == [(2, True), (None, True)]
    assert qroot.users_cdb.read_bytes() == before
    assert sorted(p.name for p in qroot.users.iterdir()) == ["assign", "cdb"]


def test_newu_returns_warnings_and_still_writes(qroot: QmailRoot) -> None:
    write_assign(qroot, b"=a:u:1:1:home:::\n.\n")
    problems = newu(qroot)
    assert [p.severity for p in problems] == ["warning"]
    assert qroot.users_cdb.exists()


def test_newu_without_users_assign_is_one_problem(qroot: QmailRoot) -> None:
    problems = newu(qroot)
    assert [(p.path, p.line, p.message) for p in problems] == [
        (qroot.assign, None, "unable to read: file does not exist")
    ]
    assert not qroot.users_cdb.exists()


# --- lookup ----------------------------------------------------------------


def owner(root: QmailRoot, local: str) -> tuple[str, str, str] | None:
    """(source, dash, ext): enough to tell which line matched and what qmail-local gets."""
    found = lookup(root, local)
    return None if found is None else (found.source, found.dash, found.ext)


PRECEDENCE = (
    b"+:alias:7790:2108:/var/qmail/alias:-::\n"  # 1
    b"+joe-:joe:507:100:/home/joe:-::\n"  # 2
    b"=joe:joe:507:100:/home/joe:::\n"  # 3
    b"+joe-list-:lists:508:100:/srv/lists:-:joe-:\n"  # 4
    b"=joe-list-owner:joe:507:100:/home/joe:-:owner:\n"  # 5
    b"+jo:wild:509:100:/home/wild:-:pre-:\n"  # 6
    b".\n"
)


@pytest.mark.parametrize("compiled", [False, True], ids=["assign", "cdb"])
@pytest.mark.parametrize(
    ("local", "line", "dash", "ext"),
    [
        ("joe", 3, "", ""),  # simple beats every wildcard
        ("JOE", 3, "", ""),  # case-insensitive
        ("joe-direct", 2, "-", "direct"),
        ("Joe-Direct", 2, "-", "Direct"),  # the rest keeps its case
        ("joe-", 2, "-", ""),  # a wildcard matches its prefix itself
        ("joe-list-x", 4, "-", "joe-x"),  # longer wildcard beats shorter; pre + rest
        ("joe-list-", 4, "-", "joe-"),
        ("joe-list-owner", 5, "-", "owner"),  # simple beats a longer wildcard
        ("joe-list-owner-x", 4, "-", "joe-owner-x"),  # simple matches only exactly
        ("joel", 6, "-", "pre-el"),  # '+jo' ends in 'o', which is a wildchar
        ("bill", 1, "-", "bill"),  # the catch-all
        ("Bill", 1, "-", "Bill"),
        ("j", 1, "-", "j"),
    ],
)
def test_lookup_precedence(
    qroot: QmailRoot, compiled: bool, local: str, line: int, dash: str, ext: str
) -> None:
    write_assign(qroot, PRECEDENCE)
    if compiled:
        assert newu(qroot) == []
    source = "users/cdb" if compiled else f"users/assign:{line}"
    assert owner(qroot, local) == (source, dash, ext)


def test_lookup_returns_the_whole_owner(qroot: QmailRoot) -> None:
    write_assign(qroot, PRECEDENCE)
    assert lookup(qroot, "joe-list-x") == Owner(
        "lists", 508, 100, "/srv/lists", "-", "joe-x", "users/assign:4"
    )


@pytest.mark.parametrize("compiled", [False, True], ids=["assign", "cdb"])
def test_without_a_catch_all_an_unknown_address_has_no_owner(
    qroot: QmailRoot, compiled: bool
) -> None:
    write_assign(qroot, b"=joe:joe:507:100:/home/joe:::\n+joe-:joe:507:100:/home/joe:-::\n.\n")
    if compiled:
        newu(qroot)
    assert lookup(qroot, "bill") is None
    assert lookup(qroot, "jo") is None


@pytest.mark.parametrize("compiled", [False, True], ids=["assign", "cdb"])
def test_a_wildcard_written_in_upper_case_never_matches(qroot: QmailRoot, compiled: bool) -> None:
    # qmail-newu lists the 'X' as written; qmail-lspawn looks for the lower-cased 'x'.
    write_assign(qroot, b"+Joe-X:joe:507:100:/home/joe:-::\n+:alias:7:7:/a:-::\n.\n")
    if compiled:
        newu(qroot)
    found = lookup(qroot, "joe-xyz")
    assert found is not None
    assert found.user == "alias"
    write_assign(qroot, b"+Joe-X:joe:507:100:/home/joe:-::\n+ax:a:8:8:/a:-::\n.\n")
    if compiled:
        newu(qroot)
    assert owner(qroot, "joe-xyz") == (
        "users/cdb" if compiled else "users/assign:1",
        "-",
        "yz",
    )


@pytest.mark.parametrize("compiled", [False, True], ids=["assign", "cdb"])
def test_only_ascii_is_case_folded(qroot: QmailRoot, compiled: bool) -> None:
    write_assign(qroot, "=JÖE:j:1:1:/j:::\n.\n".encode())
    if compiled:
        newu(qroot)
    assert lookup(qroot, "jÖe") is not None
    assert lookup(qroot, "jöe") is None


def test_the_empty_local_part_is_never_looked_up(qroot: QmailRoot) -> None:
    write_assign(qroot, b"=:u:1:1:/h:::\n+:alias:7:7:/a:-::\n.\n")
    assert lookup(qroot, "") is None


def test_the_local_part_ends_at_a_nul_as_in_c(qroot: QmailRoot) -> None:
    write_assign(qroot, b"=joe:joe:1:1:/h:::\n.\n")
    assert owner(qroot, "joe\0-tail") == ("users/assign:1", "", "")


def test_no_assign_and_no_cdb_means_no_owner(qroot: QmailRoot) -> None:
    assert lookup(qroot, "joe") is None


def test_an_edit_counts_before_newu_runs(qroot: QmailRoot) -> None:
    write_assign(qroot, b"=joe:old:1:1:/h:::\n.\n", mtime=1_000_000_000_000_000_000)
    newu(qroot)
    os.utime(qroot.users_cdb, ns=(1_000_000_000_000_000_000,) * 2)
    assert lookup(qroot, "joe") == Owner("old", 1, 1, "/h", "", "", "users/cdb")
    write_assign(qroot, b"=joe:new:2:2:/h:::\n.\n", mtime=1_000_000_001_000_000_000)
    assert lookup(qroot, "joe") == Owner("new", 2, 2, "/h", "", "", "users/assign:1")
    newu(qroot)
    assert lookup(qroot, "joe") == Owner("new", 2, 2, "/h", "", "", "users/cdb")


def test_a_cdb_without_an_assign_file_is_used(qroot: QmailRoot) -> None:
    write_assign(qroot, b"=joe:joe:1:1:/h:::\n.\n")
    newu(qroot)
    qroot.assign.unlink()
    assert owner(qroot, "joe") == ("users/cdb", "", "")


def test_a_broken_edit_falls_back_to_the_last_compiled_cdb(qroot: QmailRoot) -> None:
    write_assign(qroot, b"=joe:old:1:1:/h:::\n.\n", mtime=1_000_000_000_000_000_000)
    newu(qroot)
    os.utime(qroot.users_cdb, ns=(1_000_000_000_000_000_000,) * 2)
    write_assign(qroot, b"=joe:new:0:2:/h:::\n.\n", mtime=1_000_000_001_000_000_000)
    assert lookup(qroot, "joe") == Owner("old", 1, 1, "/h", "", "", "users/cdb")


def test_a_broken_assign_without_a_cdb_is_a_temporary_failure(qroot: QmailRoot) -> None:
    write_assign(qroot, b"=joe:joe:1:1:/h:::\nbad\n.\n")
    with pytest.raises(UserError) as caught:
        lookup(qroot, "joe")
    assert (caught.value.line, caught.value.code) == (2, ExitCode.TEMPORARY)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\0" * 100, id="truncated header"),
        pytest.param(b"\0" * 2048, id="no wildcard record"),
        pytest.param(compile_cdb([])[:-4], id="truncated table"),
    ],
)
def test_an_unreadable_cdb_is_a_temporary_failure(qroot: QmailRoot, data: bytes) -> None:
    qroot.users_cdb.write_bytes(data)
    with pytest.raises(UserError) as caught:
        lookup(qroot, "joe")
    assert caught.value.code == ExitCode.TEMPORARY
    assert caught.value.message.startswith("trouble reading")


def test_a_cdb_record_is_read_as_qmail_lspawn_reads_it(qroot: QmailRoot) -> None:
    # Not from our newu: junk uid reads as 0 (scan_ulong), the ext ends at a NUL.
    with open(qroot.users_cdb, "wb") as f:
        writer = cdblib.Writer(f)
        writer.put(b"!joe\0", b"joe\x0012x\x00junk\x00/h\x00-\x00ext\x00more")
        writer.put(b"", b"")
        writer.finalize()
    assert lookup(qroot, "joe") == Owner("joe", 12, 0, "/h", "-", "ext", "users/cdb")


def test_a_cdb_record_with_too_few_fields_is_a_temporary_failure(qroot: QmailRoot) -> None:
    with open(qroot.users_cdb, "wb") as f:
        writer = cdblib.Writer(f)
        writer.put(b"!joe\0", b"joe\x001\x001")
        writer.put(b"", b"")
        writer.finalize()
    with pytest.raises(UserError):
        lookup(qroot, "joe")


# --- the cdb answers like the text -----------------------------------------

KEY_CHARS = "abAB-.x_é"
text = st.text(alphabet="abc-./_é", max_size=6)
key = st.text(alphabet=KEY_CHARS, max_size=5)
number = st.integers(1, 70000).map(str) | st.integers(1, 99).map(lambda n: f"00{n}")


@st.composite
def assign_lines(draw: st.DrawFn) -> list[str]:
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from("=+"))
        fields = [
            draw(st.sampled_from(["joe", "list", "alias"])),
            draw(number),
            draw(number | st.just("0")),
            "/home/" + draw(text),
            draw(st.sampled_from(["", "-"])),
            draw(text),
        ]
        lines.append(f"{kind}{draw(key)}:{':'.join(fields)}:")
    return lines


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(lines=assign_lines(), locals_=st.lists(st.text(alphabet=KEY_CHARS, max_size=8), max_size=8))
def test_the_compiled_cdb_answers_like_the_assign_file(
    qroot: QmailRoot, lines: list[str], locals_: list[str]
) -> None:
    data = "".join(f"{line}\n" for line in [*lines, "."]).encode()
    qroot.users_cdb.unlink(missing_ok=True)
    write_assign(qroot, data)
    assert errors(data) == []
    # also every key and key + a tail, so that hits are common
    keys = [line[1:].split(":", 1)[0] for line in lines]
    queries = [*locals_, *keys, *(k + "-Zz" for k in keys), *(k.upper() for k in keys)]
    from_text = [lookup(qroot, q) for q in queries]
    assert all(o is None or o.source.startswith("users/assign:") for o in from_text)
    assert [p for p in newu(qroot) if p.is_error] == []
    from_cdb = [lookup(qroot, q) for q in queries]
    assert all(o is None or o.source == "users/cdb" for o in from_cdb)
    assert [_no_source(o) for o in from_cdb] == [_no_source(o) for o in from_text]


def _no_source(found: Owner | None) -> Owner | None:
    return None if found is None else dataclasses.replace(found, source="")


@given(lines=assign_lines())
def test_the_cdb_holds_every_line_in_order_then_the_wildcard_record(lines: list[str]) -> None:
    data = "".join(f"{line}\n" for line in [*lines, "."]).encode()
    assignments, _ = parse_assign(data, ASSIGN)
    found = records(compile_cdb(assignments))
    assert found[:-1] == [(a.cdb_key, a.cdb_value) for a in assignments]
    assert found[-1][0] == b""
