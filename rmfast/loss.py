"""``pairwise_reward_loss``: last-token gather → value head → Bradley–Terry loss, fused, with its backward.

The compiled backends run one forward kernel (gather, dot with the head, log-sigmoid) and one backward
kernel (the gathered rows of d_hidden and d_weight). What is left in torch here works on [P]-sized vectors:
the reduction, the centering term and the per-pair coefficients of the backward.
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


def merge_rows(chosen, rejected, g_c, g_r):
    """Fold the 2P per-pair gradients dL/dr into one coefficient per distinct hidden row.

    chosen, rejected: [P] int64; g_c, g_r: [P]. Returns rows [2P] int64 (each distinct row once, -1 for
    entries folded into another) and coef [2P]. No host sync, so it stays cheap on CUDA."""
    rows = torch.cat([chosen, rejected])
    coef = torch.cat([g_c, g_r])
    rows_sorted, order = torch.sort(rows)
    coef_sorted = coef.index_select(0, order)
    head = torch.ones_like(rows_sorted, dtype=torch.bool)
    head[1:] = rows_sorted[1:] != rows_sorted[:-1]
    segment = torch.cumsum(head, 0) - 1
    total = torch.zeros_like(coef_sorted).index_add_(0, segment, coef_sorted)
    return (
        torch.where(head, rows_sorted, torch.full_like(rows_sorted, -1)),
        torch.where(head, total.index_select(0, segment), torch.zeros_like(coef_sorted)),
    )


class _FusedPairwiseTerms(torch.autograd.Function):
    """(hidden2d, weight, bias) → (r_c, r_r, loss_p) through a compiled backend's two kernels."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, chosen, rejected, margin, kernels):
        acc = torch.float64 if hidden2d.dtype == torch.float64 else torch.float32
        w = weight.to(acc).contiguous()
        b = bias.to(acc).reshape(1) if bias is not None else None
        m = margin.to(acc).contiguous() if margin is not None else None
        rc, rr, loss_p = kernels.forward(hidden2d, w, b, chosen, rejected, m)
        ctx.save_for_backward(hidden2d, w, chosen, rejected, rc, rr, m)
        ctx.kernels = kernels
        ctx.weight_dtype = weight.dtype
        ctx.bias_meta = (bias.shape, bias.dtype) if bias is not None else None
        return rc, rr, loss_p

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rc, grad_rr, grad_loss):
        hidden2d, w, chosen, rejected, rc, rr, m = ctx.saved_tensors
        diff = rc - rr if m is None else rc - rr - m
        # d softplus(-diff) / d r_c = -sigmoid(-diff), and the opposite for r_r.
        s = torch.sigmoid(-diff) * grad_loss
        g_c = grad_rc - s
        g_r = grad_rr + s
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        rows, coef = merge_rows(chosen, rejected, g_c, g_r)
        d_hidden, d_weight = ctx.kernels.backward(hidden2d, w, rows, coef, need_hidden)
        d_bias = None
        if need_bias:
            shape, dtype = ctx.bias_meta
            d_bias = (g_c.sum() + g_r.sum()).to(dtype).reshape(shape)
        return (
            d_hidden if need_hidden else None,
            d_weight.to(ctx.weight_dtype) if need_weight else None,
            d_bias, None, None, None, None,
        )


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
    return index.to(torch.int64)


def _validate(hidden, weight, chosen_index, rejected_index, bias, margin, center_coef, reduction):
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
    lo, hi = torch.aminmax(torch.cat([chosen, rejected]))
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= n_rows:
        bad = "chosen_index" if int(chosen.min()) < 0 or int(chosen.max()) >= n_rows else "rejected_index"
        _fail(bad, f"holds row indices in [{lo}, {hi}] but hidden has {n_rows} rows (valid: 0..{n_rows - 1})")

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

    if reduction not in _REDUCTIONS:
        _fail("reduction", f"must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
    if not isinstance(center_coef, (int, float)) or isinstance(center_coef, bool) or not math.isfinite(center_coef):
        _fail("center_coef", f"must be a finite float, got {center_coef!r}")
    return weight, chosen, rejected, bias, margin


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
) -> PairwiseRewardOutput:
    """Bradley–Terry loss of a value head on gathered last-token hidden states, fused.

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

    Returns:
        PairwiseRewardOutput(loss, chosen_rewards [P], rejected_rewards [P]); rewards are float32
        (float64 for float64 hidden) and carry gradients too. Gradients reach hidden, weight and bias.

    A hidden that cannot be viewed as [N, D] without a copy (e.g. a slice of a [B, L, D] tensor along L)
    is copied once; 2-D hidden of any strides is read in place.
    """
    weight, chosen, rejected, bias, margin = _validate(
        hidden, weight, chosen_index, rejected_index, bias, margin, center_coef, reduction
    )
    hidden2d = hidden if hidden.dim() == 2 else hidden.reshape(-1, hidden.shape[-1])
    name = backends.select(backend, hidden.device.type)
    if name == "torch":
        rc, rr, loss_p = reference.pairwise_terms(hidden2d, weight, bias, chosen, rejected, margin)
    else:
        rc, rr, loss_p = _FusedPairwiseTerms.apply(
            hidden2d, weight, bias, chosen, rejected, margin, backends.kernels_for(name)
        )
    if reduction == "mean":
        loss = loss_p.mean()
    elif reduction == "sum":
        loss = loss_p.sum()
    else:
        loss = loss_p
    if center_coef:
        center = (rc + rr).square()
        loss = loss + center_coef * (center if reduction == "none" else center.mean())
    return PairwiseRewardOutput(loss, rc, rr)
