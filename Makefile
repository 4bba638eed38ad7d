# packer-assets: the two commands that matter are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LAB_STATE ?= .lab
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

# The lab's env file when a lab is up and the caller named no other.
PACKER_ASSETS_ENV_FILE ?= $(if $(wildcard $(LAB_STATE)/lab.env),$(CURDIR)/$(LAB_STATE)/lab.env,)
export PACKER_ASSETS_ENV_FILE
DAGSTER := $(BIN)/dagster asset materialize -m packer_assets.definitions
# `make ui`: where the webserver listens.
UI_HOST ?= 127.0.0.1
UI_PORT ?= 3000

# What the suite needs from the system: the real packer, a real sshd and ssh/scp for the SSH paths,
# debconf (preseed validation), gnupg (checksum signatures), PostgreSQL (deploy/'s instance, a cluster
# of the tests' own on loopback), Chromium + ChromeDriver (the UI test), QEMU, qemu-img and debootstrap
# (a real Debian guest: tests/lab/realguest).
TEST_PACKAGES := packer openssh-server openssh-client debconf gnupg postgresql chromium chromium-driver \
	qemu-system-x86 qemu-utils debootstrap
# pytest arguments, e.g. `make test PYTEST_ARGS="-m 'not slow'"` (markers: pyproject.toml)
PYTEST_ARGS ?=

.PHONY: settings-check init demo demo-real real-keys lab-up-real build build-all validate test test-deps test-fast test-lab lint bench bench-builds ui venv packer dagster-home lab-up lab-down lab-status catalog-check clean

demo: venv packer lab-up catalog-check ## the lab, then every asset of every template against it
	$(MAKE) init PACKER_ASSETS_ENV_FILE=$(abspath $(LAB_STATE))/lab.env
	$(MAKE) build-all PACKER_ASSETS_ENV_FILE=$(abspath $(LAB_STATE))/lab.env
	$(MAKE) lab-status
	@echo "Proofs: docs/proof/platform/packer-builds/builds/<key>/latest/README.md"
	@echo "Lab running. Point the project at it with: export PACKER_ASSETS_ENV_FILE=$(abspath $(LAB_STATE))/lab.env"
	@echo "Stop it with: make lab-down"

# debian-12 and debian-13 with a real guest: QEMU VMs on a Debian 12 (bookworm) or 13 (trixie) image debootstrapped
# from this machine's apt mirror (built once per suite, 1-2 min, cached under ~/.cache/packer-assets), the install
# emulated from the served preseed (its packages from the mirror, cached as a layer per selection: ~9 min once per
# suite), everything after it real. Each key runs as `dagster asset materialize`, then its signed proof is checked.
REAL_GUEST_PACKAGES := qemu-system-x86 qemu-utils debootstrap
# The keys built for real, one or both (`make demo-real REAL_KEYS=debian-13`). The default is those of the two the
# project's catalog has (`packer-assets catalog check` lists them), so it builds debian-13 once the catalog ships it;
# a key named here that the catalog lacks is refused by `lab up` in one line.
# (Read once, when first used: after `venv` made the command.)
REAL_KEYS ?= $(eval REAL_KEYS := $(filter debian-12 debian-13,$(shell $(BIN)/packer-assets catalog check 2>/dev/null \
  | sed -n 's/^\([a-z0-9.-]*\): .*/\1/p')))$(REAL_KEYS)
comma := ,
empty :=
space := $(empty) $(empty)
# Each key's real build's own bound (seconds): 3-6 min under TCG, ~15 the first time per suite (its package layer);
# nothing may wait past this. Both keys: at most twice this.
DEMO_REAL_TIMEOUT ?= 1800
# kvm|tcg: skips the lab's accelerator probe (docs/realguest.md); from the environment or the command line, it
# reaches the lab (`lab up` and its service) and `make test` (tests/conftest.py lets it through).
export PACKER_ASSETS_QEMU_ACCEL
REAL_ASSETS := staged_iso,unattended_files,template,template_proof
REAL_LAB_ENV = PACKER_ASSETS_ENV_FILE=$(abspath $(LAB_STATE))/lab.env
demo-real: venv packer lab-up-real catalog-check ## the lab with real Debian guests; REAL_KEYS (debian-12 debian-13) built, smoke-tested and proved for real (root; ~15 min per suite the first time: the image, the package layer)
	$(MAKE) init $(REAL_LAB_ENV)
	@set -e; for key in $(REAL_KEYS); do \
	  echo "== $$key: a real build"; \
	  $(REAL_LAB_ENV) timeout $(DEMO_REAL_TIMEOUT) $(DAGSTER) --select '$(REAL_ASSETS)' --partition $$key; \
	  $(REAL_LAB_ENV) $(BIN)/packer-assets proof verify docs/proof/platform/packer-builds/builds/$$key/latest \
	    --allowed-signers $(LAB_STATE)/signing/allowed_signers; \
	  grep -E '^\| (Guest|Packages \(SBOM\)|smoke_test) \|' docs/proof/platform/packer-builds/builds/$$key/latest/README.md; \
	done
	@echo "Stop the lab with: make lab-down"

