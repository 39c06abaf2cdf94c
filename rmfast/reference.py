"""Plain-torch reference of the fused loss: the oracle of the tests (it runs in float64 too) and the
fallback backend. Differentiable by autograd; accumulates in float32, or float64 for float64 inputs."""

import torch
import torch.nn.functional as F


def comparison_loss(d, log_nu=None, tie=None):
    """Each comparison's loss from d = r_c − r_r − margin [P]: Bradley–Terry's softplus(−d) without log_nu;
    with log_nu (Davidson's log ν, a scalar tensor), T − d/2 for a win and T − log ν for a tie (tie [P] bool),
    T = log(e^{d/2} + e^{−d/2} + ν)."""
    if log_nu is None:
        return F.softplus(-d)
    log_nu = log_nu.to(d.dtype).reshape(())
    half = d / 2
    total = torch.logaddexp(torch.logaddexp(half, -half), log_nu.expand_as(d))
    win = total - half
    return win if tie is None else torch.where(tie, total - log_nu, win)


def pairwise_terms(hidden2d, weight, bias, chosen, rejected, margin, log_nu=None, tie=None):
    """hidden2d [N, D]; weight [D]; bias scalar tensor or None; chosen, rejected [P] int64;
    margin [P] or None; log_nu a scalar tensor or None (Davidson's loss when given); tie [P] bool or None.
    Returns (r_c, r_r, loss_p), each [P] in the accumulation dtype."""
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
    return rc, rr, comparison_loss(diff, log_nu, tie)


def masked_square_error(predicted, target):
    """Per row [S]: Σ over its finite targets of (predicted − target)², and [S] how many it has (a NaN or ±inf
    target is a missing value, masked). predicted, target [S, A]."""
    target = target.to(device=predicted.device, dtype=predicted.dtype)
    have = torch.isfinite(target)
    err = torch.where(have, predicted - torch.nan_to_num(target, nan=0.0, posinf=0.0, neginf=0.0), 0.0)
    return err.square().sum(1), have.sum(1)


def attribute_terms(hidden2d, weight, bias, index, target=None, response_weight=None):
    """hidden2d [N, D]; weight [A, D]; bias [A] or None; index [S] int64; target [S, A] or None (NaN: missing);
    response_weight [S] or None. Returns (out [S, A], loss or None): the attributes, and the regression loss
    Σ_s w_s Σ_a (out − target)² / Σ_s w_s n_s over the finite targets (0 when there are none), in the
    accumulation dtype."""
    acc = torch.float64 if hidden2d.dtype == torch.float64 else torch.float32
    out = hidden2d.index_select(0, index).to(acc) @ weight.to(acc).t()
    if bias is not None:
        out = out + bias.to(acc).reshape(-1)
    if target is None:
        return out, None
    sq, n = masked_square_error(out, target)
    n = n.to(acc)
    if response_weight is not None:
        w = response_weight.to(acc)
        sq, n = sq * w, n * w
    return out, sq.sum() / n.sum().clamp_min(torch.finfo(acc).tiny)


def plackett_luce_terms(rewards, group, scores):
    """rewards, scores [S]; group [S] int64. Each response's term lse_k − r_k [S], lse_k the log-sum-exp of the
    rewards of k's group scored ≤ k (Breslow's rule for ties), differentiable; an [S, S] mask."""
    risk = (group[:, None] == group[None, :]) & (scores[None, :] <= scores[:, None])
    lse = torch.logsumexp(rewards[None, :].expand(len(rewards), -1).masked_fill(~risk, float("-inf")), dim=1)
    return lse - rewards


def plackett_luce(rewards, group, scores, weight):
    """Σ_k weight_k (lse_k − r_k) over plackett_luce_terms."""
    return (weight * plackett_luce_terms(rewards, group, scores)).sum()
