"""Triton kernels of the attribute head (A outputs) on gathered last-token rows: the [A, D] form of the fused
op's gather and projection (the kernel-level contract of rmfast/backends.py, attribute_head_*).

forward:  a program takes BLOCK_S gathered rows, walks the hidden size in BLOCK_D tiles and accumulates all
          A outputs of each row at once ([BLOCK_S, BLOCK_A] from [BLOCK_S, BLOCK_D] × [BLOCK_D, BLOCK_A]).
hidden_grad: a program takes BLOCK_R rows × BLOCK_D columns and writes those rows of a zero d_hidden,
          Σ_a coef[r, a] · w[a] (no hidden state is read).

Runs on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 was set before this module was imported.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .pairwise_loss import _acc, _block_d


@triton.jit
def _attribute_fwd_kernel(
    H, W, B, IDX, OUT,
    S, A, D, stride_n, stride_d,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
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
        h = tl.load(H + idx[:, None] * stride_n + offs_d[None, :] * stride_d,
                    mask=mask_s[:, None] & mask_d[None, :], other=0.0).to(ACC)
        w = tl.load(W + offs_a[None, :] * D + offs_d[:, None], mask=mask_d[:, None] & mask_a[None, :], other=0.0)
        acc += tl.sum(h[:, :, None] * w[None, :, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(B + offs_a, mask=mask_a, other=0.0)[None, :]
    tl.store(OUT + offs_s[:, None] * A + offs_a[None, :], acc, mask=mask_s[:, None] & mask_a[None, :])


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


def attribute_head_fwd(hidden, weight, bias, index):
    """hidden [N, D] any strides; weight [A, D] acc dtype; bias [A] or None; index [S] int64. Returns [S, A] acc."""
    weight, index = weight.contiguous(), index.contiguous()
    S, (A, D) = index.numel(), weight.shape
    out = torch.empty((S, A), dtype=weight.dtype, device=hidden.device)
    if S == 0:
        return out
    block_a = triton.next_power_of_2(A)
    block_s = 16
    block_d = _block_d(D, max(16, 512 // block_a))  # a [BLOCK_S, BLOCK_D, BLOCK_A] product of at most 8K elements
    _attribute_fwd_kernel[(triton.cdiv(S, block_s),)](
        hidden, weight, bias.contiguous() if bias is not None else weight, index, out,
        S, A, D, hidden.stride(0), hidden.stride(1),
        HAS_BIAS=bias is not None, ACC=_acc(hidden.dtype), BLOCK_S=block_s, BLOCK_A=block_a, BLOCK_D=block_d,
        num_warps=4,
    )
    return out


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
                          index: torch.Tensor) -> torch.Tensor:
    return attribute_head_fwd(hidden, weight, bias, index)


@attribute_head_fwd_op.register_fake
def _(hidden, weight, bias, index):
    return weight.new_empty((index.shape[0], weight.shape[0]))


@torch.library.custom_op("rmfast::triton_attribute_hidden_grad", mutates_args=())
def attribute_head_hidden_grad_op(weight: torch.Tensor, rows: torch.Tensor, coef: torch.Tensor, n_rows: int,
                                  dtype: torch.dtype) -> torch.Tensor:
    return attribute_head_hidden_grad(weight, rows, coef, n_rows, dtype)


@attribute_head_hidden_grad_op.register_fake
def _(weight, rows, coef, n_rows, dtype):
    return weight.new_empty((n_rows, weight.shape[1]), dtype=dtype)
