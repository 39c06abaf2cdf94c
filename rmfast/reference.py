"""Plain-torch reference of the fused loss: the oracle of the tests (it runs in float64 too) and the
fallback backend. Differentiable by autograd; accumulates in float32, or float64 for float64 inputs."""

import torch
import torch.nn.functional as F


def pairwise_terms(hidden2d, weight, bias, chosen, rejected, margin):
    """hidden2d [N, D]; weight [D]; bias scalar tensor or None; chosen, rejected [P] int64;
    margin [P] or None. Returns (r_c, r_r, loss_p), each [P] in the accumulation dtype."""
    acc = torch.float64 if hidden2d.dtype == torch.float64 else torch.float32
    # One gather for both sides: its backward then fills a single dense d_hidden, not one per side.
    rewards = hidden2d.index_select(0, torch.cat([chosen, rejected])).to(acc) @ weight.to(acc)
    rc, rr = rewards.split(chosen.shape[0])
    if bias is not None:
        b = bias.to(acc).reshape(())
        rc = rc + b
        rr = rr + b
    diff = rc - rr
    if margin is not None:
        diff = diff - margin.to(acc)
    return rc, rr, F.softplus(-diff)
