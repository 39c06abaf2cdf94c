"""Backends of the fused loss and how one is chosen.

Every compiled backend implements the kernel-level contract of ``csrc/pairwise_loss.h``:
``forward(hidden2d, weight, bias, chosen, rejected, margin) -> (r_c, r_r, loss_p)`` and
``backward(hidden2d, weight, rows, coef, need_hidden_grad) -> (d_hidden, d_weight)``.
``torch`` is the differentiable reference (rmfast/reference.py) and needs neither.

Choice (``backend="auto"``): CUDA tensors → triton, cuda, torch; CPU tensors → cpu, torch.
``RMFAST_BACKEND`` (read here) sets the backend used when the caller passes ``"auto"``.
A requested backend that cannot run warns once, naming why, and the auto order takes over.
"""

import os
import warnings

BACKENDS = ("torch", "triton", "cuda", "cpu")
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}
_warned = set()
_reasons = {}


class _ExtensionKernels:
    """The compiled ops; torch's dispatcher sends CPU tensors to the CPU kernels, CUDA tensors to CUDA."""

    @staticmethod
    def forward(hidden, weight, bias, chosen, rejected, margin):
        import torch

        return torch.ops.rmfast.pairwise_loss_fwd(hidden, weight, bias, chosen, rejected, margin)

    @staticmethod
    def backward(hidden, weight, rows, coef, need_hidden_grad):
        import torch

        return torch.ops.rmfast.pairwise_loss_bwd(hidden, weight, rows, coef, need_hidden_grad)


class _TritonKernels:
    """The Triton kernels (kernels/), imported on first use: TRITON_INTERPRET is read at that import."""

    @staticmethod
    def forward(hidden, weight, bias, chosen, rejected, margin):
        from rmfast import kernels

        return kernels.pairwise_loss_fwd(hidden, weight, bias, chosen, rejected, margin)

    @staticmethod
    def backward(hidden, weight, rows, coef, need_hidden_grad):
        from rmfast import kernels

        return kernels.pairwise_loss_bwd(hidden, weight, rows, coef, need_hidden_grad)


def triton_interpreting():
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def unavailable_reason(name, device_type):
    """None if backend ``name`` can run on tensors of ``device_type`` ('cpu' or 'cuda'), else why not."""
    key = (name, device_type)
    if key not in _reasons:
        _reasons[key] = _find_reason(name, device_type)
    return _reasons[key]


def _find_reason(name, device_type):
    if name == "torch":
        return None
    if name == "triton":
        if device_type == "cpu" and not triton_interpreting():
            return "triton runs on CPU tensors only under TRITON_INTERPRET=1"
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            return f"triton is not installed ({exc})"
        return None
    if name in ("cuda", "cpu"):
        if name != device_type:
            return f"the {name} backend takes {name.upper()} tensors, these are on {device_type}"
        from . import _extension

        source, build, why_not = _extension.info()
        if source is None:
            return f"the compiled extension is missing: {why_not}"
        if name == "cuda" and not build.get("with_cuda"):
            return "the compiled extension was built without CUDA kernels (rebuild where nvcc is found)"
        return None
    return f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}"


def kernels_for(name):
    """The kernel-level implementation of a compiled backend (not for 'torch')."""
    return _TritonKernels if name == "triton" else _ExtensionKernels


def _warn_once(requested, reason, chosen):
    key = (requested, reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"rmfast: backend {requested!r} unavailable ({reason}); using {chosen!r}", stacklevel=4)


def select(backend, device_type):
    """Resolve a backend name for tensors on ``device_type``; 'auto' follows RMFAST_BACKEND, then the order."""
    requested = backend
    if backend == "auto":
        requested = os.environ.get("RMFAST_BACKEND", "auto").strip().lower() or "auto"
    order = _AUTO_ORDER.get(device_type, ("torch",))
    if requested != "auto":
        reason = unavailable_reason(requested, device_type)
        if reason is None:
            return requested
        chosen = next(b for b in order if unavailable_reason(b, device_type) is None)
        _warn_once(requested, reason, chosen)
        return chosen
    for name in order:
        reason = unavailable_reason(name, device_type)
        if reason is None:
            return name
        if name != "torch" and not (name == "triton" and device_type == "cpu"):
            _warn_once(name, reason, "the next backend")
    return "torch"
