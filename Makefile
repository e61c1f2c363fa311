# Two commands on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench bench-faults bench-backfill clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## The main job on the bundled emulator: no key, no network.
demo: $(STAMP)
	$(BIN)/python -m pipeline.demo

## The whole test suite.
test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests bench

## Throughput, CPU and memory, ours vs the fastest bare fetch loop, side by side, then the
## enrichment path against the rate-limit ceiling (bench/README.md; about 5-10 minutes).
bench: $(STAMP)
	$(BIN)/python -m bench.throughput
	$(BIN)/python -m bench.enrich

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

## An export through injected faults and a tight rate limit, next to a clean one.
bench-faults: $(STAMP)
	$(BIN)/python -m bench.faults

## A concurrent backfill against the rate-limit ceiling, next to a sequential walk.
bench-backfill: $(STAMP)
	$(BIN)/python -m bench.backfill
