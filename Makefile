# fusedclip: `make bench` and `make test` create .venv and install everything on first use.
#
#   make bench       set up, then benchmark fusedclip against torch (GPU sets on CUDA, small CPU sets without)
#   make test        set up, then run the test suite (GPU tests skip without CUDA; the skips are
#                    counted by reason at the end)
#   make microbench  per-operation pytest-benchmark runs, saved under .benchmarks/ and compared with
#                    the previous saved run
#   make checkstyle  ruff on Python, clang-format (when installed) on csrc/
#
# Knobs: TORCH_VERSION, VENV, PYTHON; the build reads FUSEDCLIP_BUILD_EXT, TORCH_CUDA_ARCH_LIST,
# MAX_JOBS and CUDA_HOME (see setup.py).

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.14.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fusedclip-installed

.PHONY: setup test bench microbench checkstyle clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstalls (and so rebuilds the extension) whenever the build inputs change.
$(STAMP): $(PY) setup.py pyproject.toml requirements-dev.txt $(shell find csrc -type f)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(STAMP)

test: setup
	$(PY) -m fusedclip backends
	$(PY) -m pytest -q

bench: setup
	$(PY) -m fusedclip bench --sets-file bench/sets.toml --out bench/results

microbench: setup
	$(PY) -m pytest bench --benchmark-only --benchmark-autosave \
	  $$(ls .benchmarks/*/*.json >/dev/null 2>&1 && echo --benchmark-compare)

checkstyle: setup
	$(PY) -m ruff check fusedclip tests bench setup.py examples
	@if command -v clang-format >/dev/null; then clang-format --dry-run --Werror $$(find csrc -name "*.h" -o -name "*.cpp" -o -name "*.cu" -o -name "*.cuh"); \
	else echo "clang-format not installed: skipping csrc/"; fi

clean:
	rm -rf build *.egg-info fusedclip/_C*.so
