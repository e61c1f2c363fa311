# Two commands on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install bytecode demo test test-fast lint bench bench-faults bench-backfill bench-walk \
	bench-dataset bench-compact bench-refresh bench-versions bench-load bench-environments bench-delta bench-delta-export clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,delta]'
	touch $(STAMP)

install: $(STAMP)

## The package's bytecode, as installing a wheel compiles it: an editable install does not,
## and where PYTHONDONTWRITEBYTECODE is set, every start compiled the whole package again
## (0.16 s of a CLI run's 0.44 s start on this machine). Only stale files are rewritten.
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q pipeline

## The main job on the bundled emulator: no key, no network.
demo: bytecode
	$(BIN)/python -m pipeline.demo

## The whole test suite.
test: bytecode
	$(BIN)/python -m pytest -q

## All but the tests marked slow (big data, kill loops, lease sleeps): about a minute.
test-fast: bytecode
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests bench examples

## Throughput, CPU and memory, ours vs the fastest bare fetch loop, side by side, then the
## enrichment path against the rate-limit ceiling (bench/README.md; about 5-10 minutes).
bench: bytecode
	$(BIN)/python -m bench.throughput
	$(BIN)/python -m bench.enrich

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

## An export through injected faults and a tight rate limit, next to a clean one.
bench-faults: bytecode
	$(BIN)/python -m bench.faults

## A concurrent backfill against the rate-limit ceiling, next to a sequential walk.
bench-backfill: bytecode
	$(BIN)/python -m bench.backfill

## The exact walk's extra requests next to a plain cursor walk, same listings.
bench-walk: bytecode
	$(BIN)/python -m bench.walk_cost

## A 10,000,000-version dataset in DATASET (default output/bench-dataset), without the API.
DATASET ?= output/bench-dataset
bench-dataset: bytecode
	$(BIN)/python -m bench.dataset $(DATASET) --versions 10000000 --days 30

## Compaction of one partition at 750,000, 1,500,000 and 3,000,000 rows: time and peak RSS.
bench-compact: bytecode
	$(BIN)/python -m bench.compact

## A full refresh next to the first export of the same data, 200,000 and 1,000,000 sessions.
bench-refresh: bytecode
	$(BIN)/python -m bench.refresh

## The known-versions check over a 10,000,000-version dataset (built first), newest first.
bench-versions: bytecode
	$(BIN)/python -m bench.versions

## A first load of 200,000 sessions into PostgreSQL next to DuckDB (a throwaway local server).
bench-load: bytecode
	$(BIN)/python -m bench.load

## 4 environments, each with its own key and rate-limit bucket: each alone, then all at once.
bench-environments: bytecode
	$(BIN)/python -m bench.environments

## A 10,000-change flush into a 10,000,000-row Delta latest table (365 partitions), then
## OPTIMIZE: time, peak RSS, where the time goes (DELTA_ROWS to try a smaller table first).
DELTA_ROWS ?= 10000000
bench-delta: bytecode
	mkdir -p output
	$(BIN)/python -m bench.delta --rows $(DELTA_ROWS) --out-dir output

## A first export of 1,000,000 sessions into Delta next to the same into Parquet: wall time
## and peak RSS of each, and the ratios against the targets (≤ 1.3× time, ≤ 1.5× RSS).
bench-delta-export: bytecode
	$(BIN)/python -m bench.delta_export --repeat 3

## This checkout's `run` next to another checkout's (BASELINE=DIR, e.g. a git worktree of an
## older commit), alternating rounds on one emulator: speed ratio, CPU and peak RSS.
bench-ab: bytecode
	test -n "$(BASELINE)" || { echo "make bench-ab BASELINE=DIR"; exit 2; }
	$(BIN)/python -m compileall -q $(BASELINE)/pipeline
	$(BIN)/python -m bench.ab_export $(BASELINE)
