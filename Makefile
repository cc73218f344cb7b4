# The two commands a user needs: `make run` and `make test`. Both set the machine up first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup run test unit lint bench doctor clean go bpf wheel

setup:
	@bash scripts/bootstrap.sh

run: setup
	$(VENV)/bin/kspan run $(ARGS)

doctor: setup
	$(VENV)/bin/kspan doctor

go: setup
	@bash scripts/install-go.sh

# The CO-RE probe objects alone (setup builds them too); `wheel` ships them in the package.
bpf:
	@bash scripts/build-bpf.sh

wheel: setup
	$(VENV)/bin/pip wheel --no-deps -w dist .

test: setup go
	$(VENV)/bin/ruff check tracer correlator exporters tests bench
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q -rs tests

unit: setup
	$(PY) -m pytest -q tests/unit

# Hypothesis profiles (tests/conftest.py): `test` and `unit` run derandomized ("ci": the same
# examples every run, no example database); `fuzz` explores at random for longer and keeps its
# example database in .hypothesis/examples, so what it once found is tried first next time.
test unit: export HYPOTHESIS_PROFILE ?= ci

.PHONY: fuzz
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q -p no:cacheprovider -o timeout=3600 tests/unit -k fuzz

lint: setup
	$(VENV)/bin/ruff check tracer correlator exporters tests bench

bench: setup go
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m bench.run $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info build tracer/objects/*.bpf.o
