"""Export Trigger.dev sessions into hive-partitioned Parquet."""

import os

# Arrow's Parquet writer allocates from the process-wide default pool, which only this
# variable picks, and only before pyarrow loads; mimalloc, Arrow's default, keeps ~25 MB
# of freed pages after the first flush (bench/README.md). A user's own choice wins.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")

__version__ = "0.1.0"
