"""The training objective over a batch of groups (a pair is a group of two): the Bradley–Terry loss of every
comparison (better, worse) through the fused pairwise op, each with its margin and weight.

The batch carries both, built on the host by the layout (rmfast.layouts._objective):
- a comparison's margin: the row's margin column (a pair's), plus ``margin_scale · (score_better −
  score_worse)`` when margin_scale > 0;
- a comparison's weight: its group's weight; with ``weighting="group"`` divided by its group's number of
  comparisons (InstructGPT: the K(K-1)/2 comparisons of a group are correlated, and counting each would weigh
  big groups more). With every weight 1 (pairs, and groups by default) the loss is the op's own mean.

Responses in several comparisons are rows the op gathers more than once and folds (one gradient per row)."""

from .layouts import WEIGHTINGS  # noqa: F401  (re-exported)
from .loss import PairwiseRewardOutput, pairwise_reward_loss


def reward_loss(hidden, weight, batch, bias=None, center_coef=0.0, backend="auto",
                check_indices=None) -> PairwiseRewardOutput:
    """The loss of a Batch from hidden states [R, L, D] (or [N, D]) and a value head weight [D].

    Returns PairwiseRewardOutput(loss: scalar, chosen_rewards, rejected_rewards: [C] float32, the better and
    the worse response's reward of each comparison). Gradients reach hidden, weight and bias."""
    w = batch.comparison_weight
    if w is None:
        return pairwise_reward_loss(hidden, weight, batch.chosen_index, batch.rejected_index, bias=bias,
                                    margin=batch.margin, center_coef=center_coef, backend=backend,
                                    check_indices=check_indices)
    out = pairwise_reward_loss(hidden, weight, batch.chosen_index, batch.rejected_index, bias=bias,
                               margin=batch.margin, center_coef=center_coef, reduction="none", backend=backend,
                               check_indices=check_indices)
    w = w.to(device=out.loss.device, dtype=out.loss.dtype)
    return PairwiseRewardOutput((out.loss * w).sum() / w.sum(), out.chosen_rewards, out.rejected_rewards)
