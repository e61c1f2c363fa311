"""A run's outcome, reported: its one summary log line, and `--metrics-file`.

The metrics file is Prometheus' text format for node_exporter's textfile collector (point
the collector at the file's directory; it reads `*.prom`). It is rewritten whole and
atomically after every run, success or failure, and keeps what earlier runs recorded (last
success, counters) and the series of other environments sharing the file, so a failed run
does not erase when the last good one finished.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ExitCode, ExportError
from pipeline.store.state import Counters
from pipeline.store.storage import Storage
from pipeline.timestamps import iso_ms

log = logging.getLogger("pipeline.summary")

PREFIX = "sessions_export_"
LOCK_HELD_EXIT = ExitCode.LOCK_HELD


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # gauge or counter
    help: str


METRICS: tuple[Metric, ...] = (
    Metric("last_success_timestamp_seconds", "gauge", "when the last successful run finished"),
    Metric("last_run_timestamp_seconds", "gauge", "when the last run finished, however it ended"),
    Metric("last_exit_code", "gauge", "exit code of the last run (0 done, 75 lock held)"),
    Metric("last_run_sessions", "gauge", "sessions written by the last successful run"),
    Metric("last_run_files", "gauge", "files written by the last successful run"),
    Metric("last_run_requests", "gauge", "API requests made by the last successful run"),
    Metric("last_run_retries", "gauge", "requests retried by the last successful run"),
    Metric("last_run_rate_limited", "gauge", "429 answers met by the last successful run"),
    Metric("last_run_duration_seconds", "gauge", "how long the last successful run took"),
    Metric("last_failure_timestamp_seconds", "gauge", "when the last failed run finished"),
    Metric("runs_total", "counter", "successful runs"),
    Metric("sessions_total", "counter", "sessions written by successful runs"),
    Metric("failures_total", "counter", "failed runs (exit code not 0 and not 75)"),
    Metric("lock_held_total", "counter", "runs skipped because another held the lock (exit 75)"),
)
_KNOWN = {m.name for m in METRICS}
_SAMPLE = re.compile(rf"^{PREFIX}(\w+)\{{(environment=.*)\}} (\S+)$")

Samples = dict[tuple[str, str], float]  # (metric, its labels as written) -> value


@dataclass(frozen=True)
class RunOutcome:
    """What a successful run reports: its counters (`rows` are the sessions written)."""

    counts: Counters
    files: int
    seconds: float


def parse(text: str) -> Samples:
    """The samples of a file this module wrote; anything else in it is dropped."""
    samples: Samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match and match.group(1) in _KNOWN:
            try:
                samples[(match.group(1), match.group(2))] = float(match.group(3))
            except ValueError:
                continue
    return samples


def render(samples: Samples) -> str:
    lines = []
    for metric in METRICS:
        series = sorted((env, v) for (name, env), v in samples.items() if name == metric.name)
        if not series:
            continue
        lines.append(f"# HELP {PREFIX}{metric.name} {metric.help}")
        lines.append(f"# TYPE {PREFIX}{metric.name} {metric.kind}")
        for labels, value in series:
            number = repr(value) if value % 1 else str(int(value))
            lines.append(f"{PREFIX}{metric.name}{{{labels}}} {number}")
    return "\n".join(lines) + "\n"


def after_success(samples: Samples, environment: str, outcome: RunOutcome, now_s: float) -> Samples:
    updated = dict(samples)
    values = {
        "last_success_timestamp_seconds": now_s,
        "last_run_timestamp_seconds": now_s,
        "last_exit_code": 0,
        "last_run_sessions": outcome.counts.rows,
        "last_run_files": outcome.files,
        "last_run_requests": outcome.counts.requests,
        "last_run_retries": outcome.counts.retries,
        "last_run_rate_limited": outcome.counts.rate_limited,
        "last_run_duration_seconds": round(outcome.seconds, 3),
    }
    updated.update({(name, environment): float(v) for name, v in values.items()})
    _add(updated, "runs_total", environment, 1)
    _add(updated, "sessions_total", environment, outcome.counts.rows)
    _add(updated, "failures_total", environment, 0)
    return updated


def after_failure(samples: Samples, environment: str, exit_code: int, now_s: float) -> Samples:
    updated = dict(samples)
    updated[("last_run_timestamp_seconds", environment)] = now_s
    updated[("last_exit_code", environment)] = float(exit_code)
    if exit_code == LOCK_HELD_EXIT:  # another run is busy: not a failure to alert on
        _add(updated, "lock_held_total", environment, 1)
    else:
        updated[("last_failure_timestamp_seconds", environment)] = now_s
        _add(updated, "failures_total", environment, 1)
    _add(updated, "runs_total", environment, 0)
    return updated


def _add(samples: Samples, name: str, environment: str, amount: float) -> None:
    samples[(name, environment)] = samples.get((name, environment), 0.0) + amount


class MetricsFile:
    """Reads, updates and atomically rewrites one textfile-collector file."""

    def __init__(self, path: str, environment: str | None, branch: str | None = None) -> None:
        target = Path(path).expanduser()
        self.name = target.name
        self.directory = target.parent.absolute()
        self.storage = Storage(str(self.directory))
        self.environment = series_labels(environment, branch)

    def _update(self, change: Callable[[Samples], Samples]) -> None:
        with _directory_locked(self.directory):  # environments run at once share the file
            data = self.storage.read_bytes(self.name)
            samples = parse(data.decode(errors="replace")) if data else {}
            self.storage.write_bytes(self.name, render(change(samples)).encode())

    def success(self, outcome: RunOutcome, now_s: float) -> None:
        self._update(lambda s: after_success(s, self.environment, outcome, now_s))

    def failure(self, exit_code: int, now_s: float) -> None:
        self._update(lambda s: after_failure(s, self.environment, exit_code, now_s))


@contextmanager
def _directory_locked(directory: Path) -> Iterator[None]:
    """An exclusive `flock` on the directory itself: no lock file beside the metrics."""
    directory.mkdir(parents=True, exist_ok=True)
    handle = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def series_labels(environment: str | None, branch: str | None = None) -> str:
    """`environment="prod"`, and `,branch="feature-x"` for a preview or dev branch."""
    labels = f'environment="{_label(environment or "default")}"'
    return f'{labels},branch="{_label(branch)}"' if branch else labels


# -- what the CLI calls ------------------------------------------------------------------


def summary_fields(
    summary: Any, environment: str | None, branch: str | None = None
) -> dict[str, Any]:
    """A run summary (dataclass) as flat JSON-able fields: its counters beside the others
    (`rows` as `sessions`), the window as ISO times."""
    fields = dataclasses.asdict(summary)
    fields.update(fields.pop("counts", None) or {})
    window = fields.pop("window", None) or {}
    fields["window_from"] = iso_ms(window.get("from_ms"))
    fields["window_to"] = iso_ms(window.get("to_ms"))
    fields["sessions"] = fields.pop("rows", None)
    fields["seconds"] = round(float(fields.get("seconds") or 0), 3)
    return {"event": "run_summary", "environment": environment, "branch": branch, **fields}


def summary_text(summary: Any, branch: str | None = None) -> str:
    """A job's one-line summary, naming the branch when there is one."""
    return f"{summary.line()}; branch {branch}" if branch else summary.line()


def log_summary(summary: Any, environment: str | None, branch: str | None = None) -> None:
    """The run's last log line: readable text on a terminal, every field in JSON."""
    log.info(
        summary_text(summary, branch),
        extra={"fields": summary_fields(summary, environment, branch)},
    )


def exit_code_of(error: BaseException) -> int:
    if isinstance(error, ExportError):
        return error.exit_code
    if isinstance(error, KeyboardInterrupt):
        return 130
    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, int) else 1
    return 1


def record_success(
    path: str | None, environment: str | None, summary: Any, branch: str | None = None
) -> None:
    if path:
        outcome = RunOutcome(summary.counts, files=summary.files, seconds=summary.seconds)
        MetricsFile(path, environment, branch).success(outcome, time.time())


def record_failure(
    path: str | None, environment: str | None, error: BaseException, branch: str | None = None
) -> None:
    """Best effort: the run's own error is what the user must see."""
    if path:
        try:
            MetricsFile(path, environment, branch).failure(exit_code_of(error), time.time())
        except ExportError as metrics_error:
            log.warning("could not update the metrics file: %s", metrics_error)
