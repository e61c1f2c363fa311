"""`python -m pipeline` and the `sessions-export` script: the CLI, after the process-wide
choices that belong to it and not to the library."""

import logging
import os
import sys


def main() -> None:
    """Choose Arrow's memory pool, then run the command line."""
    # Arrow's Parquet writer allocates from the process-wide default pool, which only this
    # variable picks, and only before pyarrow loads; mimalloc, Arrow's default, keeps ~25 MB
    # of freed pages after the first flush (bench/README.md). A user's own choice wins.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
    from pipeline.cli import main as run_cli

    try:
        run_cli()
    except SystemExit as done:
        if "deltalake" in sys.modules and isinstance(done.code, int | None):
            _exit_now(done.code or 0)
        raise


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown, which now and then aborts the process once
    delta-rs has read through pyarrow (its threads outlive Arrow's: delta-rs #2184)."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    main()
