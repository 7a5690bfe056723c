# Chunkyard: `make run` starts a server on ./data (created on first run), `make test` installs
# everything the tests need from nothing and runs them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ./data
LISTEN ?= 127.0.0.1:8420

.PHONY: run test lint bench system-deps clean

$(BIN)/chunkyard: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.test-deps: pyproject.toml $(BIN)/chunkyard
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/chunkyard
	@test -f $(DATA)/repo.toml || $(BIN)/chunkyard init --data $(DATA)
	$(BIN)/chunkyard serve --data $(DATA) --listen $(LISTEN)

system-deps:
	@bash scripts/install-system-deps.sh

test: $(VENV)/.test-deps system-deps
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: $(VENV)/.test-deps
	$(BIN)/ruff check .

# bench: the storage engine, the fleet suite at scale small (3 runs, about 30 min) and the cloud tiers against
# moto and Azurite (3 runs, a few minutes; the emulators come with the test extra and system-deps); see
# benchmarks/RESULTS.md.
# bench-smoke: the fleet suite at scale smoke for CI (under 3 min); fails only when something breaks, not on a
# missed target.
bench: $(BIN)/chunkyard $(VENV)/.test-deps system-deps
	bash benchmarks/install-peers.sh
	$(BIN)/python -m benchmarks.engine
	$(BIN)/python -m benchmarks.suite --scale small
	$(BIN)/python -m benchmarks.tiering

.PHONY: bench-smoke
bench-smoke: $(BIN)/chunkyard
	bash benchmarks/install-peers.sh
	$(BIN)/python -m benchmarks.suite --scale smoke

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
