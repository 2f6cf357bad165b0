# dicomflow — one entry point for people and CI (.ci/run calls `make test`).
#
#   make demo    sample DICOM archive -> NIfTI on this machine, with a summary
#   make test    install everything, start the emulators, run every test tier
#   make lint    ruff + mypy (strict on src/)
#   make bench   benchmarks (print ratios measured side by side)
#   make soak    the cloud path's simulation over 100,000 seeds (CI runs 2,000)
#   make dist    build dist/functions-source.zip for Terraform
#   make lock    regenerate functions/requirements.txt (the hashed lock) after changing dependencies
#   make dev     local dev stack: Firestore + Cloud Tasks emulators, functions, worker

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TASKS_VENV := .venv-tasks
CHECKOV_VENV := .venv-checkov
UV_VENV := .venv-uv
# Three install stamps, so each target installs only what it needs: `make demo` the package alone,
# `make lint` the linters, `make test` the test tools (and the emulators, through `tools`).
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
LINT_STAMP := $(VENV)/.installed-lint
TIERS := unit contract simulation integration emulator e2e infra
# A test belongs to exactly one tier: the most demanding of its markers wins.
TIER_unit := unit
TIER_contract := contract and not emulator and not e2e
TIER_simulation := simulation
TIER_integration := integration and not emulator and not e2e
TIER_emulator := emulator and not e2e
TIER_e2e := e2e
TIER_infra := infra

export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_NO_INPUT := 1

.PHONY: help
help:
	@sed -n 's/^#   //p' Makefile

# --- installation ----------------------------------------------------------------------------------

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e .
	@touch $@

$(TEST_STAMP): $(STAMP)
	$(PIP) install --quiet -c constraints.txt -e '.[test]'
	@touch $@

$(LINT_STAMP): $(STAMP)
	$(PIP) install --quiet -c constraints.txt -e '.[lint]'
	@touch $@

# Everything a developer needs in .venv (the package, test and lint tools).
.PHONY: venv
venv: $(STAMP) $(TEST_STAMP) $(LINT_STAMP)

# gcloud-tasks-emulator pins an old protobuf/grpc, so it lives in its own virtualenv (GCP_FACTS §4).
$(TASKS_VENV)/.installed:
	@test -x $(TASKS_VENV)/bin/python || $(PYTHON) -m venv $(TASKS_VENV)
	$(TASKS_VENV)/bin/python -m pip install --quiet 'gcloud-tasks-emulator==0.6.2'
	@touch $@

# checkov ships its own fork of hcl2 under the same import name as python-hcl2: keep it apart.
$(CHECKOV_VENV)/.installed:
	@test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet 'checkov==3.3.30'
	@touch $@

# The Firestore emulator comes with the Google Cloud CLI's Debian package; install it if it is missing.
.PHONY: firestore-emulator
firestore-emulator:
	@if gcloud emulators firestore --help >/dev/null 2>&1 && command -v java >/dev/null; then \
		echo "firestore emulator: present"; \
	else \
		echo "firestore emulator missing: installing google-cloud-cli-firestore-emulator"; \
		apt-get update -qq && apt-get install -y -qq google-cloud-cli-firestore-emulator openjdk-17-jre-headless; \
	fi

.PHONY: tools
tools: $(TEST_STAMP) $(TASKS_VENV)/.installed $(CHECKOV_VENV)/.installed firestore-emulator

# --- everyday targets --------------------------------------------------------------------------------

.PHONY: demo
demo: $(STAMP)
	$(VENV)/bin/dicomflow demo --dir demo-out

.PHONY: lint
lint: $(LINT_STAMP)
	$(VENV)/bin/ruff check src tests functions container bench
	$(VENV)/bin/ruff format --check src tests functions container bench
	$(VENV)/bin/mypy

