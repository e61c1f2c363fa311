"""Every emulator option, with upstream's defaults, declared once: the `emulator` command's
flags are made from these fields (`flag` records their help, range and spelling)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pipeline.emulator.timestamps import now_ms


def flag(
    default: Any,
    help: str,  # the word every CLI library uses
    *,
    name: str | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
    above: float | None = None,
    file: bool = False,
) -> Any:
    """An `EmulatorConfig` field that is a flag of `sessions-export emulator`.

    `name`: the flag when it is not the field's (`--api-key`, repeatable, for `api_keys`;
    `--no-rate-limit` for `rate_limit`). `at_least`, `at_most`, `above`: a number's range.
    `file`: the value names an existing file.
    """
    meta = {
        "help": help,
        "name": name,
        "at_least": at_least,
        "at_most": at_most,
        "above": above,
        "file": file,
    }
    return field(default=default, metadata={"flag": meta})


@dataclass(frozen=True)
class EmulatorConfig:
    sessions: int = flag(1000, "How many sessions to generate.", at_least=0)
    seed: int = flag(1, "Data seed: same seed, same data.")
    days: float = flag(30.0, "createdAt spans [anchor - days, anchor].", above=0)
    # newest possible createdAt; None = now, rounded to the ms
    anchor: datetime | None = flag(None, "Newest createdAt (ISO-8601). Default: now.")
    host: str = flag("127.0.0.1", "Interface to listen on.")
    port: int = flag(8787, "0 picks a free port.", at_least=0, at_most=65535)
    allow_remote: bool = flag(False, "Allow a non-loopback --host.")
    # empty: any well-formed tr_dev_/stg_/prod_/preview_ key
    api_keys: tuple[str, ...] = flag(
        (),
        "Accept only these keys (repeatable). Default: any tr_dev_/tr_stg_/tr_prod_/"
        "tr_preview_ key (a preview key also needs the x-trigger-branch header).",
        name="--api-key",
    )
    forbidden_keys: tuple[str, ...] = flag(
        (), "Answer this key with 403 (repeatable).", name="--forbidden-key"
    )
    list_trigger_config: Literal["omit", "include"] = flag(
        "omit",
        "omit: list rows lack triggerConfig (upstream source); include: as the docs show.",
    )
    rate_limit: bool = flag(True, "Turn the rate limit off.", name="--no-rate-limit")
    rate_limit_burst: int = flag(750, "Bucket size per key.", at_least=1)
    rate_limit_refill: int = flag(250, "Tokens added each interval.", at_least=1)
    rate_limit_interval: float = flag(10.0, "Seconds between refills.", above=0)
    fault_seed: int = flag(0, "Seed of the fault draws.")
    fault_5xx: float = flag(0.0, "Probability of a 500/502/503/504.", at_least=0, at_most=1)
    fault_reset: float = flag(
        0.0, "Probability of dropping the connection mid-response.", at_least=0, at_most=1
    )
    fault_truncate: float = flag(
        0.0, "Probability of a 200 whose JSON body is cut in half.", at_least=0, at_most=1
    )
    fault_stall: float = flag(
        0.0, "Probability of waiting --stall-seconds before answering.", at_least=0, at_most=1
    )
    stall_seconds: float = flag(30.0, "Length of a stall.", at_least=0)
    latency_ms: float = flag(0.0, "Added to every API request.", at_least=0)
    fault_header_should_retry: bool = flag(
        False, "Sometimes send x-should-retry: false with an injected 5xx."
    )
    id_skew_ms: int = flag(
        0,
        "Ids' time part off createdAt by up to N ms, as when ids are made before the insert.",
        at_least=0,
    )
    replication_delay: float = flag(
        0.0,
        "Seconds before the list sees a new session or a change of tags or closing.",
        at_least=0,
    )
    same_ms_burst: int = flag(
        0, "Generate this many sessions sharing one millisecond, mid-range.", at_least=0
    )
    path_prefix: str = flag(
        "",
        "Serve the API under this path (/trigger/api/v1/sessions), like a self-hosted "
        "server behind a reverse proxy.",
    )
    tls_cert: str | None = flag(
        None, "PEM certificate chain: serve https (with --tls-key).", file=True
    )
    tls_key: str | None = flag(None, "Its private key.", file=True)

    def __post_init__(self) -> None:
        problems = []
        if self.sessions < 0:
            problems.append("sessions must be >= 0")
        if self.days <= 0:
            problems.append("days must be > 0")
        if not 0 <= self.port <= 65535:
            problems.append("port must be 0..65535")
        if self.list_trigger_config not in ("omit", "include"):
            problems.append("list_trigger_config must be 'omit' or 'include'")
        if self.rate_limit_burst < 1 or self.rate_limit_refill < 1:
            problems.append("rate limit burst and refill must be >= 1")
        if self.rate_limit_interval <= 0:
            problems.append("rate limit interval must be > 0")
        faults = (self.fault_5xx, self.fault_reset, self.fault_truncate, self.fault_stall)
        if any(not 0 <= p <= 1 for p in faults):
            problems.append("fault probabilities must be within 0..1")
        elif sum(faults) > 1:
            problems.append("fault probabilities must add up to at most 1")
        if self.stall_seconds < 0 or self.latency_ms < 0:
            problems.append("stall seconds and latency must be >= 0")
        if self.id_skew_ms < 0 or self.replication_delay < 0 or self.same_ms_burst < 0:
            problems.append("id skew, replication delay and burst must be >= 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("tls cert and tls key go together")
        if self.path_prefix and not self.path_prefix.startswith("/"):
            problems.append("path prefix must start with /")
        if problems:
            raise ValueError("; ".join(problems))

    def anchor_ms(self) -> int:
        if self.anchor is None:
            return now_ms()
        anchor = self.anchor if self.anchor.tzinfo else self.anchor.replace(tzinfo=UTC)
        return round(anchor.timestamp() * 1000)
