"""Evaluation during training: every response of every eval group scored (a pair is a group of two),
sharded over the ranks and gathered back in dataset order, then the eval metrics over all of them.

Metrics (eval_*): pairs (the number of comparisons), loss (the training objective with its margins and
weights, without the centering term: Σ weight · loss / Σ weight over the set), accuracy (the share of strict
comparisons whose better response gets the higher reward), margin (the mean better − worse reward), chosen /
rejected mean and std (the better and the worse side of every strict comparison), reward mean and std (over
every response: what an export's normalisation reads), groups (those with a strict comparison),
top1_accuracy and kendall_tau (rmfast.group_metrics, means over those groups). With ties (the davidson
objective): ties (tied comparisons), tie_accuracy (over every comparison, ties included: the outcome
Davidson's model finds likeliest, a tie when |r_b − r_w| < 2 log ν) and tie_nu. With attributes (the regression
objectives): NAME_rmse and NAME_pearson of each attribute over the responses that have a value for it, and
attribute_values (how many values there were); the loss is the objective's (the masked mean squared error, plus
the Bradley–Terry loss for regression+bradley_terry)."""

import torch
import torch.distributed as dist

from . import reference
from .group_metrics import group_metrics
from .objective import davidson_terms, plackett_luce_terms, tie_threshold


def eval_part(rewards, batch, attributes=None):
    """What the eval keeps of one scored Batch (CPU tensors, small enough to gather): every response's reward
    and, per comparison, the better and the worse reward, its margin and weight, and the batch's ranking
    metrics; with attributes ([S, A] predicted), those, the data's and each response's weight."""
    C = batch.better_response.shape[0]
    extra = {}
    if attributes is not None:
        extra = {"attributes": attributes, "target": batch.response_attributes.float(),
                 "response_weight": batch.group_weight.float()[batch.response_group]}
    margin = batch.margin.float() if batch.margin is not None else torch.zeros(C)
    weight = batch.comparison_weight.float() if batch.comparison_weight is not None else torch.ones(C)
    tie = batch.tie if batch.tie is not None else torch.zeros(C, dtype=torch.bool)
    return {"rewards": rewards, "better": rewards[batch.better_response], "worse": rewards[batch.worse_response],
            "margin": margin, "weight": weight, "tie": tie, "group": batch.response_group,
            "scores": batch.response_scores, "group_weight": batch.group_weight.float(),
            "metrics": group_metrics(rewards, batch), **extra}


def _std(x):
    return float(x.std()) if x.numel() > 1 else 0.0


def _attribute_metrics(parts, names):
    """(the weighted masked mean squared error, {eval_NAME_rmse, eval_NAME_pearson, eval_attribute_values})."""
    pred = torch.cat([p["attributes"] for p in parts]).double()
    target = torch.cat([p["target"] for p in parts]).double()
    weight = torch.cat([p["response_weight"] for p in parts]).double()
    sq, n = reference.masked_square_error(pred, target)
    count = float((weight * n).sum())
    mse = float((weight * sq).sum()) / count if count else float("nan")
    out = {"eval_attribute_values": int(n.sum())}
    for a, name in enumerate(names):
        have = torch.isfinite(target[:, a])
        x, y = pred[have, a], target[have, a]
        out[f"eval_{name}_rmse"] = float((x - y).square().mean().sqrt()) if len(x) else float("nan")
        ok = len(x) > 1 and float(x.std()) > 0 and float(y.std()) > 0
        out[f"eval_{name}_pearson"] = float(torch.corrcoef(torch.stack([x, y]))[0, 1]) if ok else float("nan")
    return mse, out


def _loss(parts, objective, log_nu):
    """The objective's loss over the whole eval set (its weights; no centering term)."""
    if objective == "plackett_luce":
        total = weights = 0.0
        for p in parts:
            G = p["group_weight"].shape[0]
            per_group = plackett_luce_terms(p["rewards"].double(), p["group"], p["scores"], G)
            total += float((per_group * p["group_weight"].double()).sum())
            weights += float(p["group_weight"].sum())
        return total / weights if weights else float("nan")
    better, worse = torch.cat([p["better"] for p in parts]).double(), torch.cat([p["worse"] for p in parts]).double()
    margin, weight = torch.cat([p["margin"] for p in parts]).double(), torch.cat([p["weight"] for p in parts]).double()
    if objective == "davidson":
        per = davidson_terms(better, worse, log_nu, margin, torch.cat([p["tie"] for p in parts]))
    else:
        per = torch.nn.functional.softplus(-(better - worse - margin))
    return float((per * weight).sum() / weight.sum()) if len(per) else float("nan")