real-keys: ## the keys make demo-real builds (REAL_KEYS)
	@echo $(REAL_KEYS)

lab-up-real: venv
	@[ -n "$(strip $(REAL_KEYS))" ] || { $(BIN)/packer-assets catalog check; \
	  echo "REAL_KEYS: the catalog has neither debian-12 nor debian-13 (above); name keys: make demo-real REAL_KEYS=<key>"; exit 2; }
	@tools/system-packages.sh $(REAL_GUEST_PACKAGES)
	$(BIN)/packer-assets lab up --state $(LAB_STATE) --real-guest $(subst $(space),$(comma),$(strip $(REAL_KEYS)))

# The tests make their own labs and instances: nothing of a lab `make demo` left (PACKER_ASSETS_ENV_FILE)
# or of $(DAGSTER_HOME) reaches them (tests/conftest.py also clears the project's variables).
# Each run writes a JUnit report, every test's duration in it (setup + call + teardown), to
# test-output/junit-<target>.xml: junit-test.xml, junit-test-fast.xml, junit-test-lab.xml.
PYTEST = env -u PACKER_ASSETS_ENV_FILE -u DAGSTER_HOME $(BIN)/pytest --junitxml=test-output/junit-$@.xml \
	-o junit_duration_report=total
# The two fast tiers, by marker (pyproject.toml; tests/conftest.py says what each needs)
BINARIES := packer or sshd or postgres or e2e or browser or realguest

test: lint test-deps venv ## the gates, then the whole test suite; installs what it needs first (as root with apt), else says what is missing
	$(PYTEST) $(PYTEST_ARGS)

# The gates (configuration: pyproject.toml's [tool.ruff] and [tool.mypy]): lint, format, types, on the product
# and the lab. Each is its own line, so a failure names its gate.
LINT_PATHS := packer_assets lab/packer_assets_lab
lint: venv ## ruff check, ruff format --check and mypy (strict on the core) on the product and the lab
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

test-fast: venv ## the unit tests alone: no lab, packer, sshd, PostgreSQL, Dagster processes, browser or QEMU guest
	$(PYTEST) -m "not (lab or $(BINARIES))" $(PYTEST_ARGS)

test-lab: venv ## the tests of the in-process lab that need no binary: no packer, sshd, PostgreSQL, Dagster processes, browser or QEMU guest
	$(PYTEST) -m "lab and not ($(BINARIES))" $(PYTEST_ARGS)

test-deps:
	@tools/system-packages.sh $(TEST_PACKAGES)

bench: venv ## benchmarks that need no packer build: they print figures, they do not fail (bench/README.md)
	$(BIN)/python bench/upload_hash_throughput.py
	$(BIN)/python bench/isowatch_tick.py
	$(BIN)/python bench/sensor_tick.py
	$(BIN)/python bench/definitions_load.py
	$(BIN)/python bench/schedule_tick.py

bench-builds: venv packer ## benchmarks with real packer builds in a lab of their own (~9 min): overhead, no-op rerun, scaling, a real-guest build by phase
	$(BIN)/python bench/build_overhead.py
	$(BIN)/python bench/noop_rerun.py
	$(BIN)/python bench/parallel_scaling.py
	$(BIN)/python bench/noop_vs_floor.py
	@tools/system-packages.sh $(REAL_GUEST_PACKAGES)
	$(BIN)/python bench/realguest_build.py

venv: $(VENV)/.installed

# The product and the lab (lab/: its own distribution, the one that needs fakepve), both editable.
$(VENV)/.installed: pyproject.toml lab/pyproject.toml
	@tools/system-packages.sh python3-venv
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' -e ./lab
	touch $@

