"""Module form of the fused loss: a value head that owns its weight and bias."""

import math

import torch
from torch import nn

from .loss import PairwiseRewardOutput, pairwise_reward_loss


class RewardHead(nn.Module):
    """Value head ``r = h · weight (+ bias)`` with the fused pairwise loss as its forward.

    weight: [hidden_size]; bias: [1] when ``bias=True``. ``rewards(hidden)`` scores every row;
    ``forward(hidden, chosen_index, rejected_index, ...)`` returns a PairwiseRewardOutput.
    """

    def __init__(self, hidden_size: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"RewardHead: hidden_size must be at least 1, got {hidden_size}")
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(1, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        # A small head keeps the initial rewards near zero, so the first loss is close to log 2.
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.hidden_size + 1))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def rewards(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., D] → rewards [...] in float32 (float64 for float64 hidden)."""
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        r = hidden.to(acc) @ self.weight.to(acc)
        return r + self.bias.to(acc) if self.bias is not None else r

    def forward(self, hidden, chosen_index, rejected_index, margin=None, center_coef=0.0,
                reduction="mean", backend="auto", *, check_indices=None) -> PairwiseRewardOutput:
        """hidden [..., D]; chosen_index, rejected_index [P] int64: see rmfast.pairwise_reward_loss."""
        return pairwise_reward_loss(hidden, self.weight, chosen_index, rejected_index, bias=self.bias,
                                    margin=margin, center_coef=center_coef, reduction=reduction,
                                    backend=backend, check_indices=check_indices)

    def extra_repr(self):
        return f"hidden_size={self.hidden_size}, bias={self.bias is not None}"
