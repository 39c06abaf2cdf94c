import os

import pytest
import torch

# Triton decides at kernel-definition time whether to interpret; without a GPU the Triton kernels are
# tested on CPU tensors through its interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rmfast import backends  # noqa: E402

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")),
]


def runnable_backends(device):
    return [b for b in backends.BACKENDS if backends.unavailable_reason(b, device) is None]


def backend_device_params():
    """(backend, device) pairs: every backend on CPU and on CUDA; one that cannot run here is a failure
    for the compiled CPU path (the build must provide it) and a skip only for GPU-only combinations."""
    params = []
    for device in ("cpu", "cuda"):
        for name in backends.BACKENDS:
            if name == "cuda" and device == "cpu" or name == "cpu" and device == "cuda":
                continue
            marks = []
            if device == "cuda" and not torch.cuda.is_available():
                marks.append(pytest.mark.skip(reason="no CUDA GPU"))
            params.append(pytest.param(name, device, id=f"{name}-{device}", marks=marks))
    return params
