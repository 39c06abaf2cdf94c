"""Triton kernels of the attribute head (A outputs) on gathered last-token rows: the [A, D] form of the fused
op's gather and projection (the kernel-level contract of rmfast/backends.py, attribute_head_*).

forward:  a program takes BLOCK_S gathered rows, walks the hidden size in BLOCK_D tiles and accumulates all
          A outputs of each row at once ([BLOCK_S, BLOCK_A] from [BLOCK_S, BLOCK_D] × [BLOCK_D, BLOCK_A]),
          copying the tiles it reads to the rows d_weight needs (when asked) and writing each row's (weighted)
          squared error against a target and its count of observed values (the regression objective, when
          given; the launcher sums them).
hidden_grad: a program takes BLOCK_R rows × BLOCK_D columns and writes those rows of a zero d_hidden,
          Σ_a coef[r, a] · w[a] (no hidden state is read).

Runs on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 was set before this module was imported.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .pairwise_loss import _acc, _block_d


@triton.jit
def _attribute_fwd_kernel(
    H, W, B, IDX, T, RW, OUT, SQ, CNT, ROWS,
    S, A, D, stride_n, stride_d,
    HAS_BIAS: tl.constexpr, HAS_TARGET: tl.constexpr, HAS_RW: tl.constexpr, GATHER: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_s = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    offs_a = tl.arange(0, BLOCK_A)
    mask_a = offs_a < A
    idx = tl.load(IDX + offs_s, mask=mask_s, other=0)
    acc = tl.zeros([BLOCK_S, BLOCK_A], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        tile = tl.load(H + idx[:, None] * stride_n + offs_d[None, :] * stride_d,
                       mask=mask_s[:, None] & mask_d[None, :], other=0.0)
        if GATHER:  # the rows d_weight reads, copied as they are read
            row0 = offs_s.to(tl.int64)[:, None] * D  # S·D may pass 2³¹
            tl.store(ROWS + row0 + offs_d[None, :], tile, mask=mask_s[:, None] & mask_d[None, :])
        h = tile.to(ACC)
        w = tl.load(W + offs_a[None, :] * D + offs_d[:, None], mask=mask_d[:, None] & mask_a[None, :], other=0.0)
        acc += tl.sum(h[:, :, None] * w[None, :, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(B + offs_a, mask=mask_a, other=0.0)[None, :]
    tl.store(OUT + offs_s[:, None] * A + offs_a[None, :], acc, mask=mask_s[:, None] & mask_a[None, :])
    if HAS_TARGET:  # Σ_a (out − target)² over the finite targets (NaN: a missing value)
        inside = mask_s[:, None] & mask_a[None, :]
        y = tl.load(T + offs_s[:, None] * A + offs_a[None, :], mask=inside, other=0.0)
        have = inside & (y == y) & (tl.abs(y) != float("inf"))
        err = tl.where(have, acc - y, 0.0)
        e = tl.sum(err * err, axis=1)
        n = tl.sum(tl.where(have, 1.0, 0.0), axis=1)
        if HAS_RW:
            ws = tl.load(RW + offs_s, mask=mask_s, other=0.0)
            e = e * ws
            n = n * ws
        tl.store(SQ + offs_s, e, mask=mask_s)
        tl.store(CNT + offs_s, n, mask=mask_s)


@triton.jit
def _attribute_hidden_grad_kernel(
    W, ROWS, COEF, DH, M, A, D,
    BLOCK_R: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < M
    offs_a = tl.arange(0, BLOCK_A)
    mask_a = offs_a < A
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    rows = tl.load(ROWS + offs_r, mask=mask_r, other=0)
    coef = tl.load(COEF + offs_r[:, None] * A + offs_a[None, :], mask=mask_r[:, None] & mask_a[None, :], other=0.0)
    w = tl.load(W + offs_a[:, None] * D + offs_d[None, :], mask=mask_a[:, None] & mask_d[None, :], other=0.0)
    dh = tl.sum(coef[:, :, None] * w[None, :, :], axis=1)
    # A row listed twice carries the same coefficients both times, so duplicate stores write equal values.
    keep = mask_r & (rows >= 0)  # -1 marks an entry to skip, as in the C++ and CUDA kernels
    tl.store(DH + rows[:, None] * D + offs_d[None, :], dh.to(DH.dtype.element_ty),
             mask=keep[:, None] & mask_d[None, :])


def attribute_head_fwd(hidden, weight, bias, index, target=None, response_weight=None, gather=False):
    """hidden [N, D] any strides; weight [A, D] acc dtype; bias [A] or None; index [S] int64; target [S, A] acc or
    None; response_weight [S] acc or None. Returns (out [S, A] acc, sums [2] acc (empty without target): Σ_s w_s
    Σ_a (out − target)² and Σ_s w_s n_s over the finite targets, rows [S, D] in hidden's dtype (empty unless
    gather): the gathered rows)."""
    weight, index = weight.contiguous(), index.contiguous()
    S, (A, D) = index.numel(), weight.shape
    out = torch.empty((S, A), dtype=weight.dtype, device=hidden.device)
    per_row = torch.zeros((2, S if target is not None else 0), dtype=weight.dtype, device=hidden.device)
    rows = torch.empty((S, D) if gather else (0,), dtype=hidden.dtype, device=hidden.device)
    if S == 0:
        return out, per_row.sum(1) if target is not None else per_row.new_empty(0), rows
    block_a = triton.next_power_of_2(A)
    block_s = 16
    block_d = _block_d(D, max(16, 512 // block_a))  # a [BLOCK_S, BLOCK_D, BLOCK_A] product of at most 8K elements
    _attribute_fwd_kernel[(triton.cdiv(S, block_s),)](
        hidden, weight, bias.contiguous() if bias is not None else weight, index,
        target.contiguous() if target is not None else weight,
        response_weight.contiguous() if response_weight is not None else weight, out,
        per_row[0] if target is not None else out, per_row[1] if target is not None else out,
        rows if gather else hidden,
        S, A, D, hidden.stride(0), hidden.stride(1),
        HAS_BIAS=bias is not None, HAS_TARGET=target is not None, HAS_RW=response_weight is not None, GATHER=gather,
        ACC=_acc(hidden.dtype), BLOCK_S=block_s, BLOCK_A=block_a, BLOCK_D=block_d, num_warps=4,
    )
    return out, per_row.sum(1) if target is not None else per_row.new_empty(0), rows


def attribute_head_hidden_grad(weight, rows, coef, n_rows, dtype):
    """weight [A, D] acc; rows [M] int64 in [0, n_rows); coef [M, A] acc, equal for equal rows. Returns d_hidden
    [n_rows, D] contiguous in ``dtype``: Σ_a coef[i, a]·weight[a] at rows[i], zeros elsewhere."""
    rows, coef, weight = rows.contiguous(), coef.contiguous(), weight.contiguous()
    (A, D), M = weight.shape, rows.numel()
    d_hidden = torch.zeros((n_rows, D), dtype=dtype, device=weight.device)
    if M == 0:
        return d_hidden
    block_a = triton.next_power_of_2(A)
    block_r = 16
    block_d = _block_d(D, max(16, 512 // block_a))
    grid = (triton.cdiv(M, block_r), triton.cdiv(D, block_d))
    _attribute_hidden_grad_kernel[grid](weight, rows, coef, d_hidden, M, A, D, BLOCK_R=block_r, BLOCK_A=block_a,
                                        BLOCK_D=block_d, num_warps=4)
    return d_hidden


@torch.library.custom_op("rmfast::triton_attribute_fwd", mutates_args=())
def attribute_head_fwd_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          index: torch.Tensor, target: Optional[torch.Tensor] = None,
                          response_weight: Optional[torch.Tensor] = None,
                          gather: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attribute_head_fwd(hidden, weight, bias, index, target, response_weight, gather)


@attribute_head_fwd_op.register_fake
def _(hidden, weight, bias, index, target=None, response_weight=None, gather=False):
    return attribute_fakes(hidden, weight, index, target, gather)


def attribute_fakes(hidden, weight, index, target, gather):
    """The forward's outputs' shapes and dtypes (fake kernels of the Triton and the extension's op)."""
    S = index.shape[0]
    return (weight.new_empty((S, weight.shape[0])), weight.new_empty(2 if target is not None else 0),
            hidden.new_empty((S, hidden.shape[1]) if gather else (0,)))


@torch.library.custom_op("rmfast::triton_attribute_hidden_grad", mutates_args=())
def attribute_head_hidden_grad_op(weight: torch.Tensor, rows: torch.Tensor, coef: torch.Tensor, n_rows: int,
                                  dtype: torch.dtype) -> torch.Tensor:
    return attribute_head_hidden_grad(weight, rows, coef, n_rows, dtype)


@attribute_head_hidden_grad_op.register_fake
def _(weight, rows, coef, n_rows, dtype):
    return weight.new_empty((n_rows, weight.shape[1]), dtype=dtype)
