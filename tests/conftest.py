"""Fixtures shared by every test: qmail roots in tmp_path, the qmail oracle."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from core.paths import QmailRoot
from tests.oracle import oracle_bin


@pytest.fixture(autouse=True)
def _keep_the_machine_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A test never reads the developer's /var/qmail or writes to $HOME."""
    monkeypatch.setenv("QMAILHOME", str(tmp_path / "no-such-root"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if os.geteuid() == 0:
        # As root, deliveries run as the recipient's uid (nobody, in tests): it must
        # be able to pass through pytest's private temporary directories.
        for parent in (tmp_path, *tmp_path.parents):
            if parent == Path(tempfile.gettempdir()) or parent == Path("/"):
                break
            parent.chmod(parent.stat().st_mode | 0o011)


@pytest.fixture(scope="session")
def oracle() -> Path:
    found = oracle_bin()
    if isinstance(found, str):
        pytest.skip(found)
    return found


@pytest.fixture
def root(tmp_path: Path) -> QmailRoot:
    """A fresh qmail root made by the same code as `qmailtui init`."""
    from core.setup import init_root

    return init_root(tmp_path / "qmail", me="mx.example.org")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "oracle" in item.fixturenames:
            item.add_marker(pytest.mark.oracle)
    os.environ.setdefault("HYPOTHESIS_PROFILE", "default")
