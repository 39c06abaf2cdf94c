"""Layouts: how a micro-batch of tokenized pairs becomes one backbone forward.

All layouts meet the fused loss through the same two index vectors (flat row indices into R·L), so the
loss never knows the layout:
- ``padded``: [2P, L], chosen rows first then rejected rows (DeepSpeed-Chat's order), padded on the right
  (or left) to the batch's longest sequence;
- ``packed``: every sequence end to end in rows, positions restarting at 0 for each;
- ``prefix_shared``: each pair as [shared prefix][chosen suffix][rejected suffix], the prefix computed once.
``make`` builds any of them, ``pair_costs`` says what a pair costs in each."""

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from .errors import UserError


@dataclass
class Batch:
    """input_ids, attention_mask: [R, L] int64; position_ids: [R, L] or None; chosen_index, rejected_index:
    [P] int64 flat row indices into R·L; margin: [P] float32 or None. tokens: real tokens in the batch;
    positions: token positions the forward computes (R·L)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    chosen_index: torch.Tensor
    rejected_index: torch.Tensor
    margin: Optional[torch.Tensor] = None
    position_ids: Optional[torch.Tensor] = None
    tokens: int = 0
    blocks: Optional[list] = None  # packed layouts: who attends to what (see Block)
    inputs: Optional[dict] = None  # the backbone's attention inputs, once built (RewardModel.prepare)

    @property
    def pairs(self):
        return self.chosen_index.shape[0]

    @property
    def positions(self):
        return self.input_ids.numel()

    def _map(self, fn):
        # type(self): a subclass (rmfast.groups.GroupBatch) keeps its own fields through to() / pin_memory()
        return type(self)(**{k: (fn(v) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()
                             if k != "inputs"})

    def to(self, device):
        """The batch on `device` (asynchronous from pinned memory); attention inputs are left to be rebuilt
        there."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self):
        """The batch in page-locked host memory, so that a later to(cuda) overlaps with compute."""
        return self._map(lambda t: t.pin_memory())


