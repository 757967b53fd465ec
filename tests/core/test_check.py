"""`qmailtui check` through the real entry point: one line per problem, exit 1 on errors."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from core import users
from core.check import check
from core.paths import QmailRoot

ME = "mx.example.org"
LINE = re.compile(r"(?P<file>[^:]+?)(?::(?P<line>\d+))?: (?P<severity>error|warning): .+")


@dataclass
class Checked:
    code: int
    lines: list[str]
    stderr: str

    def find(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]

    def one(self, text: str) -> str:
        found = self.find(text)
        assert len(found) == 1, self.lines
        return found[0]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qmailtui", *args],
        capture_output=True,
        encoding="utf-8",  # strict: raw bytes from a file must not reach the terminal
        timeout=60,
        check=False,
        env=env,
    )


def qmail_check(root: QmailRoot) -> Checked:
    done = run("check", "--root", str(root.path))
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stdout.splitlines()
    for line in lines:
        assert LINE.fullmatch(line), line
        assert not line.startswith(str(root.path)), "files under the root are named relative to it"
    return Checked(done.returncode, lines, done.stderr)


def write(root: QmailRoot, relative: str, text: str, mode: int | None = None) -> Path:
    path = root.path / relative
    path.write_text(text)
    if mode is not None:
        os.chmod(path, mode)
    return path


def age(path: Path, seconds: int) -> None:
    """Make `path` older than it is by `seconds`."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - seconds * 1_000_000_000))


# -- the output contract ------------------------------------------------------


def test_fresh_init_root_is_clean(tmp_path: Path) -> None:
    created = run("init", str(tmp_path / "q"), "--me", ME)
    assert created.returncode == 0, created.stderr
    checked = qmail_check(QmailRoot(tmp_path / "q"))
    assert (checked.code, checked.lines) == (0, [])


def test_fixture_root_is_clean(root: QmailRoot) -> None:
    assert check(root) == []


def test_problem_lines_name_files_relative_to_the_root(root: QmailRoot) -> None:
    write(root, "control/concurrencyremote", "abc\n")
    write(root, "control/rcpthosts", f"{ME}\n*.example.com\n")
    checked = qmail_check(root)
    assert checked.lines
    for line in checked.lines:
        assert not line.startswith("/")
        assert str(root.path) not in line.partition(": ")[0]


def test_root_may_come_before_the_sub_command(root: QmailRoot) -> None:
    write(root, "control/concurrencyremote", "abc\n")
    done = run("--root", str(root.path), "check")
    assert done.returncode == 1
    assert "control/concurrencyremote:1: error:" in done.stdout


def test_nonexistent_root_is_one_line_and_a_failure(tmp_path: Path) -> None:
    done = run("check", "--root", str(tmp_path / "nonexistent"))
    assert done.returncode != 0
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert "nonexistent" in done.stderr


def test_garbage_in_every_control_file_is_reported_not_raised(root: QmailRoot) -> None:
    junk = bytes(range(256)) + b"\n:\n::\n%\n\xff@\xfe:\x00\n"
    for name in ("me", "locals", "rcpthosts", "virtualdomains", "smtproutes", "databytes"):
        root.control_file(name).write_bytes(junk)
    checked = qmail_check(root)
    assert checked.code == 1
    assert checked.find("error")


# -- errors: exit 1 -----------------------------------------------------------


def test_non_numeric_concurrencyremote_is_an_error_on_line_1(root: QmailRoot) -> None:
    write(root, "control/concurrencyremote", "abc\n")
    checked = qmail_check(root)
    assert checked.code == 1
    assert checked.one("concurrencyremote").startswith("control/concurrencyremote:1: error: ")


def test_smtproutes_bad_port_is_an_error_with_its_line(root: QmailRoot) -> None:
    write(root, "control/smtproutes", "a.example:relay.example.net\nb.example:relay:25x\n")
    checked = qmail_check(root)
    assert checked.code == 1
    assert checked.one("smtproutes").startswith("control/smtproutes:2: error: port '25x'")


def test_missing_rcpthosts_is_an_open_relay_error(root: QmailRoot) -> None:
    root.control_file("rcpthosts").unlink()
    checked = qmail_check(root)
    assert checked.code == 1
    line = checked.one("control/rcpthosts")
    assert line.startswith("control/rcpthosts: error: ")
    assert "open relay" in line


def test_missing_me_is_an_error(root: QmailRoot) -> None:
    root.control_file("me").unlink()
    checked = qmail_check(root)
    assert checked.code == 1
    assert checked.one("control/me").startswith("control/me: error: missing")


def test_world_writable_alias_dotqmail_is_an_error(root: QmailRoot) -> None:
    os.chmod(root.alias / ".qmail-root", 0o646)
    checked = qmail_check(root)
    assert checked.code == 1
    line = checked.one(".qmail-root")
    assert line.startswith("alias/.qmail-root: error: ")
    assert "world-writable" in line


def test_group_writable_alias_dotqmail_is_only_a_warning(root: QmailRoot) -> None:
    os.chmod(root.alias / ".qmail-root", 0o664)
    checked = qmail_check(root)
    assert checked.code == 0
    assert checked.one(".qmail-root").startswith("alias/.qmail-root: warning: ")


