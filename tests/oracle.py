"""The real qmail programs (notqmail, built by ../shared/oracle/build.sh) as oracles.

Tests that compare with qmail take the `oracle` fixture: the directory holding
the built programs. Where the oracle's source is not beside the checkout the
tests are skipped with the reason, never passed silently.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def build_script() -> Path | None:
    explicit = os.environ.get("QMAIL_ORACLE_BUILD")
    candidates = [Path(explicit)] if explicit else []
    candidates.append(REPO.parent / "shared" / "oracle" / "build.sh")
    for path in candidates:
        if path.is_file():
            return path
    return None


@functools.cache
def oracle_bin() -> Path | str:
    """The bin directory, or a string saying why there is none."""
    ready = os.environ.get("QMAIL_ORACLE_BIN")
    if ready and (Path(ready) / "qmail-inject").exists():
        return Path(ready)
    script = build_script()
    if script is None:
        return "the qmail oracle (../shared/oracle/build.sh) is not available"
    result = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, timeout=600, check=False
    )
    if result.returncode != 0:
        return f"the qmail oracle did not build: {result.stderr.strip()}"
    return Path(result.stdout.strip().splitlines()[-1])