packer: ## Debian's packer (any packer on PATH counts), or a clear message where we cannot install it
	@tools/system-packages.sh packer

# One line naming the variable and where it came from, instead of a traceback from the definitions' load.
settings-check: venv
	@$(BIN)/packer-assets settings >/dev/null

init: venv dagster-home settings-check ## materialize proxmox_env: API user, role, token, infra/env/.env.proxmox
	$(DAGSTER) --select proxmox_env

# The rebuild of one key, as the toolkit's build-wrapper.sh: make build KEY=debian-12. One process:
# `packer-assets build` checks the settings and the key (one line, exit 2: job execute would run and record an
# unknown partition), then runs Dagster's `dagster job execute -j rebuild_template` for the key's partition in
# itself: a run of that job (in the UI's history of that job, not an anonymous asset run), executed in this
# process like `dagster asset materialize` (no daemon; the pool still applies).
# KEY reaches the shell as an environment variable ("$$KEY"), never pasted into the recipe's quoting: any text
# is one argument (after `--`: a KEY that starts with - is a key too).
build: venv dagster-home
	@[ -n "$$KEY" ] || { echo "usage: make build KEY=<template key> (see: make catalog-check)"; exit 2; }
	$(BIN)/packer-assets build -- "$$KEY"

# Only the keys whose inputs changed or that have no template (`packer-assets plan`, the weekly schedule's
# pre-check); ALL=1 runs every key (each run still skips a key that is up to date).
build-all: venv dagster-home settings-check ## every key that needs a build, one after the other (ALL=1: every key)
	@if [ -n "$(ALL)" ]; then keys=$$($(BIN)/python -c "from packer_assets.config.settings import environment; \
	  from packer_assets.catalog import load_catalog; print(' '.join(load_catalog(env=environment()).keys()))"); \
	  else $(BIN)/packer-assets plan; keys=$$($(BIN)/packer-assets plan --keys-only); fi; \
	  set -e; for key in $$keys; do $(MAKE) --no-print-directory build KEY=$$key; done

validate: venv ## render and validate every key, then packer validate (validate-all.sh)
	$(BIN)/packer-assets validate

ui: venv packer lab-up dagster-home ## the lab + `dagster dev` (webserver and daemon) on http://$(UI_HOST):$(UI_PORT)
	@[ -f "$${PACKER_ASSETS_ROOT:-.}/infra/env/.env.proxmox" ] || $(MAKE) init PACKER_ASSETS_ENV_FILE=$(abspath $(LAB_STATE))/lab.env
	@echo "Dagster UI on http://$(UI_HOST):$(UI_PORT) (Ctrl-C stops it; the lab keeps running: make lab-down)"
	PACKER_ASSETS_ENV_FILE=$(abspath $(LAB_STATE))/lab.env $(BIN)/dagster dev -m packer_assets.definitions -h $(UI_HOST) -p $(UI_PORT)

# The instance: the repo's dagster.yaml (SQLite under DAGSTER_HOME, queued runs, one run per key,
# pool packer_builds = 2) linked into DAGSTER_HOME. A dagster.yaml of your own there is left alone.
dagster-home:
	@mkdir -p "$(DAGSTER_HOME)"
	@if [ ! -e "$(DAGSTER_HOME)/dagster.yaml" ] || [ -L "$(DAGSTER_HOME)/dagster.yaml" ]; then \
	  ln -sfn "$(CURDIR)/dagster.yaml" "$(DAGSTER_HOME)/dagster.yaml"; \
	else \
	  echo "$(DAGSTER_HOME)/dagster.yaml is your own file: kept (the repo's is $(CURDIR)/dagster.yaml)"; \
	fi

lab-up: venv
	$(BIN)/packer-assets lab up --state $(LAB_STATE)

lab-down: venv
	$(BIN)/packer-assets lab down --state $(LAB_STATE)

lab-status: venv
	$(BIN)/packer-assets lab status --state $(LAB_STATE)

catalog-check: venv
	$(BIN)/packer-assets catalog check

clean: ## stop the lab and remove everything generated (not the venv)
	-@[ -x $(BIN)/packer-assets ] && $(BIN)/packer-assets lab down --state $(LAB_STATE) || true
	rm -rf $(LAB_STATE) output .dagster_home .pytest_cache test-output
