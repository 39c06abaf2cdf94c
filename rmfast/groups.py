"""Layouts for groups (a prompt with K ranked or scored responses): every comparison in one forward.

- ``prefix_shared_groups``: each group as ``[prompt][r1][r2]…[rK]`` inside packed rows (first-fit, like
  the pair layouts). The prompt is computed once; response i's tokens see the prompt and their own earlier
  tokens only, and their positions restart at the prompt length. As blocks: ``Block(row, prompt start,
  end of r1)`` (prompt + r1, causal, as prefix + chosen in rmfast.layouts.prefix_shared), then
  ``Block(row, q0, q1, prefix=(prompt start, prompt end))`` for each later response, as the rejected suffix
  of a pair. Every attention that reads blocks (dense, segments, varlen) runs it unchanged.
- ``padded_groups``: every response as its own right-padded row ``[prompt + response]``: the reference.

Both give a GroupBatch: chosen_index / rejected_index hold, for every comparison, the flat last-token row
of the better and of the worse response. A response in several comparisons repeats there; the fused op
folds repeated rows (one gradient per row), so each response is still computed and read once."""

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .layouts import Batch, Block, _finish, _first_fit
from .errors import UserError

GROUP_LAYOUTS = ("padded", "prefix_shared")


@dataclass
class GroupBatch(Batch):
    """A Batch of G groups, S responses and C comparisons (C = Batch.pairs), with what the group loss and
    the group metrics need besides the two index vectors ([C] int64 each):
    response_index: [S] int64 flat last-token row of every response, group after group;
    response_group: [S] int64 the group (0..G-1) of each response; response_scores: [S] float32;
    comparison_group: [C] int64 the group of each comparison; score_diff: [C] float32 (better − worse, > 0);
    group_weight: [G] float32 each group's loss weight."""

    response_index: Optional[torch.Tensor] = None
    response_group: Optional[torch.Tensor] = None
    response_scores: Optional[torch.Tensor] = None
    comparison_group: Optional[torch.Tensor] = None
    score_diff: Optional[torch.Tensor] = None
    group_weight: Optional[torch.Tensor] = None

    @property
    def groups(self):
        return self.group_weight.shape[0]


def _as_group_batch(batch, groups, indices, last):
    """`batch` (its rows built) as a GroupBatch whose comparisons read `last`: [S] int64 flat last-token
    rows of the groups' responses, group after group."""
    better, worse, cgroup, diff, rgroup, scores = [], [], [], [], [], []
    offset = 0
    for g, i in enumerate(indices):
        pairs, d = groups.comparisons(i)
        better.append(pairs[:, 0] + offset)
        worse.append(pairs[:, 1] + offset)
        cgroup.append(np.full(len(pairs), g, np.int64))
        diff.append(d)
        K = len(groups.responses[i])
        rgroup.append(np.full(K, g, np.int64))
        scores.append(np.asarray(groups.scores[i], np.float32))
        offset += K
    last = torch.as_tensor(np.asarray(last, np.int64))
    cat = lambda parts: torch.from_numpy(np.concatenate(parts))  # noqa: E731
    better, worse = cat(better), cat(worse)
    fields = {k: v for k, v in batch.__dict__.items() if k != "inputs"}
    fields.update(chosen_index=last[better], rejected_index=last[worse], margin=None)
    return GroupBatch(**fields, response_index=last, response_group=cat(rgroup), response_scores=cat(scores),
                      comparison_group=cat(cgroup), score_diff=cat(diff),
                      group_weight=torch.from_numpy(groups.weight[np.asarray(indices, np.int64)].copy()))


def group_lengths(groups, indices=None):
    """Tokens each group takes in prefix_shared_groups (prompt once, every response once), int64 [n]."""
    indices = range(len(groups)) if indices is None else indices
    return np.array([len(groups.prompt[i]) + sum(len(r) for r in groups.responses[i]) for i in indices], np.int64)


def _check_fits(groups, indices, lengths, capacity):
    worst = int(np.argmax(lengths))
    if lengths[worst] > capacity:
        i = indices[worst]
        K, s = len(groups.responses[i]), len(groups.prompt[i])
        raise UserError(f"group {groups.locations[i]} takes {int(lengths[worst])} tokens (a {s}-token prompt and "
                        f"{K} responses of {int(lengths[worst]) - s} tokens in all) and does not fit a row of "
                        f"max_tokens={capacity}: raise max_tokens (the token budget) to at least "
                        f"{int(lengths[worst])}, or lower data.max_length; groups are never split")


