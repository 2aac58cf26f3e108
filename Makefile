# Two commands a new machine needs (see README.md):
#   make demo   install everything and run the main job
#   make test   install everything and run the test suite
#
# The virtual environment lives outside the clone, keyed by a hash of
# requirements.txt, so torch is installed once per machine, not once per clone.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
REQ_HASH := $(shell sha256sum requirements.txt | cut -c1-16)
VENV ?= $(HOME)/.cache/clip-audit/venv-$(REQ_HASH)
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv demo serve test test-engine clean-venv

venv: $(VENV)/.installed

# No file prerequisite: the folder name already carries the hash of requirements.txt, and a fresh clone's
# requirements.txt is always newer than a cached venv, which would reinstall it on every CI run.
$(VENV)/.installed:
	rm -rf "$(VENV)"
	$(PYTHON) -m venv "$(VENV)"
	"$(PY)" -m pip install --quiet --upgrade pip
	"$(PY)" -m pip install --quiet -r requirements.txt
	touch "$@"

demo: venv
	"$(PY)" manage.py demo $(DEMO_ARGS)

serve: venv
	"$(PY)" manage.py serve

test: venv
	"$(PY)" -m pytest $(PYTEST_ARGS)

test-engine: venv
	"$(PY)" -m pytest tests/engine $(PYTEST_ARGS)

clean-venv:
	rm -rf "$(VENV)"
