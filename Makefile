# hrtem-book — two commands on a fresh clone:
#   make book   set up .venv and build the book (PROFILE=name picks the results profile)
#   make test   set up .venv and run the tests
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := requirements/constraints.txt
STAMP := $(VENV)/.installed
# torch first, pinned: an unpinned resolve would fetch a multi-GB CUDA build
TORCH_PIN := $(shell grep -E '^torch==' $(CONSTRAINTS))
TORCHVISION_PIN := $(shell grep -E '^torchvision==' $(CONSTRAINTS))

.PHONY: setup test test-fast book live lint format bench clean-book

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_PIN)" -c $(CONSTRAINTS)
	# torchvision's PyPI wheel is CUDA-built: take only its pure-Python parts (see hrtem_book/_torchvision.py)
	$(PIP) install -q --no-deps "$(TORCHVISION_PIN)"
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[test,book]'
	@touch $@

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks
