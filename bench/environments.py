"""`make bench-environments`: 4 environments exported one at a time, next to all 4 at once
with `run --all-environments --parallel 4`.

Each environment has its own key, so its own bucket in the emulator, as each Trigger.dev
environment has upstream. The bucket is upstream's (750 tokens, 250 refilled every 10 s)
scaled down 25 times in tokens and 10 times in time: 30 tokens, 10 refilled every second,
10 requests/s per environment. Every environment walks the emulator's 50,000 sessions (500
full pages, list rows with `triggerConfig`), so one walk alone takes about (500 - 30) / 10 =
47 s and waits on its bucket, not on the CPU. Four buckets side by side should take about
as long as the slowest one alone; the target is at most 1.3 times it. Each measurement
uses keys no earlier one spent, so every bucket starts full; every dataset is checked
exactly against the emulator's ids.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import httpx

from bench.common import (
    emulator,
    exported_ids,
    measure,
    only_manifest,
    rate_limit_flags,
    write_results,
)

SESSIONS = 50_000
BURST, REFILL, INTERVAL_S = 30, 10, 1.0
NAMES = ("dev", "staging", "prod", "preview")
TARGET = 1.3
FLAGS = (
    "--sessions",
    str(SESSIONS),
    "--seed",
    "5",
    "--list-trigger-config",
    "include",
    *rate_limit_flags(BURST, REFILL, INTERVAL_S),
)


def write_config(where: Path, url: str, phase: str) -> tuple[Path, dict[str, str]]:
    """A config of the 4 environments, each with its own output and key variable; the keys
    are new for each phase so that no bucket starts spent."""
    lines = [f'api_url = "{url}"', 'log_level = "warning"', ""]
    keys = {}
    for name in NAMES:
        variable = f"BENCH_{name.upper()}_KEY"
        keys[variable] = f"tr_dev_bench_{phase}_{name}_key"
        lines += [
            f"[environments.{name}]",
            f'secret_key_env = "{variable}"',
            f'output = "{where / phase / name}"',
        ]
    config = where / f"{phase}.toml"
    config.write_text("\n".join(lines) + "\n")
    return config, keys


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", *args]


def main() -> None:
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as temp, emulator(*FLAGS) as url:
        where = Path(temp)
        config, keys = write_config(where, url, "alone")
        outputs: list[Path] = []
        for name in NAMES:
            result = measure(cli("run", "--config", str(config), "--environment", name), keys)
            assert result.returncode == 0, result
            manifest = only_manifest(str(where / "alone" / name))
            rows.append(
                {
                    "case": f"{name} alone",
                    "wall_seconds": round(result.seconds, 2),
                    "requests": manifest["requests"],
                    "429s": manifest["rate_limited"],
                    "cpu_seconds": round(result.cpu_seconds, 2),
                }
            )
            outputs.append(where / "alone" / name)
        config, keys = write_config(where, url, "together")
        together = measure(
            cli("run", "--config", str(config), "--all-environments", "--parallel", "4"), keys
        )
        assert together.returncode == 0, together
        slowest = max(float(str(row["wall_seconds"])) for row in rows)
        rows.append(
            {
                "case": "all 4 at once (--parallel 4)",
                "wall_seconds": round(together.seconds, 2),
                "requests": sum(
                    only_manifest(str(where / "together" / n))["requests"] for n in NAMES
                ),
                "429s": sum(
                    only_manifest(str(where / "together" / n))["rate_limited"] for n in NAMES
                ),
                "cpu_seconds": round(together.cpu_seconds, 2),
                "slowest_alone_seconds": slowest,
                "ratio_to_slowest_alone": round(together.seconds / slowest, 3),
                "sum_alone_seconds": round(sum(float(str(row["wall_seconds"])) for row in rows), 2),
            }
        )
        outputs += [where / "together" / n for n in NAMES]
        lines = httpx.get(f"{url}/_emulator/sessions", timeout=120).text.splitlines()
        truth = {json.loads(line)["id"] for line in lines if line}
        exact = all(
            len(ids := exported_ids(str(out))) == len(truth) and set(ids) == truth
            for out in outputs
        )
    for row in rows:
        row["data_exact"] = exact
    write_results("environments", rows)
    ratio = float(str(rows[-1]["ratio_to_slowest_alone"]))
    verdict = "met" if ratio <= TARGET and exact else "NOT met"
    print(f"all 4 at once / slowest alone = {ratio} (target <= {TARGET}): {verdict}")


if __name__ == "__main__":
    main()
