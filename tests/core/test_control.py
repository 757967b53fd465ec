"""control/*: each file's reader, default and fallback chain (spec/control.md §1, §3)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import control
from core.control import Config, Route
from core.errors import Problem
from core.paths import QmailRoot

ME = "mx.example.org"


def write(root: QmailRoot, name: str, data: str | bytes) -> Path:
    path = root.control_file(name)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


def remove(root: QmailRoot, name: str) -> None:
    root.control_file(name).unlink(missing_ok=True)


def load(root: QmailRoot, **files: str | bytes | None) -> Config:
    """Load the root after writing (str/bytes) or removing (None) the named files."""
    for name, data in files.items():
        if data is None:
            remove(root, name)
        else:
            write(root, name, data)
    return control.load(root)


def problems_for(config: Config, name: str) -> list[Problem]:
    return [p for p in config.problems if p.path.name == name]


# -- single-line files: defaults and fallbacks (§1.1, §3) ---------------------

# file -> (literal default when neither the file nor `me` exists, does `me` come first?)
LINE_DEFAULTS = [
    ("bouncefrom", "MAILER-DAEMON", False),
    ("doublebounceto", "postmaster", False),
    ("bouncehost", "bouncehost", True),
    ("defaultdomain", "defaultdomain", True),
    ("defaulthost", "defaulthost", True),
    ("doublebouncehost", "doublebouncehost", True),
    ("envnoathost", "envnoathost", True),
    ("idhost", "idhost", True),
    ("plusdomain", "plusdomain", True),
    ("helohost", None, True),
    ("localiphost", None, True),
    ("smtpgreeting", None, True),
]


@pytest.mark.parametrize(("name", "literal", "me_first"), LINE_DEFAULTS)
def test_absent_line_file_defaults_to_me_or_its_literal(
    root: QmailRoot, name: str, literal: str | None, me_first: bool
) -> None:
    config = load(root)
    assert getattr(config, name) == (ME if me_first else literal)


@pytest.mark.parametrize(("name", "literal", "me_first"), LINE_DEFAULTS)
def test_absent_line_file_without_me_takes_the_literal_default(
    root: QmailRoot, name: str, literal: str | None, me_first: bool
) -> None:
    config = load(root, me=None)
    assert getattr(config, name) == literal


@pytest.mark.parametrize(("name", "literal", "me_first"), LINE_DEFAULTS)
def test_present_line_file_wins_over_every_default(
    root: QmailRoot, name: str, literal: str | None, me_first: bool
) -> None:
    config = load(root, **{name: "given.example.net\n"})
    assert getattr(config, name) == "given.example.net"


@pytest.mark.parametrize(("name", "literal", "me_first"), LINE_DEFAULTS)
def test_empty_line_file_is_present_and_gives_the_empty_string(
    root: QmailRoot, name: str, literal: str | None, me_first: bool
) -> None:
    assert getattr(load(root, **{name: ""}), name) == ""
    assert getattr(load(root, **{name: "\n"}), name) == ""


def test_bouncefrom_default_is_mailer_daemon_not_me(root: QmailRoot) -> None:
    config = load(root)
    assert config.bouncefrom == "MAILER-DAEMON"
    assert config.bouncehost == ME


def test_defaultdomain_falls_back_to_me_then_to_the_literal(root: QmailRoot) -> None:
    assert load(root, defaultdomain="example.net").defaultdomain == "example.net"
    assert load(root, defaultdomain=None).defaultdomain == ME
    assert load(root, me=None).defaultdomain == "defaultdomain"


def test_doublebounceto_empty_is_kept_for_the_discard_idiom(root: QmailRoot) -> None:
    """control.md §4.5: an empty first line makes the recipient `@host`."""
    config = load(root, doublebounceto="\n")
    assert config.doublebounceto == ""
    assert config.doublebouncehost == ME


def test_only_the_first_line_of_a_single_line_file_is_read(root: QmailRoot) -> None:
    config = load(root, smtpgreeting="first\nsecond\n", me="mx.example.org\nignored\n")
    assert config.smtpgreeting == "first"
    assert config.me == ME
    assert config.problems == ()


def test_trailing_space_and_tab_are_stripped_but_leading_kept(root: QmailRoot) -> None:
    config = load(root, smtpgreeting=" \thello world \t \n")
    assert config.smtpgreeting == " \thello world"


def test_hash_is_data_in_a_single_line_file(root: QmailRoot) -> None:
    assert load(root, smtpgreeting="# not a comment\n").smtpgreeting == "# not a comment"
    assert load(root, envnoathost="#x\n").envnoathost == "#x"


def test_last_line_without_newline_is_read(root: QmailRoot) -> None:
    assert load(root, envnoathost="example.net").envnoathost == "example.net"


def test_dos_line_end_is_stripped_with_a_warning(root: QmailRoot) -> None:
    config = load(root, envnoathost="example.net\r\n")
    assert config.envnoathost == "example.net"
    [problem] = problems_for(config, "envnoathost")
    assert (problem.line, problem.severity) == (1, "warning")
    assert "carriage return" in problem.message


# -- me -----------------------------------------------------------------------


def test_missing_me_is_an_error_without_a_line(root: QmailRoot) -> None:
    config = load(root, me=None)
    assert config.me is None
    [problem] = problems_for(config, "me")
    assert problem.is_error
    assert problem.line is None
    assert "missing" in problem.message


def test_me_that_is_not_a_host_name_is_an_error_on_line_1(root: QmailRoot) -> None:
    [problem] = problems_for(load(root, me="not a host\n"), "me")
    assert (problem.line, problem.is_error) == (1, True)


def test_empty_me_is_blamed_on_no_line(root: QmailRoot) -> None:
    [problem] = problems_for(load(root, me=""), "me")
    assert problem.line is None
    assert problem.is_error


# -- integers (§1.2): junk qmail would read as 0 or ignore is an error here -------

INT_DEFAULTS = [
    ("concurrencylocal", 10),
    ("concurrencyremote", 20),
    ("queuelifetime", 604800),
    ("databytes", 0),
    ("timeoutsmtpd", 1200),
    ("timeoutremote", 1200),
    ("timeoutconnect", 60),
]


@pytest.mark.parametrize(("name", "default"), INT_DEFAULTS)
def test_absent_integer_file_takes_qmails_default(root: QmailRoot, name: str, default: int) -> None:
    config = load(root)
    assert getattr(config, name) == default
    assert config.problems == ()


@pytest.mark.parametrize(("name", "default"), INT_DEFAULTS)
def test_integer_file_value_is_read(root: QmailRoot, name: str, default: int) -> None:
    config = load(root, **{name: "7 \t\nignored\n"})
    assert getattr(config, name) == 7
    assert config.problems == ()


@pytest.mark.parametrize(("name", "default"), INT_DEFAULTS)
@pytest.mark.parametrize(
    ("text", "qmail_reads"),
    [
        ("abc", "default"),
        (" 10", "default"),
        ("-5", "default"),
        ("20abc", "20"),
        ("+5", "default"),
        ("0x10", "0"),
        ("1 000", "1"),
        ("\u0661\u0660", "default"),  # Arabic-Indic digits: not digits to scan_ulong
        ("\u00b2", "default"),  # superscript two: str.isdigit() says yes, int() says no
    ],
)
def test_non_numeric_integer_is_an_error_naming_file_and_line_1(
    root: QmailRoot, name: str, default: int, text: str, qmail_reads: str
) -> None:
    config = load(root, **{name: text + "\n"})
    assert getattr(config, name) == default
    [problem] = problems_for(config, name)
    assert problem.path == root.control_file(name)
    assert problem.line == 1
    assert problem.is_error
    assert "not a number" in problem.message
    expected = str(default) if qmail_reads == "default" else qmail_reads
    assert f"qmail would silently use {expected}" in problem.hint


def test_empty_integer_file_is_an_error_blaming_no_line(root: QmailRoot) -> None:
    config = load(root, queuelifetime="")
    assert config.queuelifetime == 604800
    [problem] = problems_for(config, "queuelifetime")
    assert (problem.line, problem.is_error) == (None, True)


@pytest.mark.parametrize(
    "text", ["2147483648", "99999999999999999999", pytest.param("9" * 5000, id="5000-digits")]
)
def test_integer_beyond_a_c_int_is_an_error(root: QmailRoot, text: str) -> None:
    config = load(root, queuelifetime=text)
    assert config.queuelifetime == 604800
    [problem] = problems_for(config, "queuelifetime")
    assert (problem.line, problem.is_error) == (1, True)
    assert "too large" in problem.message


def test_largest_c_int_is_accepted(root: QmailRoot) -> None:
    config = load(root, queuelifetime="2147483647")
    assert config.queuelifetime == 2147483647
    assert config.problems == ()


def test_timeoutsmtpd_0_becomes_1(root: QmailRoot) -> None:
    assert load(root, timeoutsmtpd="0\n").timeoutsmtpd == 1


def test_concurrency_0_holds_the_channel_and_is_kept(root: QmailRoot) -> None:
    config = load(root, concurrencylocal="0", concurrencyremote="0")
    assert (config.concurrencylocal, config.concurrencyremote) == (0, 0)
    assert config.errors == []


def test_concurrency_above_the_cap_is_an_error_and_capped(root: QmailRoot) -> None:
    config = load(root, concurrencyremote="5000")
    assert config.concurrencyremote == control.CONCURRENCY_MAX
    [problem] = problems_for(config, "concurrencyremote")
    assert (problem.line, problem.is_error) == (1, True)


# -- list files (§1.3) --------------------------------------------------------


def test_locals_absent_defaults_to_me(root: QmailRoot) -> None:
    assert load(root, locals=None).locals == frozenset([ME])


def test_locals_absent_and_me_absent_is_empty(root: QmailRoot) -> None:
    assert load(root, locals=None, me=None).locals == frozenset()


def test_empty_locals_is_present_and_has_no_domain(root: QmailRoot) -> None:
    assert load(root, locals="").locals == frozenset()


@pytest.mark.parametrize("name", ["rcpthosts", "morercpthosts"])
def test_absent_recipient_list_is_none_not_empty(root: QmailRoot, name: str) -> None:
    assert getattr(load(root, **{name: None}), name) is None
    assert getattr(load(root, **{name: ""}), name) == frozenset()


@pytest.mark.parametrize("name", ["percenthack", "badmailfrom"])
def test_absent_optional_list_is_empty(root: QmailRoot, name: str) -> None:
    assert getattr(load(root), name) == frozenset()


@pytest.mark.parametrize("name", ["locals", "rcpthosts", "morercpthosts", "percenthack"])
def test_domain_list_skips_comments_blank_lines_and_lowercases(root: QmailRoot, name: str) -> None:
    text = "# a comment\n\nExample.COM \t\n#example.net\nb.example.org"
    config = load(root, **{name: text})
    assert getattr(config, name) == frozenset(["example.com", "b.example.org"])
    assert problems_for(config, name) == []


def test_hash_after_the_first_character_is_data_in_a_list_file(root: QmailRoot) -> None:
    config = load(root, badmailfrom="a#b@example.com\n")
    assert config.badmailfrom == frozenset(["a#b@example.com"])


def test_list_entry_with_leading_space_never_matches_and_is_warned(root: QmailRoot) -> None:
    config = load(root, rcpthosts=f"{ME}\n example.com\n")
    assert config.rcpthosts == frozenset([ME, " example.com"])
    [problem] = problems_for(config, "rcpthosts")
    assert (problem.line, problem.severity) == (2, "warning")
    assert "leading white space" in problem.message


def test_star_in_rcpthosts_is_a_warning_with_the_fix(root: QmailRoot) -> None:
    config = load(root, rcpthosts=f"{ME}\n*.example.com\n")
    [problem] = problems_for(config, "rcpthosts")
    assert (problem.line, problem.severity) == (2, "warning")
    assert "'.example.com'" in problem.hint
    assert "'example.com'" in problem.hint


def test_bad_domain_in_a_list_is_a_warning_with_its_line(root: QmailRoot) -> None:
    config = load(root, locals=f"{ME}\nexa mple.com\n")
    [problem] = problems_for(config, "locals")
    assert (problem.line, problem.severity) == (2, "warning")


def test_domain_literal_is_a_valid_list_entry(root: QmailRoot) -> None:
    config = load(root, rcpthosts=f"{ME}\n[192.0.2.1]\n")
    assert "[192.0.2.1]" in (config.rcpthosts or ())
    assert config.problems == ()


# -- badmailfrom (§4.1) -------------------------------------------------------


def test_badmailfrom_holds_addresses_and_at_domains_lowercased(root: QmailRoot) -> None:
    config = load(root, badmailfrom="Spammer@Example.COM\n@Junk.example\n")
    assert config.badmailfrom == frozenset(["spammer@example.com", "@junk.example"])
    assert config.problems == ()


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ("*@spam.example", "not a wildcard"),
        ("spam.example", "no '@'"),
        (".spam.example", "no '@'"),
        (" @spam.example", "leading white space"),
    ],
)
def test_badmailfrom_line_that_never_matches_as_meant_is_warned(
    root: QmailRoot, line: str, said: str
) -> None:
    config = load(root, badmailfrom=f"ok@example.com\n{line}\n")
    [problem] = problems_for(config, "badmailfrom")
    assert (problem.line, problem.severity) == (2, "warning")
    assert said in problem.message


# -- virtualdomains (§4.3) ----------------------------------------------------


def test_virtualdomains_keys_are_lowercased_and_values_kept(root: QmailRoot) -> None:
    config = load(
        root,
        virtualdomains="Virt.example.COM:Joe\nJoe@Virt.example.com:alice\n.sub.example:s\n:all\n",
    )
    assert config.virtualdomains == {
        "virt.example.com": "Joe",
        "joe@virt.example.com": "alice",
        ".sub.example": "s",
        "": "all",
    }
    assert config.problems == ()


def test_virtualdomains_last_duplicate_wins(root: QmailRoot) -> None:
    config = load(root, virtualdomains="a.example:first\nA.EXAMPLE:second\n")
    assert config.virtualdomains == {"a.example": "second"}


def test_virtualdomains_empty_prepend_is_an_exception_entry(root: QmailRoot) -> None:
    assert load(root, virtualdomains="a.example:\n").virtualdomains == {"a.example": ""}


def test_virtualdomains_line_without_colon_is_ignored_with_a_warning(root: QmailRoot) -> None:
    config = load(root, virtualdomains="a.example:joe\nb.example\n")
    assert config.virtualdomains == {"a.example": "joe"}
    [problem] = problems_for(config, "virtualdomains")
    assert (problem.line, problem.severity) == (2, "warning")


def test_virtualdomains_value_keeps_colons_after_the_first(root: QmailRoot) -> None:
    assert load(root, virtualdomains="a.example:j:k\n").virtualdomains == {"a.example": "j:k"}


@pytest.mark.parametrize("prepend", ["joe@example.com", "joe smith", "../joe"])
def test_virtualdomains_prepend_that_is_no_local_part_is_an_error(
    root: QmailRoot, prepend: str
) -> None:
    config = load(root, virtualdomains=f"a.example:ok\nb.example:{prepend}\n")
    assert config.virtualdomains == {"a.example": "ok"}
    [problem] = problems_for(config, "virtualdomains")
    assert (problem.line, problem.is_error) == (2, True)


# -- smtproutes (§4.4, remote.md §2) ------------------------------------------


@pytest.mark.parametrize(
    ("line", "route"),
    [
        ("example.com:relay.example.net", Route("example.com", "relay.example.net", None, 1)),
        ("example.com:relay.example.net:2525", Route("example.com", "relay.example.net", 2525, 1)),
        ("Example.COM:Relay.example.net", Route("example.com", "Relay.example.net", None, 1)),
        (".example.com:relay.example.net", Route(".example.com", "relay.example.net", None, 1)),
        (":smarthost.example.net", Route("", "smarthost.example.net", None, 1)),
        (":smarthost.example.net:26", Route("", "smarthost.example.net", 26, 1)),
        ("example.com:", Route("example.com", "", None, 1)),
        ("example.com:[192.0.2.7]", Route("example.com", "[192.0.2.7]", None, 1)),
        ("example.com:192.0.2.7:587", Route("example.com", "192.0.2.7", 587, 1)),
    ],
)
def test_smtproutes_line_is_parsed(root: QmailRoot, line: str, route: Route) -> None:
    config = load(root, smtproutes=line + "\n")
    assert config.smtproutes == (route,)
    assert config.problems == ()


@pytest.mark.parametrize(
    ("route", "text"),
    [
        (Route("a.example", "relay.example", None, 1), "a.example:relay.example"),
        (Route("a.example", "relay.example", 26, 1), "a.example:relay.example:26"),
        (Route("", "relay.example", None, 1), ":relay.example"),
        (Route("a.example", "", None, 1), "a.example:"),
    ],
)
def test_route_text_is_the_smtproutes_line(route: Route, text: str) -> None:
    assert route.text == text


@pytest.mark.parametrize(
    ("port", "qmail_port"),
    [
        ("25x", "25"),
        ("abc", "0"),
        ("", "0"),
        ("0", "0"),
        ("65536", "0"),
        ("-1", "0"),
        ("\u00b2", "0"),  # str.isdigit() says yes, int() says no
        pytest.param("9" * 5000, "a number that overflowed", id="5000-digits"),
    ],
)
def test_smtproutes_bad_port_is_an_error_with_its_line(
    root: QmailRoot, port: str, qmail_port: str
) -> None:
    config = load(
        root, smtproutes=f"a.example:relay.example.net\nb.example:relay.example.net:{port}\n"
    )
    assert [r.domain for r in config.smtproutes] == ["a.example"]
    [problem] = problems_for(config, "smtproutes")
    assert (problem.line, problem.is_error) == (2, True)
    assert f"qmail would use port {qmail_port}" in problem.hint


def test_smtproutes_port_without_relay_is_an_error(root: QmailRoot) -> None:
    config = load(root, smtproutes="a.example::2525\n")
    assert config.smtproutes == ()
    [problem] = problems_for(config, "smtproutes")
    assert (problem.line, problem.is_error) == (1, True)


def test_smtproutes_bad_relay_is_an_error(root: QmailRoot) -> None:
    config = load(root, smtproutes="a.example:relay host\n")
    [problem] = problems_for(config, "smtproutes")
    assert (problem.line, problem.is_error) == (1, True)


ROUTES = (
    "inside.af.mil:firewall.af.mil:26\n"
    ".af.mil:\n"
    ":heaven.af.mil\n"
    "dup.example:first.example\n"
    "dup.example:second.example\n"
)


@pytest.mark.parametrize(
    ("host", "relay", "port"),
    [
        ("inside.af.mil", "firewall.af.mil", 26),
        ("INSIDE.AF.MIL", "firewall.af.mil", 26),
        ("a.inside.af.mil", "", None),  # .af.mil: is the longest suffix: MX
        ("x.af.mil", "", None),
        ("af.mil", "heaven.af.mil", None),  # .af.mil does not cover af.mil itself
        ("example.com", "heaven.af.mil", None),
        ("dup.example", "second.example", None),  # last duplicate wins
    ],
)
def test_smtproute_lookup_follows_qmail_remote(
    root: QmailRoot, host: str, relay: str, port: int | None
) -> None:
    route = load(root, smtproutes=ROUTES).smtproute(host)
    assert route is not None
    assert (route.relay, route.port) == (relay, port)


def test_smtproute_lookup_without_a_default_finds_nothing(root: QmailRoot) -> None:
    assert load(root, smtproutes="a.example:relay.example\n").smtproute("b.example") is None
    assert load(root, smtproutes=None).smtproute("b.example") is None


# -- defaultdelivery (§5) -----------------------------------------------------


def test_defaultdelivery_absent_is_maildir(root: QmailRoot) -> None:
    assert load(root, defaultdelivery=None).defaultdelivery == ("./Maildir/",)


def test_defaultdelivery_keeps_every_instruction_line(root: QmailRoot) -> None:
    config = load(root, defaultdelivery="|dot-forward .forward\n./Mailbox\n")
    assert config.defaultdelivery == ("|dot-forward .forward", "./Mailbox")


def test_defaultdelivery_without_an_instruction_is_an_error(root: QmailRoot) -> None:
    config = load(root, defaultdelivery="# nothing\n\n")
    assert config.defaultdelivery == ("./Maildir/",)
    [problem] = problems_for(config, "defaultdelivery")
    assert problem.is_error


# -- unknown files, unreadable files -------------------------------------------


@pytest.mark.parametrize(
    ("name", "meant"), [("rcpthost", "rcpthosts"), ("concurencyremote", "concurrencyremote")]
)
def test_misspelt_control_file_is_a_warning_naming_the_real_one(
    root: QmailRoot, name: str, meant: str
) -> None:
    config = load(root, **{name: "x\n"})
    [problem] = problems_for(config, name)
    assert problem.severity == "warning"
    assert f"did you mean control/{meant}?" in problem.message


@pytest.mark.parametrize("name", ["rcpthosts~", "#rcpthosts#", "rcpthosts.bak", "signatures"])
def test_backups_and_other_software_files_are_not_reported(root: QmailRoot, name: str) -> None:
    assert load(root, **{name: "x\n"}).problems == ()


def test_control_file_that_is_a_directory_is_an_error(root: QmailRoot) -> None:
    root.control_file("databytes").mkdir()
    config = control.load(root)
    assert config.databytes == 0
    [problem] = problems_for(config, "databytes")
    assert problem.is_error


def test_nul_byte_is_an_error(root: QmailRoot) -> None:
    config = load(root, envnoathost=b"exa\0mple.com\n")
    assert any(p.is_error and "NUL" in p.message for p in problems_for(config, "envnoathost"))


def test_fresh_root_has_no_problem(root: QmailRoot) -> None:
    assert control.load(root).problems == ()


# -- properties ---------------------------------------------------------------

ALL_FILES = sorted(control.KNOWN_FILES - {"morercpthosts.cdb", "servercert.pem"})
LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
HOST = st.lists(LABEL, min_size=1, max_size=4).map(".".join)
PROPERTY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def line_count(data: bytes) -> int:
    lines = data.split(b"\n")
    return len(lines) - 1 if lines[-1] == b"" else len(lines)


@PROPERTY
@given(files=st.dictionaries(st.sampled_from(ALL_FILES), st.binary(max_size=200), max_size=5))
def test_any_bytes_in_any_control_file_give_problems_never_exceptions(
    root: QmailRoot, files: dict[str, bytes]
) -> None:
    for name in ALL_FILES:
        remove(root, name)
    for name, data in files.items():
        write(root, name, data)
    config = control.load(root)
    for problem in config.problems:
        assert problem.path.parent == root.control, problem
        assert problem.severity in ("error", "warning")
        if problem.line is not None:
            data = files.get(problem.path.name, b"")
            assert 1 <= problem.line <= line_count(data), problem
        problem.format(root.path).encode("utf-8")  # printable on any terminal


@PROPERTY
@given(
    name=st.sampled_from(["locals", "rcpthosts", "morercpthosts", "percenthack"]),
    entries=st.lists(
        st.tuples(HOST, st.booleans(), st.sampled_from(["", " ", "\t", " \t"])),
        min_size=1,
        max_size=10,
    ),
    noise=st.lists(st.sampled_from(["", "# comment", "#x.example.com", "   "]), max_size=5),
)
def test_every_entry_of_a_valid_list_file_is_found(
    root: QmailRoot,
    name: str,
    entries: list[tuple[str, bool, str]],
    noise: list[str],
) -> None:
    lines = [(host.upper() if upper else host) + trailing for host, upper, trailing in entries]
    text = "\n".join([*noise, *lines, *noise])
    config = load(root, **{name: text})
    found = getattr(config, name)
    for host, _, _ in entries:
        assert host in found
    assert problems_for(config, name) == []


PORT = st.one_of(st.none(), st.integers(1, 65535))
IP = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
RELAY = st.one_of(HOST, IP.map(lambda ip: f"[{ip}]"), IP)
KEY = st.one_of(HOST, HOST.map(lambda h: "." + h), st.just(""))
ROUTE = st.one_of(
    st.tuples(KEY, RELAY, PORT),
    st.tuples(KEY, st.just(""), st.none()),  # `domain:` = use MX
)


@PROPERTY
@given(routes=st.lists(ROUTE, max_size=8))
def test_smtproutes_round_trip(root: QmailRoot, routes: list[tuple[str, str, int | None]]) -> None:
    values = tuple(Route(d, r, p, n) for n, (d, r, p) in enumerate(routes, 1))
    write(root, "smtproutes", "".join(f"{route.text}\n" for route in values))
    config = control.load(root)
    assert config.smtproutes == values
    assert problems_for(config, "smtproutes") == []


def test_reading_never_changes_a_file(root: QmailRoot) -> None:
    path = write(root, "smtproutes", "a.example:relay.example:99999\n")
    before = (path.read_bytes(), os.stat(path).st_mtime_ns)
    control.load(root)
    assert (path.read_bytes(), os.stat(path).st_mtime_ns) == before
