"""Delta Lake output: `sessions/` (latest view) and `sessions_versions/` (every version).

The job core calls: `DeltaOutput.at(uri)`, `recover(...)` on start, a `DeltaSink` as its
sink, `known_versions(...)` for the re-read windows; the commands call `compact_delta`,
`verify_delta` and `scan_delta_sessions`. The protocol is in docs/delta.md.
"""

from pipeline.dataset.delta.commit import DeltaConflict
from pipeline.dataset.delta.maintain import (
    CompactReport,
    DeltaTableStatus,
    DeltaVerifyReport,
    compact_delta,
    delta_dataset,
    delta_status,
    scan_delta_sessions,
    verify_delta,
)
from pipeline.dataset.delta.recover import DeltaRecovery, known_versions, recover, recover_all
from pipeline.dataset.delta.sink import DeltaSink, DeltaWritten
from pipeline.dataset.delta.tables import (
    DELTA_SCHEMA,
    LATEST_DIR,
    VERSIONS_DIR,
    DeltaOutput,
    require_deltalake,
)

__all__ = [
    "DELTA_SCHEMA",
    "LATEST_DIR",
    "VERSIONS_DIR",
    "CompactReport",
    "DeltaConflict",
    "DeltaOutput",
    "DeltaRecovery",
    "DeltaSink",
    "DeltaTableStatus",
    "DeltaVerifyReport",
    "DeltaWritten",
    "compact_delta",
    "delta_dataset",
    "delta_status",
    "known_versions",
    "recover",
    "recover_all",
    "require_deltalake",
    "scan_delta_sessions",
    "verify_delta",
]