def test_world_writable_alias_home_is_an_error(root: QmailRoot) -> None:
    """qmail-local: `Uh-oh: home directory is writable. (#4.7.0)` for every delivery."""
    os.chmod(root.alias, 0o757)
    checked = qmail_check(root)
    assert checked.code == 1
    assert checked.one("home directory").startswith("alias: error: ")


def test_sticky_alias_home_is_a_warning(root: QmailRoot) -> None:
    os.chmod(root.alias, 0o755 | stat.S_ISVTX)
    checked = qmail_check(root)
    assert checked.code == 0
    assert checked.one("sticky").startswith("alias: warning: ")


def test_dotqmail_with_a_blank_first_line_is_an_error(root: QmailRoot) -> None:
    """qmail-local: `Uh-oh: first line of .qmail file is blank. (#4.2.1)`."""
    write(root, "alias/.qmail-info", "\n./Maildir/\n")
    checked = qmail_check(root)
    assert checked.code == 1
    assert checked.one(".qmail-info").startswith("alias/.qmail-info:1: error: ")


def test_user_home_from_assign_is_checked_too(root: QmailRoot, tmp_path: Path) -> None:
    home = tmp_path / "alice"
    home.mkdir()
    write(root, "users/assign", f"=alice:alice:1000:1000:{home}:::\n.\n")
    users.newu(root)
    (home / ".qmail").write_text("./Maildir/\n")
    os.chmod(home / ".qmail", 0o666)
    checked = qmail_check(root)
    assert checked.code == 1
    assert any("user alice: world-writable" in line for line in checked.lines)


# -- warnings: exit 0 ---------------------------------------------------------


def test_star_in_rcpthosts_is_a_warning_naming_line_and_fix(root: QmailRoot) -> None:
    write(root, "control/rcpthosts", f"{ME}\n*.example.com\n")
    checked = qmail_check(root)
    assert checked.code == 0
    line = checked.one("*.example.com")
    assert line.startswith("control/rcpthosts:2: warning: ")
    assert "'.example.com'" in line


def test_assign_newer_than_users_cdb_is_a_warning_naming_newu(root: QmailRoot) -> None:
    write(root, "users/assign", "=alice:alice:1000:1000:/nonexistent/alice:::\n.\n")
    users.newu(root)
    age(root.users_cdb, 60)
    checked = qmail_check(root)
    assert checked.code == 0
    line = checked.one("users/assign")
    assert line.startswith("users/assign: warning: newer than users/cdb")
    assert "qmailtui newu" in line


def test_assign_with_users_but_no_cdb_is_a_warning(root: QmailRoot) -> None:
    write(root, "users/assign", "=alice:alice:1000:1000:/nonexistent/alice:::\n.\n")
    checked = qmail_check(root)
    assert checked.code == 0
    assert "qmailtui newu" in checked.one("users/assign")


def test_empty_assign_without_cdb_is_fine(root: QmailRoot) -> None:
    """No users/cdb and an empty one both leave qmail-lspawn to the passwd database."""
    assert not root.users_cdb.exists()
    assert qmail_check(root).lines == []


def test_tcp_smtp_newer_than_its_cdb_is_a_warning(root: QmailRoot) -> None:
    write(root, "etc/tcp.smtp", '127.0.0.1:allow,RELAYCLIENT=""\n:allow\n')
    write(root, "etc/tcp.smtp.cdb", "")
    age(root.path / "etc/tcp.smtp.cdb", 60)
    checked = qmail_check(root)
    assert checked.code == 0
    line = checked.one("etc/tcp.smtp")
    assert line.startswith("etc/tcp.smtp: warning: newer than etc/tcp.smtp.cdb")
    assert "qmailtui tcprules" in line


def test_tcp_smtp_without_its_cdb_is_a_warning(root: QmailRoot) -> None:
    write(root, "etc/tcp.smtp", ":allow\n")
    assert qmail_check(root).one("etc/tcp.smtp").startswith("etc/tcp.smtp: warning: ")


def test_local_domain_not_in_rcpthosts_is_a_warning_on_its_locals_line(root: QmailRoot) -> None:
    write(root, "control/locals", f"{ME}\nother.example\n")
    checked = qmail_check(root)
    assert checked.code == 0
    line = checked.one("other.example")
    assert line.startswith("control/locals:2: warning: ")
    assert "rcpthosts" in line


def test_local_domain_covered_by_a_dot_suffix_in_rcpthosts_is_fine(root: QmailRoot) -> None:
    write(root, "control/locals", f"{ME}\nsub.other.example\n")
    write(root, "control/rcpthosts", f"{ME}\n.other.example\n")
    assert qmail_check(root).lines == []


def test_virtual_domain_not_in_rcpthosts_is_a_warning(root: QmailRoot) -> None:
    write(root, "control/virtualdomains", "virt.example:joe\n")
    checked = qmail_check(root)
    assert checked.code == 0
    assert checked.one("virt.example").startswith("control/virtualdomains:1: warning: ")