def padded(pairs, indices, pad_id, padding_side="right", pad_to_multiple_of=None, use_margin=True):
    """Pairs ``indices`` of a TokenizedPairs as [2P, L]: chosen rows then rejected rows."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be right or left, got {padding_side!r}")
    seqs = [pairs.chosen[i] for i in indices] + [pairs.rejected[i] for i in indices]
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
    P = len(indices)
    margin = _margin(pairs, indices, use_margin)
    position_ids = None
    if padding_side == "left":  # positions count from each sequence's first real token
        position_ids = torch.from_numpy(np.clip(np.cumsum(mask, axis=1) - 1, 0, None))
    return Batch(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(last[:P]),
                 torch.from_numpy(last[P:]), margin, position_ids, int(lengths.sum()))


# ---------------------------------------------------------------- packed layouts
#
# Both pack units end to end into rows of at most max_tokens (first-fit decreasing) and describe each
# row's attention as blocks: `Block(row, q0, q1, k_ranges)` says queries [q0, q1) of a row attend, causally
# by position within the block, to the key ranges listed. The dense reference turns blocks into a 4-D
# boolean mask; the segment attention runs one small sdpa per block instead.


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


def _check_capacity(longest, max_tokens, what):
    if max_tokens is not None and longest > max_tokens:
        raise UserError(f"a {what} of {longest} tokens does not fit max_tokens={max_tokens}; raise it to at "
                        f"least data.max_length (×2 for prefix_shared pairs)")


def _finish(rows_tokens, rows_pos, blocks, chosen_flat, rejected_flat, pad_id, margin, tokens):
    """Pad rows to a common length L and make flat indices absolute."""
    L = max(len(t) for t in rows_tokens)
    R = len(rows_tokens)
    ids = np.full((R, L), pad_id, dtype=np.int64)
    pos = np.zeros((R, L), dtype=np.int64)
    used = np.zeros((R, L), dtype=np.int64)
    for r, (t, p) in enumerate(zip(rows_tokens, rows_pos)):
        ids[r, : len(t)] = t
        pos[r, : len(p)] = p
        used[r, : len(t)] = 1
    chosen = np.array([r * L + c for r, c in chosen_flat], dtype=np.int64)
    rejected = np.array([r * L + c for r, c in rejected_flat], dtype=np.int64)
    return Batch(torch.from_numpy(ids), torch.from_numpy(used), torch.from_numpy(chosen),
                 torch.from_numpy(rejected), margin, torch.from_numpy(pos), tokens, blocks)


def _margin(pairs, indices, use_margin):
    if not use_margin:
        return None
    m = pairs.margin[np.asarray(indices)]
    return torch.from_numpy(np.nan_to_num(m, nan=0.0).astype(np.float32)) if np.isfinite(m).any() else None


def pack_sequences(seqs, pad_id, max_tokens=None):
    """Sequences laid end to end in rows of at most max_tokens (default: the longest sequence); positions
    restart at 0 for each, which sees only its own earlier tokens. chosen_index holds every sequence's
    last-token index (rejected_index is empty)."""
    lengths = [len(s) for s in seqs]
    capacity = max_tokens or max(lengths)
    _check_capacity(max(lengths), capacity, "sequence")
    rows = _first_fit(lengths, capacity)
    rows_tokens, rows_pos, blocks = [], [], []
    last = [None] * len(seqs)
    for r, members in enumerate(rows):
        toks, pos, start = [], [], 0
        for i in members:
            n = lengths[i]
            toks.extend(seqs[i])
            pos.extend(range(n))
            blocks.append(Block(r, start, start + n))
            last[i] = (r, start + n - 1)
            start += n
        rows_tokens.append(toks)
        rows_pos.append(pos)
    return _finish(rows_tokens, rows_pos, blocks, last, [], pad_id, None, sum(lengths))


def packed(pairs, indices, pad_id, max_tokens=None, use_margin=True):
    """Every chosen and rejected sequence of the pairs, packed (see pack_sequences)."""
    seqs = [pairs.chosen[i] for i in indices] + [pairs.rejected[i] for i in indices]
    batch = pack_sequences(seqs, pad_id, max_tokens)
    P = len(indices)
    last = batch.chosen_index
    batch.chosen_index, batch.rejected_index = last[:P].clone(), last[P:].clone()
    batch.margin = _margin(pairs, indices, use_margin)
    return batch


def prefix_shared(pairs, indices, pad_id, max_tokens=None, use_margin=True):
    """Each pair as [shared prefix][chosen suffix][rejected suffix] inside a packed row: the prefix is
    computed once; rejected-suffix tokens see the prefix and their own earlier tokens, never the chosen
    suffix, and their positions restart at the prefix length."""
    units = []
    for i in indices:
        c, r, s = pairs.chosen[i], pairs.rejected[i], int(pairs.shared[i])
        units.append((c[:s], c[s:], r[s:]))
    lengths = [len(p) + len(c) + len(r) for p, c, r in units]
    capacity = max_tokens or max(lengths)
    _check_capacity(max(lengths), capacity, "pair")
    rows = _first_fit(lengths, capacity)
    rows_tokens, rows_pos, blocks = [], [], []
    chosen_last, rejected_last = [None] * len(units), [None] * len(units)
    for r, members in enumerate(rows):
        toks, pos, start = [], [], 0
        for u in members:
            prefix, cs, rs = units[u]
            s, nc, nr = len(prefix), len(cs), len(rs)
            toks.extend(prefix)
            toks.extend(cs)
            toks.extend(rs)
            pos.extend(range(s + nc))
            pos.extend(range(s, s + nr))
            blocks.append(Block(r, start, start + s + nc))                        # prefix + chosen: causal
            blocks.append(Block(r, start + s + nc, start + s + nc + nr, (start, start + s)))  # rejected
            chosen_last[u] = (r, start + s + nc - 1)
            rejected_last[u] = (r, start + s + nc + nr - 1)
            start += s + nc + nr
        rows_tokens.append(toks)
        rows_pos.append(pos)
    tokens = int(sum(lengths))
    return _finish(rows_tokens, rows_pos, blocks, chosen_last, rejected_last, pad_id,
                   _margin(pairs, indices, use_margin), tokens)


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


def make(layout, pairs, indices, pad_id, max_tokens=None, use_margin=True):
    """A Batch of pairs `indices` in `layout` (padded, packed or prefix_shared); max_tokens: packed rows'
    capacity (ignored by padded)."""
    if layout == "padded":
        return padded(pairs, indices, pad_id, use_margin=use_margin)
    build = {"packed": packed, "prefix_shared": prefix_shared}.get(layout)
    if build is None:
        raise ValueError(f"unknown layout {layout!r}; use padded, packed or prefix_shared")
    return build(pairs, indices, pad_id, max_tokens=max_tokens, use_margin=use_margin)


def pair_costs(pairs, layout):
    """Token positions each pair costs in `layout` ([n] int64) and how a micro-batch's cost follows from
    its pairs' costs: 'sum' (packed layouts) or 'max' (padded: every pair pays for the longest)."""
    c, r = pairs.chosen_lengths.astype(np.int64), pairs.rejected_lengths.astype(np.int64)
    if layout == "padded":
        return 2 * np.maximum(c, r), "max"
    if layout == "packed":
        return c + r, "sum"
    if layout == "prefix_shared":
        return c + r - pairs.shared.astype(np.int64), "sum"
    raise ValueError(f"unknown layout {layout!r}; use padded, packed or prefix_shared")
