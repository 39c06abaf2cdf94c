"""The fused end of the model: last-token gather → value head → loss, with its backward, for every objective.

- ``pairwise_reward_loss``: Bradley–Terry over pairs (or, given ``log_nu``, Davidson's loss with ties kept);
- ``attribute_head`` / ``attribute_regression_loss``: an [A, D] head's attributes, and their masked mean
  squared error;
- ``plackett_luce_loss``: the listwise likelihood of ranked groups.

The compiled backends run the forward kernels (gather, dot with the head, the loss's terms) and one backward
kernel (the gathered rows of d_hidden). What is left in torch here works on [P]-, [S, A]- or [S, D]-sized
tensors: the reduction, the centering term, the per-row coefficients of the backward and d_weight.
"""

import math
from typing import NamedTuple, Optional, Union

import torch

from . import backends, reference

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")


class PairwiseRewardOutput(NamedTuple):
    """loss: scalar (mean/sum) or [P] (none); chosen_rewards, rejected_rewards: [P] float32
    (float64 when hidden is float64)."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def _as(t, dtype):
    """t in dtype; no dispatcher call when it already is (this path runs on every step)."""
    return t if t.dtype == dtype else t.to(dtype)


def _reward_grads(rc, rr, m, grad_rc, grad_rr, grad_loss, reduction, log_nu=None, tie=None):
    """(dL/dr of each gathered row [2P] (chosen then rejected), dL/d log ν (a scalar, None without log_nu))
    from rc, rr, m [P], Davidson's log_nu [1] and tie [P] (or None), and the upstream gradients of r_c, r_r
    ([P]) and of the reduced loss ([P] for "none", else a scalar); None for an output that received none."""
    P = rc.shape[0]
    d_log_nu = None
    if grad_loss is None:
        coef = rc.new_zeros(2 * P)
        if log_nu is not None:
            d_log_nu = log_nu.new_zeros(())
    else:
        scale = grad_loss / P if reduction == "mean" else grad_loss
        if log_nu is None:
            # d softplus(-(r_c - r_r - m)) / d r_c = -sigmoid(r_r - r_c + m); the opposite for r_r.
            s = (rr - rc) if m is None else (rr - rc).add_(m)
            s = s.sigmoid_().mul_(scale)
        else:
            # Davidson: with (p_win, p_loss, p_tie) the softmax of (d/2, -d/2, log ν), dT/dd = (p_win - p_loss)/2
            # and dT/d log ν = p_tie; a win's loss T - d/2, a tie's T - log ν.
            half = rc - rr if m is None else (rc - rr).sub_(m)
            half = half.div_(2)
            p = torch.softmax(torch.stack([half, -half, log_nu.reshape(()).expand_as(half)]), dim=0)
            dd = (p[0] - p[1]) / 2
            dnu = p[2]
            if tie is None:
                dd = dd - 0.5
            else:
                dd = torch.where(tie, dd, dd - 0.5)
                dnu = dnu - tie.to(dnu.dtype)
            s = -dd * scale
            d_log_nu = (dnu * scale).sum()
        coef = torch.cat([-s, s])
    if grad_rc is not None:
        coef[:P] += grad_rc
    if grad_rr is not None:
        coef[P:] += grad_rr
    return coef, d_log_nu


class _FusedPairwiseTerms(torch.autograd.Function):
    """(hidden2d, weight, bias) → (r_c, r_r, loss) through a compiled backend's kernels; the reduction is
    inside too (one autograd node less on every step).

    Saves the gathered rows [2P, D] (only when weight needs a gradient), never hidden [N, D]: d_hidden
    needs just the head and one coefficient per row, d_weight the rows. Dynamo traces it (the kernels are
    ops with fake kernels, see rmfast/backends.py)."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, log_nu, chosen, rejected, index, margin, tie, reduction, kernels):
        """hidden2d [N, D]; weight [D]; bias one-element or None; log_nu one-element or None (Davidson's loss);
        chosen, rejected [P] int64; index [2P], their concatenation; margin [P] or None; tie [P] bool or None.
        Returns r_c, r_r [P] and the loss reduced by ``reduction`` (mean, sum, none), float32 (float64 for
        float64 hidden)."""
        acc = torch.float64 if hidden2d.dtype == torch.float64 else torch.float32
        w = _as(weight, acc).contiguous()
        b = _as(bias, acc).reshape(1) if bias is not None else None
        m = _as(margin, acc).contiguous() if margin is not None else None
        nu = _as(log_nu, acc).reshape(1) if log_nu is not None else None
        rc, rr, loss_p = kernels.forward(hidden2d, w, b, chosen, rejected, m, nu, tie)
        rows = kernels.gather_rows(hidden2d, index) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(rows, w, index, rc, rr, m, nu, tie)
        ctx.log_nu_meta = (log_nu.shape, log_nu.dtype) if log_nu is not None else None
        ctx.set_materialize_grads(False)  # outputs nobody used get None, not zeros to add
        ctx.kernels = kernels
        ctx.reduction = reduction
        ctx.hidden_meta = (hidden2d.shape[0], hidden2d.dtype)
        ctx.weight_dtype = weight.dtype
        ctx.bias_meta = (bias.shape, bias.dtype) if bias is not None else None
        if reduction == "mean":
            loss_p = loss_p.mean()
        elif reduction == "sum":
            loss_p = loss_p.sum()
        return rc, rr, loss_p

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rc, grad_rr, grad_loss):
        rows, w, index, rc, rr, m, nu, tie = ctx.saved_tensors
        coef, d_nu = _reward_grads(rc, rr, m, grad_rc, grad_rr, grad_loss, ctx.reduction, nu, tie)
        need_hidden, need_weight, need_bias, need_nu = ctx.needs_input_grad[:4]
        d_hidden = d_weight = d_bias = d_log_nu = None
        if need_nu:
            shape, dtype = ctx.log_nu_meta
            d_log_nu = _as(d_nu, dtype).reshape(shape)
        if need_hidden:
            n_rows, dtype = ctx.hidden_meta
            # A row gathered more than once gets the sum of its coefficients at each of its entries, so
            # the kernel's writes of that row agree (no sort, no atomics).
            total = coef.new_zeros(n_rows).index_add_(0, index, coef).index_select(0, index)
            d_hidden = ctx.kernels.hidden_grad(w, index, total, n_rows, dtype)
        if need_weight:
            d_weight = _as(coef @ _as(rows, coef.dtype), ctx.weight_dtype)  # [2P] @ [2P, D]
        if need_bias:
            shape, dtype = ctx.bias_meta
            d_bias = _as(coef.sum(), dtype).reshape(shape)
        return d_hidden, d_weight, d_bias, d_log_nu, None, None, None, None, None, None, None


