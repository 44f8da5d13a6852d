"""Build and install fusedclip.

The CUDA extension ``fusedclip._C`` (csrc/) is built when nvcc and a CUDA build of torch are
present; otherwise the pure-Python package installs and runs on the Triton and reference backends.
Install with ``pip install --no-build-isolation -e .`` so the build uses the installed torch.

Environment:
  FUSEDCLIP_BUILD_EXT   auto (default): build when possible; 1: build or fail; 0: never build.
  TORCH_CUDA_ARCH_LIST  target GPUs; default the visible GPU's, or 9.0 (H100/H200) when none is.
  MAX_JOBS              parallel compile jobs (ninja).
  CUDA_HOME             the CUDA toolkit; default /usr/local/cuda when it exists.
"""

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_extension():
    mode = os.environ.get("FUSEDCLIP_BUILD_EXT", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"FUSEDCLIP_BUILD_EXT must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    if "CUDA_HOME" not in os.environ and os.path.isfile("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    problems = []
    try:
        import torch
    except ImportError:
        problems.append("torch is not installed (install it first, then use --no-build-isolation)")
    else:
        if torch.version.cuda is None:
            problems.append(f"torch {torch.__version__} is a CPU-only build")
    cuda_home = os.environ.get("CUDA_HOME")
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        problems.append("nvcc was not found (set CUDA_HOME)")
    if problems:
        why = "; ".join(problems)
        if mode == "1":
            sys.exit(f"FUSEDCLIP_BUILD_EXT=1 but the CUDA extension cannot be built: {why}")
        print(f"fusedclip: not building the CUDA extension: {why}", file=sys.stderr)
        return False
    return True


def _extra_include_dirs():
    # CUDA wheels of torch ship toolkit headers (cuBLAS, cuSPARSE, ...) under nvidia/cu*/include,
    # and torch's own headers include some of them.
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    return [d for r in roots for d in sorted(glob.glob(os.path.join(r, "cu*", "include")))]


def _ext_modules():
    if not _want_extension():
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    sources = sorted(
        glob.glob("csrc/**/*.cpp", recursive=True) + glob.glob("csrc/**/*.cu", recursive=True)
    )
    ext = CUDAExtension(
        name="fusedclip._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc"), *_extra_include_dirs()],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo", "-Xptxas=-v"],
        },
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _ext_modules()

setup(
    name="fusedclip",
    version="0.1.0",
    description="Fused CUDA and Triton gradient clipping for PyTorch",
    packages=["fusedclip", "fusedclip.triton_kernels"],
    package_dir={"fusedclip": "fusedclip", "fusedclip.triton_kernels": "triton_kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={"bench": ["rich", "matplotlib"], "triton": ["triton>=3.2"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
