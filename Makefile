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
#                    torch CPU_TORCH_VERSION, fusedclip's sdist built and installed into it with the
#                    CPU engine, and the CPU engine's tests (tests/api, engine, features; not slow)
#                    run against that installed copy
#   make test-torch-V  (V in EDGE_TORCH: 2.6.0 2.11.0 2.15.0; make test-edges runs all three)
#                    the tests that depend on torch's version (EDGE_TESTS, EDGE_K) against
#                    PyPI's torch V in .venv-torch-V, installed from the sdist, Triton in its
#                    interpreter; for EDGE_CUDA (2.11.0, the GPU machines' torch) with the CUDA
#                    kernels compiled (sm_90). make prefetch downloads their wheels into .wheels/
#   make microbench  per-operation pytest-benchmark runs, saved under .benchmarks/ and compared with
#                    the previous saved run
#   make sanitize    fusedclip._C's CPU engine built with AddressSanitizer and
#                    UndefinedBehaviorSanitizer (in SAN_DIR, from a copy of the files git sees), and
#                    the engine, API and BackwardClipper tests run against it, the sanitizer
#                    runtimes preloaded, leaks off, any report fatal (CI runs it)
#   make fuzz        the differential fuzzer (tests/fuzz) at length: random seeds, 20 times the
#                    examples of make test's derandomized run, failures kept in .hypothesis/ and
#                    replayed first next time (FUZZ_PROFILE=long; FUZZ_ARGS for pytest, e.g. -k cpp)
#   make checkstyle  ruff on Python, clang-format (when installed) on csrc/
#   make lock-check  the venvs hold exactly the versions of their lock files (CI runs it)
#   make lock        refresh the lock files to the newest releases, then run every test stage
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

.PHONY: setup test fuzz test-cpu-torch test-edges prefetch sanitize bench bench-publish microbench checkstyle \
	lock lock-check clean

constrained = $(if $(1),-c $(1))
comma := ,
empty :=
space := $(empty) $(empty)

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

# The fuzzer's long run (tests/fuzz; make test runs its derandomized ci profile). Triton runs in its
# interpreter where there is no GPU.
FUZZ_PROFILE ?= long
FUZZ_ARGS ?=
fuzz: setup
	FUSEDCLIP_FUZZ_PROFILE=$(FUZZ_PROFILE) $(if $(HAVE_GPU),,TRITON_INTERPRET=1) \
	  $(PY) -m pytest -q tests/fuzz/test_fuzz.py $(FUZZ_ARGS)

# torch and the test tools, once per CPU_TORCH_VERSION; a CUDA build of torch is refused.
$(CPU_STAMP): requirements/cpu-torch.txt $(CPU_LOCK)
	$(PYTHON) -m venv $(CPU_DIR)
	$(CPU_PY) -m pip install -q $(call constrained,$(CPU_LOCK)) --upgrade pip
	$(CPU_PY) -m pip install -q $(call constrained,$(CPU_LOCK)) $(CPU_TORCH_PIP_ARGS) \
	  torch==$(CPU_TORCH_VERSION) -r requirements/cpu-torch.txt
	$(CPU_PY) -c 'import sys, torch; sys.exit(torch.version.cuda and \
	  f"torch {torch.__version__} is a CUDA build: set CPU_TORCH_PIP_ARGS to a CPU index")'
	rm -f $(CPU_DIR)/.deps-torch-* && touch $@

# sdist_install PYTHON DIR BUILD_EXT: an sdist made from a copy of the files git sees (tracked, and
# untracked ones not ignored; MANIFEST.in decides what it holds, so a source missing there fails the
# build), then installed from it into PYTHON's venv (not editable), fusedclip._C built as BUILD_EXT
# asks. No in-place _C*.so or build/ of another venv's torch can leak into it.
define sdist_install
	rm -rf $(2)/src $(2)/dist $(2)/run && mkdir -p $(2)/src $(2)/run
	git ls-files -z --cached --others --exclude-standard \
	  | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C $(2)/src
	cd $(2)/src && $(1) -m build -q --sdist --no-isolation -o $(2)/dist > $(2)/sdist.log 2>&1 \
	  || { cat $(2)/sdist.log; exit 1; }
	@echo "fusedclip: installing $$(cd $(2)/dist && ls) with FUSEDCLIP_BUILD_EXT=$(3)"
	@start=$$SECONDS; FUSEDCLIP_BUILD_EXT=$(3) $(1) -m pip install -q --no-build-isolation --no-deps \
	  $(2)/dist/fusedclip-*.tar.gz && echo "fusedclip: built and installed in $$((SECONDS - start)) s"
endef

