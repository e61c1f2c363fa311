"""Export Trigger.dev sessions into hive-partitioned Parquet.

The Python API (imported on first use, so `import pipeline` stays cheap):

- `scan_sessions(output, *, latest=True, storage_options=None, table_format=None)
  -> polars.LazyFrame` (`table_format` None: Delta when `<output>/sessions/_delta_log/`
  exists, else Parquet)
- `export(config=None, **options) -> RunSummary`, the same run as `sessions-export run`;
  failures raise `ExportError`, whose `exit_code` is the CLI's for the same failure.

Importing it changes nothing process-wide (environment, Arrow's memory pool, logging): the
command line (`pipeline.__main__`) makes those choices for its own process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["ExportError", "export", "scan_sessions"]

if TYPE_CHECKING:
    from pipeline.dataset.scan import scan_sessions
    from pipeline.errors import ExportError
    from pipeline.public import export

_LAZY = {
    "scan_sessions": "pipeline.dataset.scan",
    "export": "pipeline.public",
    "ExportError": "pipeline.errors",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
