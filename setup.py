"""Build and install fusedclip.

The compiled engine ``fusedclip._C`` (csrc/) has two parts: the CPU engine, which builds with any
torch (a CppExtension), and the CUDA kernels, added when nvcc and a CUDA build of torch are found
(a CUDAExtension). Without torch the pure-Python package installs and runs on the Triton and
reference backends. Install with ``pip install --no-build-isolation .`` (or ``-e .``) so the build
uses the installed torch.

Environment:
  FUSEDCLIP_BUILD_EXT   what to build: auto (default): the CPU engine whenever torch is installed,
                        and the CUDA kernels too when nvcc and a CUDA build of torch are found;
                        cpu: the CPU engine only; cuda (or 1): the CPU engine and the CUDA kernels,
                        or exit saying why they cannot be built; 0: no extension (pure Python).
                        auto without torch or without a C++ compiler (CXX, default c++) installs
                        the pure-Python package and says why.
  TORCH_CUDA_ARCH_LIST  target GPUs; default the visible GPU's, or 9.0 (H100/H200) when none is.
  MAX_JOBS              parallel compile jobs (ninja).
  CUDA_HOME             the CUDA toolkit; default /usr/local/cuda when it exists.
  FUSEDCLIP_SANITIZE    1: the host code with AddressSanitizer and UndefinedBehaviorSanitizer
                        (run it with the sanitizer runtimes preloaded: `make sanitize`).
"""

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# FUSEDCLIP_BUILD_EXT values and what they ask for.
_MODES = {"auto": "auto", "cpu": "cpu", "cuda": "cuda", "1": "cuda", "0": "none"}


def _cuda_problems(torch):
    """Why the CUDA kernels cannot be built here (empty when they can)."""
    if "CUDA_HOME" not in os.environ and os.path.isfile("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build")
    cuda_home = os.environ.get("CUDA_HOME")
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        problems.append("nvcc was not found (set CUDA_HOME)")
    return problems


def _compiler_problem():
    """Why no C++ compiler can build the extension here (None when one can)."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0]) is None:
        return f"no C++ compiler found ({cxx}: set CXX or install g++)"
    return None


def _what_to_build():
    """("none", "cpu" or "cuda"; one line saying what is built and why)."""
    setting = os.environ.get("FUSEDCLIP_BUILD_EXT", "auto").strip().lower()
    if setting not in _MODES:
        sys.exit(
            f"fusedclip: FUSEDCLIP_BUILD_EXT must be auto, cpu, cuda (or 1) or 0, got {setting!r}"
        )
    mode, named = _MODES[setting], f"FUSEDCLIP_BUILD_EXT={setting}"
    if mode == "none":
        return "none", f"not building fusedclip._C ({named}): pure-Python install"
    try:
        import torch
    except ImportError:
        why = "torch is not installed (install it first, then use --no-build-isolation)"
        if mode != "auto":
            sys.exit(f"fusedclip: {named} but fusedclip._C cannot be built: {why}")
        return "none", f"not building fusedclip._C ({named}): {why}; pure-Python install"
    no_compiler = _compiler_problem()
    if no_compiler:
        if mode != "auto":
            sys.exit(f"fusedclip: {named} but fusedclip._C cannot be built: {no_compiler}")
        return "none", f"not building fusedclip._C ({named}): {no_compiler}; pure-Python install"
    if mode == "cpu":
        return "cpu", f"building fusedclip._C, CPU engine only ({named}; torch {torch.__version__})"
    problems = _cuda_problems(torch)
    if problems:
        why = "; ".join(problems)
        if mode == "cuda":
            sys.exit(f"fusedclip: {named} but the CUDA kernels cannot be built: {why}")
        return "cpu", f"building fusedclip._C, CPU engine only ({named}; no CUDA kernels: {why})"
    return "cuda", (
        f"building fusedclip._C, CPU engine and CUDA kernels ({named}; torch {torch.__version__}, "
        f"nvcc in {os.environ.get('CUDA_HOME') or 'PATH'})"
    )


def _extra_include_dirs():
    # CUDA wheels of torch ship toolkit headers (cuBLAS, cuSPARSE, ...) under nvidia/cu*/include,
    # and torch's own headers include some of them.
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    return [d for r in roots for d in sorted(glob.glob(os.path.join(r, "cu*", "include")))]


# The host compiler's flags. The CPU engine runs its passes on torch's intra-op threads
# (at::parallel_for, which is an OpenMP loop in torch's Linux builds: it needs -fopenmp, and links
# the libgomp torch itself loads). FMA contraction stays off so that the baseline and AVX2 chunk
# loops compute the same bits (csrc/cpu/kernels.h); -Wno-psabi silences GCC's note on the vector
# arguments of those loops' internal functions.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-Wno-psabi"]
LINK_FLAGS: list[str] = []
if sys.platform.startswith("linux"):
    CXX_FLAGS.append("-fopenmp")
    LINK_FLAGS.append("-fopenmp")
if os.environ.get("FUSEDCLIP_SANITIZE") == "1":
    # Every report is an error (no recovery), and frames stay readable in the reports.
    SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                "-fno-omit-frame-pointer", "-g"]
    CXX_FLAGS = [f for f in CXX_FLAGS if f != "-O3"] + ["-O1", *SANITIZE]
    LINK_FLAGS += SANITIZE


def _sources(*patterns):
    return sorted(path for pattern in patterns for path in glob.glob(os.path.join("csrc", pattern)))


def _ext_modules():
    kind, line = _what_to_build()
    print(f"fusedclip: {line}", file=sys.stderr)
    if kind == "none":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # The CPU engine (csrc/README.md): schemas, Python module, plans, operators, CPU passes.
    sources = _sources("*.cpp", "engine/*.cpp", "cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc"), *_extra_include_dirs()]
    if kind == "cpu":
        ext = CppExtension(
            name="fusedclip._C",
            sources=sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=LINK_FLAGS,
        )
        return [ext], {"build_ext": BuildExtension}
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    ext = CUDAExtension(
        name="fusedclip._C",
        sources=sources + _sources("cuda/*.cpp", "cuda/*.cu"),
        include_dirs=include_dirs,
        extra_compile_args={
            "cxx": CXX_FLAGS,
            "nvcc": ["-O3", "-lineinfo", "-Xptxas=-v"],
        },
        extra_link_args=LINK_FLAGS,
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _ext_modules()

setup(
    name="fusedclip",
    version="0.1.0",
    description="Fused CUDA and Triton gradient clipping for PyTorch",
    # The Triton kernels live at the top level (triton_kernels/, beside csrc/) and install inside
    # the package: a top-level import name would collide with the triton_kernels package that
    # Triton's own project publishes.
    packages=find_packages(include=["fusedclip", "fusedclip.*"]) + ["fusedclip.triton_kernels"],
    package_dir={"fusedclip.triton_kernels": "triton_kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy", "rich"],
    extras_require={"bench": ["matplotlib"], "triton": ["triton>=3.2"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
