# Two commands on a fresh machine: `make run` and `make test`.
# Both create .venv when it is missing and install the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test soak install clean bench guarantees

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,fast,bench]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/ringkv cluster up --nodes 3 --rf 3 --data-dir ./data --demo

test: $(STAMP)
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q tests

# The long runs kept out of `make test`: minutes of chaos, thousands of keys.
soak: $(STAMP)
	$(BIN)/python -m pytest -q -m soak tests

bench: $(STAMP)
	$(BIN)/python -m bench

# Reruns the simulator commands behind README's Guarantees figures and rewrites
# them (and the pinned first-seed hashes the tests check) in README.md.
guarantees: $(STAMP)
	$(BIN)/python -m ringkv.sim.guarantees README.md

clean:
	rm -rf $(VENV) data build *.egg-info
