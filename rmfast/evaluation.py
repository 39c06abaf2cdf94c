"""Evaluation during training: every response of every eval group scored (a pair is a group of two),
sharded over the ranks and gathered back in dataset order, then the eval metrics over all of them.

Metrics (eval_*): pairs (the number of comparisons), loss (the training objective's margins and weights,
without the centering term), accuracy (the share of comparisons whose better response gets the higher
reward), margin (the mean better − worse reward), chosen / rejected mean and std (the better and the worse
side of every comparison), reward mean and std (over every response: what an export's normalisation
reads), groups, top1_accuracy and kendall_tau (rmfast.group_metrics, means over groups)."""

import torch
import torch.distributed as dist

from .group_metrics import group_metrics


def eval_part(rewards, batch):
    """What the eval keeps of one scored Batch (CPU tensors, small enough to gather): every response's reward
    and, per comparison, the better and the worse reward, its margin and weight, and the batch's ranking
    metrics."""
    C = batch.better_response.shape[0]
    margin = batch.margin.float() if batch.margin is not None else torch.zeros(C)
    weight = batch.comparison_weight.float() if batch.comparison_weight is not None else torch.ones(C)
    return {"rewards": rewards, "better": rewards[batch.better_response], "worse": rewards[batch.worse_response],
            "margin": margin, "weight": weight, "metrics": group_metrics(rewards, batch)}


def _std(x):
    return float(x.std()) if x.numel() > 1 else 0.0


def eval_metrics(parts):
    """The eval record (see the module docstring) of scored eval batches (eval_part each)."""
    better, worse = torch.cat([p["better"] for p in parts]), torch.cat([p["worse"] for p in parts])
    margin, weight = torch.cat([p["margin"] for p in parts]), torch.cat([p["weight"] for p in parts])
    rewards = torch.cat([p["rewards"] for p in parts])
    diff = better - worse
    C = int(diff.numel())
    G = sum(p["metrics"]["groups"] for p in parts)
    losses = torch.nn.functional.softplus(-(diff - margin))
    return {
        "eval_pairs": C,
        "eval_loss": float((losses * weight).sum() / weight.sum()) if C else float("nan"),
        "eval_accuracy": float((diff > 0).float().mean()) if C else float("nan"),
        "eval_margin": float(diff.mean()) if C else float("nan"),
        "eval_chosen_mean": float(better.mean()), "eval_chosen_std": _std(better),
        "eval_rejected_mean": float(worse.mean()), "eval_rejected_std": _std(worse),
        "eval_reward_mean": float(rewards.mean()), "eval_reward_std": _std(rewards),
        "eval_groups": G,
        "eval_top1_accuracy": sum(p["metrics"]["top1_accuracy"] * p["metrics"]["groups"] for p in parts) / max(G, 1),
        "eval_kendall_tau": sum(p["metrics"]["kendall_tau"] * p["metrics"]["groups"] for p in parts) / max(G, 1),
    }


class Evaluator:
    """The eval set of a run, scored through `engine` (the DeepSpeed engine, so that ZeRO-3 gathers the
    weights) in micro-batches of `batch_size` groups built by make_batch(data, indices): each rank takes every
    world-th one and every rank runs the same number of forwards (ZeRO-3 needs it; the padding ones are not
    kept). Calling it returns the eval record."""

    def __init__(self, data, engine, make_batch, batch_size, rank=0, world=1):
        self.data, self.engine, self.make_batch = data, engine, make_batch
        self.batch_size, self.rank, self.world = batch_size, rank, world

    def _score(self, batch):
        rewards = self.engine(batch, rewards_at=batch.response_index).float().cpu()
        return eval_part(rewards, batch._map(torch.Tensor.cpu))

    def parts(self):
        """eval_part of every eval micro-batch, gathered from all ranks in dataset order."""
        n, size = len(self.data), self.batch_size
        batches = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
        rounds = -(-len(batches) // self.world) * self.world
        parts = []
        was_training = self.engine.training
        self.engine.eval()
        try:
            for k in range(self.rank, rounds, self.world):
                out = self._score(self.make_batch(self.data, batches[k % len(batches)]))
                if k < len(batches):
                    parts.append(out)
        finally:
            self.engine.train(was_training)
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, parts)
            # rank r scored batches r, r + world, …: put them back in dataset order
            order = sorted(((r + j * self.world, p) for r, g in enumerate(gathered) for j, p in enumerate(g)),
                           key=lambda kp: kp[0])
            parts = [p for _, p in order]
        return parts

    @torch.no_grad()
    def __call__(self):
        return eval_metrics(self.parts())
