"""Layouts: how a micro-batch of groups (rmfast.data.tokens.TokenizedGroups; a pair is a group of two)
becomes one backbone forward, every comparison of every group in it.

All layouts meet the loss through the same two index vectors (flat row indices into R·L of each
comparison's better and worse response), so the loss never knows the layout:
- ``padded``: every response as its own row ``[prompt + response]``, padded on the right (or left) to the
  batch's longest sequence: what a plain trainer computes, and the reference. Rows go response by response:
  every group's first response, then every group's second, … (for pairs: the chosen rows, then the rejected
  rows, DeepSpeed-Chat's order);
- ``packed``: every whole sequence ``[prompt + response]`` end to end in rows (taken in the padded rows'
  order), positions restarting at 0;
- ``prefix_shared``: each group as ``[prompt][r1][r2]…[rK]`` inside packed rows: the prompt is computed once;
  response i's tokens see the prompt and their own earlier tokens only, positions restarting at the prompt
  length (for a pair: [shared prefix][chosen suffix][rejected suffix]).
``make`` builds any of them; ``TokenizedGroups.lengths(layout)`` says what a group costs in each.

A response in several comparisons repeats in the index vectors; the fused op folds repeated rows (one
gradient per row), so each response is still computed and read once."""

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .data.groups import tied_pairs
from .errors import UserError

LAYOUTS = ("padded", "packed", "prefix_shared")
WEIGHTINGS = ("comparison", "group")


@dataclass
class Batch:
    """input_ids, attention_mask: [R, L] int64; position_ids: [R, L] or None; chosen_index, rejected_index:
    [C] int64 flat row indices into R·L of each comparison's better and worse response's last token; margin:
    [C] float32 or None (each comparison's margin in the loss); comparison_weight: [C] float32 or None (every
    comparison counts the same). tokens: real tokens in the batch; positions: token positions the forward
    computes (R·L).

    The groups in it: response_index: [S] int64 flat last-token row of every response, group after group;
    response_group: [S] int64 the group (0..G-1) of each response; response_scores: [S] float32;
    better_response, worse_response: [C] int64 each comparison's responses (into the S responses);
    comparison_group: [C] int64; score_diff: [C] float32 (better − worse score, > 0; 0 for a tie);
    group_weight: [G]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    chosen_index: torch.Tensor
    rejected_index: torch.Tensor
    margin: Optional[torch.Tensor] = None
    position_ids: Optional[torch.Tensor] = None
    tokens: int = 0
    blocks: Optional[list] = None  # packed layouts: who attends to what (see Block)
    inputs: Optional[dict] = None  # the backbone's attention inputs, once built (RewardModel.prepare)
    comparison_weight: Optional[torch.Tensor] = None
    response_index: Optional[torch.Tensor] = None
    response_group: Optional[torch.Tensor] = None
    response_scores: Optional[torch.Tensor] = None
    better_response: Optional[torch.Tensor] = None
    worse_response: Optional[torch.Tensor] = None
    comparison_group: Optional[torch.Tensor] = None
    score_diff: Optional[torch.Tensor] = None
    group_weight: Optional[torch.Tensor] = None
    tie: Optional[torch.Tensor] = None  # [C] bool: tied comparisons (the davidson objective), None when none
    ties: int = 0  # how many
    loss_count: int = 0  # a weighted loss's divisor: the comparisons, or the groups with weighting "group"
    response_attributes: Optional[torch.Tensor] = None  # [S, A] float32, NaN where missing (data.attributes)

    @property
    def pairs(self):
        """The number of comparisons (a pair has one)."""
        return self.chosen_index.shape[0]

    @property
    def groups(self):
        return self.group_weight.shape[0]

    @property
    def positions(self):
        return self.input_ids.numel()

    def _map(self, fn):
        return type(self)(**{k: (fn(v) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()
                             if k != "inputs"})

    def to(self, device):
        """The batch on `device` (asynchronous from pinned memory); attention inputs are left to be rebuilt
        there."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self):
        """The batch in page-locked host memory, so that a later to(cuda) overlaps with compute."""
        return self._map(lambda t: t.pin_memory())


# ---------------------------------------------------------------- what the loss reads of the groups


