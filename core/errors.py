"""Errors a user can cause, and the exit codes they become.

Library code raises `UserError` (or returns `Problem`s); only the command
line turns them into one line on standard error and an exit code.
"""

from __future__ import annotations

import contextlib
import enum
import os
from pathlib import Path


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1  # a generic failure, or "the answer is no" (check found errors)
    USAGE = 2  # argparse's own code for a bad command line
    PERMANENT = 100  # qmail's "permanent": bad input, do not retry
    TEMPORARY = 111  # qmail's "temporary": try again later


class Problem:
    """One thing wrong (or suspicious) in a file, with the line to blame."""

    __slots__ = ("hint", "line", "message", "path", "severity")

    def __init__(
        self,
        path: Path | str,
        line: int | None,
        message: str,
        severity: str = "error",
        hint: str = "",
    ) -> None:
        self.path = Path(path)
        self.line = line  # None when no line is to blame; never invent one
        self.message = message
        self.severity = severity  # "error" or "warning"
        self.hint = hint

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def format(self, root: Path | None = None) -> str:
        """`FILE:LINE: error: MESSAGE`, FILE relative to the root when it is inside it."""
        name = str(self.path)
        if root is not None:
            with contextlib.suppress(ValueError):
                name = str(self.path.relative_to(root))
        where = f"{name}:{self.line}" if self.line is not None else name
        text = f"{where}: {self.severity}: {self.message}"
        return f"{text} ({self.hint})" if self.hint else text

    def as_dict(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "line": self.line,
            "severity": self.severity,
            "message": self.message,
            "hint": self.hint,
        }

    def __repr__(self) -> str:
        return f"Problem({self.format()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Problem) and (
            self.path,
            self.line,
            self.message,
            self.severity,
        ) == (other.path, other.line, other.message, other.severity)

    def __hash__(self) -> int:
        return hash((self.path, self.line, self.message, self.severity))


class UserError(Exception):
    """A mistake in the user's input: printed as one line, never as a traceback."""

    def __init__(
        self,
        message: str,
        *,
        path: Path | str | None = None,
        line: int | None = None,
        code: ExitCode = ExitCode.FAILURE,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = Path(path) if path is not None else None
        self.line = line
        self.code = code

    @classmethod
    def from_problem(cls, problem: Problem, code: ExitCode = ExitCode.FAILURE) -> UserError:
        return cls(problem.message, path=problem.path, line=problem.line, code=code)

    def format(self, root: Path | None = None) -> str:
        if self.path is None:
            return self.message
        name = str(self.path)
        if root is not None:
            with contextlib.suppress(ValueError):
                name = str(self.path.relative_to(root))
        where = f"{name}:{self.line}" if self.line is not None else name
        return f"{where}: {self.message}"


def os_reason(error: OSError) -> str:
    """qmail-style lower-case reason for an OSError ("file does not exist")."""
    reasons = {
        2: "file does not exist",
        13: "access denied",
        17: "file already exists",
        28: "out of disk space",
        122: "disk quota exceeded",
        20: "not a directory",
        21: "is a directory",
        30: "read-only file system",
    }
    if error.errno is not None and error.errno in reasons:
        return reasons[error.errno]
    return os.strerror(error.errno).lower() if error.errno else str(error)
