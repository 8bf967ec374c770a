# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs the project from pyproject.toml, pinned by constraints.txt;
# `make test` also creates .venv-checkov (the manifest scanner, from requirements-checkov.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Checkov (tests/test_k8s_checkov.py scans the Kubernetes manifests with it) in a venv of its own:
# its pins clash with the project's (requirements-checkov.txt says which).
CHECKOV_VENV ?= .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed
# Your photos get their own folder, so a search on them never meets the sample's (and vice versa).
DEMO_DIR ?= demo-output$(if $(INPUT),-$(notdir $(abspath $(INPUT))))
# Point the demo at your own folder: make demo INPUT=/path/to/photos [DEMO_ARGS="--image-size 160 --max-trials 8"]
INPUT ?=
DEMO_ARGS ?=

.PHONY: install demo test clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==26.3"
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

$(CHECKOV_STAMP): requirements-checkov.txt
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet --upgrade "pip==26.3"
	$(CHECKOV_VENV)/bin/python -m pip install --quiet -r requirements-checkov.txt
	touch $(CHECKOV_STAMP)

install: $(STAMP) $(CHECKOV_STAMP)

demo: $(STAMP)
	$(PY) -m scripts.demo --workdir $(DEMO_DIR) $(if $(INPUT),--input $(INPUT)) $(DEMO_ARGS)

test: $(STAMP) $(CHECKOV_STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) $(DEMO_DIR) build *.egg-info