# Each tier runs on its own so its summary line is visible; all tiers run even if one fails, and the
# target fails if any did. pytest exit code 5 (no tests collected) is a failure: every tier has tests.
.PHONY: test
test: tools
	@rm -f .coverage .coverage.*
	@failed=""; \
	for tier in $(TIERS); do \
		echo; echo "=== tier: $$tier ==="; \
		set +e; \
		DICOMFLOW_TASKS_EMULATOR_PYTHON=$(CURDIR)/$(TASKS_VENV)/bin/python \
		DICOMFLOW_CHECKOV=$(CURDIR)/$(CHECKOV_VENV)/bin/checkov \
		$(PY) -m pytest -m "$$(make -s --no-print-directory tier-expr-$$tier)" --cov --cov-append --cov-report= \
			--cov-fail-under=0 -p no:cacheprovider; \
		rc=$$?; set -e; \
		if [ $$rc -eq 5 ]; then echo "tier $$tier: no tests were collected (exit code 5) — treated as a failure"; fi; \
		if [ $$rc -ne 0 ]; then failed="$$failed $$tier"; fi; \
	done; \
	echo; $(VENV)/bin/coverage combine --quiet 2>/dev/null || true; \
	if ! $(VENV)/bin/coverage report > .coverage-report.txt; then failed="$$failed coverage"; fi; \
	grep TOTAL .coverage-report.txt; echo "(branch coverage of src/ over all tiers; the floor is fail_under in pyproject.toml)"; \
	if [ -n "$$failed" ]; then echo "FAILED:$$failed"; exit 1; fi; \
	echo "all tiers passed: $(TIERS)"

.PHONY: tier-expr-%
tier-expr-%:
	@echo '$(TIER_$*)'

# One tier alone, e.g. `make test-unit`.
.PHONY: test-%
test-%: tools
	DICOMFLOW_TASKS_EMULATOR_PYTHON=$(CURDIR)/$(TASKS_VENV)/bin/python \
	DICOMFLOW_CHECKOV=$(CURDIR)/$(CHECKOV_VENV)/bin/checkov \
	$(PY) -m pytest -m "$(TIER_$*)" -p no:cacheprovider

.PHONY: soak
soak: $(TEST_STAMP)
	$(PY) -m tests.sim --seeds 100000 --jobs $$(nproc)

.PHONY: bench
bench: $(TEST_STAMP)
	$(PY) bench/local_overhead.py
	$(PY) bench/drive_transfer.py
	$(PY) bench/fanout.py

# The Cloud Functions source: entry points + the dicomflow package + pinned requirements.
.PHONY: dist
dist: $(STAMP)
	$(PY) -m dicomflow.packaging dist/functions-source.zip

# uv resolves the functions' lock for Cloud Functions' platform (CPython 3.11, x86-64 Linux), whatever this
# machine is; it lives in its own virtualenv like the other tools.
$(UV_VENV)/.installed:
	@test -x $(UV_VENV)/bin/python || $(PYTHON) -m venv $(UV_VENV)
	$(UV_VENV)/bin/python -m pip install --quiet 'uv==0.13.8'
	@touch $@

# Regenerate functions/requirements.txt (the hashed lock in the functions archive); needs PyPI.
.PHONY: lock
lock: $(STAMP) $(UV_VENV)/.installed
	PATH=$(CURDIR)/$(UV_VENV)/bin:$$PATH $(PY) -m dicomflow.packaging lock

# DEV_ARGS: more options of `dicomflow dev`, e.g. DEV_ARGS="--logs /tmp/dev-logs".
.PHONY: dev
dev: tools
	DICOMFLOW_TASKS_EMULATOR_PYTHON=$(CURDIR)/$(TASKS_VENV)/bin/python $(VENV)/bin/dicomflow dev $(DEV_ARGS)

.PHONY: constraints
constraints: $(TEST_STAMP) $(LINT_STAMP)
	@{ sed -n '1,2p' constraints.txt; $(PIP) freeze --exclude-editable | grep -v '^-e' | sort; } > constraints.tmp
	@mv constraints.tmp constraints.txt

.PHONY: clean
clean:
	rm -rf $(VENV) $(TASKS_VENV) $(CHECKOV_VENV) $(UV_VENV) demo-out dist .coverage .coverage.* .pytest_cache .mypy_cache .ruff_cache
