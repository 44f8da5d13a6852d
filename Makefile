# fusedclip: `make bench` and `make test` create .venv and install everything on first use.
#
#   make bench       set up, then benchmark fusedclip against torch: the headline rows (GPU sets on
#                    CUDA, small CPU sets without); results in bench/results/local/ (ignored by git)
#   make bench-publish
#                    the same, written to bench/results/published/ (the numbers README.md quotes)
#   make test        set up, then run the test suite (GPU tests skip without CUDA; the skips are
#                    counted by reason at the end)
#   make test-cpu-torch
#                    what a user without CUDA gets: a second venv (CPU_VENV) with the CPU build of
#                    torch CPU_TORCH_VERSION, fusedclip installed into it (not editable) with the CPU
#                    engine, and the CPU engine's tests (tests/api, engine, features; not slow) run
#                    against that installed copy
#   make microbench  per-operation pytest-benchmark runs, saved under .benchmarks/ and compared with
#                    the previous saved run
#   make sanitize    fusedclip._C's CPU engine built with AddressSanitizer and
#                    UndefinedBehaviorSanitizer (in SAN_DIR, from a copy of the files git sees), and
#                    the engine, API and BackwardClipper tests run against it, the sanitizer
#                    runtimes preloaded, leaks off, any report fatal (CI runs it)
#   make checkstyle  ruff on Python, clang-format (when installed) on csrc/
#   make lock-check  the venvs hold exactly the versions of their lock files (CI runs it)
#   make lock        refresh the lock files to the newest releases, then run both test stages
#
# Versions: requirements/*.txt say what each venv needs; requirements/lock-*.txt pin every package
# (torch's own dependencies included) to the versions last tested, and every install here uses them
# as pip constraints, so the test environment is the same every day until `make lock` is run on
# purpose. LOCK= (empty) / CPU_LOCK= installs unpinned, e.g. with another TORCH_VERSION. Installs
# of the package itself (`pip install fusedclip`, setup.py) keep their version ranges.
#
# Build: without a GPU (no nvidia-smi) fusedclip._C gets its CPU engine alone, unless
# FUSEDCLIP_BUILD_EXT asks for more (`make test FUSEDCLIP_BUILD_EXT=cuda`; CI does, so that a CUDA
# compile error fails it); with one, FUSEDCLIP_BUILD_EXT=auto (the CUDA kernels too). The build also
# reads TORCH_CUDA_ARCH_LIST, MAX_JOBS and CUDA_HOME (see setup.py).
#
# Knobs: TORCH_VERSION, VENV, PYTHON, LOCK; for test-cpu-torch CPU_TORCH_VERSION, CPU_VENV,
# CPU_LOCK, CPU_TESTS and CPU_TORCH_PIP_ARGS (e.g. --index-url https://download.pytorch.org/whl/cpu
# where pip would fetch a CUDA build).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.14.1
PY := $(VENV)/bin/python
LOCK ?= requirements/lock-dev.txt
HAVE_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
BUILD_EXT := $(or $(FUSEDCLIP_BUILD_EXT),$(if $(HAVE_GPU),auto,cpu))
DEPS := $(VENV)/.deps-installed
STAMP := $(VENV)/.fusedclip-built-$(BUILD_EXT)

CPU_TORCH_VERSION ?= 2.13.0
CPU_VENV ?= .venv-cpu
CPU_TORCH_PIP_ARGS ?=
CPU_TESTS ?= tests/api tests/engine tests/features
CPU_LOCK ?= requirements/lock-cpu-torch.txt
CPU_DIR := $(abspath $(CPU_VENV))
CPU_PY := $(CPU_DIR)/bin/python
CPU_STAMP := $(CPU_DIR)/.deps-torch-$(CPU_TORCH_VERSION)

.PHONY: setup test test-cpu-torch sanitize bench bench-publish microbench checkstyle lock lock-check \
	clean

