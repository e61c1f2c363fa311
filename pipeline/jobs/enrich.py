"""Fill `triggerConfig` for list rows that omit it.

Upstream's list rows leave `triggerConfig` out ("retrieve a single session to read it").
It is fixed at creation, so each session's configuration is looked up once: from this
run's memory, else from a row of the same session already in the dataset, else with
`GET /api/v1/sessions/{id}` — those fetches run concurrently through the shared client,
and so within its rate limiter. Sessions known to have no configuration are remembered
in the checkpoint so that they are not fetched again.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow.compute as pc

from pipeline.api.client import TriggerClient
from pipeline.dataset.flatten import parse_timestamp_ms
from pipeline.dataset.layout import files_by_partition, read_file
from pipeline.dataset.schema import TRIGGER_CONFIG, TRIGGER_CONFIG_COLUMNS
from pipeline.store.storage import Storage

log = logging.getLogger(__name__)

Config = dict[str, Any] | None  # None: the session has no triggerConfig
_COLUMNS = [c.name for c in TRIGGER_CONFIG_COLUMNS]
_MEMORY = 20_000  # configurations kept in memory; older ones are found again in the dataset


def config_from_row(row: dict[str, Any]) -> Config:
    """Rebuild the API's triggerConfig object from a stored row's flattened columns."""
    if row.get("trigger_config_base_payload") is None:
        return None
    config: dict[str, Any] = {}
    for column in TRIGGER_CONFIG_COLUMNS:
        value = row.get(column.name)
        if value is None:
            continue
        config[column.source] = json.loads(value) if column.kind == "json" else value
    return config


class TriggerConfigFiller:
    def __init__(
        self,
        client: TriggerClient,
        output: Storage,
        concurrency: int,
        without_config: dict[str, int] | None = None,
    ) -> None:
        self.client = client
        self.output = output
        self._known: dict[str, Config] = {}
        self.without_config = dict(without_config or {})  # id -> createdAt ms
        self._loaded_days: set[str] = set()
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="enrich")
        self._partitions: dict[str, list[str]] | None = None
        self.single_fetches = 0
        self.from_dataset = 0
        # once one list row carries triggerConfig, the server includes it (the public docs'
        # behaviour): a row without it then has none, and nothing needs fetching
        self.lists_carry_config = False

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def fill(self, sessions: list[dict[str, Any]]) -> None:
        """Give every session that lacks `triggerConfig` its configuration, in place."""
        missing = [s for s in sessions if TRIGGER_CONFIG not in s]
        if not missing or self.lists_carry_config:
            return
        unknown = [
            s for s in missing if s["id"] not in self._known and s["id"] not in self.without_config
        ]
        if unknown:
            self._load_from_dataset(unknown)
            unknown = [s for s in unknown if s["id"] not in self._known]
        if unknown:
            fetched = list(self._pool.map(self._fetch, [s["id"] for s in unknown]))
            for session, config in zip(unknown, fetched, strict=True):
                self._remember(session, config)
        for session in missing:
            config = self._known.get(session["id"])
            if config is not None:
                session[TRIGGER_CONFIG] = config

    def remember_listed(self, sessions: list[dict[str, Any]]) -> None:
        """Notice whether list rows carry triggerConfig (then nothing needs fetching)."""
        if not self.lists_carry_config:
            self.lists_carry_config = any(isinstance(s.get(TRIGGER_CONFIG), dict) for s in sessions)

    def refresh(self) -> None:
        """Forget which partitions were read: this run has flushed more files since."""
        self._partitions = None
        self._loaded_days.clear()

    def _put(self, session_id: str, config: Config) -> None:
        if len(self._known) >= _MEMORY:
            del self._known[next(iter(self._known))]
        self._known[session_id] = config

    def _remember(self, session: dict[str, Any], config: Config) -> None:
        self._put(session["id"], config)
        if config is None:
            self.without_config[session["id"]] = parse_timestamp_ms(session["createdAt"])

    def _fetch(self, session_id: str) -> Config:
        self.single_fetches += 1
        full = self.client.get_session(session_id)
        if full is None:
            log.warning("session %s disappeared before its triggerConfig was read", session_id)
            return None
        config = full.get(TRIGGER_CONFIG)
        return config if isinstance(config, dict) else None

    def _load_from_dataset(self, sessions: list[dict[str, Any]]) -> None:
        """Read configurations of earlier versions from the partitions these sessions are in."""
        if self._partitions is None:
            self._partitions = {
                day: [f.path for f in files]
                for day, files in files_by_partition(self.output).items()
            }
        days = {s["createdAt"][:10] for s in sessions} - self._loaded_days
        for day in sorted(days):
            self._loaded_days.add(day)
            for path in self._partitions.get(day, []):
                table = read_file(self.output, path, columns=["id", *_COLUMNS])
                table = table.filter(pc.is_valid(table["trigger_config_base_payload"]))
                for row in table.to_pylist():
                    if row["id"] not in self._known:
                        self._put(row["id"], config_from_row(row))
                        self.from_dataset += 1
