"""Several environments in turn: `run --all-environments` runs each [environments.NAME]
table of the config file, one after another, and exits with the worst outcome.

One environment failing does not stop the others; each failure is printed as one line
naming its environment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import click

from pipeline.errors import ExitCode, ExportError
from pipeline.ops.logs import redact

log = logging.getLogger(__name__)

# least to most in need of a person: done, lock busy (next cron run retries), API down
# (resumes), storage, key rejected, bad config, a bug
SEVERITY = (
    ExitCode.DONE,
    ExitCode.LOCK_HELD,
    ExitCode.API_FAILING,
    ExitCode.STORAGE,
    ExitCode.KEY_REJECTED,
    ExitCode.USAGE,
    ExitCode.VERIFY_FAILED,
    ExitCode.BUG,
)


def worst_exit(codes: Iterable[int]) -> int:
    def rank(code: int) -> int:
        return SEVERITY.index(code) if code in SEVERITY else len(SEVERITY)

    return max(codes, key=rank, default=0)


def run_each(names: list[str], run_one: Callable[[str], object]) -> int:
    """Call `run_one` for every environment; the worst exit code of them all."""
    codes = []
    for name in names:
        try:
            run_one(name)
            codes.append(0)
        except ExportError as error:
            click.echo(f"sessions-export: error: [{name}] {redact(str(error))}", err=True)
            codes.append(error.exit_code)
        except SystemExit as exit_:  # a command that exits by itself (verify's 6)
            codes.append(exit_.code if isinstance(exit_.code, int) else 1)
        except Exception as error:  # noqa: BLE001 - one environment's bug must not stop the rest
            log.debug("unexpected error in environment %s", name, exc_info=True)
            click.echo(
                f"sessions-export: unexpected error (a bug, please report it) in [{name}]: "
                f"{type(error).__name__}: {redact(str(error))}",
                err=True,
            )
            codes.append(1)
    return worst_exit(codes)
