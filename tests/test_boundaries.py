"""The architecture's promises, checked in fresh interpreters."""

from __future__ import annotations

import subprocess
import sys

import pytest


def loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return set(out.stdout.split())


def test_the_core_never_imports_the_console() -> None:
    modules = loaded_after("import core.daemon, core.send, core.service, core.admin")
    assert not {m for m in modules if m.split(".")[0] in ("textual", "rich", "qmailtui")}


@pytest.mark.parametrize(
    "statement",
    ["import qmailtui.sendmail", "import qmailtui.injecting"],
)
def test_the_injection_path_stays_light(statement: str) -> None:
    """cron runs sendmail once per message: no asyncio, email, json, console."""
    modules = loaded_after(statement)
    heavy = {"asyncio", "email", "json", "textual", "rich", "argparse", "cdblib", "dns"}
    assert not {m for m in modules if m.split(".")[0] in heavy}
