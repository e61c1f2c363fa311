"""`make demo`: the incremental export against the bundled emulator, no key, no network.

Starts `sessions-export emulator` on a free loopback port, runs `sessions-export run` into
`output/` (twice: the second run shows what an incremental run with nothing new costs),
reads the dataset back with `verify`, and prints a short summary.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEMO_KEY = "tr_dev_local_emulator_demo"  # the emulator accepts any well-formed dev key
OUTPUT = Path("output")
MARKER = OUTPUT / ".demo"
SESSIONS = 20_000


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], env=env, text=True, capture_output=True
    )


def _prepare_output() -> None:
    existing = (
        [p for p in OUTPUT.iterdir() if p.name not in (".gitkeep", ".demo")]
        if OUTPUT.exists()
        else []
    )
    if existing and not MARKER.exists():
        sys.exit(f"demo: {OUTPUT}/ holds an export that is not the demo's; move it away first")
    for name in ("sessions", "_runs", "_state"):
        shutil.rmtree(OUTPUT / name, ignore_errors=True)
    OUTPUT.mkdir(exist_ok=True)
    MARKER.write_text("written by `make demo`; the demo clears this folder each time\n")


def main() -> None:
    _prepare_output()
    emulator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "emulator",
            "--port",
            "0",
            "--sessions",
            str(SESSIONS),
            "--seed",
            "7",
            "--days",
            "45",
            "--list-trigger-config",
            "include",
            "--no-rate-limit",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = emulator.stdout.readline() if emulator.stdout else ""
        if "http://" not in line:
            sys.exit(f"demo: the emulator did not start: {line.strip()}")
        url = line.split("http://", 1)[1].split()[0]
        url = f"http://{url}"
        print(f"emulator: {line.strip()}")
        env = {**os.environ, "TRIGGER_SECRET_KEY": DEMO_KEY, "TRIGGER_API_URL": url}
        for label in ("first run (whole history)", "second run (nothing new)"):
            started = time.monotonic()
            result = _cli(
                "run",
                "--output",
                str(OUTPUT),
                "--log-format",
                "text",
                "--log-level",
                "warning",
                env=env,
            )
            if result.returncode != 0:
                sys.stderr.write(result.stderr)
                sys.exit(f"demo: the export failed with exit {result.returncode}")
            print(f"{label}: {result.stdout.strip()} [{time.monotonic() - started:.1f}s wall]")
        verify = _cli("verify", "--output", str(OUTPUT), env=env)
        print(verify.stdout.strip())
        _summary()
    finally:
        emulator.terminate()
        emulator.wait(timeout=10)


def _summary() -> None:
    manifests = sorted((OUTPUT / "_runs").glob("*.json"))
    first = json.loads(manifests[0].read_text())
    files = list((OUTPUT / "sessions").rglob("*.parquet"))
    partitions = {f.parent.name for f in files}
    print(
        f"\nsummary: {first['rows']} sessions, {len(partitions)} partitions, {len(files)} files, "
        f"{first['seconds']:.1f}s, {first['requests']} requests, {first['retries']} retries "
        f"(first run); dataset in {OUTPUT}/sessions/"
    )
    print(
        "query it:  duckdb -c \"SELECT count(*) FROM read_parquet('output/sessions/*/*.parquet',"
        ' hive_partitioning=true)"'
    )


if __name__ == "__main__":
    main()
