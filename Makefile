# Two entry points for a fresh machine (each installs what it needs):
#   make demo   - create a table, load the bundled Kamailio log, print what it holds
#   make test   - lint, then the whole test suite (installs Kamailio, sipp and Prometheus for the end-to-end tests)
# and, for numbers:
#   make bench  - benchmarks against peers, measured in the same run

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
CORE    := $(VENV)/.installed-core
STAMP   := $(VENV)/.installed-dev

.PHONY: demo test lint test-stress bench bench-kamailio system-deps clean

# npcalls alone (numpy, xxhash): all the demo needs; a C compiler, if there is one,
# builds the compiled fast path of ingest (npcalls/ingest/_scan.c) in place
$(CORE): pyproject.toml setup.py npcalls/ingest/_scan.c
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $(CORE)

# plus the analysis extra, test tools and benchmark peers
$(STAMP): $(CORE)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(CORE)
	$(BIN)/npcalls demo

system-deps:
	scripts/install-system-deps.sh

# (system-deps first: it installs gcc, which the install uses to build ingest's C scanner)
test: system-deps $(STAMP) lint
	$(BIN)/python -m pytest

# pyflakes + import order, and types (configured in pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check npcalls tests bench
	$(BIN)/mypy

# The long runs: 10,000 crash kills, 10M churn cycles (see README).
test-stress: $(STAMP) system-deps
	$(BIN)/python -m pytest -m stress

# bench/targets.py runs bench_core.py and bench_ingest.py (their reports shown) and
# ends with issue 13's targets, PASS/MISS, all from that one run
bench: $(STAMP)
	$(BIN)/python bench/targets.py --show
	$(BIN)/python bench/bench_lifecycle.py
	$(BIN)/python bench/bench_analysis.py
	$(BIN)/python bench/bench_exporter.py
	$(BIN)/python bench/bench_locks.py

# Kamailio with and without npcalls recording (needs the system packages)
bench-kamailio: $(STAMP) system-deps
	$(BIN)/python bench/bench_kamailio.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
