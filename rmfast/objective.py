"""The training objectives over a batch of groups (a pair is a group of two), through the fused end of the model:
the op gathers each response's last-token row and projects it with the value head (forward and backward in
one pass); what is left here works on [C]- or [S]-sized reward vectors.

- ``bradley_terry`` (the default): the loss of every comparison (better, worse), ``softplus(-(r_b - r_w -
  margin))``, computed inside the op. A comparison's margin is its row's margin column (a pair's) plus
  ``margin_scale · (score_better − score_worse)``.
- ``davidson``: Davidson's extension of Bradley–Terry with ties kept. With d = r_b − r_w − margin and the tie
  parameter ν > 0 (learnt or fixed), P(b wins) = e^{d/2} / (e^{d/2} + e^{-d/2} + ν) and P(tie) = ν / (…);
  tied comparisons (equal scores, or a pair row's tie column) are trained on as ties instead of dropped.
- ``plackett_luce``: the listwise likelihood of each group's ranking, Σ_k [log Σ_{j ranked ≤ k} e^{r_j} − r_k]
  over its responses (ties in the scores share their risk set: Breslow's rule); with K = 2 it is
  Bradley–Terry. Margins do not apply.
- ``regression``: an attribute head of A outputs (rmfast.nn.AttributeHead) trained by the mean squared error
  of every response's attributes against the data's (data.attributes), over the values the data has: a missing
  value is masked, not 0. Each response's weight is its group's. The reward the comparisons are read with is
  the head's fixed combination of the attributes.
- ``regression+bradley_terry``: both, summed: the regression loss, plus Bradley–Terry over the comparisons on
  the combined score (HelpSteer2-Preference's recipe), through the fused op with the combined head.

Weights (rmfast.layouts): a comparison's weight is its group's weight (the row's weight column), divided by
its group's number of comparisons with ``weighting="group"``; the loss is Σ weight · loss over the
micro-batch's comparisons divided by their number (by the number of groups with ``weighting="group"``), so a
row of weight 0.5 counts half whatever else its micro-batch holds. plackett_luce weighs each group's loss by
its weight, over the number of groups. With every weight 1 the Bradley–Terry loss is the op's own mean. The
centering term ``center_coef · (r_b + r_w)²`` is averaged over comparisons with the same weights."""

import math

import torch

from .loss import PairwiseRewardOutput, pairwise_reward_loss
from .loss import attribute_head as fused_head

OBJECTIVES = ("bradley_terry", "davidson", "plackett_luce", "regression", "regression+bradley_terry")
REGRESSION = ("regression", "regression+bradley_terry")


def _weighted_mean(per, weight, count):
    """Σ weight · per / count (per.mean() without weights)."""
    if weight is None:
        return per.mean()
    weight = weight.to(device=per.device, dtype=per.dtype)
    return (per * weight).sum() / max(count, 1)


def davidson_terms(better, worse, log_nu, margin=None, tie=None):
    """Davidson's negative log-likelihood of each comparison ([C] each, float): −log P(better wins), or −log
    P(tie) where tie [C] bool says so. log_nu: log ν, a float or a scalar tensor (learnt)."""
    d = better - worse
    if margin is not None:
        d = d - margin.to(d.dtype)
    log_nu = torch.as_tensor(log_nu, dtype=d.dtype, device=d.device)
    half = d / 2
    total = torch.logaddexp(torch.logaddexp(half, -half), log_nu.expand_as(d))  # log(e^{d/2} + e^{-d/2} + ν)
    win = total - half
    if tie is None:
        return win
    return torch.where(tie.to(d.device), total - log_nu, win)


def plackett_luce_terms(rewards, group, scores, groups):
    """Each group's Plackett–Luce negative log-likelihood [G] from its responses' rewards [S] (group [S]
    int64, scores [S]): for every response k, log Σ_j e^{r_j} over the responses j of its group scored ≤ its
    score, minus r_k (the lowest gives 0)."""
    group, scores = group.to(rewards.device), scores.to(rewards.device)
    risk = (group[:, None] == group[None, :]) & (scores[None, :] <= scores[:, None])
    lse = torch.logsumexp(rewards[None, :].expand(len(rewards), -1).masked_fill(~risk, float("-inf")), dim=1)
    return torch.zeros(groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, group, lse - rewards)


def plackett_luce_loss(rewards, batch):
    """The weighted mean over a batch's groups of plackett_luce_terms."""
    per_group = plackett_luce_terms(rewards, batch.response_group, batch.response_scores, batch.groups)
    return _weighted_mean(per_group, batch.group_weight, batch.groups)


def regression_terms(predicted, target):
    """Per response [S]: Σ over its observed attributes of (predicted − target)², and [S] how many it has
    (target NaN: missing, masked)."""
    target = target.to(device=predicted.device, dtype=predicted.dtype)
    have = torch.isfinite(target)
    err = torch.where(have, predicted - torch.nan_to_num(target), torch.zeros_like(predicted))
    return err.square().sum(dim=1), have.sum(dim=1)