def _fail(argument, why):
    raise ValueError(f"pairwise_reward_loss: `{argument}` {why}")


def _check_index(name, index, device):
    if not isinstance(index, torch.Tensor):
        _fail(name, f"must be a torch.Tensor of int64 row indices, got {type(index).__name__}")
    if index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
        _fail(name, f"must be an integer tensor (int64), got dtype {index.dtype}")
    if index.dim() != 1:
        _fail(name, f"must be 1-D [P], got shape {tuple(index.shape)}")
    if index.device != device:
        _fail(name, f"is on {index.device} but hidden is on {device}; move both to one device")
    # Every backend (the kernels read ``index + p`` as flat memory) gets contiguous int64: a view with a
    # stride such as ``pairs[:, 0]`` or an int32 tensor is copied here, once, before any backend.
    return _as(index, torch.int64).contiguous()


def _check_range(index, P, n_rows, check):
    """index [2P] int64 (chosen then rejected rows) against hidden's n_rows; see ``check_indices``."""
    if check is False:
        return
    if torch.compiler.is_compiling() or (check is None and index.device.type != "cpu"):
        # On the device: no host sync and no graph break; a bad index fails at the next synchronisation.
        torch._assert_async(((index >= 0) & (index < n_rows)).all(),
                            f"pairwise_reward_loss: a row index is outside hidden's {n_rows} rows")
        return
    lo, hi = torch.aminmax(index)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= n_rows:
        chosen = index[:P]
        bad = "chosen_index" if int(chosen.min()) < 0 or int(chosen.max()) >= n_rows else "rejected_index"
        _fail(bad, f"holds row indices in [{lo}, {hi}] but hidden has {n_rows} rows (valid: 0..{n_rows - 1})")


