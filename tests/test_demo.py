"""`make demo` end to end in a scratch folder, and its closing hint run as printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_hint_runs_with_what_the_demo_installed(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIGGER_")}
    demo = subprocess.run([sys.executable, "-m", "pipeline.demo"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stderr[-2000:]
    last = demo.stdout.strip().splitlines()[-1]
    assert last.startswith("query it:  ") and "duckdb -c" not in last
    hint = last.removeprefix("query it:  ")
    assert hint.startswith(f"{sys.executable} -c ")  # the venv's own Python, no other program
    query = subprocess.run(hint, shell=True, cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert query.returncode == 0, query.stderr
    counts = [int(n) for n in re.findall(r"│ [\w.\-]+\s+┆ (\d+)\s+│", query.stdout)]
    assert "chat.agent" in query.stdout and counts
    assert sum(counts) == 20_050  # the demo's sessions plus the 50 it created, latest versions
