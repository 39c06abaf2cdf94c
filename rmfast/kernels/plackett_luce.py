"""Triton kernels of the Plackett–Luce objective over groups of responses, from the rewards the attribute head
gave (the kernel-level contract of rmfast/backends.py, plackett_luce_forward).

lse:  a program takes BLOCK_K responses and walks all S responses once in BLOCK_J tiles (an online log-sum-exp
      over each response's risk set): lse_k = log Σ_j e^{r_j} over the j of k's group
      scored ≤ k (Breslow's rule for ties), and the weighted term w_k (lse_k − r_k).
coef: a program takes BLOCK_J responses and walks all S: dloss/dr_j = Σ_k w_k [j in k's set] e^{r_j − lse_k} − w_j.

Runs on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 was set before this module was imported.
"""

from typing import Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _plackett_luce_lse_kernel(R, G, SC, W, LSE, TERM, S, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr):
    pid = tl.program_id(0)
    offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < S
    rk = tl.load(R + offs_k, mask=mask_k, other=0.0)
    gk = tl.load(G + offs_k, mask=mask_k, other=-1)
    sk = tl.load(SC + offs_k, mask=mask_k, other=0.0)
    # one pass, an online log-sum-exp: the running maximum starts at r_k (k is in its own set, so it stays
    # finite) and the running sum is rescaled when the maximum grows
    top = rk
    total = tl.zeros([BLOCK_K], dtype=rk.dtype)
    for j0 in range(0, S, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < S
        rj = tl.load(R + offs_j, mask=mask_j, other=0.0)
        gj = tl.load(G + offs_j, mask=mask_j, other=-2)
        sj = tl.load(SC + offs_j, mask=mask_j, other=0.0)
        risk = (gj[None, :] == gk[:, None]) & (sj[None, :] <= sk[:, None]) & mask_j[None, :]
        new_top = tl.maximum(top, tl.max(tl.where(risk, rj[None, :], float("-inf")), axis=1))
        total = total * tl.exp(top - new_top) + tl.sum(tl.where(risk, tl.exp(rj[None, :] - new_top[:, None]), 0.0),
                                                        axis=1)
        top = new_top
    lse = top + tl.log(tl.where(mask_k, total, 1.0))  # lanes past S: no log(0)
    wk = tl.load(W + offs_k, mask=mask_k, other=0.0)
    tl.store(LSE + offs_k, lse, mask=mask_k)
    tl.store(TERM + offs_k, wk * (lse - rk), mask=mask_k)


@triton.jit
def _plackett_luce_coef_kernel(R, G, SC, W, LSE, COEF, S, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_j = pid * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = offs_j < S
    rj = tl.load(R + offs_j, mask=mask_j, other=0.0)
    gj = tl.load(G + offs_j, mask=mask_j, other=-1)
    sj = tl.load(SC + offs_j, mask=mask_j, other=0.0)
    acc = tl.zeros([BLOCK_J], dtype=rj.dtype)
    for k0 in range(0, S, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < S
        gk = tl.load(G + offs_k, mask=mask_k, other=-2)
        sk = tl.load(SC + offs_k, mask=mask_k, other=0.0)
        wk = tl.load(W + offs_k, mask=mask_k, other=0.0)
        lk = tl.load(LSE + offs_k, mask=mask_k, other=0.0)
        inset = (gk[None, :] == gj[:, None]) & (sj[:, None] <= sk[None, :]) & mask_k[None, :]
        acc += tl.sum(tl.where(inset, wk[None, :] * tl.exp(rj[:, None] - lk[None, :]), 0.0), axis=1)
    wj = tl.load(W + offs_j, mask=mask_j, other=0.0)
    tl.store(COEF + offs_j, acc - wj, mask=mask_j)


def plackett_luce_fwd(rewards, group, scores, weight):
    """rewards [S] acc; group [S] int64; scores, weight [S] acc. Returns (loss [] acc, coef [S] acc):
    Σ_k weight_k (lse_k − r_k) and dloss/dr (see the module's docstring)."""
    rewards, group, scores, weight = (t.contiguous() for t in (rewards, group, scores, weight))
    S = rewards.numel()
    coef = torch.empty_like(rewards)
    if S == 0:
        return rewards.new_zeros(()), coef
    lse, term = torch.empty_like(rewards), torch.empty_like(rewards)
    block = 32
    grid = (triton.cdiv(S, block),)
    _plackett_luce_lse_kernel[grid](rewards, group, scores, weight, lse, term, S, BLOCK_K=block, BLOCK_J=64,
                                    num_warps=4)
    _plackett_luce_coef_kernel[grid](rewards, group, scores, weight, lse, coef, S, BLOCK_J=block, BLOCK_K=64,
                                     num_warps=4)
    return term.sum(), coef


@torch.library.custom_op("rmfast::triton_plackett_luce_fwd", mutates_args=())
def plackett_luce_fwd_op(rewards: torch.Tensor, group: torch.Tensor, scores: torch.Tensor,
                         weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return plackett_luce_fwd(rewards, group, scores, weight)


@plackett_luce_fwd_op.register_fake
def _(rewards, group, scores, weight):
    return rewards.new_empty(()), rewards.new_empty(rewards.shape)