@pytest.mark.parametrize("name", ["rcpthost", "concurencylocal", "virtualdomain"])
def test_misspelt_control_file_is_a_did_you_mean_warning(root: QmailRoot, name: str) -> None:
    write(root, f"control/{name}", "x\n")
    checked = qmail_check(root)
    assert checked.code == 0
    line = checked.one(f"control/{name}:")  # the file itself, not the suggestion
    assert line.startswith(f"control/{name}: warning: ")
    assert "did you mean control/" in line


def test_me_that_is_not_fully_qualified_is_a_warning(root: QmailRoot) -> None:
    write(root, "control/me", "mx\n")
    write(root, "control/locals", f"{ME}\n")
    checked = qmail_check(root)
    assert checked.code == 0
    assert checked.one("fully qualified").startswith("control/me:1: warning: ")


def test_domain_in_locals_and_virtualdomains_is_a_warning_on_the_unused_line(
    root: QmailRoot,
) -> None:
    write(root, "control/virtualdomains", f"virt.example:joe\n{ME}:bob\n")
    write(root, "control/rcpthosts", f"{ME}\nvirt.example\n")
    checked = qmail_check(root)
    assert checked.code == 0
    line = checked.one("never used")
    assert line.startswith("control/virtualdomains:2: warning: ")


def test_smtproute_for_a_local_domain_is_a_warning(root: QmailRoot) -> None:
    write(root, "control/smtproutes", f"{ME}:relay.example.net\n:smarthost.example.net\n")
    checked = qmail_check(root)
    assert checked.code == 0
    assert checked.one("never used").startswith("control/smtproutes:1: warning: ")


def test_defaultdelivery_maildir_missing_in_alias_is_a_warning(root: QmailRoot) -> None:
    write(root, "control/defaultdelivery", "# the alias user's mail\n./Mail/\n")
    checked = qmail_check(root)
    assert checked.code == 0
    line = checked.one("not a Maildir")
    assert line.startswith("control/defaultdelivery:2: warning: './Mail/'")
    assert "maildirmake" in line


def test_default_maildir_missing_in_alias_is_a_warning(root: QmailRoot) -> None:
    root.control_file("defaultdelivery").unlink()
    for sub in ("new", "cur", "tmp"):
        (root.alias / "Maildir" / sub).rmdir()
    (root.alias / "Maildir").rmdir()
    checked = qmail_check(root)
    assert checked.code == 0
    assert checked.one("not a Maildir").startswith("control/defaultdelivery: warning: ")


def test_dotqmail_maildir_that_does_not_exist_is_a_warning(root: QmailRoot) -> None:
    write(root, "alias/.qmail-info", "# list\n./info/\n")
    checked = qmail_check(root)
    assert checked.code == 0
    assert checked.one("'./info/'").startswith("alias/.qmail-info:2: warning: ")


@pytest.mark.parametrize(
    ("name", "wanted"), [(".qmail-Info", ".qmail-info"), (".qmail-p.d", ".qmail-p:d")]
)
def test_dotqmail_name_qmail_never_looks_for_is_a_warning(
    root: QmailRoot, name: str, wanted: str
) -> None:
    write(root, f"alias/{name}", "&someone@example.net\n")
    checked = qmail_check(root)
    assert checked.code == 0
    line = checked.one("never used")
    assert line.startswith(f"alias/{name}: warning: ")
    assert repr(wanted) in line


def test_badmailfrom_entry_with_leading_space_is_a_warning(root: QmailRoot) -> None:
    write(root, "control/badmailfrom", "@spam.example\n @junk.example\n")
    checked = qmail_check(root)
    assert checked.code == 0
    line = checked.one("junk.example")
    assert line.startswith("control/badmailfrom:2: warning: leading white space")


def test_badmailfrom_domain_without_at_is_a_warning(root: QmailRoot) -> None:
    write(root, "control/badmailfrom", "spam.example\n")
    checked = qmail_check(root)
    assert checked.code == 0
    assert "'@spam.example'" in checked.one("control/badmailfrom:1: warning:")


@pytest.mark.parametrize("name", ["concurrencylocal", "concurrencyremote"])
def test_concurrency_0_is_a_warning(root: QmailRoot, name: str) -> None:
    write(root, f"control/{name}", "0\n")
    checked = qmail_check(root)
    assert checked.code == 0
    assert checked.one("holds every delivery").startswith(f"control/{name}:1: warning: ")


def test_warnings_only_exit_0_and_errors_exit_1(root: QmailRoot) -> None:
    write(root, "control/rcpthosts", f"{ME}\n*.example.com\n")
    assert qmail_check(root).code == 0
    write(root, "control/databytes", "10M\n")
    checked = qmail_check(root)
    assert checked.code == 1
    assert len(checked.lines) == 2


def test_file_name_that_is_not_utf8_is_printed_without_a_traceback(root: QmailRoot) -> None:
    path = os.fsencode(root.alias) + b"/.qmail-\xff"
    with open(path, "w") as f:
        f.write("&someone@example.net\n")
    os.chmod(path, 0o666)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    done = run("check", "--root", str(root.path), env=env)
    assert "Traceback" not in done.stderr
    assert done.returncode == 1
