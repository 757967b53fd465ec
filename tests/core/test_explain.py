"""`explain`: what it says is what delivery does (same code), with files and lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core import control
from core.explain import explain
from core.paths import QmailRoot
from tests.e2e.conftest import make_user


def explained(root: QmailRoot, address: str) -> tuple[str, list[str]]:
    ex = explain(root, control.load(root), address)
    lines = [
        s.text + (f" [{s.file}" + (f":{s.line}" if s.line else "") + "]" if s.file else "")
        for s in ex.steps
    ]
    return ex.outcome, lines


def test_a_user_with_a_maildir_dotqmail_is_explained_with_its_lines(root: QmailRoot) -> None:
    home = make_user(root, "alice")
    (home / ".qmail").write_text("# mine\n./Maildir/\n&bob@remote.test\n")
    outcome, lines = explained(root, "alice@mx.example.org")
    assert outcome == "delivered: maildir, forward"
    assert "mx.example.org is local [control/locals:1]" in lines
    owner = [line for line in lines if line.startswith("user alice (")]
    assert owner
    assert owner[0].endswith("[users/assign:1]")
    assert any(line.startswith(".qmail: used [") for line in lines)
    assert any(line.startswith("Maildir ./Maildir/ [") and line.endswith(":2]") for line in lines)
    assert any(line.startswith("forward to bob@remote.test [") for line in lines)


def test_an_unknown_local_user_goes_to_the_alias_user_and_bounces(root: QmailRoot) -> None:
    outcome, lines = explained(root, "nobody@mx.example.org")
    assert outcome == "bounced: Sorry, no mailbox here by that name. (#5.1.1)"
    assert "no user owns 'nobody': the alias user (" in lines[1]
    assert ".qmail-nobody: none [alias/.qmail-nobody]" in lines
    assert ".qmail-default: none [alias/.qmail-default]" in lines


def test_postmaster_uses_the_empty_alias_file_and_defaultdelivery(root: QmailRoot) -> None:
    outcome, lines = explained(root, "PostMaster@MX.example.org")
    assert outcome == "delivered: maildir"
    assert ".qmail-postmaster: used [alias/.qmail-postmaster]" in lines
    assert "Maildir ./Maildir/ [control/defaultdelivery:1]" in lines


def test_a_virtual_domain_names_its_line_and_the_prefixed_address(root: QmailRoot) -> None:
    (root.control / "virtualdomains").write_text("# v\nvirt.example.net:alias-virt\n")
    (root.alias / ".qmail-alias-virt-default").write_text("./Maildir/\n")
    outcome, lines = explained(root, "Sales@virt.example.net")
    assert outcome == "delivered: maildir"
    assert lines[0].startswith("control/virtualdomains virt.example.net:alias-virt adds")
    assert lines[0].endswith("alias-virt-Sales@virt.example.net [control/virtualdomains:2]")
    assert ".qmail-alias-virt-default: used [alias/.qmail-alias-virt-default]" in lines


def test_a_world_writable_dotqmail_defers_and_says_so(root: QmailRoot) -> None:
    path = root.alias / ".qmail-abuse"
    path.write_text("./Maildir/\n")
    path.chmod(0o666)
    outcome, _ = explained(root, "abuse@mx.example.org")
    assert outcome == "deferred: Uh-oh: .qmail file is writable. (#4.7.0)"


def test_a_missing_maildir_is_a_warning(root: QmailRoot) -> None:
    home = make_user(root, "carol", maildir=False)
    assert not (home / "Maildir").exists()
    outcome, lines = explained(root, "carol@mx.example.org")
    assert outcome == "deferred: Unable to chdir to maildir. (#4.2.1)"
    assert (
        "Maildir ./Maildir/: does not exist, so deliveries defer [control/defaultdelivery:1]"
        in lines
    )


def test_a_remote_address_says_remote(root: QmailRoot) -> None:
    outcome, lines = explained(root, "someone@elsewhere.test")
    assert outcome.startswith("remote")
    assert lines[0] == "elsewhere.test is not in control/locals nor control/virtualdomains: remote"


@pytest.mark.parametrize(
    ("dotqmail", "expected"),
    [
        ("./Maildir/\n", "delivered"),
        ("", "delivered"),
        ("\n./Maildir/\n", "deferred"),
        ("./NoSuchMaildir/\n", "deferred"),
    ],
)
async def test_what_explain_says_is_what_delivery_does(
    root: QmailRoot, dotqmail: str, expected: str
) -> None:
    """The same address explained, then delivered by the real core."""
    from core.lspawn import LocalSpawner
    from core.queue import Queue

    home = make_user(root, "dave")
    (home / ".qmail").write_text(dotqmail)
    if os.getuid() == 0:
        os.chown(home / ".qmail", 65534, 65534)
    outcome, _ = explained(root, "dave@mx.example.org")
    msgid = Queue(root).enqueue_routed(
        b"Subject: x\n\n",
        "a@b.test",
        ["dave@mx.example.org"],
        [],
        uid=0,
        pid=1,
        invoked="x",
        now=0,
    )
    spawner = LocalSpawner(root, lambda why: None)
    try:
        result = await spawner.deliver("dave@mx.example.org", "a@b.test", msgid, 0.0)
    finally:
        await spawner.close()
    status = {"K": "delivered", "Z": "deferred", "D": "bounced"}[result.status]
    assert outcome.startswith(expected)
    assert status == expected
    if expected == "deferred":
        assert result.text.strip() in outcome


def test_the_command_answers_with_exit_0_even_for_a_bounce(root: QmailRoot, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "qmailtui", "--root", str(root.path), "explain", "x@mx.example.org"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("x@mx.example.org: bounced: Sorry, no mailbox here")
    as_json = subprocess.run(
        [
            sys.executable,
            "-m",
            "qmailtui",
            "explain",
            "--json",
            "x@mx.example.org",
            "--root",
            str(root.path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    data = json.loads(as_json.stdout)
    assert data["channel"] == "local"
    assert data["steps"][0] == {
        "text": "mx.example.org is local",
        "file": "control/locals",
        "line": 1,
        "level": "info",
    }
