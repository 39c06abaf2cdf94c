"""Backends of the fused loss and how one is chosen.

Kernel-level contract of every compiled backend (``torch`` is the differentiable reference,
rmfast/reference.py, and needs neither); acc is float32, or float64 for float64 hidden:

- ``forward(hidden2d, weight, bias, chosen, rejected, margin, log_nu, tie) -> (r_c, r_r, loss_p)``: hidden2d
  [N, D] of any float dtype and strides; weight [D] acc; bias [1] acc or None; chosen, rejected [P] int64;
  margin [P] acc or None; log_nu [1] acc or None; tie [P] bool or None. The [P] and [D] vectors arrive
  contiguous (rmfast/loss.py normalises the indices to contiguous int64 and margin / weight to contiguous
  acc before any backend). Outputs [P] acc; with d = r_c - r_r - margin, loss_p = softplus(-d)
  (Bradley–Terry) without log_nu, else Davidson's: log(e^{d/2} + e^{-d/2} + ν) - (log ν if tie else d/2).
- ``hidden_grad(weight, rows, coef, n_rows, dtype) -> d_hidden``: weight [D] acc; rows [M] int64 in
  [0, n_rows); coef [M] acc, equal for equal rows. d_hidden [n_rows, D] contiguous in ``dtype``: zeros
  except row rows[i] = coef[i]·weight. It reads no hidden state, so the autograd of rmfast/loss.py saves
  only the gathered rows (for d_weight, a [2P, D] product it computes itself), never hidden.
- ``attribute_forward(hidden2d, weight, bias, index, target, response_weight, gather) -> (out, sums, rows)``
  and ``attribute_hidden_grad(weight, rows, coef, n_rows, dtype) -> d_hidden``: the same for an attribute head
  (rmfast.attribute_head): weight [A, D] acc, bias [A] acc or None, index [S] int64, target [S, A] acc or None,
  response_weight [S] acc or None → out [S, A] acc, sums [2] acc (Σ_s w_s Σ_a (out − target)² and Σ_s w_s n_s
  over the finite targets: the regression objective's error and count; empty without target), rows [S, D] in
  hidden's dtype (the gathered rows, copied as the kernel reads them, for d_weight; empty unless gather);
  coef [M, A] acc → d_hidden rows Σ_a coef[i, a]·weight[a].
- ``gather_rows(hidden2d, index) -> rows [S, D]`` contiguous in hidden's dtype: the rows d_weight reads, which
  the pairwise op's forward saves (the CPU kernel writes them to huge-page-backed memory where large: a fresh
  buffer's page faults are most of a CPU forward's cost).
- ``plackett_luce_forward(rewards, group, scores, weight) -> (loss, coef)``: the listwise objective over groups
  of the rewards attribute_forward gave: rewards, scores, weight [S] acc, group [S] int64 → loss [] acc
  (Σ_k weight_k (lse_k − r_k), lse_k over the responses of k's group scored ≤ k) and coef [S] acc = dloss/dr.

Each backend's kernels are torch operators with fake (meta) kernels, so ``torch.compile(fullgraph=True)``
traces through the loss: the extension's ``torch.ops.rmfast.*`` (pairwise_loss_fwd / _bwd, attribute_head_fwd /
_hidden_grad, plackett_luce_fwd, gather_rows; csrc/bindings.cpp; their fake kernels are registered here once
the extension is loaded) and the Triton launchers wrapped as ``torch.ops.rmfast.triton_*`` (kernels/). Eager
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
    def _fwd(hidden, weight, bias, chosen, rejected, margin, log_nu=None, tie=None):
        P = chosen.shape[0]
        return weight.new_empty(P), weight.new_empty(P), weight.new_empty(P)

    @torch.library.register_fake("rmfast::pairwise_loss_bwd")
    def _bwd(hidden, weight, rows, coef, need_hidden_grad):
        d_hidden = hidden.new_empty(hidden.shape if need_hidden_grad else (0,))
        return d_hidden, weight.new_empty(weight.shape)

    @torch.library.register_fake("rmfast::attribute_head_fwd")
    def _attribute_fwd(hidden, weight, bias, index, target=None, response_weight=None, gather=False):
        from rmfast.kernels.attribute_head import attribute_fakes

        return attribute_fakes(hidden, weight, index, target, gather)

    @torch.library.register_fake("rmfast::gather_rows")
    def _gather_rows(hidden, index):
        return hidden.new_empty((index.shape[0], hidden.shape[1]))

    @torch.library.register_fake("rmfast::plackett_luce_fwd")
    def _plackett_luce(rewards, group, scores, weight):
        return rewards.new_empty(()), rewards.new_empty(rewards.shape)

    @torch.library.register_fake("rmfast::attribute_head_hidden_grad")
    def _attribute_hidden_grad(like, weight, rows, coef):
        return like.new_empty(like.shape)


class _ExtensionKernels:
    """The compiled ops; torch's dispatcher sends CPU tensors to the CPU kernels, CUDA tensors to CUDA."""

    @staticmethod
    def forward(hidden, weight, bias, chosen, rejected, margin, log_nu=None, tie=None):
        import torch

        return torch.ops.rmfast.pairwise_loss_fwd.default(hidden, weight, bias, chosen, rejected, margin, log_nu,
                                                          tie)

    @staticmethod
    def hidden_grad(weight, rows, coef, n_rows, dtype):
        import torch

        # The extension's backward reads hidden at the listed rows for a d_weight computed elsewhere: one
        # row expanded to [n_rows, D] (stride 0) gives it d_hidden's shape and dtype without hidden.
        row = weight if weight.dtype == dtype else weight.new_zeros(weight.shape, dtype=dtype)
        shape_only = row.expand(n_rows, -1)
        return torch.ops.rmfast.pairwise_loss_bwd.default(shape_only, weight, rows, coef, True)[0]

    @staticmethod
    def attribute_forward(hidden, weight, bias, index, target=None, response_weight=None, gather=False):
        import torch

        return torch.ops.rmfast.attribute_head_fwd.default(hidden, weight, bias, index, target, response_weight,
                                                           gather)

    @staticmethod
    def attribute_hidden_grad(weight, rows, coef, n_rows, dtype):
        import torch

        like = weight.new_zeros((1, weight.shape[1]), dtype=dtype).expand(n_rows, -1)  # shape and dtype only
        return torch.ops.rmfast.attribute_head_hidden_grad.default(like, weight, rows, coef)

    @staticmethod
    def plackett_luce_forward(rewards, group, scores, weight):
        import torch

        return torch.ops.rmfast.plackett_luce_fwd.default(rewards, group, scores, weight)

    @staticmethod
    def gather_rows(hidden, index):
        import torch

        return torch.ops.rmfast.gather_rows.default(hidden, index)


