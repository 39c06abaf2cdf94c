"""Backends of the fused loss and how one is chosen.

Kernel-level contract of every compiled backend (``torch`` is the differentiable reference,
rmfast/reference.py, and needs neither); acc is float32, or float64 for float64 hidden:

- ``forward(hidden2d, weight, bias, chosen, rejected, margin) -> (r_c, r_r, loss_p)``: hidden2d [N, D] of
  any float dtype and strides; weight [D] acc; bias [1] acc or None; chosen, rejected [P] int64; margin [P]
  acc or None. The [P] and [D] vectors arrive contiguous (rmfast/loss.py normalises the indices to
  contiguous int64 and margin / weight to contiguous acc before any backend).
  Outputs [P] acc, loss_p = softplus(-(r_c - r_r - margin)).
- ``hidden_grad(weight, rows, coef, n_rows, dtype) -> d_hidden``: weight [D] acc; rows [M] int64 in
  [0, n_rows); coef [M] acc, equal for equal rows. d_hidden [n_rows, D] contiguous in ``dtype``: zeros
  except row rows[i] = coef[i]·weight. It reads no hidden state, so the autograd of rmfast/loss.py saves
  only the gathered rows (for d_weight, a [2P, D] product it computes itself), never hidden.
- ``attribute_forward(hidden2d, weight, bias, index) -> out`` and ``attribute_hidden_grad(weight, rows, coef,
  n_rows, dtype) -> d_hidden``: the same for an attribute head (rmfast.attribute_head): weight [A, D] acc,
  bias [A] acc or None, index [S] int64 → out [S, A] acc; coef [M, A] acc → d_hidden rows Σ_a coef[i, a]·weight[a].

Each backend's kernels are torch operators with fake (meta) kernels, so ``torch.compile(fullgraph=True)``
traces through the loss: the extension's ``torch.ops.rmfast.pairwise_loss_fwd`` / ``pairwise_loss_bwd``
(csrc/bindings.cpp; their fake kernels are registered here once the extension is loaded) and the Triton
launchers wrapped as ``torch.ops.rmfast.triton_pairwise_fwd`` / ``triton_hidden_grad`` (kernels/). Eager
code calls the Triton launchers directly, skipping the custom op's host-side dispatch.

Choice (``backend="auto"``): CUDA tensors → triton, cuda, torch; CPU tensors → cpu, torch.
``RMFAST_BACKEND`` (read here) sets the backend used when the caller passes ``"auto"``.
A requested backend that cannot run warns once, naming why, and the auto order takes over.

Index range check (``pairwise_reward_loss(..., check_indices=None)``, rmfast/loss.py): ``None`` checks on
the host for CPU tensors (a ValueError naming the argument) and on the device for CUDA tensors
(``torch._assert_async``: no host sync; a bad index fails the next synchronising call); ``True`` checks on
the host everywhere (a sync on CUDA); ``False`` skips the check, for callers that build the indices
themselves. Under torch.compile the check is always the device-side one, which keeps the graph whole.
"""

import os
import warnings

import torch

BACKENDS = ("torch", "triton", "cuda", "cpu")
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}
_warned = set()
_reasons = {}
_fakes = []


def _register_extension_fakes():
    """Fake kernels of the extension's ops: output shapes and dtypes only (FakeTensor, torch.compile)."""
    import torch

    if _fakes:
        return
    _fakes.append(True)

    @torch.library.register_fake("rmfast::pairwise_loss_fwd")
    def _fwd(hidden, weight, bias, chosen, rejected, margin):
        P = chosen.shape[0]
        return weight.new_empty(P), weight.new_empty(P), weight.new_empty(P)

    @torch.library.register_fake("rmfast::pairwise_loss_bwd")
    def _bwd(hidden, weight, rows, coef, need_hidden_grad):
        d_hidden = hidden.new_empty(hidden.shape if need_hidden_grad else (0,))
        return d_hidden, weight.new_empty(weight.shape)

    @torch.library.register_fake("rmfast::attribute_head_fwd")
    def _attribute_fwd(hidden, weight, bias, index):
        return weight.new_empty((index.shape[0], weight.shape[0]))

    @torch.library.register_fake("rmfast::attribute_head_hidden_grad")
    def _attribute_hidden_grad(like, weight, rows, coef):
        return like.new_empty(like.shape)


class _ExtensionKernels:
    """The compiled ops; torch's dispatcher sends CPU tensors to the CPU kernels, CUDA tensors to CUDA."""

    @staticmethod
    def forward(hidden, weight, bias, chosen, rejected, margin):
        import torch

        return torch.ops.rmfast.pairwise_loss_fwd.default(hidden, weight, bias, chosen, rejected, margin)

    @staticmethod
    def hidden_grad(weight, rows, coef, n_rows, dtype):
        import torch

        # The extension's backward reads hidden at the listed rows for a d_weight computed elsewhere: one
        # row expanded to [n_rows, D] (stride 0) gives it d_hidden's shape and dtype without hidden.
        row = weight if weight.dtype == dtype else weight.new_zeros(weight.shape, dtype=dtype)
        shape_only = row.expand(n_rows, -1)
        return torch.ops.rmfast.pairwise_loss_bwd.default(shape_only, weight, rows, coef, True)[0]

    @staticmethod
    def attribute_forward(hidden, weight, bias, index):
        import torch

        return torch.ops.rmfast.attribute_head_fwd.default(hidden, weight, bias, index)

    @staticmethod
    def attribute_hidden_grad(weight, rows, coef, n_rows, dtype):
        import torch

        like = weight.new_zeros((1, weight.shape[1]), dtype=dtype).expand(n_rows, -1)  # shape and dtype only
        return torch.ops.rmfast.attribute_head_hidden_grad.default(like, weight, rows, coef)


class _TritonKernels:
    """The Triton kernels (kernels/), imported on first use: TRITON_INTERPRET is read at that import."""

    @staticmethod
    def forward(hidden, weight, bias, chosen, rejected, margin):
        import torch

        from rmfast import kernels

        fwd = kernels.pairwise_loss_fwd_op if torch.compiler.is_compiling() else kernels.pairwise_loss_fwd
        return fwd(hidden, weight, bias, chosen, rejected, margin)

    @staticmethod
    def hidden_grad(weight, rows, coef, n_rows, dtype):
        import torch

        from rmfast import kernels

        grad = (kernels.pairwise_loss_hidden_grad_op if torch.compiler.is_compiling()
                else kernels.pairwise_loss_hidden_grad)
        return grad(weight, rows, coef, n_rows, dtype)

    @staticmethod
    def attribute_forward(hidden, weight, bias, index):
        import torch

        from rmfast import kernels

        fwd = kernels.attribute_head_fwd_op if torch.compiler.is_compiling() else kernels.attribute_head_fwd
        return fwd(hidden, weight, bias, index)

    @staticmethod
    def attribute_hidden_grad(weight, rows, coef, n_rows, dtype):
        import torch

        from rmfast import kernels

        grad = (kernels.attribute_head_hidden_grad_op if torch.compiler.is_compiling()
                else kernels.attribute_head_hidden_grad)
        return grad(weight, rows, coef, n_rows, dtype)


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
        _register_extension_fakes()
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


# torch.compile runs it eagerly and keeps its answer as a constant: what it does on a first call (the
# extension's loading under a lock, an import, a warning) cannot be traced, and the answer is a string
@torch.compiler.assume_constant_result
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