constrained = $(if $(1),-c $(1))

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch and the tools, at the locked versions: again when the requirements or the lock change. Each
# step says what it does, how long it took on this project's 2-core machines, and how long it took.
$(DEPS): $(PY) requirements/dev.txt $(LOCK)
	@echo "fusedclip setup: installing torch $(TORCH_VERSION) and the tools of requirements/dev.txt" \
	  "into $(VENV)$(if $(LOCK), at the versions of $(LOCK)) (about 2 minutes the first time, on 2" \
	  "cores; seconds after that)"
	@start=$$SECONDS; \
	$(PY) -m pip install -q $(call constrained,$(LOCK)) --upgrade pip && \
	$(PY) -m pip install -q $(call constrained,$(LOCK)) torch==$(TORCH_VERSION) -r requirements/dev.txt \
	  && echo "fusedclip setup: installed in $$((SECONDS - start)) s"
	touch $@

# fusedclip, editable, and fusedclip._C built: again whenever a build input changes.
$(STAMP): $(DEPS) setup.py pyproject.toml $(shell find csrc -type f)
	@echo "fusedclip setup: building fusedclip._C with FUSEDCLIP_BUILD_EXT=$(BUILD_EXT):" \
	  "$(if $(filter cpu,$(BUILD_EXT)),the CPU engine (no GPU here: no CUDA kernels; about 40 s on 2 cores),the CPU engine and the CUDA kernels where nvcc and a CUDA torch are (about 80 s on 2 cores))"
	@rm -f $(VENV)/.fusedclip-built-*
	@start=$$SECONDS; \
	FUSEDCLIP_BUILD_EXT=$(BUILD_EXT) $(PY) -m pip install -q --no-build-isolation --no-deps -e . \
	  && echo "fusedclip setup: built in $$((SECONDS - start)) s"
	touch $@

setup: $(STAMP)

test: setup
	$(PY) -m fusedclip backends
	$(PY) -m pytest -q

# torch and the test tools, once per CPU_TORCH_VERSION; a CUDA build of torch is refused.
$(CPU_STAMP): requirements/cpu-torch.txt $(CPU_LOCK)
	$(PYTHON) -m venv $(CPU_DIR)
	$(CPU_PY) -m pip install -q $(call constrained,$(CPU_LOCK)) --upgrade pip
	$(CPU_PY) -m pip install -q $(call constrained,$(CPU_LOCK)) $(CPU_TORCH_PIP_ARGS) \
	  torch==$(CPU_TORCH_VERSION) -r requirements/cpu-torch.txt
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

# The sanitized build. Its tests: tests/engine (but test_build, which reads the optimized build's
# instructions), tests/api and BackwardClipper's, without the Triton cases (Triton's interpreter runs
# none of fusedclip's C++; it would only slow the run down). Every CPU kernel build (baseline, AVX2,
# AVX-512, as this CPU allows) runs there: tests/engine/test_cpu_engine.py switches between them.
SAN_DIR := $(abspath .venv-san)
SAN_PRELOAD = $(shell gcc -print-file-name=libasan.so) $(shell gcc -print-file-name=libubsan.so)
SAN_ENV = LD_PRELOAD="$(SAN_PRELOAD)" ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
SAN_TESTS ?= tests/engine tests/api tests/features/test_backward.py
# Proof that the runtime is active and a report is fatal: a heap overflow that must abort.
define SAN_CANARY
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
ctypes.memset(libc.malloc(16), 0, 17)
endef
export SAN_CANARY

