# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs the project from pyproject.toml, pinned by constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
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

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m scripts.demo --workdir $(DEMO_DIR) $(if $(INPUT),--input $(INPUT)) $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) $(DEMO_DIR) build *.egg-info
