"""The secret key and the branch: where they come from and what makes them acceptable.

The key is read from its variable (`TRIGGER_SECRET_KEY`, or the one `secret_key_env`
names), else from the file that `<variable>_FILE` names (the Docker and Kubernetes secrets
convention). It is never printed: messages name the variable or the file, never the key.
A preview environment's key (`tr_preview_…`) needs a branch, sent as `x-trigger-branch`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.errors import AuthError, UsageError

KEY_PREFIXES = ("tr_dev_", "tr_stg_", "tr_prod_", "tr_preview_")
PREVIEW_PREFIX = "tr_preview_"
BRANCH_HEADER = "x-trigger-branch"
FILE_SUFFIX = "_FILE"


@dataclass(frozen=True)
class SecretKey:
    """The key and where it was read from (a variable or a file), for messages."""

    value: str
    source: str  # `TRIGGER_SECRET_KEY`, or `TRIGGER_SECRET_KEY_FILE (/run/secrets/key)`

    def __repr__(self) -> str:  # the key never reaches a traceback or a log
        return f"SecretKey(source={self.source!r})"


def read_secret_key(variable: str, environ: Mapping[str, str]) -> SecretKey:
    """The key from `variable`, else from the file `<variable>_FILE` names.

    A file that is named but missing, unreadable or empty is a `UsageError` (exit 2); no
    key at all is an `AuthError` (exit 3), as a rejected one is.
    """
    value = environ.get(variable, "")
    if value:
        return SecretKey(value, variable)
    file_variable = variable + FILE_SUFFIX
    path = environ.get(file_variable, "")
    if not path:
        return SecretKey("", variable)
    source = f"{file_variable} ({path})"
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise UsageError(f"{file_variable} names {path}, which does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or type(error).__name__
        raise UsageError(f"{file_variable} names {path}, which cannot be read: {reason}") from None
    if not text.strip():
        raise UsageError(f"{file_variable} names {path}, which is empty")
    return SecretKey(text.strip(), source)


def check_secret_key(key: str | None, source: str = "TRIGGER_SECRET_KEY") -> str:
    if not key:
        raise AuthError(f"{source} is not set: export your environment's secret key")
    if not key.startswith(KEY_PREFIXES) or any(c.isspace() for c in key):
        raise AuthError(
            f"{source} does not look like a secret key (tr_dev_…, tr_stg_…, tr_prod_…, "
            "tr_preview_…)"
        )
    return key


def check_branch(key: str, branch: str | None, source: str = "TRIGGER_SECRET_KEY") -> None:
    """A preview key without a branch fails before any request (upstream answers 401)."""
    if key.startswith(PREVIEW_PREFIX) and not branch:
        raise UsageError(
            f"{source} is a preview key (tr_preview_…), which needs a branch: pass --branch "
            "NAME, set branch in the config, or export TRIGGER_PREVIEW_BRANCH"
        )
    if branch is not None and not branch.isascii():
        raise UsageError(f"branch {branch!r} must be ASCII to travel in an HTTP header")
