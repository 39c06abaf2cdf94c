"""Layouts: how a micro-batch of tokenized pairs becomes one backbone forward.

All layouts meet the fused loss through the same two index vectors (flat row indices into R·L), so the
loss never knows the layout. This module has ``padded``: [2P, L], chosen rows first then rejected rows
(DeepSpeed-Chat's order), padded on the right (or left) to the batch's longest sequence."""

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch


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

    @property
    def pairs(self):
        return self.chosen_index.shape[0]

    @property
    def positions(self):
        return self.input_ids.numel()

    def to(self, device):
        move = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in self.__dict__.items()}
        return Batch(**move)


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
    margin = None
    if use_margin:
        m = pairs.margin[np.asarray(indices)]
        if np.isfinite(m).any():
            margin = torch.from_numpy(np.nan_to_num(m, nan=0.0).astype(np.float32))
    position_ids = None
    if padding_side == "left":  # positions count from each sequence's first real token
        position_ids = torch.from_numpy(np.clip(np.cumsum(mask, axis=1) - 1, 0, None))
    return Batch(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(last[:P]),
                 torch.from_numpy(last[P:]), margin, position_ids, int(lengths.sum()))
