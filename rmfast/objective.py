"""The training objectives over a batch of groups (a pair is a group of two), through the fused end of the model:
the op gathers each response's last-token row and projects it with the value head (forward and backward in
one pass); what is left here works on [C]- or [S]-sized reward vectors.

- ``bradley_terry`` (the default): the loss of every comparison (better, worse), ``softplus(-(r_b - r_w -
  margin))``, computed inside the op. A comparison's margin is its row's margin column (a pair's) plus
  ``margin_scale · (score_better − score_worse)``.
- ``davidson``: Davidson's extension of Bradley–Terry with ties kept. With d = r_b − r_w − margin and the tie
  parameter ν > 0 (learnt or fixed), P(b wins) = e^{d/2} / (e^{d/2} + e^{-d/2} + ν) and P(tie) = ν / (…);
  tied comparisons (equal scores, or a pair row's tie column) are trained on as ties instead of dropped.
  Computed inside the op too (pairwise_reward_loss's log_nu and tie), its gradient of log ν in the op's backward.
- ``plackett_luce``: the listwise likelihood of each group's ranking, Σ_k [log Σ_{j ranked ≤ k} e^{r_j} − r_k]
  over its responses (ties in the scores share their risk set: Breslow's rule); with K = 2 it is
  Bradley–Terry. Margins do not apply.
- ``regression``: an attribute head of A outputs (rmfast.nn.AttributeHead) trained by the mean squared error
  of every response's attributes against the data's (data.attributes), over the values the data has: a missing
  value is masked, not 0. Each response's weight is its group's. The squared errors are computed in the op
  (rmfast.attribute_regression_loss). The reward the comparisons are read with is
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

from . import reference
from .loss import PairwiseRewardOutput, attribute_regression_loss, pairwise_reward_loss
from .loss import plackett_luce_loss as fused_plackett_luce

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
    P(tie) where tie [C] bool says so. log_nu: log ν, a float or a scalar tensor (learnt). The same terms as the
    fused op's (rmfast.reference.comparison_loss), from rewards already computed (evaluation)."""
    d = better - worse
    if margin is not None:
        d = d - margin.to(d.dtype)
    log_nu = torch.as_tensor(log_nu, dtype=d.dtype, device=d.device)
    return reference.comparison_loss(d, log_nu, tie.to(d.device) if tie is not None else None)


def plackett_luce_terms(rewards, group, scores, groups):
    """Each group's Plackett–Luce negative log-likelihood [G] from its responses' rewards [S] (group [S]
    int64, scores [S]): for every response k, log Σ_j e^{r_j} over the responses j of its group scored ≤ its
    score, minus r_k (the lowest gives 0)."""
    group, scores = group.to(rewards.device), scores.to(rewards.device)
    per = reference.plackett_luce_terms(rewards, group, scores)
    return torch.zeros(groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, group, per)


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
        # the gather, the projection and each response's squared error in the op: Σ w · Σ_a (p − y)² / Σ w ·
        # (observed values), each response weighted by its group's weight, 0 when nothing is observed
        response_weight = batch.group_weight[batch.response_group].to(device=hidden.device)
        loss, predicted = attribute_regression_loss(
            hidden, a_weight, batch.response_index.to(hidden.device), batch.response_attributes.to(hidden.device),
            a_bias, response_weight, backend, check_indices=check_indices)
        if objective == "regression" or batch.pairs == 0:
            r = predicted @ combination.to(predicted)
            rb, rw = r[batch.better_response.to(r.device)], r[batch.worse_response.to(r.device)]
            return PairwiseRewardOutput(loss, rb, rw)
        out = reward_loss(hidden, weight, batch, bias, center_coef, backend, check_indices)
        return PairwiseRewardOutput(loss + out.loss, out.chosen_rewards, out.rejected_rewards)
    w = batch.comparison_weight
    if objective in ("bradley_terry", "davidson"):
        if objective == "davidson":  # the op's own loss, given log ν and the tied comparisons
            op.update(log_nu=log_nu, tie=batch.tie.to(hidden.device) if batch.tie is not None else None)
        if w is None:
            return pairwise_reward_loss(hidden, weight, batch.chosen_index, batch.rejected_index,
                                        margin=batch.margin, center_coef=center_coef, **op)
        out = pairwise_reward_loss(hidden, weight, batch.chosen_index, batch.rejected_index, margin=batch.margin,
                                   center_coef=center_coef, reduction="none", **op)
        return PairwiseRewardOutput(_weighted_mean(out.loss, w, batch.loss_count), out.chosen_rewards,
                                    out.rejected_rewards)
    if objective == "plackett_luce":
        # every response's reward once (the fused gather and projection, A = 1), then the groups' terms in the op
        dev = hidden.device
        loss, r = fused_plackett_luce(hidden, weight, batch.response_index.to(dev), batch.response_group.to(dev),
                                     batch.response_scores.to(dev), bias,
                                     batch.group_weight.to(dev) if batch.group_weight is not None else None, backend,
                                     num_groups=batch.groups, check_indices=check_indices)
        rb, rw = r[batch.better_response.to(r.device)], r[batch.worse_response.to(r.device)]
        if center_coef:
            loss = loss + center_coef * _weighted_mean((rb + rw).square(), w, batch.loss_count)
        return PairwiseRewardOutput(loss, rb, rw)
    raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")


def tie_threshold(log_nu):
    """|r_b − r_w| below which Davidson's model finds a tie the likeliest outcome: 2 log ν (none when ν ≤ 1)."""
    return max(0.0, 2 * float(log_nu))


def log_nu_of(nu):
    if not (isinstance(nu, (int, float)) and math.isfinite(nu) and nu > 0):
        raise ValueError(f"Davidson's tie parameter ν must be a finite number > 0, got {nu!r}")
    return math.log(nu)


__all__ = ["OBJECTIVES", "REGRESSION", "reward_loss", "davidson_terms", "plackett_luce_terms",
           "tie_threshold", "log_nu_of"]