def eval_metrics(parts, objective="bradley_terry", log_nu=0.0, attributes=()):
    """The eval record (see the module docstring) of scored eval batches (eval_part each); attributes: the
    attribute names (the regression objectives)."""
    better, worse = torch.cat([p["better"] for p in parts]), torch.cat([p["worse"] for p in parts])
    tie = torch.cat([p["tie"] for p in parts])
    rewards = torch.cat([p["rewards"] for p in parts])
    diff = better - worse
    strict, sb, sw = diff[~tie], better[~tie], worse[~tie]  # a tie's two sides are in no order
    C = int(diff.numel())
    G = sum(p["metrics"]["groups"] for p in parts)  # groups with a strict comparison
    nan = float("nan")
    over_groups = lambda key: sum(p["metrics"].get(key, 0.0) * p["metrics"]["groups"] for p in parts) / max(G, 1)  # noqa: E731
    record = {
        "eval_pairs": C,
        "eval_loss": _loss(parts, objective, log_nu) if C else nan,
        "eval_accuracy": float((strict > 0).float().mean()) if len(strict) else nan,
        "eval_margin": float(strict.mean()) if len(strict) else nan,
        "eval_chosen_mean": float(sb.mean()) if len(sb) else nan, "eval_chosen_std": _std(sb),
        "eval_rejected_mean": float(sw.mean()) if len(sw) else nan, "eval_rejected_std": _std(sw),
        "eval_reward_mean": float(rewards.mean()), "eval_reward_std": _std(rewards),
        "eval_groups": G,
        "eval_top1_accuracy": over_groups("top1_accuracy"),
        "eval_kendall_tau": over_groups("kendall_tau"),
    }
    if attributes:
        mse, per_attribute = _attribute_metrics(parts, attributes)
        pairwise = record["eval_loss"] if objective == "regression+bradley_terry" and C else 0.0
        record.update(eval_loss=mse + pairwise, **per_attribute)
    if objective == "davidson":
        threshold = tie_threshold(log_nu)
        called_tie = diff.abs() < threshold
        right = torch.where(tie, called_tie, ~called_tie & (diff > 0))
        record.update(eval_ties=int(tie.sum()), eval_tie_accuracy=float(right.float().mean()) if C else float("nan"),
                      eval_tie_nu=float(torch.tensor(float(log_nu)).exp()))
    return record


class Evaluator:
    """The eval set of a run, scored through `engine` (the DeepSpeed engine, so that ZeRO-3 gathers the
    weights) in micro-batches of `batch_size` groups built by make_batch(data, indices): each rank takes every
    world-th one and every rank runs the same number of forwards (ZeRO-3 needs it; the padding ones are not
    kept). Calling it returns the eval record."""

    def __init__(self, data, engine, make_batch, batch_size, rank=0, world=1, objective="bradley_terry",
                 log_nu=lambda: 0.0, attributes=()):
        self.data, self.engine, self.make_batch = data, engine, make_batch
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.objective, self.log_nu, self.attributes = objective, log_nu, list(attributes)

    def _score(self, batch):
        if not self.attributes:
            rewards = self.engine(batch, rewards_at=batch.response_index).float().cpu()
            return eval_part(rewards, batch._map(torch.Tensor.cpu))
        attributes = self.engine(batch, attributes_at=batch.response_index).float().cpu()
        combination = getattr(self.engine, "module", self.engine).head.combination.float().cpu()
        return eval_part(attributes @ combination, batch._map(torch.Tensor.cpu), attributes)

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
        log_nu = self.log_nu()  # on every rank (a ZeRO-3 gather)
        return eval_metrics(self.parts(), self.objective, log_nu, self.attributes)