class _TritonKernels:
    """The Triton kernels (kernels/), imported on first use: TRITON_INTERPRET is read at that import."""

    @staticmethod
    def forward(hidden, weight, bias, chosen, rejected, margin, log_nu=None, tie=None):
        import torch

        from rmfast import kernels

        fwd = kernels.pairwise_loss_fwd_op if torch.compiler.is_compiling() else kernels.pairwise_loss_fwd
        return fwd(hidden, weight, bias, chosen, rejected, margin, log_nu, tie)

    @staticmethod
    def hidden_grad(weight, rows, coef, n_rows, dtype):
        import torch

        from rmfast import kernels

        grad = (kernels.pairwise_loss_hidden_grad_op if torch.compiler.is_compiling()
                else kernels.pairwise_loss_hidden_grad)
        return grad(weight, rows, coef, n_rows, dtype)

    @staticmethod
    def attribute_forward(hidden, weight, bias, index, target=None, response_weight=None, gather=False):
        import torch

        from rmfast import kernels

        fwd = kernels.attribute_head_fwd_op if torch.compiler.is_compiling() else kernels.attribute_head_fwd
        return fwd(hidden, weight, bias, index, target, response_weight, gather)

    @staticmethod
    def attribute_hidden_grad(weight, rows, coef, n_rows, dtype):
        import torch

        from rmfast import kernels

        grad = (kernels.attribute_head_hidden_grad_op if torch.compiler.is_compiling()
                else kernels.attribute_head_hidden_grad)
        return grad(weight, rows, coef, n_rows, dtype)

    @staticmethod
    def plackett_luce_forward(rewards, group, scores, weight):
        import torch

        from rmfast import kernels

        fwd = kernels.plackett_luce_fwd_op if torch.compiler.is_compiling() else kernels.plackett_luce_fwd
        return fwd(rewards, group, scores, weight)

    @staticmethod
    def gather_rows(hidden, index):
        return hidden.index_select(0, index)


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
