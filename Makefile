# Two commands set up everything on a fresh machine that has only python3:
#   make test    create .venv, install the project with its dev extra, run pytest
#   make bench   same environment, run the benchmark
#   make pythons the built wheel installed and smoke-tested on every CPython 3.10-3.13 found
#   make lint    ruff check, ruff format --check, mypy (pyproject's config, tools/typecheck.py)
# Pass arguments through PYTEST_ARGS / BENCH_ARGS, e.g. make test PYTEST_ARGS='-k encodings -x'.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# Re-install only when the dependencies may have changed. The install is editable, so edits to
# the sources (new modules included) need no re-install.
STAMP := $(VENV)/.installed-stamp

.PHONY: test lint bench pythons install clean

test: $(STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS)

# mypy through tools/typecheck.py: it checks the packages as they install (client/ is
# flashtoken.client), which mypy cannot see from the checkout's layout.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VPY) tools/typecheck.py

# The main benchmark, then the host map's and the fleet tier's figures (each starts its own
# daemons and servers); the worst exit status of the three.
bench: $(STAMP)
	status=0; \
	$(VPY) -m benchmark $(BENCH_ARGS) || status=$$?; \
	$(VPY) -m benchmark.hoststore $(filter --quick,$(BENCH_ARGS)) --json benchmark/out/hoststore.json || status=$$?; \
	$(VPY) -m benchmark.fleet $(filter --quick,$(BENCH_ARGS)) || status=$$?; \
	exit $$status

# The CI matrix: one fresh venv per CPython 3.10-3.13 on this machine (absent ones are listed
# as SKIP; none found is a failure). Pass PYTHONS_ARGS='--require 3.10,3.13' to insist.
pythons: $(STAMP)
	$(VPY) tools/check_pythons.py $(PYTHONS_ARGS)

install: $(STAMP)

# A current pip first: the editable install of a pyproject-only project needs pip >= 21.3, older
# than what some distributions' python3 brings.
$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip

$(STAMP): pyproject.toml | $(VPY)
	$(VPY) -m pip install -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) benchmark/out
