"""Training metrics: a window of micro-batch results kept on the device until a log step, and the writer
of metrics.jsonl, the experiment trackers (trackers.py) and the log lines a person reads (rank 0)."""

import json
import math
import time

import torch
import torch.distributed as dist

from .trackers import scalars


class Window:
    """Training metrics accumulated over the micro-batches since the last log line. Loss and correct pairs
    stay on the device until reduce(), so adding a micro-batch never waits for the GPU."""

    def __init__(self, device):
        self.device = device
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.float64, device=device)
        self.pairs = self.strict = self.tokens = self.positions = self.batches = self.responses = 0
        self.start = time.perf_counter()

    def add(self, out, batch):
        self.loss += out.loss.detach().double()
        right = out.chosen_rewards.detach() > out.rejected_rewards.detach()
        if batch.tie is not None:  # accuracy is over strict comparisons
            right = right & ~batch.tie
        self.correct += right.sum()
        self.pairs += batch.pairs
        self.strict += batch.pairs - batch.ties
        self.tokens += batch.tokens
        self.positions += batch.positions
        self.batches += 1
        index = getattr(batch, "response_index", None)  # every Batch of rmfast.layouts has it
        self.responses += index.numel() if index is not None else 2 * batch.pairs

    def reduce(self, world):
        """The window's metrics over every rank: one all-reduce of a tensor on the trainer's device (NCCL
        takes device tensors only) and one host sync."""
        counts = torch.tensor([self.pairs, self.strict, self.tokens, self.positions, self.batches, self.responses],
                              dtype=torch.float64, device=self.device)
        t = torch.cat([torch.stack([self.loss, self.correct]), counts])
        if world > 1:
            dist.all_reduce(t)
        loss, correct, pairs, strict, tokens, positions, batches, responses = t.tolist()
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"loss": loss / max(batches, 1), "accuracy": correct / strict if strict else float("nan"),
                "pairs": int(pairs), "tokens": int(tokens), "responses": int(responses),
                "pairs_per_s": pairs / elapsed, "tokens_per_s": tokens / elapsed,
                "responses_per_s": responses / elapsed, "positions_per_pair": positions / max(pairs, 1)}


def json_text(value, **kw):
    """`value` as JSON every reader parses (jq, JavaScript, pandas): a number that is not finite (the accuracy
    of an eval set without comparisons) is written null, not Python's NaN."""
    return json.dumps(_finite(value), allow_nan=False, **kw)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class MetricsLog:
    """Writes metric records (dicts with a "step") to metrics.jsonl under rmfast's keys and to the run's
    experiment trackers (trackers.py) under Hugging Face's names, on rank 0, and prints eval results. Other
    ranks write nothing."""

    def __init__(self, path, rank, log=print, trackers=()):
        self.path = path
        self.rank = rank
        self.log = log
        self.trackers = list(trackers) if rank == 0 else []

    def write(self, record):
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json_text(record) + "\n")
        values = scalars(record)
        if values:
            for tracker in self.trackers:
                tracker.log(record["step"], values)
        if "eval_accuracy" in record:
            ties = (f"  tie accuracy {record['eval_tie_accuracy']:.3f} (ν {record['eval_tie_nu']:.3f})"
                    if "eval_tie_accuracy" in record else "")
            pearson = [(k[len("eval_"):-len("_pearson")], v) for k, v in record.items() if k.endswith("_pearson")]
            attributes = ("  Pearson r " + ", ".join(f"{name} {v:.3f}" for name, v in pearson)) if pearson else ""
            comparisons = (f"  accuracy {record['eval_accuracy']:.3f}  margin {record['eval_margin']:.3f}"
                           if record.get("eval_pairs") or not pearson else "")
            self.log(f"eval at step {record['step']}: loss {record['eval_loss']:.4f}{comparisons}{ties}{attributes}")

    def close(self):
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def train_line(record, total_steps):
    """The plain log line of a training record (logs and CI, where no progress bar is drawn); a window without
    comparisons (attribute rows alone) shows responses/s instead of accuracy and pairs/s."""
    if record["pairs"] or "responses_per_s" not in record:
        what = f"accuracy {record['accuracy']:.3f}  pairs/s {record['pairs_per_s']:.1f}"
    else:
        what = f"responses/s {record['responses_per_s']:.1f}"
    return (f"step {record['step']}/{total_steps}  loss {record['loss']:.4f}  {what}  "
            f"tokens/s {record['tokens_per_s']:.0f}  lr {record['lr']:.2e}")

