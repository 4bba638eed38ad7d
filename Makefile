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

.PHONY: init demo test venv packer lab-up lab-down lab-status catalog-check clean

demo: venv packer lab-up catalog-check ## lab + catalog check + proxmox_env (later: every asset of every template)
	$(MAKE) init PACKER_ASSETS_ENV_FILE=$(CURDIR)/$(LAB_STATE)/lab.env
	$(MAKE) lab-status
	@echo "Lab running. Point the project at it with: export PACKER_ASSETS_ENV_FILE=$(CURDIR)/$(LAB_STATE)/lab.env"
	@echo "Stop it with: make lab-down"

test: venv ## the whole test suite (needs packer and openssh-server: .ci/run installs them)
	$(BIN)/pytest

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[lab,dev]'
	touch $@

packer: ## Debian's packer, or a clear message where we cannot install it
	@command -v packer >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq packer; \
	else \
	  echo "packer is not installed: run 'sudo apt-get install packer' (or install HashiCorp's packer)"; exit 1; \
	fi

init: venv ## materialize proxmox_env: API user, role, token, infra/env/.env.proxmox
	@mkdir -p $(DAGSTER_HOME)
	$(DAGSTER) --select proxmox_env

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
