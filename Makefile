# The two commands of the quick start:
#   make demo   the pipeline on the simulated demo corpus (profiles/local), then the report
#   make test   the README's test command
# Each creates .venv on first use and installs torch (pinned) and cellfoundry with the extras it
# needs; later calls install nothing until pyproject.toml changes (a stamp file per extras set).
#
# TORCH_INDEX: where the torch wheel comes from. Empty: pip's configured indexes (on PyPI, Linux
# x86_64 wheels of this pin are the CUDA build). CPU-only elsewhere:
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu

PYTHON ?= python3
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
VENV := .venv
comma := ,
BIN := $(CURDIR)/$(VENV)/bin
# The rules' shell commands call `python -m cellfoundry`: the virtual environment's python.
export PATH := $(BIN):$(PATH)
export VIRTUAL_ENV := $(CURDIR)/$(VENV)

.PHONY: demo test

demo: $(VENV)/.installed-hf
	snakemake --profile profiles/local
	snakemake --report report.html
	@python -c "$$WHERE"

test: $(VENV)/.installed-test-lamin-hf
	python -m pytest

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# `.installed-<extras>`: made after a successful install; older than pyproject.toml = reinstall.
$(VENV)/.installed-%: pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(VENV)/bin/python -m pip install -q -e ".[$(subst -,$(comma),$*)]"
	@touch $@

# Where `make demo` left the model and the report (paths from the validated config).
define WHERE
import os, yaml
from cellfoundry.config import validate_config
config = validate_config(yaml.safe_load(open("config/config.yaml")))
run = os.path.join(config["project_path"], "model_checkpoints", config["train"]["run"], "final")
print("model:  " + os.path.abspath(run))
print("report: " + os.path.abspath("report.html"))
endef
export WHERE
