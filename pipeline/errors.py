"""Errors a user can meet, each with the exit code the contract gives it.

The CLI catches `ExportError` at its edge and prints `str(error)` as one line; anything
else is a bug and exits 1.
"""

from __future__ import annotations


class ExportError(Exception):
    """Base of every expected failure; `exit_code` is what the process returns."""

    exit_code = 1


class UsageError(ExportError):
    """Bad flags, config file or time range (exit 2)."""

    exit_code = 2


class AuthError(ExportError):
    """The API rejected the key: 401 or 403 (exit 3)."""

    exit_code = 3


class ApiError(ExportError):
    """The API kept failing after retries, or answered something unusable (exit 4)."""

    exit_code = 4


class QueryRejected(UsageError):
    """The API answered 400: the request (filters, cursor) is wrong, not the network."""


class CursorLoop(ApiError):
    """The cursor walk stopped advancing; continuing would loop forever."""


class StorageError(ExportError):
    """Output or state storage failed: disk full, permissions, unreachable bucket (exit 5)."""

    exit_code = 5


class LockHeld(ExportError):
    """Another run holds the lock (exit 75, EX_TEMPFAIL: try again later)."""

    exit_code = 75