def regression_loss(predicted, batch):
    """The masked mean squared error of a batch's attributes, each response weighted by its group's weight:
    Σ w · Σ_a (p − y)² / Σ w · (observed values) (0 when nothing is observed)."""
    sq, n = regression_terms(predicted, batch.response_attributes)
    w = batch.group_weight.to(device=predicted.device, dtype=predicted.dtype)[batch.response_group.to(predicted.device)]
    count = (w * n).sum()
    return (w * sq).sum() / count.clamp_min(torch.finfo(predicted.dtype).tiny)  # 0 when nothing is observed


def reward_loss(hidden, weight, batch, bias=None, center_coef=0.0, backend="auto", check_indices=None,
                objective="bradley_terry", log_nu=0.0, attribute_head=None) -> PairwiseRewardOutput:
    """The loss of a Batch from hidden states [R, L, D] (or [N, D]) and a value head weight [D] under
    `objective` (log_nu: Davidson's log ν; attribute_head: (weight [A, D], bias [A] or None, combination [A])
    for the regression objectives, whose scalar head is `weight`/`bias`).

    Returns PairwiseRewardOutput(loss: scalar, chosen_rewards, rejected_rewards: [C] float32, the better and
    the worse response's reward of each comparison). Gradients reach hidden, weight, bias (and log_nu)."""
    op = dict(bias=bias, backend=backend, check_indices=check_indices)
    if objective in REGRESSION:
        if attribute_head is None or batch.response_attributes is None:
            raise ValueError(f"the {objective} objective needs an attribute head and data with attributes")
        a_weight, a_bias, combination = attribute_head
        predicted = fused_head(hidden, a_weight, batch.response_index.to(hidden.device), a_bias, backend,
                               check_indices=check_indices)
        loss = regression_loss(predicted, batch)
        if objective == "regression" or batch.pairs == 0:
            r = predicted @ combination.to(predicted)
            rb, rw = r[batch.better_response.to(r.device)], r[batch.worse_response.to(r.device)]
            return PairwiseRewardOutput(loss, rb, rw)
        out = reward_loss(hidden, weight, batch, bias, center_coef, backend, check_indices)
        return PairwiseRewardOutput(loss + out.loss, out.chosen_rewards, out.rejected_rewards)
    w = batch.comparison_weight
    if objective == "bradley_terry":
        if w is None:
            return pairwise_reward_loss(hidden, weight, batch.chosen_index, batch.rejected_index,
                                        margin=batch.margin, center_coef=center_coef, **op)
        out = pairwise_reward_loss(hidden, weight, batch.chosen_index, batch.rejected_index, margin=batch.margin,
                                   center_coef=center_coef, reduction="none", **op)
        return PairwiseRewardOutput(_weighted_mean(out.loss, w, batch.loss_count), out.chosen_rewards,
                                    out.rejected_rewards)
    if objective == "davidson":
        out = pairwise_reward_loss(hidden, weight, batch.chosen_index, batch.rejected_index, reduction="none", **op)
        rb, rw = out.chosen_rewards, out.rejected_rewards
        per = davidson_terms(rb, rw, log_nu, batch.margin, batch.tie)
    elif objective == "plackett_luce":
        # every response's reward once, through the fused gather and projection (rmfast.attribute_head, A = 1)
        r = fused_head(hidden, weight, batch.response_index.to(hidden.device), bias, backend,
                       check_indices=check_indices)[:, 0]
        rb, rw = r[batch.better_response.to(r.device)], r[batch.worse_response.to(r.device)]
        loss = plackett_luce_loss(r, batch)
        if center_coef:
            loss = loss + center_coef * _weighted_mean((rb + rw).square(), w, batch.loss_count)
        return PairwiseRewardOutput(loss, rb, rw)
    else:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if center_coef:
        per = per + center_coef * (rb + rw).square()
    return PairwiseRewardOutput(_weighted_mean(per, w, batch.loss_count), rb, rw)


def tie_threshold(log_nu):
    """|r_b − r_w| below which Davidson's model finds a tie the likeliest outcome: 2 log ν (none when ν ≤ 1)."""
    return max(0.0, 2 * float(log_nu))


def log_nu_of(nu):
    if not (isinstance(nu, (int, float)) and math.isfinite(nu) and nu > 0):
        raise ValueError(f"Davidson's tie parameter ν must be a finite number > 0, got {nu!r}")
    return math.log(nu)


__all__ = ["OBJECTIVES", "REGRESSION", "reward_loss", "regression_loss", "regression_terms",
           "davidson_terms", "plackett_luce_terms", "plackett_luce_loss",
           "tie_threshold", "log_nu_of"]