def _objective(batch, groups, indices, last, use_margin=True, margin_scale=0.0, weighting="comparison", ties=False):
    """`batch` (its rows built) with its comparisons: `last` [S] int64 flat last-token rows of the groups'
    responses, group after group. The margin of a comparison: the row's margin column (a pair's, when
    use_margin) plus margin_scale · (score_better − score_worse); its weight: its group's weight, divided by
    the group's number of comparisons with weighting 'group' (see rmfast.objective). ties: the tied response
    pairs of each group are comparisons too (after its strict ones; batch.tie marks them, margin 0)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    better, worse, cgroup, diff, rgroup, scores, tie = [], [], [], [], [], [], []
    offset = 0
    for g, i in enumerate(indices):
        pairs, d = groups.comparisons(i)
        tie.append(np.zeros(len(pairs), bool))
        if ties:
            tied = tied_pairs(groups.scores[i])
            pairs, d = np.concatenate([pairs, tied]), np.concatenate([d, np.zeros(len(tied), np.float32)])
            tie.append(np.ones(len(tied), bool))
        better.append(pairs[:, 0] + offset)
        worse.append(pairs[:, 1] + offset)
        cgroup.append(np.full(len(pairs), g, np.int64))
        diff.append(d)
        K = len(groups.responses[i])
        rgroup.append(np.full(K, g, np.int64))
        scores.append(np.asarray(groups.scores[i], np.float32))
        offset += K
    idx = np.asarray(indices, np.int64)
    better, worse, cgroup = np.concatenate(better), np.concatenate(worse), np.concatenate(cgroup)
    diff = np.concatenate(diff).astype(np.float32)
    tie = np.concatenate(tie)
    margin = None
    column = groups.margin[idx] if use_margin else np.zeros(0)
    if np.isfinite(column).any():
        margin = np.nan_to_num(column, nan=0.0).astype(np.float32)[cgroup]
    if margin_scale:
        margin = (0 if margin is None else margin) + np.float32(margin_scale) * diff
    if margin is not None and tie.any():
        margin = np.where(tie, np.float32(0), margin)
    group_weight = groups.weight[idx].astype(np.float32)
    weight = None
    per = group_weight[cgroup]
    if weighting == "group":
        per = per / np.bincount(cgroup, minlength=len(idx)).astype(np.float32)[cgroup]
    if not np.all(per == 1):
        weight = torch.from_numpy(per.astype(np.float32))
    # what a weighted loss is divided by: the comparisons (or groups), so that a row's weight multiplies its
    # comparisons' share of the loss whatever else the micro-batch holds
    batch.loss_count = len(idx) if weighting == "group" else len(cgroup)
    last = torch.as_tensor(np.asarray(last, np.int64))
    better_t, worse_t = torch.from_numpy(better), torch.from_numpy(worse)
    batch.chosen_index, batch.rejected_index = last[better_t], last[worse_t]
    batch.margin = None if margin is None else torch.from_numpy(np.asarray(margin, np.float32))
    batch.comparison_weight = weight
    batch.response_index = last
    batch.response_group = torch.from_numpy(np.concatenate(rgroup))
    batch.response_scores = torch.from_numpy(np.concatenate(scores))
    batch.better_response, batch.worse_response = better_t, worse_t
    batch.comparison_group = torch.from_numpy(cgroup)
    batch.score_diff = torch.from_numpy(diff)
    batch.group_weight = torch.from_numpy(group_weight)
    batch.tie = torch.from_numpy(tie) if tie.any() else None
    batch.ties = int(tie.sum())
    if groups.attributes is not None:
        batch.response_attributes = torch.from_numpy(np.concatenate(
            [np.asarray(groups.attributes[i], np.float32) for i in indices]).reshape(-1, groups.num_attributes))
    return batch


# ---------------------------------------------------------------- padded


def _by_response(groups, indices):
    """Every response (u: its group's place in `indices`, k) in the order whole-sequence layouts take them:
    every group's first response, then every group's second, … — for pairs, the chosen sequences then the
    rejected ones, the order rmfast's pair layouts always had."""
    sizes = [len(groups.responses[i]) for i in indices]
    return [(u, k) for k in range(max(sizes, default=0)) for u, K in enumerate(sizes) if k < K], sizes


def _group_major(order, sizes, flat):
    """flat[j], the last-token row of response order[j], rearranged group after group (what _objective reads)."""
    start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    out = np.empty(len(order), np.int64)
    for j, (u, k) in enumerate(order):
        out[start[u] + k] = flat[j]
    return out


def padded(groups, indices, pad_id, padding_side="right", pad_to_multiple_of=None, **objective):
    """Groups `indices` with every response as its own row [prompt + response] ([S, L], response by response:
    see _by_response), padded to the longest (to a multiple of pad_to_multiple_of when given). objective:
    use_margin, margin_scale, weighting, ties (see _objective)."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be right or left, got {padding_side!r}")
    indices = [int(i) for i in indices]
    order, sizes = _by_response(groups, indices)
    seqs = [groups.sequence(indices[u], k) for u, k in order]
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    L = int(lengths.max())
    if pad_to_multiple_of:
        L = -(-L // pad_to_multiple_of) * pad_to_multiple_of
    R = len(seqs)
    ids = np.full((R, L), pad_id, dtype=np.int64)
    mask = np.zeros((R, L), dtype=np.int64)
    for r, s in enumerate(seqs):
        if padding_side == "right":
            ids[r, : len(s)] = s
            mask[r, : len(s)] = 1
        else:
            ids[r, L - len(s):] = s
            mask[r, L - len(s):] = 1
    # The last real token of each row, from its length: pad ids are never searched for.
    last_col = lengths - 1 if padding_side == "right" else np.full(R, L - 1)
    last = np.arange(R) * L + last_col
    position_ids = None
    if padding_side == "left":  # positions count from each sequence's first real token
        position_ids = torch.from_numpy(np.clip(np.cumsum(mask, axis=1) - 1, 0, None))
    empty = torch.zeros(0, dtype=torch.int64)
    batch = Batch(torch.from_numpy(ids), torch.from_numpy(mask), empty, empty, None, position_ids,
                  int(lengths.sum()))
    return _objective(batch, groups, indices, _group_major(order, sizes, last), **objective)


# ---------------------------------------------------------------- packed layouts
#
# Both pack units end to end into rows of at most max_tokens (first-fit decreasing) and describe each
# row's attention as blocks: `Block(row, q0, q1, prefix)` says queries [q0, q1) of a row attend, causally
# by position within the block, to themselves and to the key range `prefix` in full. The dense reference
# turns blocks into a 4-D boolean mask; the segment attention runs one small sdpa per block instead.


# max_tokens for "everything in one row": right for segment and flex attention, which pay nothing for long
# rows and so avoid row padding altogether.
ONE_ROW = 10**9


@dataclass
class Block:
    """Queries [q0, q1) of `row` see keys `prefix` (a range [p0, p1) seen in full, or None) plus keys
    [q0, k) for each query k (causal within the block)."""

    row: int
    q0: int
    q1: int
    prefix: Optional[tuple] = None


def _first_fit(lengths, capacity):
    """Rows of unit indices, first-fit decreasing; every unit must fit a row."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows, room = [], []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def _rows(units, capacity, place, pad_id):
    """Units laid out in packed rows: place(unit, row, start) → (tokens, positions, blocks, last columns).
    Returns (Batch with rows and blocks, flat last-token rows of each unit's sequences, unit after unit)."""
    lengths = [len(u[0]) + sum(len(r) for r in u[1]) for u in units]
    rows = _first_fit(lengths, capacity)
    rows_tokens, rows_pos, blocks = [], [], []
    last = [None] * len(units)
    for r, members in enumerate(rows):
        toks, pos = [], []
        for u in members:
            t, p, b, cols = place(units[u], r, len(toks))
            toks += t
            pos += p
            blocks += b
            last[u] = [(r, c) for c in cols]
        rows_tokens.append(toks)
        rows_pos.append(pos)
    L = max(len(t) for t in rows_tokens)
    R = len(rows_tokens)
    ids = np.full((R, L), pad_id or 0, dtype=np.int64)
    pos = np.zeros((R, L), dtype=np.int64)
    used = np.zeros((R, L), dtype=np.int64)
    for r, (t, p) in enumerate(zip(rows_tokens, rows_pos)):
        ids[r, : len(t)] = t
        pos[r, : len(p)] = p
        used[r, : len(t)] = 1
    flat = np.array([r * L + c for per_unit in last for r, c in per_unit], dtype=np.int64)
    empty = torch.zeros(0, dtype=torch.int64)
    batch = Batch(torch.from_numpy(ids), torch.from_numpy(used), empty, empty, None, torch.from_numpy(pos),
                  int(sum(lengths)), blocks)
    return batch, flat


def _place_group(unit, row, start):
    """One group [prompt][r1]…[rK] from column `start` of `row`: (tokens, positions, blocks, last columns)."""
    prompt, responses = unit
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


def _place_sequence(unit, row, start):
    """One whole sequence from column `start` of `row`, positions from 0, seeing only itself."""
    seq = unit[1][0]
    n = len(seq)
    return list(seq), list(range(n)), [Block(row, start, start + n)], [start + n - 1]


def _capacity(lengths, max_tokens, what, hint):
    longest = int(max(lengths))
    capacity = max_tokens or longest
    if longest > capacity:
        raise UserError(f"{what(int(np.argmax(lengths)))} takes {longest} tokens and does not fit a row of "
                        f"max_tokens={capacity}: raise max_tokens (the token budget) to at least {longest}, or "
                        f"lower data.max_length; {hint}")
    return capacity


def pack_sequences(seqs, pad_id, max_tokens=None):
    """Sequences laid end to end in rows of at most max_tokens (default: the longest sequence); positions
    restart at 0 for each, which sees only its own earlier tokens. The Batch's response_index holds every
    sequence's flat last-token row, in their order (no comparisons: single sequences are scored)."""
    units = [((), [s]) for s in seqs]
    capacity = _capacity([len(s) for s in seqs], max_tokens, lambda i: f"a sequence of {len(seqs[i])} tokens",
                         "sequences are never split")
    batch, last = _rows(units, capacity, _place_sequence, pad_id)
    batch.response_index = torch.from_numpy(last)
    return batch


def packed(groups, indices, pad_id, max_tokens=None, **objective):
    """Every whole sequence [prompt + response] of the groups, packed (each response its own sequence, taken
    response by response as padded's rows, first-fit decreasing)."""
    indices = [int(i) for i in indices]
    order, sizes = _by_response(groups, indices)
    seqs = [groups.sequence(indices[u], k) for u, k in order]
    units = [((), [s]) for s in seqs]
    capacity = _capacity([len(s) for s in seqs], max_tokens, lambda i: f"a sequence of {len(seqs[i])} tokens",
                         "sequences are never split")
    batch, last = _rows(units, capacity, _place_sequence, pad_id)
    return _objective(batch, groups, indices, _group_major(order, sizes, last), **objective)


def prefix_shared(groups, indices, pad_id, max_tokens=None, **objective):
    """Groups `indices` as [prompt][r1]…[rK] in packed rows of at most max_tokens (default: the longest
    group), first-fit decreasing."""
    indices = [int(i) for i in indices]
    units = [(groups.prompt[i], groups.responses[i]) for i in indices]

    def what(u):
        i = indices[u]
        K, s = len(groups.responses[i]), len(groups.prompt[i])
        return f"group {groups.locations[i]} (a {s}-token prompt and {K} responses)"

    capacity = _capacity(groups.lengths("prefix_shared", indices) if len(indices) else [0], max_tokens, what,
                         "groups are never split")
    batch, last = _rows(units, capacity, _place_group, pad_id)
    return _objective(batch, groups, indices, last, **objective)


def dense_mask(batch):
    """The blocks of a packed batch as a 4-D boolean mask [R, 1, L, L] (True: may attend), for sdpa.
    Padding tokens attend to themselves only, so that no softmax row is empty."""
    R, L = batch.input_ids.shape
    mask = torch.zeros(R, 1, L, L, dtype=torch.bool)
    for b in batch.blocks:
        n = b.q1 - b.q0
        mask[b.row, 0, b.q0:b.q1, b.q0:b.q1] = torch.ones(n, n, dtype=torch.bool).tril()
        if b.prefix is not None:
            mask[b.row, 0, b.q0:b.q1, b.prefix[0]:b.prefix[1]] = True
    idle = ~batch.attention_mask.bool()
    rows, cols = idle.nonzero(as_tuple=True)
    mask[rows, 0, cols, cols] = True
    return mask


def make(layout, groups, indices, pad_id, max_tokens=None, **objective):
    """A Batch of groups `indices` in `layout` (padded, packed or prefix_shared); max_tokens: packed rows'
    capacity (ignored by padded); objective: use_margin, margin_scale, weighting, ties (see _objective)."""
    if layout == "padded":
        return padded(groups, indices, pad_id, **objective)
    build = {"packed": packed, "prefix_shared": prefix_shared}.get(layout)
    if build is None:
        raise ValueError(f"unknown layout {layout!r}; use padded, packed or prefix_shared")
    return build(groups, indices, pad_id, max_tokens=max_tokens, **objective)


def costs(groups, layout):
    """Token positions each group costs in `layout` ([n] int64) and how a micro-batch's cost follows from its
    groups' costs: 'sum' (packed layouts) or 'max' (padded: every row pays for the longest): what
    rmfast.data.sampler.PairSampler takes."""
    return groups.lengths(layout), ("max" if layout == "padded" else "sum")
