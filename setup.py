"""Build of rmfast and its compiled extension ``rmfast._C``.

What is built depends on the machine, and the build says so:
- a CUDAExtension (CPU + CUDA kernels) when torch was built with CUDA and nvcc is found
  (CUDA_HOME, nvcc on PATH, /usr/local/cuda or /usr/local/cuda-*);
- else a CppExtension (CPU kernels only).
RMFAST_BUILD=cpu forces the CPU-only build, RMFAST_BUILD=none builds no extension (rmfast then builds one
on first use through torch.utils.cpp_extension.load, or uses its torch backend).
TORCH_CUDA_ARCH_LIST picks the GPU architectures; with no GPU visible it defaults to "8.0;9.0".

Install after torch, without build isolation:  pip install --no-build-isolation -e .
"""

import glob
import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg):
    print(f"rmfast build: {msg}", file=sys.stderr, flush=True)


def _find_cuda_home():
    # Loaded from its file: importing the rmfast package here would import torch before CUDA_HOME is set.
    spec = importlib.util.spec_from_file_location("_rmfast_toolchain", os.path.join(ROOT, "rmfast", "_toolchain.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.find_cuda_home()


def _nvidia_wheel_includes():
    """Header folders of torch's nvidia-* wheels (cusparse.h and friends live there, not in CUDA_HOME)."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        dirs += [d for d in glob.glob(os.path.join(base, "*", "include")) if os.path.isdir(d)]
    return sorted(dirs)


def _extensions():
    mode = os.environ.get("RMFAST_BUILD", "auto").lower()
    if mode not in ("auto", "cuda", "cpu", "none"):
        raise SystemExit(f"RMFAST_BUILD={mode!r}: use one of auto, cuda, cpu, none")
    if mode == "none":
        _say("RMFAST_BUILD=none: no compiled extension (JIT build on first use, else the torch backend)")
        return [], {}

    cuda_home = _find_cuda_home() if mode in ("auto", "cuda") else None
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME once, at import.
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        raise SystemExit(
            "rmfast build: torch is not installed in this environment. Install it first "
            "(pip install torch==2.14.1), then: pip install --no-build-isolation -e ."
        ) from None

    cxx_flags = ["-O3", "-fopenmp-simd"]
    sources = [os.path.join("csrc", f) for f in ("bindings.cpp", "pairwise_loss_cpu.cpp")]
    with_cuda = torch.version.cuda is not None and cuda_home is not None
    if mode == "cuda" and not with_cuda:
        raise SystemExit(
            f"RMFAST_BUILD=cuda but torch.version.cuda={torch.version.cuda!r} and nvcc "
            f"{'found at ' + cuda_home if cuda_home else 'not found'}; set CUDA_HOME or use RMFAST_BUILD=cpu"
        )
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        includes = _nvidia_wheel_includes()
        _say(
            f"CUDAExtension rmfast._C (CPU + CUDA kernels); torch {torch.__version__}, CUDA_HOME={cuda_home}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(detected from the GPU)')}"
        )
        ext = CUDAExtension(
            "rmfast._C",
            sources + [os.path.join("csrc", "pairwise_loss_cuda.cu")],
            include_dirs=[os.path.join(ROOT, "csrc")] + includes,
            define_macros=[("RMFAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
        )
    else:
        why = "torch has no CUDA" if torch.version.cuda is None else "nvcc not found (set CUDA_HOME)"
        if mode == "cpu":
            why = "RMFAST_BUILD=cpu"
        _say(f"CppExtension rmfast._C (CPU kernels only: {why}); torch {torch.__version__}")
        ext = CppExtension(
            "rmfast._C", sources, include_dirs=[os.path.join(ROOT, "csrc")], extra_compile_args={"cxx": cxx_flags}
        )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=["rmfast", "rmfast.data", "rmfast.kernels", "rmfast.serve", "rmfast.csrc"],
    package_dir={"rmfast": "rmfast", "rmfast.csrc": "csrc"},
    package_data={"rmfast.csrc": ["*.cpp", "*.cu", "*.h"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
