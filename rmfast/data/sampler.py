"""Micro-batches of pairs: seeded, resumable from any step, length-grouped, with a fixed number of pairs or
a token budget, and sharded so that every rank takes the same number of steps."""

import numpy as np
from ..errors import UserError

COMBINE = ("sum", "max")


class PairSampler:
    """Yields lists of pair indices (one micro-batch each) for this rank.

    costs: [n] tokens a pair costs in the chosen layout (e.g. len(chosen) + len(rejected) for packed rows).
    combine: how a batch's cost follows from its pairs' — 'sum' (packed layouts) or 'max' (padded: every
        pair pays for the longest; then cost = pairs × max cost).
    pairs_per_batch or token_budget: a fixed number of pairs, or as many as fit in the budget.
    Each epoch: a seeded shuffle, then within windows of ``group_size`` pairs a sort by cost, so a batch
    holds pairs of similar length; then the batches themselves are shuffled. Every rank computes the same
    global list and takes every world_size-th batch; the list is padded by wrapping around (or, with
    drop_last, cut) to a multiple of world_size.
    """

    def __init__(self, costs, *, pairs_per_batch=None, token_budget=None, combine="sum", seed=0, rank=0,
                 world_size=1, shuffle=True, group_by_length=True, group_size=2048, drop_last=False):
        self.costs = np.asarray(costs, dtype=np.int64)
        if self.costs.ndim != 1 or len(self.costs) == 0:
            raise ValueError("costs must be a non-empty 1-D sequence, one per pair")
        if (pairs_per_batch is None) == (token_budget is None):
            raise ValueError("give exactly one of pairs_per_batch and token_budget")
        if pairs_per_batch is not None and pairs_per_batch < 1:
            raise ValueError(f"pairs_per_batch must be ≥ 1, got {pairs_per_batch}")
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {', '.join(COMBINE)}, got {combine!r}")
        if token_budget is not None and self.costs.max() > token_budget:
            worst = int(self.costs.argmax())
            raise UserError(f"pair {worst} alone costs {int(self.costs.max())} tokens, over the token budget of "
                            f"{token_budget}: raise the budget or lower max_length")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.pairs_per_batch = pairs_per_batch
        self.token_budget = token_budget
        self.combine = combine
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.group_size = group_size
        self.drop_last = drop_last
        self.epoch = 0
        self.step = 0
        self._cache = None

    def _split(self, order):
        if self.pairs_per_batch is not None:
            return [order[i:i + self.pairs_per_batch] for i in range(0, len(order), self.pairs_per_batch)]
        batches, current, peak, total = [], [], 0, 0
        for i in order:
            c = int(self.costs[i])
            new_total, new_peak = total + c, max(peak, c)
            cost = new_total if self.combine == "sum" else (len(current) + 1) * new_peak
            if current and cost > self.token_budget:
                batches.append(np.array(current))
                current, total, peak = [], c, c
            else:
                total, peak = new_total, new_peak
            current.append(i)
        if current:
            batches.append(np.array(current))
        return batches

    def global_batches(self, epoch):
        """Every rank's batches for an epoch, before sharding (the same list on every rank)."""
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.costs)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.group_by_length:
            groups = [order[i:i + self.group_size] for i in range(0, n, self.group_size)]
            batches = []
            for g in groups:  # longest first inside a window; stable so ties keep the shuffled order
                batches += self._split(g[np.argsort(-self.costs[g], kind="stable")])
            if self.shuffle:
                batches = [batches[i] for i in rng.permutation(len(batches))]
        else:
            batches = self._split(order)
        return [b.tolist() for b in batches]

    def rank_batches(self, epoch):
        if self._cache is None or self._cache[0] != epoch:
            batches = self.global_batches(epoch)
            w = self.world_size
            if self.drop_last:
                batches = batches[: len(batches) // w * w]
            elif len(batches) % w:
                pad = w - len(batches) % w
                batches = batches + [batches[i % len(batches)] for i in range(pad)]
            self._cache = (epoch, batches[self.rank::w])
        return self._cache[1]

    def __len__(self):
        """Steps per epoch on this rank (the same on every rank)."""
        return len(self.rank_batches(self.epoch))

    def __iter__(self):
        """The rest of the current epoch from the current step; the state advances as batches are taken,
        and moves to the next epoch at the end."""
        batches = self.rank_batches(self.epoch)
        while self.step < len(batches):
            batch = batches[self.step]
            self.step += 1
            yield batch
        self.epoch += 1
        self.step = 0

    def state_dict(self):
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state):
        if state.get("seed", self.seed) != self.seed or state.get("world_size", self.world_size) != self.world_size:
            raise UserError(f"sampler state was saved with seed {state.get('seed')} and world_size "
                            f"{state.get('world_size')}, this sampler has seed {self.seed} and world_size "
                            f"{self.world_size}: resume with the same settings")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
