"""core.tcprules on its own: the syntax, the cdb bytes, the look-up order (spec/tcprules.md)."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.tcprules import (
    ALLOW,
    Decision,
    Rule,
    Rules,
    RulesError,
    RulesFile,
    RuleSyntaxError,
    candidates,
    compile_and_swap,
    compile_cdb,
    error_str,
    find_line,
    parse_line,
    parse_rules,
)
from qmailtui.tcprulescmd import tcprules_main, tcprulescheck_main


def rules_of(text: bytes) -> list[Rule]:
    rules, problems = parse_rules(text, Path("etc/tcp.smtp"))
    assert [p for p in problems if p.is_error] == []
    return rules


def cdb_of(text: bytes) -> Rules:
    return Rules(compile_cdb(rules_of(text)))


# spec §3: rule line -> (keys, data)
VALUES = {
    b'127.:allow,RELAYCLIENT=""': ((b"127.",), b"+RELAYCLIENT=\0"),
    b":allow": ((b"",), b""),
    b":deny": ((b"",), b"D\0"),
    b'1.2.3.40-42:deny,Z="z"': ((b"1.2.3.40", b"1.2.3.41", b"1.2.3.42"), b"D\0+Z=z\0"),
    b"10.2-3.:allow,X=/a\"b/,Y='c'": ((b"10.2.", b"10.3."), b'+X=a"b\0+Y=c\0'),
    b'joe@127.0.0.1:allow,WHO="joe"': ((b"joe@127.0.0.1",), b"+WHO=joe\0"),
    b"=host.example.com:allow": ((b"=host.example.com",), b""),
    b'=.example.com:deny,A="1",B=""': ((b"=.example.com",), b"D\0+A=1\0+B=\0"),
    b"1.2.3.4:allow \t ": ((b"1.2.3.4",), b""),
    b'x:allow,A,B="v"': ((b"x",), b"+A,B=v\0"),
    b':allow,="v"': ((b"",), b"+=v\0"),
    b"=a-b:allow": ((b"=a-b",), b""),
    b"u@1.2.3.4-5:allow": ((b"u@1.2.3.4-5",), b""),
    b"1.2.3.250-999:allow": (tuple(b"1.2.3.%d" % n for n in range(250, 256)), b""),
    b"1.2.3.-2:allow": ((b"1.2.3.0", b"1.2.3.1", b"1.2.3.2"), b""),
    b"1.2.3.04-05:allow": ((b"1.2.3.4", b"1.2.3.5"), b""),
    b"1.2.3.5-4:allow": ((), b""),
    b"18446744073709551617-2.:allow": ((b"1.", b"2."), b""),  # scan_ulong wraps at 2**64
    b" :allow": ((b" ",), b""),
    b"  # x:allow": ((b"  # x",), b""),  # only '#' in column 0 makes a comment
}


@pytest.mark.parametrize("line", VALUES.keys(), ids=[v.decode() for v in VALUES])
def test_a_rule_line_becomes_these_keys_and_data(line: bytes) -> None:
    rule = parse_line(line, 1)
    assert rule is not None
    assert (rule.keys, rule.data) == VALUES[line]


@pytest.mark.parametrize("line", [b"", b"# 1.2.3.4:deny", b"#", b"no colon here", b"  \t"])
def test_tcprules_skips_comments_blank_lines_and_lines_without_a_colon(line: bytes) -> None:
    assert parse_line(line, 1) is None


BAD = {
    b"1.2.3.4:permit": "allow or deny",
    b'1.2.3.4:allow ,X="a"': "no spaces",
    b'1.2.3.4:allow,X="unterminated': "no closing",
    b"1.2.3.4:allow,X=": "no value",
    b"1.2.3.4:allow,": "no '='",
    b"1.2.3.4:allowx": "only ,VAR=",
    b"1.2.3.x-5:allow": "not a decimal number",
    b"1.2.3.4-5-6:allow": "not a decimal number",
    b"1.2.3.4:allow\r": "carriage return",
    b"a:b:allow": "allow or deny",  # the address ends at the first ':'
}


@pytest.mark.parametrize("line", BAD.keys(), ids=[b.decode() for b in BAD])
def test_a_bad_line_is_refused_with_tcprules_words_and_a_reason(line: bytes) -> None:
    with pytest.raises(RuleSyntaxError) as caught:
        parse_line(line, 1)
    assert caught.value.message == "unable to parse this line: " + line.decode()
    assert BAD[line] in caught.value.reason


def test_a_refused_line_is_shown_up_to_its_first_nul_as_tcprules_prints_it() -> None:
    with pytest.raises(RuleSyntaxError) as caught:
        parse_line(b"a:allow\0junk", 1)
    assert caught.value.shown == b"a:allow"


def test_hash_vectors_and_the_worked_example_of_the_spec() -> None:
    data = compile_cdb(rules_of(b'127.:allow,RELAYCLIENT=""\n:allow\n'))
    assert len(data) == 2114
    assert hashlib.sha256(data).hexdigest() == (
        "eb77cc85484d9cdfabc42f0e48b486bd84c13e1f1595bf65fc59a2ab8497be06"
    )


def test_an_empty_rules_file_is_an_empty_cdb_that_allows_everything() -> None:
    data = compile_cdb([])
    assert data == b"".join((2048).to_bytes(4, "little") + bytes(4) for _ in range(256))
    assert Rules(data).lookup("1.2.3.4", "h.example") == ALLOW


def test_a_key_whose_hash_is_zero_stays_in_the_index() -> None:
    # cdblib.Writer would lose the first of these: it takes a slot with hash 0 for empty.
    rules = cdb_of(b"'O>!)1j:allow,A=\"1\"\n'O>!)2I:deny\n")
    assert rules.lookup("'O>!)1j") == Decision(True, (("A", "1"),), "'O>!)1j")
    assert rules.lookup("'O>!)2I").allow is False


def test_candidates_follow_rules_c_order() -> None:
    keys = list(candidates(b"1.2.3.4", b"a.b.example.com", b"joe"))
    assert keys == [
        b"joe@1.2.3.4",
        b"joe@=a.b.example.com",
        b"1.2.3.4",
        b"=a.b.example.com",
        b"1.2.3.",
        b"1.2.",
        b"1.",
        b"=.b.example.com",
        b"=.example.com",
        b"=.com",
        b"=",
        b"",
    ]
    assert list(candidates(b"10.0.0.1", None, None)) == [
        b"10.0.0.1",
        b"10.0.0.",
        b"10.0.",
        b"10.",
        b"",
    ]


RICH = b"""\
127.:allow,RELAYCLIENT=""
1.2.3.40-42:deny,Z="z"
=host.example.com:allow,H="exact"
=.example.com:allow,H="dom"
=:allow,H="any"
joe@127.0.0.1:allow,WHO="joe"
joe@=h.x:deny
10.:allow,A="a",A="b"
10.1.:allow,A="first"
10.1.:deny
:allow,DEFAULT=""
"""

# (ip, host, info) -> what tcpserver does
LOOKUPS = [
    (("127.0.0.1", None, None), Decision(True, (("RELAYCLIENT", ""),), "127.")),
    (("1.2.3.41", None, None), Decision(False, (("Z", "z"),), "1.2.3.41")),
    (("9.9.9.9", "host.example.com", None), Decision(True, (("H", "exact"),), "=host.example.com")),
    (("9.9.9.9", "a.b.example.com", None), Decision(True, (("H", "dom"),), "=.example.com")),
    (("9.9.9.9", "other", None), Decision(True, (("H", "any"),), "=")),
    (("9.9.9.9", "", None), Decision(True, (("H", "any"),), "=")),  # a set-but-empty host tries "="
    (
        ("127.0.0.1", "host.example.com", None),
        Decision(True, (("H", "exact"),), "=host.example.com"),
    ),
    (("127.0.0.1", "a.example.com", None), Decision(True, (("RELAYCLIENT", ""),), "127.")),
    (("127.0.0.1", None, "joe"), Decision(True, (("WHO", "joe"),), "joe@127.0.0.1")),
    (("10.9.9.9", "h.x", "joe"), Decision(False, (), "joe@=h.x")),
    (("10.9.9.9", None, None), Decision(True, (("A", "a"), ("A", "b")), "10.")),
    (("10.1.0.1", None, None), Decision(True, (("A", "first"),), "10.1.")),  # first record wins
    (("9.9.9.9", None, None), Decision(True, (("DEFAULT", ""),), "")),
]


@pytest.mark.parametrize(("query", "expected"), LOOKUPS, ids=[str(q) for q, _ in LOOKUPS])
def test_lookup_decides_as_tcpserver(
    query: tuple[str, str | None, str | None], expected: Decision
) -> None:
    assert cdb_of(RICH).lookup(*query) == expected


def test_no_matching_rule_and_no_rules_file_both_allow_with_nothing_set(tmp_path: Path) -> None:
    assert cdb_of(b"10.:deny\n").lookup("192.168.1.1") == ALLOW
    assert Rules.load(tmp_path / "missing.cdb").lookup("10.0.0.1") == ALLOW
    assert not Rules.load(tmp_path / "missing.cdb").exists


def test_a_damaged_cdb_fails_the_lookup_rather_than_answering(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="protocol error"):
        Rules(b"\0" * 100).lookup("1.2.3.4")
    with pytest.raises(RulesError, match="invalid argument"):  # ucspi-tcp's words for size 0
        Rules(b"").lookup("1.2.3.4")


def test_a_d_entry_in_a_value_denies_as_it_does_in_tcpserver() -> None:
    rules = cdb_of(b':allow,X="a\0Db"\n')
    assert rules.lookup("1.2.3.4") == Decision(False, (("X", "a"),), "")


def test_find_line_names_the_first_line_that_wrote_the_key() -> None:
    text = "# rules\n127.:allow\nbad:line\n10.0.0.1-9:deny\n10.0.0.5:allow\n:allow\n"
    assert find_line(text, "127.") == 2
    assert find_line(text, "10.0.0.5") == 4
    assert find_line(text, "") == 6
    assert find_line(text, "10.0.0.10") is None
    assert find_line(text, None) is None


@st.composite
def rule_texts(draw: st.DrawFn) -> bytes:
    addresses = st.sampled_from(
        ["", "10.", "10.0.", "10.0.0.1", "10.0.0.1-3", "10.0-1.", "=", "=a.b", "=.b", "u@10.0.0.1"]
    )
    lines = []
    for _ in range(draw(st.integers(0, 10))):
        kind = draw(st.sampled_from(["allow", "deny"]))
        env = "".join(
            f',{draw(st.sampled_from("XY"))}="{draw(st.text("ab", max_size=2))}"'
            for _ in range(draw(st.integers(0, 2)))
        )
        lines.append(f"{draw(addresses)}:{kind}{env}\n")
    return "".join(lines).encode()


queries = st.tuples(
    st.sampled_from(["10.0.0.1", "10.0.0.2", "10.1.0.1", "10.0.0.9", "11.0.0.1"]),
    st.sampled_from([None, "", "a.b", "x.a.b", "c"]),
    st.sampled_from([None, "", "u"]),
)


@settings(max_examples=80, deadline=None)
@given(text=rule_texts(), query=queries)
def test_the_cdb_answers_like_the_text_rules(
    text: bytes, query: tuple[str, str | None, str | None]
) -> None:
    rules = rules_of(text)
    first: dict[bytes, bytes] = {}
    for rule in rules:
        for key in rule.keys:
            first.setdefault(key, rule.data)
    ip, host, info = (None if q is None else q.encode() for q in query)
    assert ip is not None
    expected = next(((k, first[k]) for k in candidates(ip, host, info) if k in first), None)
    assert Rules(compile_cdb(rules)).match(ip, host, info) == expected


# compile_and_swap: etc/tcp.smtp -> etc/tcp.smtp.cdb


def test_compile_and_swap_writes_the_cdb_and_leaves_no_tmp(tmp_path: Path) -> None:
    source, cdb = tmp_path / "tcp.smtp", tmp_path / "tcp.smtp.cdb"
    source.write_bytes(b'127.:allow,RELAYCLIENT=""\n:allow\n')
    assert compile_and_swap(source, cdb) == []
    assert cdb.read_bytes() == compile_cdb(rules_of(source.read_bytes()))
    assert cdb.stat().st_mode & 0o777 == 0o644 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tcp.smtp", "tcp.smtp.cdb"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_bad_line_keeps_the_old_cdb_and_names_file_and_line(tmp_path: Path) -> None:
    source, cdb = tmp_path / "tcp.smtp", tmp_path / "tcp.smtp.cdb"
    source.write_bytes(b":allow\n")
    compile_and_swap(source, cdb)
    old = cdb.read_bytes()
    source.write_bytes(b'# x\n127.:allow\n1.2.3.4:permit\n5.:allow ,X=""\n')
    problems = compile_and_swap(source, cdb)
    assert [(p.path, p.line, p.message) for p in problems if p.is_error] == [
        (source, 3, "unable to parse this line: 1.2.3.4:permit"),
        (source, 4, 'unable to parse this line: 5.:allow ,X=""'),
    ]
    assert problems[0].format(tmp_path) == (
        "tcp.smtp:3: error: unable to parse this line: 1.2.3.4:permit "
        "(after the first ':' comes allow or deny)"
    )
    assert cdb.read_bytes() == old
    assert not (tmp_path / "tcp.smtp.tmp").exists()


def test_a_missing_source_is_nothing_to_do(tmp_path: Path) -> None:
    assert compile_and_swap(tmp_path / "tcp.smtp", tmp_path / "tcp.smtp.cdb") == []
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_target_is_a_problem_and_nothing_is_left(tmp_path: Path) -> None:
    source = tmp_path / "tcp.smtp"
    source.write_bytes(b":allow\n")
    (tmp_path / "tcp.smtp.cdb").mkdir()
    problems = compile_and_swap(source, tmp_path / "tcp.smtp.cdb")
    assert [p.message for p in problems] == ["unable to write: is a directory"]
    assert not (tmp_path / "tcp.smtp.tmp").exists()


def test_warnings_for_what_tcprules_accepts_but_cannot_be_meant(tmp_path: Path) -> None:
    text = b"127.0.0.1 allow\n127.:allow\n127.:deny\n=Mail.Example.com:allow\n1.2.3.9-1:deny\n"
    _, problems = parse_rules(text, tmp_path / "tcp.smtp")
    assert [(p.line, p.severity) for p in problems] == [
        (1, "warning"),
        (3, "warning"),
        (4, "warning"),
        (5, "warning"),
    ]
    assert "ignores" in problems[0].message
    assert "line 2, which wins" in problems[1].message
    assert "capitals" in problems[2].message
    assert "empty" in problems[3].message


def test_rules_file_rereads_only_when_tcprules_replaced_the_file(tmp_path: Path) -> None:
    cdb = tmp_path / "tcp.smtp.cdb"
    watched = RulesFile(cdb)
    assert watched.current().lookup("10.0.0.1") == ALLOW
    cdb.write_bytes(compile_cdb(rules_of(b"10.:deny\n")))
    first = watched.current()
    assert first.lookup("10.0.0.1").allow is False
    assert watched.current() is first
    tmp = tmp_path / "tcp.smtp.tmp"
    tmp.write_bytes(compile_cdb(rules_of(b'10.:allow,X="1"\n')))
    tmp.replace(cdb)
    assert watched.current().lookup("10.0.0.1") == Decision(True, (("X", "1"),), "10.")
    cdb.unlink()
    assert watched.current().lookup("10.0.0.1") == ALLOW


def test_error_str_is_djbs_table_not_strerror() -> None:
    import errno

    assert error_str(errno.ENOENT) == "file does not exist"
    assert error_str(errno.EAGAIN) == "temporary failure"
    assert error_str(errno.EPROTO) == "protocol error"
    assert error_str(errno.EACCES) == "access denied"
    assert error_str(100_000) == "unknown error"


# the commands, in-process


def run_tcprules(argv: list[str], stdin: bytes) -> tuple[int, bytes]:
    err = io.BytesIO()
    code = tcprules_main(argv, stdin=io.BytesIO(stdin), stdout=io.BytesIO(), stderr=err)
    return code, err.getvalue()


def run_check(argv: list[str], env: dict[bytes, bytes]) -> tuple[int, bytes, bytes]:
    out, err = io.BytesIO(), io.BytesIO()
    code = tcprulescheck_main(argv, environ=env, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_tcprules_command_compiles_and_refuses_like_ucspi(tmp_path: Path) -> None:
    cdb, tmp = str(tmp_path / "r.cdb"), str(tmp_path / "r.tmp")
    assert run_tcprules([cdb, tmp], b"10.:deny\n") == (0, b"")
    assert Path(cdb).read_bytes() == compile_cdb(rules_of(b"10.:deny\n"))
    assert run_tcprules([cdb, tmp], b"x:y\n") == (
        100,
        b"tcprules: fatal: unable to parse this line: x:y\n",
    )
    assert Path(cdb).read_bytes() == compile_cdb(rules_of(b"10.:deny\n"))
    assert run_tcprules([cdb], b"") == (100, b"tcprules: usage: tcprules rules.cdb rules.tmp\n")
    assert run_tcprules([cdb, str(tmp_path / "no" / "t")], b"")[0] == 111


def test_tcprulescheck_takes_ip_and_host_arguments_before_the_environment(
    tmp_path: Path,
) -> None:
    cdb = tmp_path / "r.cdb"
    cdb.write_bytes(compile_cdb(rules_of(RICH)))
    env = {b"TCPREMOTEIP": b"9.9.9.9", b"TCPREMOTEHOST": b"other"}
    assert (
        run_check([str(cdb)], env)[1]
        == b"rule =:\nset environment variable H=any\nallow connection\n"
    )
    assert run_check([str(cdb), "127.0.0.1"], env)[1] == (
        b"rule 127.:\nset environment variable RELAYCLIENT=\nallow connection\n"
    )
    assert run_check([str(cdb), "1.1.1.1", "a.example.com"], env)[1] == (
        b"rule =.example.com:\nset environment variable H=dom\nallow connection\n"
    )
    assert run_check([str(cdb), "127.0.0.1"], {b"TCPREMOTEINFO": b"joe"})[1] == (
        b"rule joe@127.0.0.1:\nset environment variable WHO=joe\nallow connection\n"
    )
    assert run_check([str(cdb), "1.2.3.40"], {})[1] == b"rule 1.2.3.40:\ndeny connection\n"
    empty = tmp_path / "empty.cdb"
    empty.write_bytes(compile_cdb([]))
    assert run_check([str(empty)], {}) == (0, b"default:\nallow connection\n", b"")


def test_tcprulescheck_errors_are_ucspis(tmp_path: Path) -> None:
    assert run_check([], {}) == (100, b"", b"tcprulescheck: usage: tcprulescheck rules.cdb\n")
    missing = str(tmp_path / "x.cdb")
    assert run_check([missing], {}) == (
        111,
        b"",
        f"tcprulescheck: fatal: unable to read {missing}: file does not exist\n".encode(),
    )


def test_help_is_printed_on_standard_output() -> None:
    out = io.BytesIO()
    assert tcprules_main(["--help"], stdout=out) == 0
    assert out.getvalue().startswith(b"usage: qmailtui tcprules CDB TMP")
    out = io.BytesIO()
    assert tcprulescheck_main(["--help"], stdout=out) == 0
    assert out.getvalue().startswith(b"usage: qmailtui tcprulescheck CDB [IP [HOST]]")