def _check_bias_margin(bias, margin, P, device):
    """bias as a one-element tensor or None, margin as a [P] tensor or None; a ValueError otherwise."""
    if bias is not None:
        if isinstance(bias, (int, float)):
            bias = torch.tensor(float(bias), device=device)
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            _fail("bias", "must be None, a float, or a one-element floating tensor")
        if bias.numel() != 1:
            _fail("bias", f"must hold one value, got shape {tuple(bias.shape)}")
        if bias.device != device:
            _fail("bias", f"is on {bias.device} but hidden is on {device}; move both to one device")

    if margin is not None:
        if isinstance(margin, (int, float)) and not isinstance(margin, bool):
            if not math.isfinite(margin):
                _fail("margin", f"must be finite, got {margin}")
            margin = torch.full((P,), float(margin), device=device)
        elif isinstance(margin, torch.Tensor):
            if not margin.is_floating_point() and margin.dtype not in (torch.int32, torch.int64):
                _fail("margin", f"must be a float or a numeric tensor, got dtype {margin.dtype}")
            if margin.dim() == 0 or margin.shape == (1,):
                margin = margin.reshape(1).expand(P)
            if margin.shape != (P,):
                _fail("margin", f"must be a float or a tensor [P={P}], got shape {tuple(margin.shape)}")
            if margin.device != device:
                _fail("margin", f"is on {margin.device} but hidden is on {device}; move both to one device")
        else:
            _fail("margin", f"must be None, a float or a tensor [P], got {type(margin).__name__}")

    return bias, margin


def _check_davidson(log_nu, tie, P, device):
    """log_nu as a one-element floating tensor or None, tie as a [P] bool tensor or None; a ValueError
    otherwise."""
    if log_nu is not None:
        if isinstance(log_nu, (int, float)) and not isinstance(log_nu, bool):
            if not math.isfinite(log_nu):
                _fail("log_nu", f"must be finite, got {log_nu}")
            log_nu = torch.tensor(float(log_nu), device=device)
        elif not isinstance(log_nu, torch.Tensor) or not log_nu.is_floating_point() or log_nu.numel() != 1:
            _fail("log_nu", "must be None, a float, or a one-element floating tensor (Davidson's log ν)")
        elif log_nu.device != device:
            _fail("log_nu", f"is on {log_nu.device} but hidden is on {device}; move both to one device")
        elif (device.type == "cpu" and not torch.compiler.is_compiling()
              and not math.isfinite(float(log_nu.detach().reshape(())))):
            _fail("log_nu", f"must be finite, got {float(log_nu.detach().reshape(()))}")
    if tie is not None:
        if log_nu is None:
            _fail("tie", "marks tied comparisons, which only Davidson's loss reads: give log_nu too")
        if not isinstance(tie, torch.Tensor) or tie.is_floating_point() or tie.is_complex():
            _fail("tie", f"must be a bool tensor [P], got {getattr(tie, 'dtype', type(tie).__name__)}")
        if tie.shape != (P,):
            _fail("tie", f"must be [P={P}], got shape {tuple(tie.shape)}")
        if tie.device != device:
            _fail("tie", f"is on {tie.device} but hidden is on {device}; move both to one device")
        tie = (tie if tie.dtype == torch.bool else tie != 0).contiguous()
    return log_nu, tie


