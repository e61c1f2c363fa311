"""The two Delta tables under an output: where they live, their schema, how to open them.

```
<output>/sessions/            the latest view: one row per session id
<output>/sessions_versions/   every version met: one row per (id, updated_at)
```

Both have `SCHEMA`'s columns (timestamps in microseconds, as Delta stores them) plus
`created_date`, the partition column. Object stores take their settings from the same
variables as `pipeline.store.storage`: the AWS ones (with `AWS_ENDPOINT_URL` for an
S3-compatible server) and `STORAGE_EMULATOR_HOST` for a GCS emulator.
"""

from __future__ import annotations

import json
import os
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.dataset.schema import PARTITION_KEY, SCHEMA
from pipeline.errors import StorageError, UsageError
from pipeline.store.storage import gcs_emulator, storage_endpoint
from pipeline.timestamps import MS_PER_DAY

if TYPE_CHECKING:
    from deltalake import DeltaTable

LATEST_DIR = "sessions"
VERSIONS_DIR = "sessions_versions"


def require_deltalake() -> ModuleType:
    """The `deltalake` module, or a usage error (exit 2) naming the pip command that adds the
    `delta` extra to this install (the clone's path when it was installed from one)."""
    try:
        import deltalake
    except ImportError:
        from pipeline.dataset.load import install_command  # only on this error path

        raise UsageError(
            f"table_format = delta needs the deltalake package, which is not installed: "
            f"run {install_command('delta')}"
        ) from None
    return deltalake


def _delta_type(field_: pa.Field) -> pa.Field:
    if pa.types.is_timestamp(field_.type):
        return pa.field(field_.name, pa.timestamp("us", tz="UTC"), nullable=field_.nullable)
    return field_


# what the tables hold: the contract's columns, microsecond timestamps, then the partition
DELTA_SCHEMA: pa.Schema = pa.schema(
    [*(_delta_type(f) for f in SCHEMA), pa.field(PARTITION_KEY, pa.date32(), nullable=False)]
)


def to_delta_rows(table: pa.Table) -> pa.Table:
    """A `SCHEMA` table as the Delta tables' rows: microsecond timestamps, `created_date`."""
    days = pc.divide(table["created_at"].cast(pa.int64()), MS_PER_DAY).cast(pa.int32())
    with_day = table.append_column(PARTITION_KEY, days.cast(pa.date32()))
    return with_day.cast(DELTA_SCHEMA)


def storage_options(uri: str, given: dict[str, str] | None = None) -> dict[str, str]:
    """delta-rs' object-store options for `uri` from the export's own variables; the
    caller's options win."""
    options: dict[str, str] = {}
    if uri.startswith(("s3://", "s3a://")):
        endpoint = storage_endpoint()
        if endpoint:
            options["aws_endpoint_url"] = endpoint
            if endpoint.startswith("http://"):
                options["aws_allow_http"] = "true"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            options["aws_region"] = region
    elif uri.startswith("gs://"):
        emulator = gcs_emulator()
        if emulator:
            base = emulator if "://" in emulator else f"http://{emulator}"
            base_url = base.rstrip("/")
            options["google_base_url"] = base_url
            options["google_skip_signature"] = "true"
            # object_store asks for a token on writes even when skipping signatures: this key
            # has none to get (the emulator setup object_store's own tests use)
            if not any("service_account" in key for key in given or {}):
                options["google_service_account_key"] = _emulator_account(base_url)
            if base.startswith("http://"):
                options["allow_http"] = "true"
    options.update(given or {})
    return options


def _emulator_account(base_url: str) -> str:
    """An object_store service-account key that sends an empty bearer and never asks OAuth."""
    return json.dumps({"gcs_base_url": base_url, "disable_oauth": True,
                       "client_email": "", "private_key": "", "private_key_id": ""})


@dataclass(frozen=True)
class DeltaOutput:
    """The output URI the two tables live under, with the options to reach it."""

    uri: str
    options: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def at(output: str | Path, given: dict[str, str] | None = None) -> DeltaOutput:
        uri = str(output).rstrip("/")
        if "://" not in uri:
            uri = str(Path(uri).expanduser().absolute())
        elif uri.startswith("file://"):
            uri = uri[len("file://") :]
        return DeltaOutput(uri, storage_options(uri, given))

    @property
    def is_local(self) -> bool:
        return "://" not in self.uri

    def table_uri(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def exists(self, name: str) -> bool:
        deltalake = require_deltalake()
        return deltalake.DeltaTable.is_deltatable(self.table_uri(name), self.options or None)

    def open(self, name: str, create: bool = True) -> DeltaTable:
        """The table `name` (`LATEST_DIR` or `VERSIONS_DIR`), created empty when absent;
        a store that cannot be reached is a `StorageError` (exit 5)."""
        deltalake = require_deltalake()
        uri = self.table_uri(name)
        options = self.options or None
        try:
            if create and not deltalake.DeltaTable.is_deltatable(uri, options):
                with suppress(deltalake.exceptions.DeltaError):  # another writer was first
                    deltalake.DeltaTable.create(
                        uri, DELTA_SCHEMA, partition_by=[PARTITION_KEY], mode="ignore",
                        storage_options=options,
                    )
            return deltalake.DeltaTable(uri, storage_options=options)
        except (OSError, deltalake.exceptions.DeltaError) as error:
            reason = " ".join(str(error).split())[:300]
            raise StorageError(f"cannot open the Delta table {uri}: {reason}") from None

def partition_literals(days: list[str]) -> str:
    """`created_date IN (...)` for a merge predicate: the touched partitions, literally."""
    quoted = ", ".join(f"'{day}'" for day in sorted(set(days)))
    return f"t.{PARTITION_KEY} IN ({quoted})"


def days_of(rows: pa.Table) -> list[str]:
    """The distinct `created_date` values of Delta rows, as ISO dates."""
    return [d.isoformat() for d in pc.unique(rows[PARTITION_KEY]).to_pylist()]

