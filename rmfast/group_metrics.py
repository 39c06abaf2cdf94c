"""Evaluation of a reward model on groups: how well its rewards order each group's responses.

- comparison accuracy: the share of comparisons (better, worse) whose better response gets the higher
  reward (a reward tie counts as wrong, as the pair accuracy does);
- top-1 accuracy: the share of groups whose highest-reward response is one of their best-scored ones;
- Kendall τ: per group, the mean over its comparisons of sign(r_better − r_worse) (+1 every comparison
  in order, −1 every one reversed; tied scores give no comparison), then the mean over groups."""

import torch


def group_metrics(rewards, batch):
    """rewards: [S] float, one per response of a GroupBatch in its order (RewardModel.rewards(batch,
    batch.response_index)). Returns {comparisons, groups, comparison_accuracy, top1_accuracy, kendall_tau}
    as Python numbers."""
    rewards = rewards.detach().float().cpu()
    where = {int(r): i for i, r in enumerate(batch.response_index.tolist())}  # flat row → response
    better = torch.tensor([where[int(r)] for r in batch.chosen_index.tolist()], dtype=torch.long)
    worse = torch.tensor([where[int(r)] for r in batch.rejected_index.tolist()], dtype=torch.long)
    sign = torch.sign(rewards[better] - rewards[worse])
    G = batch.group_weight.shape[0]
    g = batch.comparison_group.cpu()
    tau = torch.zeros(G).index_add_(0, g, sign) / torch.bincount(g, minlength=G).clamp_min(1)
    top1 = []
    for k in range(G):
        members = (batch.response_group.cpu() == k).nonzero().flatten()
        scores = batch.response_scores.cpu()[members]
        top1.append(bool(scores[rewards[members].argmax()] == scores.max()))
    return {"comparisons": int(sign.numel()), "groups": G, "comparison_accuracy": float((sign > 0).float().mean()),
            "top1_accuracy": sum(top1) / G, "kendall_tau": float(tau.mean())}
