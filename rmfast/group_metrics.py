"""Evaluation of a reward model on groups: how well its rewards order each group's responses.

- comparison accuracy: the share of comparisons (better, worse) whose better response gets the higher
  reward (a reward tie counts as wrong, as the pair accuracy does);
- top-1 accuracy: the share of groups whose highest-reward response is one of their best-scored ones;
- Kendall τ: per group, the mean over its comparisons of sign(r_better − r_worse) (+1 every comparison
  in order, −1 every one reversed; tied scores give no comparison), then the mean over groups;
- best-of-N credit (RewardBench 2's accuracy): per group, the chance that picking uniformly among the
  responses tied at the highest reward picks a best-scored one (1 / the number tied at the maximum when
  one best-scored response is among them; 0 when none is).

Groups without any comparison (every score equal) have none of these."""

import numpy as np

from .data.groups import comparisons


def rank_metrics(rewards, scores):
    """The metrics of one group: rewards and scores, [K] each (higher is better for both). Returns
    {comparisons, correct, kendall_tau, top1, best_of_n}, or None when the scores give no comparison."""
    rewards, scores = np.asarray(rewards, np.float64), np.asarray(scores, np.float64)
    pairs, _, _ = comparisons(scores)
    if len(pairs) == 0:
        return None
    sign = np.sign(rewards[pairs[:, 0]] - rewards[pairs[:, 1]])
    best = scores == scores.max()
    tied = rewards == rewards.max()
    return {"comparisons": len(pairs), "correct": int((sign > 0).sum()), "kendall_tau": float(sign.mean()),
            "top1": bool(best[int(np.argmax(rewards))]), "best_of_n": float(best[tied].sum() / tied.sum())}


def summarize(per_group):
    """Metrics over groups from rank_metrics' results (None entries skipped): comparisons, groups,
    comparison_accuracy, top1_accuracy, kendall_tau, best_of_n (means over groups; accuracy over
    comparisons)."""
    per_group = [m for m in per_group if m is not None]
    C, G = sum(m["comparisons"] for m in per_group), len(per_group)
    if G == 0:
        return {"comparisons": 0, "groups": 0}
    mean = lambda key: float(np.mean([float(m[key]) for m in per_group]))  # noqa: E731
    return {"comparisons": C, "groups": G, "comparison_accuracy": sum(m["correct"] for m in per_group) / C,
            "top1_accuracy": mean("top1"), "kendall_tau": mean("kendall_tau"), "best_of_n": mean("best_of_n")}


def group_metrics(rewards, batch):
    """rewards: [S] float, one per response of a Batch (rmfast.layouts) in its order (RewardModel.rewards(batch,
    batch.response_index)). Returns {comparisons, groups, comparison_accuracy, top1_accuracy, kendall_tau,
    best_of_n} as Python numbers over the groups that have a strict comparison."""
    rewards = rewards.detach().float().cpu().numpy()
    which = batch.response_group.cpu().numpy()
    scores = batch.response_scores.cpu().numpy()
    G = batch.group_weight.shape[0]
    return summarize([rank_metrics(rewards[which == k], scores[which == k]) for k in range(G)])

