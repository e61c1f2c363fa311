"""Errors a user can meet, and the exit code each one gives: declared once, here.

The CLI catches `ExportError` at its edge and prints `str(error)` as one line; anything
else is a bug and exits 1. `CONTRACT.md`'s exit-code line and the README's are checked
against `ExitCode` by a test.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What the process returns; the docstrings are the contract's words."""

    DONE = 0
    BUG = 1
    USAGE = 2
    KEY_REJECTED = 3
    API_FAILING = 4
    STORAGE = 5
    VERIFY_FAILED = 6
    LOCK_HELD = 75  # EX_TEMPFAIL: try again later
    INTERRUPTED = 130  # the shell's code for Ctrl-C; not an outcome a job reports

    @property
    def meaning(self) -> str:
        return _MEANINGS[self]


_MEANINGS = {
    ExitCode.DONE: "done",
    ExitCode.BUG: "anything unexpected (a bug)",
    ExitCode.USAGE: "bad usage or config",
    ExitCode.KEY_REJECTED: "key rejected (401/403)",
    ExitCode.API_FAILING: (
        "API still failing after retries, or a walk that does not advance "
        "(state kept, the next run resumes)"
    ),
    ExitCode.STORAGE: "output, state or load target failed",
    ExitCode.VERIFY_FAILED: "`verify` found problems",
    ExitCode.LOCK_HELD: "another run holds the lock",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
}

# Shown in `--help` and the README, in the contract's order (the bug last).
DOCUMENTED = (
    ExitCode.DONE,
    ExitCode.USAGE,
    ExitCode.KEY_REJECTED,
    ExitCode.API_FAILING,
    ExitCode.STORAGE,
    ExitCode.VERIFY_FAILED,
    ExitCode.LOCK_HELD,
    ExitCode.BUG,
)


def exit_codes_line() -> str:
    """`0` done · `2` bad usage or config · …, as the README and `--help` print it."""
    return " · ".join(f"`{int(code)}` {code.meaning}" for code in DOCUMENTED)


class ExportError(Exception):
    """Base of every expected failure; `exit_code` is what the process returns."""

    exit_code: ExitCode = ExitCode.BUG


class UsageError(ExportError):
    """Bad flags, config file or time range (exit 2)."""

    exit_code = ExitCode.USAGE


class AuthError(ExportError):
    """The API rejected the key: 401 or 403 (exit 3)."""

    exit_code = ExitCode.KEY_REJECTED


class ApiError(ExportError):
    """The API kept failing after retries, or answered something unusable (exit 4)."""

    exit_code = ExitCode.API_FAILING


class QueryRejected(UsageError):
    """The API answered 400: the request (filters, cursor) is wrong, not the network."""


class CursorLoop(ApiError):
    """The cursor walk stopped advancing; continuing would loop forever."""


class StorageError(ExportError):
    """Output or state storage failed: disk full, permissions, unreachable bucket (exit 5)."""

    exit_code = ExitCode.STORAGE


class LockHeld(ExportError):
    """Another run holds the lock (exit 75, EX_TEMPFAIL: try again later)."""

    exit_code = ExitCode.LOCK_HELD