def _place(prompt, responses, row, start):
    """One group laid out from column `start` of `row`: (tokens, positions, blocks, last columns [K])."""
    s, n1 = len(prompt), len(responses[0])
    toks = list(prompt) + list(responses[0])
    pos = list(range(s + n1))
    blocks = [Block(row, start, start + s + n1)]  # prompt + first response: plain causal
    last = [start + s + n1 - 1]
    at = start + s + n1
    for r in responses[1:]:
        toks.extend(r)
        pos.extend(range(s, s + len(r)))  # positions restart at the prompt length
        blocks.append(Block(row, at, at + len(r), (start, start + s)))  # sees the prompt, then itself
        at += len(r)
        last.append(at - 1)
    return toks, pos, blocks, last


def prefix_shared_groups(groups, indices, pad_id, max_tokens=None):
    """Groups `indices` of a TokenizedGroups as [prompt][r1]…[rK] in packed rows of at most max_tokens
    (default: the longest group), first-fit decreasing. Returns a GroupBatch."""
    indices = [int(i) for i in indices]
    lengths = group_lengths(groups, indices)
    capacity = max_tokens or int(lengths.max())
    _check_fits(groups, indices, lengths, capacity)
    rows = _first_fit(lengths.tolist(), capacity)
    rows_tokens, rows_pos, blocks = [], [], []
    last = [None] * len(indices)  # per group: (row, column) of each response's last token
    for r, members in enumerate(rows):
        toks, pos = [], []
        for u in members:
            i = indices[u]
            t, p, b, cols = _place(groups.prompt[i], groups.responses[i], r, len(toks))
            toks += t
            pos += p
            blocks += b
            last[u] = [(r, c) for c in cols]
        rows_tokens.append(toks)
        rows_pos.append(pos)
    flat = [rc for per_group in last for rc in per_group]
    batch = _finish(rows_tokens, rows_pos, blocks, flat, [], pad_id, None, int(lengths.sum()))
    return _as_group_batch(batch, groups, indices, batch.chosen_index)


def padded_groups(groups, indices, pad_id):
    """Groups `indices` with every response as its own right-padded row [prompt + response] ([S, L], group
    after group): what a plain trainer computes, and the reference prefix_shared_groups is tested against."""
    indices = [int(i) for i in indices]
    seqs = [groups.sequence(i, k) for i in indices for k in range(len(groups.responses[i]))]
    lengths = np.array([len(s) for s in seqs], np.int64)
    S, L = len(seqs), int(lengths.max())
    ids = np.full((S, L), pad_id, np.int64)
    mask = np.zeros((S, L), np.int64)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = s
        mask[r, : len(s)] = 1
    last = np.arange(S) * L + lengths - 1  # from lengths: pad ids are never searched for
    empty = torch.zeros(0, dtype=torch.int64)
    batch = Batch(torch.from_numpy(ids), torch.from_numpy(mask), empty, empty, None, None, int(lengths.sum()))
    return _as_group_batch(batch, groups, indices, last)


def make_groups(layout, groups, indices, pad_id, max_tokens=None):
    """A GroupBatch of groups `indices` in `layout` (padded or prefix_shared; max_tokens: packed rows'
    capacity, ignored by padded)."""
    if layout == "padded":
        return padded_groups(groups, indices, pad_id)
    if layout == "prefix_shared":
        return prefix_shared_groups(groups, indices, pad_id, max_tokens)
    raise ValueError(f"unknown layout {layout!r} for groups; use {' or '.join(GROUP_LAYOUTS)}")


def group_costs(groups, layout):
    """Token positions each group costs in `layout` ([n] int64) and how a micro-batch's cost follows from
    its groups' ('sum' packed, 'max' padded): what rmfast.data.sampler.PairSampler takes as costs."""
    if layout == "prefix_shared":
        return group_lengths(groups), "sum"
    if layout == "padded":
        longest = np.array([len(p) + max(len(r) for r in rs) for p, rs in zip(groups.prompt, groups.responses)])
        return groups.sizes * longest, "max"
    raise ValueError(f"unknown layout {layout!r} for groups; use {' or '.join(GROUP_LAYOUTS)}")
