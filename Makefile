# Two entry points: `make run` (the main job) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint clean mutants

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/bnlab check
	$(BIN)/bnlab run

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

test: lint
	$(BIN)/python -m pytest -q

# Seeded bugs in the core math, each must make its tests fail (slow: not part of `make test`).
mutants: $(STAMP)
	$(BIN)/python scripts/mutants.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build src/*.egg-info

# The suite on the oldest and the newest supported torch, each in its own .venv-compat-<torch>
# (CUDA builds, ~5 GB each; not part of CI). COMPAT_TORCH="torch:torchvision ..." overrides.
.PHONY: test-compat
test-compat:
	PYTHON=$(PYTHON) bash scripts/test_compat.sh
