"""Fill `triggerConfig` for list rows that omit it, with the configuration the API holds now.

Upstream's list rows leave `triggerConfig` out ("retrieve a single session to read it"),
and it is not fixed at creation: a create with a known `externalId` is an upsert that
rewrites it, changing nothing a list row shows but `updatedAt`. So no stored row can prove
a new version's configuration: every version about to be written (its `updatedAt` moved,
or the session is new) is read with `GET /api/v1/sessions/{id}`. Versions already held are
skipped before this, so a re-read window costs no fetch for sessions that did not change.
The fetches run concurrently through the shared client, and so within its rate limiter.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.api.client import TriggerClient
from pipeline.dataset.schema import TRIGGER_CONFIG

log = logging.getLogger(__name__)

Session = dict[str, Any]


class TriggerConfigFiller:
    def __init__(self, client: TriggerClient, concurrency: int) -> None:
        self.client = client
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="enrich")
        self._counting = threading.Lock()  # backfill windows fill from several threads
        self.single_fetches = 0
        self.newer_versions = 0  # fetched sessions that had changed since they were listed
        # once one list row carries triggerConfig, the server includes it (the public docs'
        # behaviour): a row without it then has none, and nothing needs fetching
        self.lists_carry_config = False

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def fill(self, sessions: list[Session]) -> list[Session]:
        """The sessions to write, each with the configuration the API holds for it now.

        A session that changed between the listing and its fetch is written as fetched: a
        real, newer version whose configuration belongs to it.
        """
        if not self.lists_carry_config:
            self.lists_carry_config = any(isinstance(s.get(TRIGGER_CONFIG), dict) for s in sessions)
        missing = [i for i, s in enumerate(sessions) if TRIGGER_CONFIG not in s]
        if not missing or self.lists_carry_config:
            return sessions
        filled = list(sessions)
        fetched = self._pool.map(self._fetch, [sessions[i]["id"] for i in missing])
        newer = 0
        for index, full in zip(missing, fetched, strict=True):
            listed = sessions[index]
            if full is None:
                log.warning("session %s disappeared before its config was read", listed["id"])
            elif full.get("updatedAt") == listed.get("updatedAt"):
                filled[index] = {**listed, TRIGGER_CONFIG: full.get(TRIGGER_CONFIG)}
                if filled[index][TRIGGER_CONFIG] is None:
                    del filled[index][TRIGGER_CONFIG]
            else:
                newer += 1
                filled[index] = full
        with self._counting:
            self.single_fetches += len(missing)
            self.newer_versions += newer
        return filled

    def _fetch(self, session_id: str) -> Session | None:
        return self.client.get_session(session_id)
