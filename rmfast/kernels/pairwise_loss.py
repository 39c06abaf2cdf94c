"""Triton kernels of the fused pairwise reward loss (the kernel-level contract of rmfast/backends.py).

forward:  a program takes BLOCK_P pairs, walks the hidden size in BLOCK_D tiles, gathers both rows of each
          pair, dots them with the value head, and writes both rewards and the comparison's loss:
          softplus(-(r_c - r_r - m)) (Bradley–Terry), or Davidson's with ties (given log ν).
hidden_grad: a program takes BLOCK_R rows × BLOCK_D columns and writes those rows of a zero d_hidden
          (coef · w); the backward needs no hidden state for it (d_weight is computed from the rows saved by
          rmfast/loss.py).

Runs on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 was set before this module was imported.
Any hidden size works: tiles are masked at the edges.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _pairwise_fwd_kernel(
    H, W, B, CI, RI, M, NU, TIE, RC, RR, LOSS,
    P, D, stride_n, stride_d,
    HAS_BIAS: tl.constexpr, HAS_MARGIN: tl.constexpr, DAVIDSON: tl.constexpr, HAS_TIE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    ci = tl.load(CI + offs_p, mask=mask_p, other=0)
    ri = tl.load(RI + offs_p, mask=mask_p, other=0)
    acc_c = tl.zeros([BLOCK_P, BLOCK_D], dtype=ACC)
    acc_r = tl.zeros([BLOCK_P, BLOCK_D], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        w = tl.load(W + offs_d, mask=mask_d, other=0.0)
        mask = mask_p[:, None] & mask_d[None, :]
        col = offs_d[None, :] * stride_d
        hc = tl.load(H + ci[:, None] * stride_n + col, mask=mask, other=0.0).to(ACC)
        hr = tl.load(H + ri[:, None] * stride_n + col, mask=mask, other=0.0).to(ACC)
        acc_c += hc * w[None, :]
        acc_r += hr * w[None, :]
    rc = tl.sum(acc_c, axis=1)
    rr = tl.sum(acc_r, axis=1)
    if HAS_BIAS:
        b = tl.load(B)
        rc += b
        rr += b
    diff = rc - rr
    if HAS_MARGIN:
        diff -= tl.load(M + offs_p, mask=mask_p, other=0.0)
    if DAVIDSON:
        # T = log(e^{d/2} + e^{-d/2} + ν), a log-sum-exp of three terms; −log P(win) = T − d/2,
        # −log P(tie) = T − log ν
        log_nu = tl.load(NU).to(ACC)
        half = diff / 2
        a = tl.abs(half)
        top = tl.where(a > log_nu, a, log_nu)
        total = top + tl.log(tl.exp(a - top) + tl.exp(-a - top) + tl.exp(log_nu - top))
        loss = total - half
        if HAS_TIE:
            tie = tl.load(TIE + offs_p, mask=mask_p, other=0) != 0
            loss = tl.where(tie, total - log_nu, loss)
    else:
        x = -diff
        # softplus(x) = max(x, 0) + log(1 + exp(-|x|)); the second term carries a NaN through.
        loss = tl.where(x > 0, x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
    tl.store(RC + offs_p, rc, mask=mask_p)
    tl.store(RR + offs_p, rr, mask=mask_p)
    tl.store(LOSS + offs_p, loss, mask=mask_p)


@triton.jit
def _hidden_grad_kernel(
    W, ROWS, COEF, DH, M, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < M
    rows = tl.load(ROWS + offs_r, mask=mask_r, other=0)
    coef = tl.load(COEF + offs_r, mask=mask_r, other=0.0)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    w = tl.load(W + offs_d, mask=mask_d, other=0.0)
    dh = coef[:, None] * w[None, :]
    # A row listed twice carries the same coef both times, so duplicate stores write equal values.
    tl.store(DH + rows[:, None] * D + offs_d[None, :], dh.to(DH.dtype.element_ty),
             mask=mask_r[:, None] & mask_d[None, :])


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_d(D, cap):
    return min(cap, triton.next_power_of_2(D))


def pairwise_loss_fwd(hidden, weight, bias, chosen, rejected, margin, log_nu=None, tie=None):
    """hidden [N, D] any strides; weight [D] acc dtype; bias [1] or None; chosen, rejected [P] int64;
    margin [P] acc dtype or None; log_nu [1] acc dtype or None (Davidson's loss when given); tie [P] bool or
    None. Returns (chosen_rewards, rejected_rewards, loss), each [P] acc dtype.
    The kernel reads the [P] vectors as flat memory: any that is not contiguous is copied first."""
    chosen, rejected, weight = chosen.contiguous(), rejected.contiguous(), weight.contiguous()
    margin = margin.contiguous() if margin is not None else None
    tie = tie.contiguous().view(torch.uint8) if tie is not None else None
    P = chosen.numel()
    D = hidden.shape[1]
    rc = torch.empty(P, dtype=weight.dtype, device=hidden.device)
    rr = torch.empty_like(rc)
    loss = torch.empty_like(rc)
    block_p = 16
    grid = (triton.cdiv(P, block_p),)
    _pairwise_fwd_kernel[grid](
        hidden, weight, bias if bias is not None else weight, chosen, rejected,
        margin if margin is not None else weight, log_nu if log_nu is not None else weight,
        tie if tie is not None else chosen, rc, rr, loss,
        P, D, hidden.stride(0), hidden.stride(1),
        HAS_BIAS=bias is not None, HAS_MARGIN=margin is not None, DAVIDSON=log_nu is not None,
        HAS_TIE=tie is not None, ACC=_acc(hidden.dtype),
        BLOCK_P=block_p, BLOCK_D=_block_d(D, 256), num_warps=4,
    )
    return rc, rr, loss


def pairwise_loss_hidden_grad(weight, rows, coef, n_rows, dtype):
    """weight [D] acc; rows [M] int64 in [0, n_rows); coef [M] acc, equal for equal rows.
    Returns d_hidden [n_rows, D] contiguous in ``dtype``: coef[i]·weight at rows[i], zeros elsewhere."""
    rows, coef, weight = rows.contiguous(), coef.contiguous(), weight.contiguous()
    D = weight.shape[0]
    M = rows.numel()
    d_hidden = torch.zeros((n_rows, D), dtype=dtype, device=weight.device)
    block_r = 32
    block_d = _block_d(D, 256)
    grid = (triton.cdiv(M, block_r), triton.cdiv(D, block_d))
    _hidden_grad_kernel[grid](weight, rows, coef, d_hidden, M, D, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return d_hidden


# The same launchers as torch.library custom ops with fake kernels, so that torch.compile traces through
# them (Triton launches are opaque to dynamo). Eager code calls the launchers directly: the op's
# dispatch costs tens of microseconds per call on the host.
@torch.library.custom_op("rmfast::triton_pairwise_fwd", mutates_args=())
def pairwise_loss_fwd_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         chosen: torch.Tensor, rejected: torch.Tensor, margin: Optional[torch.Tensor],
                         log_nu: Optional[torch.Tensor] = None,
                         tie: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return pairwise_loss_fwd(hidden, weight, bias, chosen, rejected, margin, log_nu, tie)


@pairwise_loss_fwd_op.register_fake
def _(hidden, weight, bias, chosen, rejected, margin, log_nu=None, tie=None):
    P = chosen.shape[0]
    return weight.new_empty(P), weight.new_empty(P), weight.new_empty(P)


@torch.library.custom_op("rmfast::triton_hidden_grad", mutates_args=())
def pairwise_loss_hidden_grad_op(weight: torch.Tensor, rows: torch.Tensor, coef: torch.Tensor, n_rows: int,
                                 dtype: torch.dtype) -> torch.Tensor:
    return pairwise_loss_hidden_grad(weight, rows, coef, n_rows, dtype)


@pairwise_loss_hidden_grad_op.register_fake
def _(weight, rows, coef, n_rows, dtype):
    return weight.new_empty((n_rows, weight.shape[0]), dtype=dtype)
