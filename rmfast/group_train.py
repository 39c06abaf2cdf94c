"""What training on groups (data.kind groups) adds to the engine: loading group sources with an eval split
and source weights, their report lines, and the eval metrics over scored eval groups."""

import numpy as np
import torch


def data_kind(config):
    """'pairs' or 'groups' (a Config built with a plain DataConfig holds pairs)."""
    return getattr(config.data, "kind", "pairs")


def loader_config(data):
    """The plain DataConfig the pair loader takes (config.DataSection also carries data.kind)."""
    return data.loader_config() if hasattr(data, "loader_config") else data


def load_group_data(data, tokenizer):
    """Train and eval groups for a DataConfig (rmfast.data.group_tokens.load_groups per source; eval from
    data.eval, else a seeded data.eval_fraction of each train source; source weights as for pairs). Returns
    (train TokenizedGroups, eval or None, DataReport, GroupCounts summed over the sources). Not cached."""
    from .data import DataError, DataReport
    from .data.group_tokens import GroupCounts, TokenizedGroups, load_groups
    from .data.loader import Source

    if not data.train:
        raise ValueError("no training data: give at least one source (a file, folder, datasets dir or hub name)")
    rng = np.random.default_rng(data.seed)
    report, counts = DataReport(cached=False), GroupCounts()

    def load(spec):
        groups, rep, c = load_groups(spec, tokenizer, data)
        report.merge(rep)
        for name in ("groups", "comparisons", "ties", "merged", "truncated", "dropped_responses_too_long"):
            setattr(counts, name, getattr(counts, name) + getattr(c, name))
        for reason, n in c.dropped.items():
            counts.dropped[reason] = counts.dropped.get(reason, 0) + n
        return groups

    train_parts, eval_parts = [], []
    for spec in data.train:
        source = Source.parse(spec)
        groups = load(spec)
        if data.eval_fraction and not data.eval:
            order = rng.permutation(len(groups))
            n_eval = int(round(data.eval_fraction * len(groups)))
            eval_parts.append(groups.subset(np.sort(order[:n_eval])))
            groups = groups.subset(np.sort(order[n_eval:]))
        if source.weight < 0:
            raise ValueError(f"a source weight must be ≥ 0, got {source.weight}")
        whole, frac = int(source.weight), source.weight - int(source.weight)
        idx = [np.arange(len(groups))] * whole
        if frac > 0:
            idx.append(np.sort(rng.permutation(len(groups))[: int(round(frac * len(groups)))]))
        train_parts.append(groups.subset(np.concatenate(idx) if idx else np.zeros(0, np.int64)))
    for spec in data.eval:
        eval_parts.append(load(spec))
    train = TokenizedGroups.concat(train_parts)
    if len(train) == 0:
        raise DataError("no training groups left after validation and the length policy:\n"
                        + "\n".join(report.lines()))
    return train, (TokenizedGroups.concat(eval_parts) if eval_parts else None), report, counts


def group_report_lines(report, counts):
    """The data report of group sources: the pair report's lines (its pairs are the comparisons), then what
    the groups hold."""
    lines = report.lines()
    lines.insert(1, f"{counts.groups} groups, {counts.comparisons} comparisons; {counts.ties} tied response "
                    f"pairs (no comparison), {counts.merged} identical responses merged, "
                    f"{counts.dropped_responses_too_long} responses dropped as too long")
    return lines


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
