"""`make demo`: the incremental export against the bundled emulator, no key, no network.

Starts `sessions-export emulator` on a free loopback port, runs `sessions-export run` into
`output/`, changes sessions through the emulator's API (close, update, create), runs again
to show the incremental run picking the changes up, compacts, verifies, and prints a short
summary.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

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
        _export("first run (whole history)", env)
        print(_change_sessions(url))
        _export("second run (picks up the changes)", env)
        for command in (("compact",), ("verify", "--strict")):
            result = _cli(*command, "--output", str(OUTPUT), env=env)
            print(result.stdout.strip())
        _summary()
    finally:
        emulator.terminate()
        emulator.wait(timeout=10)


def _export(label: str, env: dict[str, str]) -> None:
    started = time.monotonic()
    result = _cli(
        "run", "--output", str(OUTPUT), "--log-format", "text", "--log-level", "warning", env=env
    )
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        sys.exit(f"demo: the export failed with exit {result.returncode}")
    print(f"{label}: {result.stdout.strip()} [{time.monotonic() - started:.1f}s wall]")


def _change_sessions(url: str) -> str:
    """Change data through the API, as an application using Trigger.dev would."""
    headers = {"Authorization": f"Bearer {DEMO_KEY}"}
    with httpx.Client(base_url=f"{url}/api/v1/sessions", headers=headers, timeout=30) as api:
        live = api.get("", params={"filter[status]": "ACTIVE", "page[size]": "100"}).json()
        ids = [s["id"] for s in live["data"]]
        for session_id in ids[:30]:
            api.post(f"/{session_id}/close", json={"reason": "demo closed it"}).raise_for_status()
        for session_id in ids[30:50]:
            api.patch(f"/{session_id}", json={"metadata": {"demo": "edited"}}).raise_for_status()
        for n in range(50):
            api.post(
                "",
                json={
                    "type": "chat.agent",
                    "taskIdentifier": "demo-chat",
                    "externalId": f"demo-{n}",
                    "triggerConfig": {"basePayload": {"demo": n}},  # required upstream
                },
            ).raise_for_status()
    return "changed through the API: closed 30, updated 20, created 50 sessions"


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
    print(f"query it:  {query_hint()}")


def query_hint() -> str:
    """A shell line that queries the demo's dataset with what `make demo` installed."""
    python = Path(sys.executable)
    if python.is_relative_to(Path.cwd()):  # `.venv/bin/python`, as a newcomer types it
        python = python.relative_to(Path.cwd())
    query = (
        f"import pipeline; print(pipeline.scan_sessions('{OUTPUT}')"
        ".group_by('type').len().sort('len', descending=True).collect())"
    )
    return f'{shlex.quote(str(python))} -c "{query}"'


if __name__ == "__main__":
    main()
