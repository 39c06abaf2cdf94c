"""Finding the CUDA toolkit; shared by setup.py (which loads this file directly) and the JIT build.
Imports nothing beyond the standard library."""

import glob
import os
import shutil


def find_cuda_home():
    """A CUDA toolkit folder (one with bin/nvcc and include/cuda_runtime.h), or None.

    Looks at CUDA_HOME / CUDA_PATH, the nvcc on PATH (through wrapper scripts, by its real location),
    /usr/local/cuda, then the newest /usr/local/cuda-*."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    return next((home for home in candidates if _is_toolkit(home)), None)


def _is_toolkit(home):
    return os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
        os.path.join(home, "include", "cuda_runtime.h"))
