"""The Bradley–Terry loss of a batch of groups, through the fused pairwise op unchanged.

Every comparison (better, worse) of every group is one pair of the op (``reduction="none"``); responses in
several comparisons are rows the op gathers more than once and folds. The per-comparison losses are then
weighted:

- ``"comparison"`` (the default): every comparison counts the same (times its group's weight) — what a
  pair trainer does with the comparisons written out as pairs, and with K = 2 exactly today's pair loss;
- ``"group"``: every group counts the same, its loss divided by its number of comparisons (InstructGPT:
  the K(K-1)/2 comparisons of a group are correlated, and counting each would weigh big groups more).

``margin_scale`` > 0 adds the margin ``margin_scale · (score_better − score_worse)`` (off by default)."""

import torch

from .loss import PairwiseRewardOutput, pairwise_reward_loss

WEIGHTINGS = ("comparison", "group")


def comparison_weights(batch, weighting="comparison"):
    """[C] float32 weights of a GroupBatch's comparisons, summing to 1 (see the module docstring)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    g = batch.comparison_group
    w = batch.group_weight.to(torch.float32)[g]
    if weighting == "group":
        per_group = torch.bincount(g, minlength=batch.group_weight.shape[0]).to(torch.float32)
        w = w / per_group[g]
    total = w.sum()
    if not total > 0:
        raise ValueError("the groups of this batch have no weight (group_weight sums to 0)")
    return w / total


def group_reward_loss(hidden, weight, batch, bias=None, weighting="comparison", margin_scale=0.0,
                      center_coef=0.0, backend="auto", check_indices=None) -> PairwiseRewardOutput:
    """The loss of a GroupBatch from hidden states [R, L, D] (or [N, D]) and a value head weight [D].

    Returns PairwiseRewardOutput(loss: scalar, chosen_rewards, rejected_rewards: [C] float32, the better
    and the worse response's reward of each comparison). Gradients reach hidden, weight and bias."""
    margin = None
    if margin_scale:
        margin = batch.score_diff.to(device=hidden.device, dtype=torch.float32) * float(margin_scale)
    out = pairwise_reward_loss(hidden, weight, batch.chosen_index, batch.rejected_index, bias=bias, margin=margin,
                               center_coef=center_coef, reduction="none", backend=backend,
                               check_indices=check_indices)
    w = comparison_weights(batch, weighting).to(out.loss.device)
    return PairwiseRewardOutput((out.loss * w).sum(), out.chosen_rewards, out.rejected_rewards)


def group_forward(model, batch, **kwargs) -> PairwiseRewardOutput:
    """A RewardModel's loss on a GroupBatch (RewardModel.forward dispatches on the batch; kwargs: weighting,
    margin_scale, center_coef, backend, check_indices)."""
    return model(batch, **kwargs)
