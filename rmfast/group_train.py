"""What training on groups (data.kind groups) adds to the engine: the eval metrics over scored eval groups
(rmfast.data.load_data(kind="groups") loads them)."""

import torch


def loader_config(data):
    """The plain DataConfig the pair loader takes (config.DataSection also carries data.kind)."""
    return data.loader_config() if hasattr(data, "loader_config") else data


def eval_part(rewards, batch):
    """What the group eval needs of one scored GroupBatch (CPU tensors, small enough to gather): the
    response rewards, and per comparison the better and worse reward, its group and score difference."""
    from .group_metrics import group_metrics

    where = {int(r): i for i, r in enumerate(batch.response_index.tolist())}
    better = torch.tensor([where[int(r)] for r in batch.chosen_index.tolist()], dtype=torch.long)
    worse = torch.tensor([where[int(r)] for r in batch.rejected_index.tolist()], dtype=torch.long)
    return {"rewards": rewards, "better": rewards[better], "worse": rewards[worse],
            "group": batch.comparison_group.clone(), "score_diff": batch.score_diff.float(),
            "group_weight": batch.group_weight.float(), "metrics": group_metrics(rewards, batch)}


def eval_group_metrics(parts, weighting="comparison", margin_scale=0.0, complete=True):
    """Eval metrics of scored eval batches of groups (_eval_part each): eval_accuracy (the share of
    comparisons in order), eval_top1_accuracy, eval_kendall_tau (mean over groups), eval_loss (the training
    loss's weighting and margin over the whole set), eval_margin (mean better − worse reward) and the reward
    mean / std over every response; eval_pairs counts the comparisons."""
    C = sum(p["metrics"]["comparisons"] for p in parts)
    G = sum(p["metrics"]["groups"] for p in parts)
    loss_sum, weight_sum = 0.0, 0.0
    for p in parts:
        w = p["group_weight"][p["group"]]
        if weighting == "group":
            w = w / torch.bincount(p["group"], minlength=p["group_weight"].shape[0]).float()[p["group"]]
        margin = p["score_diff"] * margin_scale if margin_scale else 0.0
        loss_sum += float((w * torch.nn.functional.softplus(-(p["better"] - p["worse"] - margin))).sum())
        weight_sum += float(w.sum())
    diff = torch.cat([p["better"] - p["worse"] for p in parts])
    rewards = torch.cat([p["rewards"] for p in parts])
    return {
        "eval_pairs": C, "eval_groups": G,
        "eval_loss": loss_sum / weight_sum if complete and weight_sum > 0 else float("nan"),
        "eval_accuracy": sum(p["metrics"]["comparison_accuracy"] * p["metrics"]["comparisons"] for p in parts)
        / max(C, 1),
        "eval_top1_accuracy": sum(p["metrics"]["top1_accuracy"] * p["metrics"]["groups"] for p in parts) / max(G, 1),
        "eval_kendall_tau": sum(p["metrics"]["kendall_tau"] * p["metrics"]["groups"] for p in parts) / max(G, 1),
        "eval_margin": float(diff.mean()),
        "eval_reward_mean": float(rewards.mean()), "eval_reward_std": float(rewards.std()) if rewards.numel() > 1
        else 0.0,
    }
