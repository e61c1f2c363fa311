"""`python -m pipeline` and the `sessions-export` script: the CLI, after the process-wide
choices that belong to it and not to the library."""

import os


def main() -> None:
    """Choose Arrow's memory pool, then run the command line."""
    # Arrow's Parquet writer allocates from the process-wide default pool, which only this
    # variable picks, and only before pyarrow loads; mimalloc, Arrow's default, keeps ~25 MB
    # of freed pages after the first flush (bench/README.md). A user's own choice wins.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
    from pipeline.cli import main as run_cli

    run_cli()


if __name__ == "__main__":
    main()
