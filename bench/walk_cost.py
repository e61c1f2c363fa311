"""The exact walk's cost: requests of the keyset walk next to a plain cursor walk, same listings.

Both walkers go through the real client over HTTP to the bundled emulator (in process);
request counts do not depend on timing, so one run is the measurement. Prints a Markdown
table for bench/README.md.
"""

from __future__ import annotations

import argparse
from collections import Counter

from pipeline.api.client import PAGE_SIZE, TriggerClient
from pipeline.api.walker import Listing, derived_status, walk_listing
from pipeline.config import Settings
from pipeline.emulator import EmulatorConfig, start_in_thread
from pipeline.emulator.timestamps import now_ms
from pipeline.runner import client_settings

KEY = "tr_dev_benchmark_key"


def plain_walk(client: TriggerClient, filters: dict[str, str]) -> tuple[int, list[str]]:
    """Follow `next` only, as the official SDK does: (requests, ids in the order met)."""
    ids: list[str] = []
    params = {"page[size]": str(PAGE_SIZE), **filters}
    requests = 0
    while True:
        page = client.list_sessions(params)
        requests += 1
        ids += [s["id"] for s in page.sessions]
        if page.next_cursor is None:
            return requests, ids
        params["page[after]"] = page.next_cursor


def keyset_walk(client: TriggerClient, filters: dict[str, str]) -> tuple[int, list[str]]:
    ids: list[str] = []
    requests = 0
    for page in walk_listing(client.list_sessions, Listing(dict(filters))):
        requests += 1
        ids += [s["id"] for s in page.sessions]
    return requests, ids


def truth_of(sessions: list[dict], filters: dict[str, str], now: int) -> set[str]:
    status = filters.get("filter[status]")
    return {s["id"] for s in sessions if status is None or derived_status(s, now) == status}


SCENARIOS = [
    # (label, emulator options)
    ("100,000 sessions over 30 days, ids in createdAt order", {"sessions": 100_000}),
    (
        "20,000 sessions ~13 ms apart, ids off createdAt by up to ±25 ms",
        {"sessions": 20_000, "days": 20_000 * 13 / 86_400_000, "id_skew_ms": 25},
    ),
]
LISTINGS = [
    ("all", {}),
    ("ACTIVE", {"filter[status]": "ACTIVE"}),
    ("CLOSED", {"filter[status]": "CLOSED"}),
    ("EXPIRED", {"filter[status]": "EXPIRED"}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    print(
        "| data | listing | plain walk: requests | plain walk: rows lost / twice "
        "| exact walk: requests | extra requests | exact walk: rows |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, options in SCENARIOS:
        config = EmulatorConfig(seed=args.seed, rate_limit=False, port=0, **options)
        with (
            start_in_thread(config) as emu,
            TriggerClient(client_settings(Settings(api_url=emu.url)), KEY) as client,
        ):
            sessions = list(emu.store.iter_sessions())
            for name, filters in LISTINGS:
                now = now_ms()
                truth = truth_of(sessions, filters, now)
                plain_requests, plain_ids = plain_walk(client, filters)
                exact_requests, exact_ids = keyset_walk(client, filters)
                twice = sum(n - 1 for n in Counter(plain_ids).values())
                lost = len(truth - set(plain_ids))
                exact = set(exact_ids) == truth and len(exact_ids) == len(truth)
                extra = (exact_requests - plain_requests) / plain_requests
                print(
                    f"| {label} | {name} | {plain_requests} | {lost} / {twice} "
                    f"| {exact_requests} | {extra:+.1%} "
                    f"| {'exact' if exact else 'NOT EXACT'} ({len(exact_ids)}) |"
                )


if __name__ == "__main__":
    main()