sanitize: $(DEPS)
	rm -rf $(SAN_DIR) && mkdir -p $(SAN_DIR)
	git ls-files -z --cached --others --exclude-standard \
	  | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C $(SAN_DIR)
	@echo "fusedclip sanitize: building fusedclip._C's CPU engine with ASan and UBSan (about a minute)"
	cd $(SAN_DIR) && FUSEDCLIP_SANITIZE=1 FUSEDCLIP_BUILD_EXT=cpu \
	  $(abspath $(PY)) setup.py -q build_ext --inplace > build.log 2>&1 || { cat build.log; exit 1; }
	cd $(SAN_DIR) && ldd fusedclip/_C*.so | grep -q libasan && $(SAN_ENV) $(abspath $(PY)) -c \
	  'import fusedclip, sys; sys.exit(0 if fusedclip.__file__.startswith("$(SAN_DIR)/") else 1)'
	cd $(SAN_DIR) && ! $(SAN_ENV) $(abspath $(PY)) -c "$$SAN_CANARY" 2> canary.log \
	  && grep -q "heap-buffer-overflow" canary.log || { echo "the sanitizer did not catch the canary"; exit 1; }
	cd $(SAN_DIR) && $(SAN_ENV) FUSEDCLIP_REQUIRE_EXTENSION=1 FUSEDCLIP_REQUIRE_TRITON=0 \
	  $(abspath $(PY)) -m pytest -q -p no:cacheprovider -k "not triton" \
	  --ignore=tests/engine/test_build.py $(SAN_TESTS)

bench: setup
	$(PY) -m fusedclip bench

bench-publish: setup
	$(PY) -m fusedclip bench --publish

microbench: setup
	$(PY) -m pytest bench --benchmark-only --benchmark-autosave \
	  $$(ls .benchmarks/*/*.json >/dev/null 2>&1 && echo --benchmark-compare)

checkstyle: setup
	$(PY) -m ruff check fusedclip tests bench setup.py examples
	@if command -v clang-format >/dev/null; then clang-format --dry-run --Werror $$(find csrc -name "*.h" -o -name "*.cpp" -o -name "*.cu" -o -name "*.cuh"); \
	else echo "clang-format not installed: skipping csrc/"; fi

# What a venv holds, as a lock file lists it: every distribution (pip and setuptools too) but
# fusedclip itself, sorted by name.
define FREEZE
import importlib.metadata as md, re
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
pins = {norm(d.metadata["Name"]): d.version for d in md.distributions()}
pins.pop("fusedclip", None)
print("\n".join(f"{name}=={pins[name]}" for name in sorted(pins)))
endef
export FREEZE

# lock-check VENV_PYTHON LOCK: the venv holds the lock's versions, no more and no fewer.
lock_check = $(1) -c "$$FREEZE" | diff -u --label "$(2) (locked)" --label "$(1) (installed)" \
	  <(grep -v '^\#' $(2)) - || { echo "$(1) does not hold $(2): make lock refreshes it"; exit 1; }

lock-check: $(DEPS) $(CPU_STAMP)
	@$(call lock_check,$(PY),$(LOCK))
	@$(call lock_check,$(CPU_PY),$(CPU_LOCK))
	@echo "$(VENV) and $(CPU_VENV) hold exactly $(LOCK) and $(CPU_LOCK)"

# lock_env VENV TORCH REQUIREMENTS LOCK [PIP_ARGS]: a new venv with the newest releases of what
# REQUIREMENTS names beside TORCH, written down as LOCK.
define lock_env
	rm -rf $(1) && $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q $(5) torch==$(2) -r $(3)
	{ echo "# make lock, $$(date -u +%F), $$($(1)/bin/python -V), $$(uname -m): the versions" \
	  "tested with torch $(2) and $(3)"; $(1)/bin/python -c "$$FREEZE"; } > $(4)
endef

# Both venvs made anew from the newest releases, their lock files rewritten, then both test stages
# run against them. Review `git diff requirements/` and commit the locks with the fixes they need.
lock:
	$(call lock_env,$(VENV),$(TORCH_VERSION),requirements/dev.txt,$(LOCK))
	$(call lock_env,$(CPU_DIR),$(CPU_TORCH_VERSION),requirements/cpu-torch.txt,$(CPU_LOCK),$(CPU_TORCH_PIP_ARGS))
	rm -f $(CPU_DIR)/.deps-torch-* && touch $(CPU_STAMP)
	$(MAKE) lock-check test test-cpu-torch

clean:
	rm -rf build *.egg-info fusedclip/_C*.so $(CPU_DIR)/src $(CPU_DIR)/run $(SAN_DIR)
