"""Helpers for benchmarks: an emulator subprocess, child processes measured with wait4."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

KEY = "tr_dev_benchmark_key"


@dataclass(frozen=True)
class Measured:
    seconds: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    cpu_seconds: float = 0.0  # user + sys of the child
    # the largest anonymous and file-backed (mapped libraries) parts of RSS, sampled
    peak_anon_mb: float = 0.0
    peak_file_mb: float = 0.0


@dataclass(frozen=True)
class Emulator:
    url: str
    pid: int

    def cpu_seconds(self) -> float:
        """User + sys CPU the emulator's process has used so far (Linux /proc)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def emulator_process(*flags: str) -> Iterator[Emulator]:
    """Run `sessions-export emulator` in its own process; yields its URL and process id."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "emulator", "--port", "0", *flags],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline() if process.stdout else ""
        if "http://" not in line:
            raise RuntimeError(f"emulator did not start: {line!r}")
        yield Emulator("http://" + line.split("http://", 1)[1].split()[0], process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)


def rate_limit_flags(burst: int, refill: int, interval_s: float) -> tuple[str, ...]:
    """The emulator's flags for a token bucket of `burst`, `refill` every `interval_s`."""
    return (
        "--rate-limit-burst",
        str(burst),
        "--rate-limit-refill",
        str(refill),
        "--rate-limit-interval",
        str(interval_s),
    )


@contextmanager
def emulator(*flags: str) -> Iterator[str]:
    """Run `sessions-export emulator` in its own process; yields its base URL."""
    with emulator_process(*flags) as running:
        yield running.url


def measure(command: list[str], env: dict[str, str] | None = None,
            cwd: str | None = None) -> Measured:
    """Wall time and peak RSS of one child process (its own, via wait4); `cwd` chooses the
    checkout whose `python -m pipeline` runs."""
    full_env = {**os.environ, "TRIGGER_SECRET_KEY": KEY, **(env or {})}
    started = time.perf_counter()
    process = subprocess.Popen(
        command, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        cwd=cwd,
    )
    peaks = {"RssAnon": 0, "RssFile": 0}
    sampler = threading.Thread(target=_sample_rss, args=(process.pid, peaks), daemon=True)
    sampler.start()
    output = process.stdout.read() if process.stdout else ""
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    sampler.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return Measured(seconds, usage.ru_maxrss / 1024, process.returncode, output, cpu,
                    peaks["RssAnon"] / 1024, peaks["RssFile"] / 1024)


def _sample_rss(pid: int, peaks: dict[str, int]) -> None:
    """Keep the largest RssAnon and RssFile (kB) of `pid` every 50 ms until it is gone."""
    status = Path(f"/proc/{pid}/status")
    while True:
        try:
            lines = status.read_text().splitlines()
        except OSError:
            return
        fields = dict(line.split(":", 1) for line in lines if ":" in line)
        if "RssAnon" not in fields:  # a zombie: the process has ended
            return
        for key in peaks:
            peaks[key] = max(peaks[key], int(fields[key].split()[0]))
        time.sleep(0.05)


def export(command: str, url: str, out: str, *args: str) -> Measured:
    """Measure one `sessions-export <command>` against `url`, writing into `out`."""
    return measure(
        [
            sys.executable,
            "-m",
            "pipeline",
            command,
            "--api-url",
            url,
            "--output",
            out,
            "--log-level",
            "warning",
            *args,
        ]
    )


def only_manifest(out: str) -> dict:
    """The manifest of the single run an output holds."""
    return json.loads(next(Path(out, "_runs").glob("*.json")).read_text())


def exported_ids(out: str) -> list[str]:
    # imported here: a child forked from a process holding pyarrow reports its pages too
    import pyarrow.dataset as ds

    table = ds.dataset(Path(out, "sessions"), format="parquet").to_table(columns=["id"])
    return table["id"].to_pylist()


def write_results(name: str, rows: list[dict]) -> None:
    """Print each row as a JSON line and keep them in bench/results/<name>.json."""
    for row in rows:
        print(json.dumps(row))
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(rows, indent=2))


def print_table(header: list[str], rows: list[list[object]]) -> None:
    """A Markdown table on stdout, ready for bench/README.md."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
