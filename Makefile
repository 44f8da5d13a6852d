# fusedclip: `make bench` and `make test` create .venv and install everything on first use.
#
#   make bench       set up, then benchmark fusedclip against torch (GPU sets on CUDA, small CPU sets without)
#   make test        set up, then run the test suite (GPU tests skip without CUDA; the skips are
#                    counted by reason at the end)
#   make test-cpu-torch
#                    what a user without CUDA gets: a second venv (CPU_VENV) with the CPU build of
#                    torch CPU_TORCH_VERSION, fusedclip installed into it (not editable) with the CPU
#                    engine, and the CPU engine's tests (tests/api, engine, features; not slow) run
#                    against that installed copy
#   make microbench  per-operation pytest-benchmark runs, saved under .benchmarks/ and compared with
#                    the previous saved run
#   make checkstyle  ruff on Python, clang-format (when installed) on csrc/
#
# Knobs: TORCH_VERSION, VENV, PYTHON; for test-cpu-torch CPU_TORCH_VERSION, CPU_VENV, CPU_TESTS and
# CPU_TORCH_PIP_ARGS (e.g. --index-url https://download.pytorch.org/whl/cpu where pip would fetch a
# CUDA build). The build reads FUSEDCLIP_BUILD_EXT, TORCH_CUDA_ARCH_LIST, MAX_JOBS and CUDA_HOME
# (see setup.py).

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.14.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fusedclip-installed

CPU_TORCH_VERSION ?= 2.13.0
CPU_VENV ?= .venv-cpu
CPU_TORCH_PIP_ARGS ?=
CPU_TESTS ?= tests/api tests/engine tests/features
CPU_DIR := $(abspath $(CPU_VENV))
CPU_PY := $(CPU_DIR)/bin/python
CPU_STAMP := $(CPU_DIR)/.deps-torch-$(CPU_TORCH_VERSION)

.PHONY: setup test test-cpu-torch bench microbench checkstyle clean

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

# torch and the test tools, once per CPU_TORCH_VERSION; a CUDA build of torch is refused.
$(CPU_STAMP): requirements-cpu-torch.txt
	$(PYTHON) -m venv $(CPU_DIR)
	$(CPU_PY) -m pip install -q $(CPU_TORCH_PIP_ARGS) torch==$(CPU_TORCH_VERSION) \
	  -r requirements-cpu-torch.txt
	$(CPU_PY) -c 'import sys, torch; sys.exit(torch.version.cuda and \
	  f"torch {torch.__version__} is a CUDA build: set CPU_TORCH_PIP_ARGS to a CPU index")'
	rm -f $(CPU_DIR)/.deps-torch-* && touch $@

# Run in the test directory before pytest: the installed copy is what `import fusedclip` finds, and
# it is the CPU engine only.
define CPU_INSTALL_CHECK
import os, sys, sysconfig, torch, fusedclip, fusedclip._C as C
print(f"torch {torch.__version__}; fusedclip from {fusedclip.__file__}; "
      f"fusedclip._C.CUDA_KERNELS={C.CUDA_KERNELS}")
site = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
if os.path.dirname(os.path.dirname(os.path.abspath(fusedclip.__file__))) not in site:
    sys.exit("not the installed fusedclip: " + fusedclip.__file__)
if C.CUDA_KERNELS:
    sys.exit("fusedclip._C has CUDA kernels: not the CPU-only build")
endef
export CPU_INSTALL_CHECK

# fusedclip is built every time, from a copy of the files git sees (tracked, and untracked ones not
# ignored): no in-place _C*.so or build/ made with the main venv's torch can leak into it. The tests
# run from an empty directory, so that `import fusedclip` can only find the installed copy.
test-cpu-torch: $(CPU_STAMP)
	rm -rf $(CPU_DIR)/src $(CPU_DIR)/run && mkdir -p $(CPU_DIR)/src $(CPU_DIR)/run
	git ls-files -z --cached --others --exclude-standard \
	  | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C $(CPU_DIR)/src
	cd $(CPU_DIR)/src && FUSEDCLIP_BUILD_EXT=cpu \
	  $(CPU_PY) -m pip install -q --no-build-isolation --no-deps .
	cd $(CPU_DIR)/run && $(CPU_PY) -c "$$CPU_INSTALL_CHECK"
	cd $(CPU_DIR)/run && FUSEDCLIP_REQUIRE_EXTENSION=1 FUSEDCLIP_REQUIRE_TRITON=0 \
	  $(CPU_PY) -m pytest -p no:cacheprovider -c $(CURDIR)/pyproject.toml --rootdir $(CURDIR) \
	  -m "not slow" $(addprefix $(CURDIR)/,$(CPU_TESTS))

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
	rm -rf build *.egg-info fusedclip/_C*.so $(CPU_DIR)/src $(CPU_DIR)/run