# installed_tests PYTHON DIR TESTS CUDA_KERNELS ENV [K]: the installed copy checked (CUDA_KERNELS 0
# or 1), then TESTS (not slow; -k K if given) run from an empty directory, so that `import
# fusedclip` can only find it.
define installed_tests
	cd $(2)/run && $(1) -c "$$INSTALL_CHECK" $(4)
	cd $(2)/run && FUSEDCLIP_REQUIRE_EXTENSION=1 $(5) \
	  $(1) -m pytest -p no:cacheprovider -c $(CURDIR)/pyproject.toml --rootdir $(CURDIR) \
	  -m "not slow" $(if $(6),-k "$(6)") $(addprefix $(CURDIR)/,$(3))
endef

# Run in the test directory before pytest: the installed copy is what `import fusedclip` finds, and
# it has the CUDA kernels or not as the stage built it (argv[1]: 1 or 0).
define INSTALL_CHECK
import os, sys, sysconfig, torch, fusedclip, fusedclip._C as C
print(f"torch {torch.__version__}; fusedclip from {fusedclip.__file__}; "
      f"fusedclip._C.CUDA_KERNELS={C.CUDA_KERNELS}")
site = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
if os.path.dirname(os.path.dirname(os.path.abspath(fusedclip.__file__))) not in site:
    sys.exit("not the installed fusedclip: " + fusedclip.__file__)
if bool(C.CUDA_KERNELS) != (sys.argv[1] == "1"):
    sys.exit(f"fusedclip._C.CUDA_KERNELS={C.CUDA_KERNELS}, the stage built it with {sys.argv[1]}")
endef
export INSTALL_CHECK

test-cpu-torch: $(CPU_STAMP)
	$(call sdist_install,$(CPU_PY),$(CPU_DIR),cpu)
	$(call installed_tests,$(CPU_PY),$(CPU_DIR),$(CPU_TESTS),0,FUSEDCLIP_REQUIRE_TRITON=0)

# The edges of the torch range setup.py declares, each in its own venv (.venv-torch-V): the oldest
# release (TORCH_MIN in fusedclip/_versions.py), the GPU machines' pair (EDGE_CUDA, whose CUDA
# kernels are compiled too, for sm_90: what a device run builds) and the newest. PyPI's builds of
# torch (CUDA builds: it has no other; here they run on the CPU) with the Triton each pins, at the
# versions of requirements/lock-torch-V.txt; fusedclip installed from its sdist; the tests that
# depend on the version (EDGE_TESTS, EDGE_K) against it, Triton in its interpreter. The downloads are
# kept in .wheels/ (`make prefetch` fills it, CI in the background while it builds): pip reads PyPI
# directly (PIP_CONFIG_FILE=/dev/null: this machine's pip configuration caps torch at 2.14.1).
EDGE_TORCH ?= 2.6.0 2.11.0 2.15.0
EDGE_CUDA ?= 2.11.0
# The tests whose answer depends on torch's or Triton's version (parity with that torch's clip,
# the operators' registration, opcheck and the Triton interpreter, fused optimizers' grad_scale,
# hooks, torch.compile), thinned by EDGE_K to the cases that differ in what they exercise (fewer
# norm types, shape classes and micro-batch counts; no determinism repeats): about 2,300 cases, a
# few minutes per edge on 2 cores. EDGE_TESTS="tests/api tests/engine tests/features" EDGE_K=
# runs all of them.
EDGE_TESTS ?= tests/api/test_parity.py tests/api/test_versions.py tests/engine/test_ops.py \
	tests/features/test_amp.py tests/features/test_backward.py tests/features/test_compile.py
EDGE_K ?= not many and not 0.5 and not 1.5 and not 3.0 and not -2- and not -3- and not zscore \
	and not adaptive and not determinis and not mixed_dtypes and not every_element_once
WHEELS := $(abspath .wheels)
EDGE_PIP := PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS=$(WHEELS) \
	$(if $(wildcard /etc/ssl/certs/ca-certificates.crt),PIP_CERT=/etc/ssl/certs/ca-certificates.crt)
edge_dir = $(abspath .venv-torch-$(1))
edge_lock = requirements/lock-torch-$(1).txt
# EDGE_LOCK= installs unpinned (make lock does)
EDGE_LOCK ?= 1

.SECONDEXPANSION:
.PRECIOUS: .venv-torch-%/.deps-installed
.venv-torch-%/.deps-installed: requirements/cpu-torch.txt $$(wildcard requirements/lock-torch-$$*.txt)
	rm -rf $(call edge_dir,$*) && $(PYTHON) -m venv $(call edge_dir,$*)
	@echo "fusedclip: installing torch $* into .venv-torch-$* from PyPI (several GB: minutes)"
	@start=$$SECONDS; $(EDGE_PIP) $(call edge_dir,$*)/bin/python -m pip install -q \
	  $(if $(EDGE_LOCK),-c $(call edge_lock,$*)) --upgrade pip && \
	$(EDGE_PIP) $(call edge_dir,$*)/bin/python -m pip install -q \
	  $(if $(EDGE_LOCK),-c $(call edge_lock,$*)) torch==$* -r requirements/cpu-torch.txt \
	  && echo "fusedclip: torch $* installed in $$((SECONDS - start)) s"
	touch $@

