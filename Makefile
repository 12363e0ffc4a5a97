# hrtem-book — two commands on a fresh clone:
#   make book   set up .venv and build the book (PROFILE=name picks the results profile)
#   make test   set up .venv and run the tests
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# pip byte-compiles every installed file on one core, and compileall all 14,758 of them takes
# 40 s on two cores; the pipeline imports about a third. This workplace sets
# PYTHONDONTWRITEBYTECODE=1, under which every process would compile its imports again (make
# test took 13:21 instead of 9:14): the recipes run without it, so each module is compiled once,
# by its first importer, and two processes import the pipeline's modules right after install:
# torch and the sweep's in one, the book's (Jupyter, matplotlib) in the other, side by side
# (one process took 21-23 s of a fresh `make book`, with the second core idle).
unexport PYTHONDONTWRITEBYTECODE
INSTALL := $(PIP) install -q --no-compile
COMPILE := $(PY) -c "import hrtem_book.cli, hrtem_book.sweep, hrtem_book.executors, \
	hrtem_book.runs, hrtem_book.simulate, hrtem_book.datasets, hrtem_book.power, distributed" & \
	compiling=$$!; \
	$(PY) -c "import hrtem_book.book.build, hrtem_book.book.pages, hrtem_book.widgets, \
	ipykernel.kernelapp, papermill, matplotlib.pyplot, seaborn, ipywidgets" && wait $$compiling
CONSTRAINTS := requirements/constraints.txt
# uv installs the same pinned set as pip several times faster (the test and book extras: 7 s
# instead of 49 s on two cores); pip itself takes over wherever uv fails (no uv for the
# platform, an index uv does not reach). pip's own find-links (a local wheel folder, as in this
# workplace's pip.conf) are handed to uv, which does not read pip's configuration.
UV_PIN := $(shell grep -E '^uv==' $(CONSTRAINTS))
FAST = $(VENV)/bin/uv pip install -q --python $(PY) \
	$$(for d in $$($(PIP) config get global.find-links 2>/dev/null); do printf -- '--find-links %s ' "$$d"; done)
# the book needs the package and its book extra; the tests add the test extra (abTEM, numba, ...)
BOOK_STAMP := $(VENV)/.installed-book
STAMP := $(VENV)/.installed
# torch first, pinned: an unpinned resolve would fetch a multi-GB CUDA build
TORCH_PIN := $(shell grep -E '^torch==' $(CONSTRAINTS))
TORCHVISION_PIN := $(shell grep -E '^torchvision==' $(CONSTRAINTS))
, := ,

.PHONY: setup test test-fast book live lint format bench clean-book browser slurm gpu-wheels

setup: $(STAMP)

# a venv with torch (pinned first: an unpinned resolve would fetch a multi-GB CUDA build) and the
# package with the extras $(1); then the pipeline's modules compiled (see INSTALL above)
define install_venv
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(INSTALL) "$(UV_PIN)" || true
	$(FAST) "$(TORCH_PIN)" -c $(CONSTRAINTS) || $(INSTALL) "$(TORCH_PIN)" -c $(CONSTRAINTS)
	# torchvision's PyPI wheel is CUDA-built: take only its pure-Python parts (see hrtem_book/_torchvision.py)
	$(FAST) --no-deps "$(TORCHVISION_PIN)" || $(INSTALL) --no-deps "$(TORCHVISION_PIN)"
	$(FAST) -c $(CONSTRAINTS) -e '.[$(1)]' || $(INSTALL) -c $(CONSTRAINTS) -e '.[$(1)]'
	$(COMPILE)
endef

$(BOOK_STAMP): pyproject.toml $(CONSTRAINTS)
	$(call install_venv,book)
	@touch $@

# one resolve for both extras (a fresh `make test` skips the book-only install)
$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(call install_venv,test$(,)book)
	@touch $(BOOK_STAMP) $@

test: $(STAMP) browser slurm
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(PY) -m pytest -q -n auto --dist worksteal --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

# --- the book (hrtem_book/book.py) --------------------------------------------------------------
PROFILE ?=
PORT ?= 8866
# Debian's chromium drives tests/test_live.py through Playwright (never `playwright install`)
CHROMIUM ?= /usr/bin/chromium
export HRTEM_BOOK_CHROMIUM := $(CHROMIUM)
APT_SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# the MyST book-theme for `myst build --html` without network, where a local copy is provided
# (this workplace's ../shared/tools); elsewhere myst downloads it
THEME_INSTALLER ?= $(wildcard ../shared/tools/install-book-theme)

# database (sweep if missing) → papermill → myst build --html, or the checked offline site
book: $(BOOK_STAMP)
	$(VENV)/bin/hrtem-book book $(if $(PROFILE),--profile $(PROFILE)) \
	  $(if $(THEME_INSTALLER),--theme-installer $(THEME_INSTALLER))

# the figure notebooks' apps in Voila on http://127.0.0.1:$(PORT)/ (Ctrl-C stops)
live: $(BOOK_STAMP)
	$(VENV)/bin/hrtem-book live $(if $(PROFILE),--profile $(PROFILE)) --port $(PORT)

browser:
	@if [ ! -x "$(CHROMIUM)" ]; then \
	  if command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium for the browser test"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    $(APT_SUDO) apt-get install -y -q --no-install-recommends chromium \
	      || { $(APT_SUDO) apt-get update -q && $(APT_SUDO) apt-get install -y -q --no-install-recommends chromium; }; \
	  else \
	    echo "no apt-get: install chromium and pass CHROMIUM=/path (tests/test_live.py skips without it)"; \
	  fi; \
	fi

# Debian's single-node SLURM (slurmctld + slurmd + munge) runs tests/test_cluster.py: the sweep
# submitted as real batch jobs through dask-jobqueue; the test starts and stops the daemons itself
slurm:
	@PATH="$$PATH:/usr/sbin:/sbin"; \
	if ! command -v sinfo >/dev/null || ! command -v slurmctld >/dev/null \
	    || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then \
	  if command -v apt-get >/dev/null; then \
	    echo "installing Debian's slurm and munge for the cluster test"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    $(APT_SUDO) apt-get install -y -q --no-install-recommends slurmd slurmctld slurm-client munge \
	      || { $(APT_SUDO) apt-get update -q && $(APT_SUDO) apt-get install -y -q --no-install-recommends slurmd slurmctld slurm-client munge; }; \
	  else \
	    echo "no apt-get: install slurm and munge (tests/test_cluster.py's SLURM tests skip without them)"; \
	  fi; \
	fi

clean-book:
	rm -rf _build

# the wheels a GPU image lacks for `hrtem-book campaign` (README "GPU campaign"): Python 3.12,
# pure-Python or abi3 builds, pinned as the constraints file pins them here
GPU_WHEELS := segmentation_models_pytorch ase netCDF4 cftime
gpu-wheels: $(STAMP)
	mkdir -p .whl
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $(foreach w,$(GPU_WHEELS),$(shell grep -iE '^$(w)==' $(CONSTRAINTS)))
	@ls .whl
