# One command each: `make demo` (set up, then train the demo model) and `make test` (set up, then
# run every test). Both create ./.venv on first use. torch is pinned to the CPU build on this disk;
# the extension is built without build isolation so that pip never fetches a CUDA torch.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: setup setup-test demo test test-c bench clean

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH)" numpy setuptools wheel ninja
	touch $@

# The package alone (what the demo needs), or with the test and benchmark-baseline extras; rebuilt only
# when a source or the build configuration changed since the last build.
SOURCES := setup.py pyproject.toml csrc/kernels/levels.txt $(shell find csrc -name '*.c' -o -name '*.cpp' -o -name '*.h')

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --no-build-isolation -e .
	touch $@

# The test extras on top of the package build: `make test` after `make demo` installs them without
# building the extension again (pip's -e ".[test]" would).
$(VENV)/.built-test: $(VENV)/.built pyproject.toml
	$(PY) -m pip install $$($(PY) -c "import re; t = open('pyproject.toml').read(); \
	    print(' '.join(re.findall(r'\"([^\"]+)\"', re.search(r'^test = \[(.*?)\]', t, re.S | re.M).group(1))))")
	touch $@

setup: $(VENV)/.built

setup-test: $(VENV)/.built-test

demo: setup
	$(PY) -m relora_ext.demo

test-c:
	bash csrc/tests/run_c_tests.sh

test: setup-test test-c
	$(PY) -m pytest -q tests

bench: setup-test
	$(PY) benchmarks/bench_ops.py

clean:
	rm -rf build *.egg-info relora_ext/*.so