def _validate(hidden, weight, chosen_index, rejected_index, bias, margin, center_coef, reduction,
              check_indices, log_nu=None, tie=None):
    """The arguments checked and normalised: (weight [D], chosen, rejected [P] int64, index [2P] (chosen
    then rejected), bias tensor or None, margin [P] or None, log_nu tensor or None, tie [P] bool or None); a
    ValueError naming the argument otherwise."""
    if not isinstance(hidden, torch.Tensor):
        _fail("hidden", f"must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        _fail("hidden", f"must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
    if hidden.dim() < 2:
        _fail("hidden", f"must be [N, D] (or [..., D]), got shape {tuple(hidden.shape)}")
    D = hidden.shape[-1]
    n_rows = hidden.numel() // D if D else 0
    if D == 0 or n_rows == 0:
        _fail("hidden", f"is empty (shape {tuple(hidden.shape)})")
    device = hidden.device

    if not isinstance(weight, torch.Tensor):
        _fail("weight", f"must be a torch.Tensor [D], got {type(weight).__name__}")
    if weight.dtype not in _FLOAT_DTYPES:
        _fail("weight", f"must be a floating tensor, got {weight.dtype}")
    if weight.dim() == 2 and weight.shape[0] == 1:  # nn.Linear(D, 1).weight
        weight = weight.reshape(-1)
    if weight.dim() != 1:
        _fail("weight", f"must be [D] (or [1, D]), got shape {tuple(weight.shape)}")
    if weight.shape[0] != D:
        _fail("weight", f"has {weight.shape[0]} features but hidden has D={D}")
    if weight.device != device:
        _fail("weight", f"is on {weight.device} but hidden is on {device}; move both to one device")

    chosen = _check_index("chosen_index", chosen_index, device)
    rejected = _check_index("rejected_index", rejected_index, device)
    if chosen.shape[0] != rejected.shape[0]:
        _fail("rejected_index", f"has {rejected.shape[0]} pairs but chosen_index has {chosen.shape[0]}")
    P = chosen.shape[0]
    if P == 0:
        _fail("chosen_index", "is empty: at least one pair is needed")
    if not (check_indices is None or isinstance(check_indices, bool)):
        _fail("check_indices", f"must be None, True or False, got {check_indices!r}")
    index = torch.cat([chosen, rejected])
    _check_range(index, P, n_rows, check_indices)

    bias, margin = _check_bias_margin(bias, margin, P, device)
    log_nu, tie = _check_davidson(log_nu, tie, P, device)
    if reduction not in _REDUCTIONS:
        _fail("reduction", f"must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
    if not isinstance(center_coef, (int, float)) or isinstance(center_coef, bool) or not math.isfinite(center_coef):
        _fail("center_coef", f"must be a finite float, got {center_coef!r}")
    return weight, chosen, rejected, index, bias, margin, log_nu, tie


def pairwise_reward_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    chosen_index: torch.Tensor,
    rejected_index: torch.Tensor,
    bias: Optional[Union[torch.Tensor, float]] = None,
    margin: Optional[Union[torch.Tensor, float]] = None,
    center_coef: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
    *,
    check_indices: Optional[bool] = None,
    log_nu: Optional[Union[torch.Tensor, float]] = None,
    tie: Optional[torch.Tensor] = None,
) -> PairwiseRewardOutput:
    """Bradley–Terry loss of a value head on gathered last-token hidden states, fused (or, given ``log_nu``,
    Davidson's loss with ties kept).

    Args:
        hidden: [N, D] (or [..., D], viewed as rows) float16 / bfloat16 / float32 / float64, any strides.
        weight: value head, [D] (or nn.Linear(D, 1).weight's [1, D]).
        chosen_index, rejected_index: [P] integer row indices into hidden's N (flattened) rows.
        bias: None, a float, or a one-element tensor added to every reward.
        margin: None, a float, or [P]: the loss is -log σ(r_c - r_r - margin).
        center_coef: weight of the centering term mean_p((r_c + r_r)²) (TRL's center_rewards_coefficient).
        reduction: "mean" | "sum" over pairs, or "none" for [P] per-pair losses (each with its own
            center_coef·(r_c + r_r)² term, so that their mean equals the "mean" loss).
        backend: "auto" | "triton" | "cuda" | "cpu" | "torch" (see rmfast.backends).
        check_indices: the row-index range check. None (default): on the host for CPU tensors (ValueError),
            on the device for CUDA tensors (no host sync; torch._assert_async); True: on the host
            everywhere (syncs CUDA); False: none, for callers that build the indices themselves. Under
            torch.compile it is always the device-side check.
        log_nu: None (Bradley–Terry), or Davidson's log ν (a float, or a one-element tensor that may be learnt:
            it gets a gradient): with d = r_c − r_r − margin, each comparison's loss is −log P(chosen wins) =
            log(e^{d/2} + e^{−d/2} + ν) − d/2, or −log P(tie) = log(e^{d/2} + e^{−d/2} + ν) − log ν where
            ``tie`` says so.
        tie: None, or [P] bool: the comparisons that were ties (Davidson's loss only).

    Returns:
        PairwiseRewardOutput(loss, chosen_rewards [P], rejected_rewards [P]); rewards are float32
        (float64 for float64 hidden) and carry gradients too. Gradients reach hidden, weight and bias.

    A hidden that cannot be viewed as [N, D] without a copy (e.g. a slice of a [B, L, D] tensor along L)
    is copied once; 2-D hidden of any strides is read in place. torch.compile(fullgraph=True) traces it.
    """
    weight, chosen, rejected, index, bias, margin, log_nu, tie = _validate(
        hidden, weight, chosen_index, rejected_index, bias, margin, center_coef, reduction, check_indices, log_nu,
        tie)
    hidden2d = hidden if hidden.dim() == 2 else hidden.reshape(-1, hidden.shape[-1])
    name = backends.select(backend, hidden.device.type)
    if name == "torch":
        rc, rr, loss = reference.pairwise_terms(hidden2d, weight, bias, chosen, rejected, margin, log_nu, tie)
        if reduction != "none":
            loss = loss.mean() if reduction == "mean" else loss.sum()
    else:
        rc, rr, loss = _FusedPairwiseTerms.apply(hidden2d, weight, bias, log_nu, chosen, rejected, index, margin,
                                                 tie, reduction, backends.kernels_for(name))
    if center_coef:
        center = (rc + rr).square()
        loss = loss + center_coef * (center if reduction == "none" else center.mean())
    return PairwiseRewardOutput(loss, rc, rr)


class _FusedAttributeHead(torch.autograd.Function):
    """(hidden2d, weight [A, D], bias [A]) → (attributes [S, A] of the rows at `index`, loss) through a compiled
    backend's kernels, where loss is the regression objective's Σ_s w_s Σ_a (out − target)² / Σ_s w_s n_s over
    the finite targets (0 when none; an empty tensor without target), its sums computed in the kernel. When
    weight needs a gradient the kernel copies the rows it reads (d_weight reads them) and only those are saved,
    never hidden."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, index, target, response_weight, kernels):
        acc = torch.float64 if hidden2d.dtype == torch.float64 else torch.float32
        w = _as(weight, acc).contiguous()
        b = _as(bias, acc).contiguous() if bias is not None else None
        t = _as(target, acc).contiguous() if target is not None else None
        ws = _as(response_weight, acc).contiguous() if response_weight is not None else None
        gather = ctx.needs_input_grad[1]
        out, sums, rows = kernels.attribute_forward(hidden2d, w, b, index, t, ws, gather)
        if t is None:
            loss, count = sums, None
            ctx.mark_non_differentiable(loss)
        else:
            count = sums[1].clamp_min(torch.finfo(acc).tiny)  # nothing observed: a loss of 0, no gradient
            loss = sums[0] / count
        ctx.save_for_backward(rows if gather else None, w, index, out if t is not None else None, t, ws, count)
        ctx.set_materialize_grads(False)
        ctx.kernels = kernels
        ctx.hidden_meta = (hidden2d.shape[0], hidden2d.dtype)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out, loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_loss):
        rows, w, index, out, t, ws, count = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        d_hidden = d_weight = d_bias = None
        if t is None:
            grad_loss = None
        if grad_out is None and grad_loss is None:
            return None, None, None, None, None, None, None
        # dL/d out [S, A]: the upstream gradient of the attributes, plus dL/d loss · 2 w_s (out − target) / count
        # where the target is observed
        coef = _as(grad_out, w.dtype).contiguous() if grad_out is not None else None
        if grad_loss is not None:
            scale = (2 * _as(grad_loss, w.dtype) / count)
            scale = scale * ws[:, None] if ws is not None else scale
            err = torch.where(torch.isfinite(t), out - t, 0.0).mul_(scale)
            coef = err if coef is None else coef + err
        if need_hidden:
            n_rows, dtype = ctx.hidden_meta
            # a row gathered more than once gets the sum of its coefficients at each of its entries
            total = coef.new_zeros((n_rows, coef.shape[1])).index_add_(0, index, coef).index_select(0, index)
            d_hidden = ctx.kernels.attribute_hidden_grad(w, index, total, n_rows, dtype)
        if need_weight:
            d_weight = _as(coef.t() @ _as(rows, coef.dtype), ctx.weight_dtype)  # [A, S] @ [S, D]
        if need_bias:
            d_bias = _as(coef.sum(0), ctx.bias_dtype)
        return d_hidden, d_weight, d_bias, None, None, None, None


def _attribute_arguments(hidden, weight, index, bias, check_indices):
    """attribute_head's arguments checked and normalised: (hidden2d [N, D], weight [A, D], index [S] int64,
    bias [A] or None); a ValueError naming the argument otherwise."""
    if not isinstance(weight, torch.Tensor) or weight.dtype not in _FLOAT_DTYPES:
        _fail("weight", f"must be a floating torch.Tensor [A, D], got {getattr(weight, 'dtype', type(weight))}")
    if weight.dim() == 1:
        weight = weight.reshape(1, -1)
    if weight.dim() != 2:
        _fail("weight", f"must be [A, D], got shape {tuple(weight.shape)}")
    if not isinstance(hidden, torch.Tensor) or hidden.dtype not in _FLOAT_DTYPES or hidden.dim() < 2:
        _fail("hidden", "must be a float16 / bfloat16 / float32 / float64 tensor [N, D] (or [..., D])")
    D = hidden.shape[-1]
    if weight.shape[1] != D:
        _fail("weight", f"has {weight.shape[1]} features but hidden has D={D}")
    if weight.device != hidden.device:
        _fail("weight", f"is on {weight.device} but hidden is on {hidden.device}; move both to one device")
    if bias is not None and (not isinstance(bias, torch.Tensor) or not bias.is_floating_point()
                             or bias.numel() != weight.shape[0]):
        _fail("bias", f"must be None or a floating tensor of {weight.shape[0]} values (one per output)")
    if bias is not None and bias.device != hidden.device:
        _fail("bias", f"is on {bias.device} but hidden is on {hidden.device}; move both to one device")
    index = _check_index("index", index, hidden.device)
    n_rows = hidden.numel() // D if D else 0
    if index.numel():
        _check_range(index, index.numel(), n_rows, check_indices)
    hidden2d = hidden if hidden.dim() == 2 else hidden.reshape(-1, D)
    return hidden2d, weight, index, bias.reshape(-1) if bias is not None else None


def _attributes(hidden2d, weight, bias, index, target, response_weight, backend):
    """(out [S, A], the regression loss or None) on the chosen backend: the fused op, or the torch reference."""
    name = backends.select(backend, hidden2d.device.type)
    if name == "torch":
        return reference.attribute_terms(hidden2d, weight, bias, index, target, response_weight)
    out, loss = _FusedAttributeHead.apply(hidden2d, weight, bias, index, target, response_weight,
                                          backends.kernels_for(name))
    return out, (loss if target is not None else None)


def attribute_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    backend: str = "auto",
    *,
    check_indices: Optional[bool] = None,
) -> torch.Tensor:
    """The attributes of an A-output head at gathered last-token rows, fused: the [A, D] form of
    pairwise_reward_loss's gather and projection, forward and backward, on the same backends.

    Args:
        hidden: [N, D] (or [..., D], viewed as rows), float16 / bfloat16 / float32 / float64, any strides.
        weight: [A, D] (an nn.Linear(D, A).weight); a [D] head is A = 1.
        index: [S] integer row indices into hidden's N (flattened) rows.
        bias: None or [A].
        backend, check_indices: as for pairwise_reward_loss.

    Returns [S, A] float32 (float64 for float64 hidden); gradients reach hidden (the gathered rows only: no
    [N, D] intermediate beyond d_hidden itself), weight and bias."""
    hidden2d, weight, index, bias = _attribute_arguments(hidden, weight, index, bias, check_indices)
    return _attributes(hidden2d, weight, bias, index, None, None, backend)[0]


class AttributeRegressionOutput(NamedTuple):
    """loss: scalar; attributes: [S, A] float32 (float64 for float64 hidden)."""

    loss: torch.Tensor
    attributes: torch.Tensor


def attribute_regression_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    response_weight: Optional[torch.Tensor] = None,
    backend: str = "auto",
    *,
    check_indices: Optional[bool] = None,
) -> AttributeRegressionOutput:
    """The masked mean squared error of an A-output head's attributes at gathered last-token rows, fused: the
    gather, the projection and each row's squared error in one kernel, the backward through the same
    kernels as attribute_head.

    Args:
        hidden, weight, index, bias, backend, check_indices: as for attribute_head.
        target: [S, A] the attributes' values; NaN (or ±inf) marks a missing value, masked (not 0).
        response_weight: None or [S] ≥ 0, each row's weight.

    Returns AttributeRegressionOutput(loss = Σ_s w_s Σ_a (out − target)² / Σ_s w_s · (observed values of s),
    0 when nothing is observed; attributes [S, A]). Gradients reach hidden, weight and bias."""
    hidden2d, weight, index, bias = _attribute_arguments(hidden, weight, index, bias, check_indices)
    S, A = index.shape[0], weight.shape[0]
    if not isinstance(target, torch.Tensor) or not target.is_floating_point():
        _fail("target", f"must be a floating tensor [S, A], got {getattr(target, 'dtype', type(target).__name__)}")
    if target.dim() == 1 and A == 1:
        target = target.reshape(-1, 1)
    if tuple(target.shape) != (S, A):
        _fail("target", f"must be [S={S}, A={A}], got shape {tuple(target.shape)}")
    if target.device != hidden.device:
        _fail("target", f"is on {target.device} but hidden is on {hidden.device}; move both to one device")
    if response_weight is not None and (not isinstance(response_weight, torch.Tensor)
                                        or tuple(response_weight.shape) != (S,)
                                        or response_weight.device != hidden.device):
        _fail("response_weight", f"must be None or a tensor [S={S}] on hidden's device")
    # the weights are data: no gradient reaches them on any backend
    out, loss = _attributes(hidden2d, weight, bias, index, target,
                            response_weight.detach() if response_weight is not None else None, backend)
    return AttributeRegressionOutput(loss, out)


class _FusedPlackettLuce(torch.autograd.Function):
    """rewards [S] → the Plackett–Luce loss through a compiled backend's kernel, which also gives dloss/dr (the
    backward scales it)."""

    @staticmethod
    def forward(ctx, rewards, group, scores, weight, kernels):
        loss, coef = kernels.plackett_luce_forward(rewards, group, scores, weight)
        ctx.save_for_backward(coef)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        (coef,) = ctx.saved_tensors
        return coef * grad_loss, None, None, None, None


class PlackettLuceOutput(NamedTuple):
    """loss: scalar; rewards: [S] float32 (float64 for float64 hidden)."""

    loss: torch.Tensor
    rewards: torch.Tensor


def plackett_luce_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor,
    group: torch.Tensor,
    scores: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    group_weight: Optional[torch.Tensor] = None,
    backend: str = "auto",
    *,
    num_groups: Optional[int] = None,
    check_indices: Optional[bool] = None,
) -> PlackettLuceOutput:
    """The Plackett–Luce (listwise) loss of groups of ranked responses, fused: each response's reward from its
    gathered last-token row (attribute_head's kernels, A = 1), then each group's likelihood of its ranking in a
    second kernel that also gives the gradient of every reward.

    Args:
        hidden, index, bias, backend, check_indices: as for attribute_head; weight: the value head, [D] or [1, D].
        group: [S] integer group of each response, 0 .. num_groups − 1, in any order.
        scores: [S] each response's score within its group: higher is better; equal scores are ties, which share
            their risk set (Breslow's rule).
        group_weight: None or [num_groups] ≥ 0, each group's weight.
        num_groups: how many groups (default: group.max() + 1, a host sync on CUDA).

    Returns PlackettLuceOutput(loss = Σ_g w_g Σ_{k in g} [log Σ_{j in g, score_j ≤ score_k} e^{r_j} − r_k] /
    num_groups, rewards [S]); with groups of two it is Bradley–Terry. Gradients reach hidden, weight and bias."""
    hidden2d, weight, index, bias = _attribute_arguments(hidden, weight, index, bias, check_indices)
    if weight.shape[0] != 1:
        _fail("weight", f"must be a value head [D] or [1, D], got shape {tuple(weight.shape)}")
    S = index.shape[0]
    group = _check_index("group", group, hidden.device)
    if group.shape[0] != S:
        _fail("group", f"must give one group per response [S={S}], got shape {tuple(group.shape)}")
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (S,) or scores.device != hidden.device:
        _fail("scores", f"must be a tensor [S={S}] on hidden's device")
    if num_groups is None:
        num_groups = int(group.max()) + 1 if S else 0
    if group_weight is not None and (not isinstance(group_weight, torch.Tensor)
                                     or tuple(group_weight.shape) != (num_groups,)
                                     or group_weight.device != hidden.device):
        _fail("group_weight", f"must be None or a tensor [num_groups={num_groups}] on hidden's device")
    if (hidden.device.type == "cpu" and S and not torch.compiler.is_compiling()
            and not bool(torch.isfinite(scores).all())):
        _fail("scores", "holds NaN or ±inf: every response needs a finite score within its group")
    rewards = _attributes(hidden2d, weight, bias, index, None, None, backend)[0][:, 0]
    acc = rewards.dtype
    # the weights are data: no gradient reaches them on any backend
    per = _as(group_weight.detach(), acc)[group] if group_weight is not None else torch.ones_like(rewards)
    per = per / max(num_groups, 1)
    scores = _as(scores, acc).contiguous()
    name = backends.select(backend, hidden.device.type)
    if name == "torch":
        return PlackettLuceOutput(reference.plackett_luce(rewards, group, scores, per), rewards)
    loss = _FusedPlackettLuce.apply(rewards.contiguous(), group, scores, per, backends.kernels_for(name))
    return PlackettLuceOutput(loss, rewards)
