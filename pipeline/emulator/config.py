"""Every emulator option, with upstream's defaults; the CLI flags map one to one."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from pipeline.emulator.timestamps import now_ms


@dataclass(frozen=True)
class EmulatorConfig:
    sessions: int = 1000
    seed: int = 1
    days: float = 30.0
    anchor: datetime | None = None  # newest possible createdAt; None = now, rounded to the ms
    host: str = "127.0.0.1"
    port: int = 8787  # 0 picks a free port
    allow_remote: bool = False
    api_keys: tuple[str, ...] = ()  # empty: any well-formed tr_dev_/stg_/prod_/preview_ key
    forbidden_keys: tuple[str, ...] = ()  # answered with 403
    list_trigger_config: Literal["omit", "include"] = "omit"
    rate_limit: bool = True
    rate_limit_burst: int = 750
    rate_limit_refill: int = 250
    rate_limit_interval: float = 10.0  # seconds between refills
    fault_seed: int = 0
    fault_5xx: float = 0.0
    fault_reset: float = 0.0
    fault_truncate: float = 0.0
    fault_stall: float = 0.0
    stall_seconds: float = 30.0
    latency_ms: float = 0.0
    fault_header_should_retry: bool = False
    id_skew_ms: int = 0  # ids' time part off createdAt by up to this many ms (either way)
    replication_delay: float = 0.0  # seconds before the list (a replica) sees a change
    same_ms_burst: int = 0  # generated sessions sharing one millisecond, mid-range
    path_prefix: str = ""  # serve under this path, as a self-hosted server behind a proxy may
    tls_cert: str | None = None  # PEM certificate (chain): serve https instead of http
    tls_key: str | None = None  # its PEM private key

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
