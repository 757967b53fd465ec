"""Remote routes as qmail-remote finds them: smtproutes, MX (lowest preference
first, random among equals), the A fallback, "this host", qmail's errors;
against a real DNS server on loopback (tests/dnsserver.py)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest

from core import control, mxroute
from core.paths import QmailRoot
from core.rdns import resolver_for
from core.setup import init_root
from tests.dnsserver import Records, dns_server
from tests.e2e.conftest import qmailtui

ZONE: Records = {
    ("pref.test", "MX"): ["20 b.pref.test.", "10 a.pref.test."],
    ("a.pref.test", "A"): ["198.51.100.1"],
    ("b.pref.test", "A"): ["198.51.100.2", "198.51.100.3"],
    ("equal.test", "MX"): ["10 x.equal.test.", "10 y.equal.test."],
    ("x.equal.test", "A"): ["198.51.100.4"],
    ("y.equal.test", "A"): ["198.51.100.5"],
    ("plain.test", "A"): ["198.51.100.6"],
    ("noaddr.test", "MX"): ["10 nowhere.noaddr.test."],
    ("backup.test", "MX"): ["10 primary.backup.test.", "20 us.backup.test."],
    ("primary.backup.test", "A"): ["198.51.100.7"],
    ("us.backup.test", "A"): ["127.0.0.1"],
    ("self.test", "MX"): ["10 us.self.test."],
    ("us.self.test", "A"): ["127.0.0.1"],
    ("relay.test", "A"): ["198.51.100.8"],
}


@pytest.fixture
def root(tmp_path: Path) -> QmailRoot:
    return init_root(tmp_path / "qmail", me="mx.example.org")


async def find(root: QmailRoot, domain: str, address: str, seed: int = 0) -> mxroute.Answer:
    host, port = address.split(":")
    resolver = resolver_for((host, int(port)))
    return await mxroute.find(control.load(root), domain, resolver, 25, random.Random(seed))


async def test_mx_records_lowest_preference_first_with_every_address(root: QmailRoot) -> None:
    with dns_server(ZONE) as dns:
        answer = await find(root, "Pref.TEST", dns.address)
    assert answer.error is None
    assert answer.how == "mx"
    assert answer.mx == [(10, "a.pref.test"), (20, "b.pref.test")]
    first, *rest = [(c.ip, c.preference) for c in answer.candidates]
    assert first == ("198.51.100.1", 10)
    assert sorted(rest) == [("198.51.100.2", 20), ("198.51.100.3", 20)]  # DNS's order


async def test_equal_preferences_come_in_either_order(root: QmailRoot) -> None:
    orders = set()
    with dns_server(ZONE) as dns:
        for seed in range(20):
            answer = await find(root, "equal.test", dns.address, seed)
            orders.add(tuple(c.ip for c in answer.candidates))
    assert orders == {("198.51.100.4", "198.51.100.5"), ("198.51.100.5", "198.51.100.4")}


async def test_no_mx_falls_back_to_the_a_records(root: QmailRoot) -> None:
    with dns_server(ZONE) as dns:
        answer = await find(root, "plain.test", dns.address)
    assert answer.how == "a"
    assert [(c.ip, c.preference) for c in answer.candidates] == [("198.51.100.6", 0)]


async def test_no_such_domain_bounces_with_qmails_text(root: QmailRoot) -> None:
    with dns_server(ZONE) as dns:
        answer = await find(root, "missing.test", dns.address)
    assert answer.error == "DSorry, I couldn't find any host named missing.test. (#5.1.2)"


async def test_mx_names_without_addresses_bounce(root: QmailRoot) -> None:
    with dns_server(ZONE) as dns:
        answer = await find(root, "noaddr.test", dns.address)
    assert answer.error == mxroute.NO_MX_ADDRESS


async def test_this_host_as_backup_mx_tries_only_the_primary(root: QmailRoot) -> None:
    with dns_server(ZONE) as dns:
        answer = await find(root, "backup.test", dns.address)
    assert [c.ip for c in answer.found] == ["198.51.100.7", "127.0.0.1"]
    assert [c.ip for c in answer.candidates] == ["198.51.100.7"]


async def test_this_host_as_best_mx_is_a_permanent_error(root: QmailRoot) -> None:
    with dns_server(ZONE) as dns:
        answer = await find(root, "self.test", dns.address)
    assert answer.error == mxroute.THIS_HOST
    assert answer.candidates == []


async def test_smtproutes_relay_and_port_without_mx(root: QmailRoot) -> None:
    (root.control / "smtproutes").write_text(".pref.test:\npref.test:relay.test:2626\n")
    with dns_server(ZONE) as dns:
        answer = await find(root, "pref.test", dns.address)
        sub = await find(root, "sub.pref.test", dns.address)
    assert answer.how == "smtproutes"
    assert answer.port == 2626
    assert [c.ip for c in answer.candidates] == ["198.51.100.8"]
    assert ("pref.test", "MX") not in dns.asked
    assert sub.how == "a" or sub.error is not None  # `.pref.test:` means MX as usual
    assert sub.route is not None
    assert sub.route.relay == ""


async def test_a_relay_on_this_host_is_tried_not_refused(root: QmailRoot) -> None:
    """qmail-remote sets prefme past every preference for a relay host, after
    its ipme check: smtproutes may point at a filter on 127.0.0.1."""
    (root.control / "smtproutes").write_text("self.test:127.0.0.1:10025\n")
    with dns_server(ZONE) as dns:
        answer = await find(root, "self.test", dns.address)
        literal = await find(root, "[127.0.0.1]", dns.address)
    assert answer.error is None
    assert [(c.ip, answer.port) for c in answer.candidates] == [("127.0.0.1", 10025)]
    assert literal.error == mxroute.THIS_HOST  # a literal is no relay: the rule holds


async def test_an_address_literal_is_used_as_it_is(root: QmailRoot) -> None:
    with dns_server(ZONE) as dns:
        answer = await find(root, "[198.51.100.9]", dns.address)
    assert answer.how == "literal"
    assert [c.ip for c in answer.candidates] == ["198.51.100.9"]
    assert dns.asked == []


async def test_a_dns_server_that_does_not_answer_is_a_temporary_failure(
    root: QmailRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mxroute, "TIMEOUT", 1.0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # bound, never answers
        answer = await find(root, "pref.test", f"127.0.0.1:{silent.getsockname()[1]}")
    assert answer.error == mxroute.NO_HOST_TEMP


def test_explain_shows_the_mx_records_and_where_a_message_would_go(root: QmailRoot) -> None:
    with dns_server(ZONE) as dns:
        done = qmailtui("explain", "user@pref.test", "--resolver", dns.address, root=root)
        selfish = qmailtui("explain", "user@self.test", "--resolver", dns.address, root=root)
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    assert "user@pref.test: remote: to 198.51.100.1 port 25 (a.pref.test)" in text, text
    assert "MX records of pref.test: 10 a.pref.test, 20 b.pref.test" in text, text
    assert selfish.returncode == 0, selfish.stderr
    assert "remote: bounced (Sorry. Although I'm listed as a best-preference MX" in (
        selfish.stdout.decode()
    )
