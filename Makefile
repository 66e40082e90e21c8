# `make test` and `make demo` create .venv on first use and install everything into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast lint demo constraints clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt setuptools
	$(PY) -m pip install --quiet -c constraints.txt --no-build-isolation -e '.[test]'
	touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check .

# Two pytest workers: most of the suite's time is single-threaded nnU-Net start-up (imports, spawned pools), so a
# second worker uses the second core. The 15 slowest tests are listed at the end: a test that grows slow shows up.
TEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15

# Skips the tests that drive nnU-Net's command-line tools (marked `integration`).
test-fast: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not integration"

demo: venv
	$(VENV)/bin/nnunet-ext demo

# Re-pin the project's environment after changing dependencies (review the diff before committing).
constraints: venv
	{ sed -n '1,2p' constraints.txt; $(PY) -m pip freeze --exclude-editable | sort -f; \
	  $(PY) -m pip freeze --all | grep '^setuptools=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info