test-torch-%: .venv-torch-%/.deps-installed
	$(call sdist_install,$(call edge_dir,$*)/bin/python,$(call edge_dir,$*),$(if $(filter $*,$(EDGE_CUDA)),cuda,cpu))
	$(call installed_tests,$(call edge_dir,$*)/bin/python,$(call edge_dir,$*),$(EDGE_TESTS),$(if $(filter $*,$(EDGE_CUDA)),1,0),FUSEDCLIP_REQUIRE_TRITON=1 TRITON_INTERPRET=1,$(EDGE_K))
	$(call noext_check,$(call edge_dir,$*)/bin/python,$(call edge_dir,$*))

# noext_check PYTHON DIR: the same sdist installed with FUSEDCLIP_BUILD_EXT=0 (into DIR/noext, beside
# the built install), imported from there: the pure-Python package runs (the reference and Triton
# backends pass the self-test) and `check` says that fusedclip._C is missing and how to get it.
define noext_check
	rm -rf $(2)/noext && FUSEDCLIP_BUILD_EXT=0 $(1) -m pip install -q --no-build-isolation --no-deps \
	  --target $(2)/noext $(2)/dist/fusedclip-*.tar.gz
	cd $(2)/run && PYTHONPATH=$(2)/noext TRITON_INTERPRET=1 $(1) -m fusedclip check --seconds 2 \
	  | tee $(2)/noext.log && grep -q "to get fusedclip._C: " $(2)/noext.log \
	  || { echo "the pure-Python install failed its check"; exit 1; }
endef

test-edges: $(addprefix test-torch-,$(EDGE_TORCH))

# The edges' downloads, all at once (CI runs it in the background while `make test` compiles).
prefetch:
	mkdir -p $(WHEELS)
	for v in $(EDGE_TORCH); do $(EDGE_PIP) $(PYTHON) -m pip download -q -d $(WHEELS) \
	  -c $(call edge_lock,$$v) torch==$$v -r requirements/cpu-torch.txt || exit 1; done

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

EDGE_STAMPS := $(foreach v,$(EDGE_TORCH),.venv-torch-$(v)/.deps-installed)

lock-check: $(DEPS) $(CPU_STAMP) $(EDGE_STAMPS)
	@$(call lock_check,$(PY),$(LOCK))
	@$(call lock_check,$(CPU_PY),$(CPU_LOCK))
	@$(foreach v,$(EDGE_TORCH),$(call lock_check,$(call edge_dir,$(v))/bin/python,$(call edge_lock,$(v)));)
	@echo "$(VENV), $(CPU_VENV) and .venv-torch-{$(subst $(space),$(comma),$(EDGE_TORCH))} hold" \
	  "exactly their lock files"

# lock_env VENV TORCH REQUIREMENTS LOCK [PIP_ARGS]: a new venv with the newest releases of what
# REQUIREMENTS names beside TORCH, written down as LOCK.
define lock_env
	rm -rf $(1) && $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q $(5) torch==$(2) -r $(3)
	{ echo "# make lock, $$(date -u +%F), $$($(1)/bin/python -V), $$(uname -m): the versions" \
	  "tested with torch $(2) and $(3)"; $(1)/bin/python -c "$$FREEZE"; } > $(4)
endef

# An edge's venv made anew from the newest releases beside PyPI's torch V, written down as its lock.
lock-torch-%:
	rm -f .venv-torch-$*/.deps-installed
	$(MAKE) .venv-torch-$*/.deps-installed EDGE_LOCK=
	{ echo "# make lock, $$(date -u +%F), $$($(call edge_dir,$*)/bin/python -V), $$(uname -m): the" \
	  "versions tested with torch $* (PyPI) and requirements/cpu-torch.txt"; \
	  $(call edge_dir,$*)/bin/python -c "$$FREEZE"; } > $(call edge_lock,$*)
	touch .venv-torch-$*/.deps-installed

# Every venv made anew from the newest releases, their lock files rewritten, then every test stage
# run against them. Review `git diff requirements/` and commit the locks with the fixes they need.
lock:
	$(call lock_env,$(VENV),$(TORCH_VERSION),requirements/dev.txt,$(LOCK))
	$(call lock_env,$(CPU_DIR),$(CPU_TORCH_VERSION),requirements/cpu-torch.txt,$(CPU_LOCK),$(CPU_TORCH_PIP_ARGS))
	rm -f $(CPU_DIR)/.deps-torch-* && touch $(CPU_STAMP)
	$(MAKE) $(addprefix lock-torch-,$(EDGE_TORCH))
	$(MAKE) lock-check test test-cpu-torch test-edges

print-%:
	@echo $($*)

clean:
	rm -rf build *.egg-info fusedclip/_C*.so $(CPU_DIR)/src $(CPU_DIR)/run $(CPU_DIR)/dist $(SAN_DIR) \
	  .venv-torch-*/src .venv-torch-*/run .venv-torch-*/dist .venv-torch-*/noext
