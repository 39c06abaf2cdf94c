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


class AttributeHead(nn.Module):
    """A head of A outputs, ``attributes = h · weightᵀ (+ bias)`` (weight [A, D], bias [A]), for attribute
    regression; the scalar reward is a fixed linear combination of them, ``combination · attributes``
    (combination [A], from the run's config: not a parameter).

    ``rewards(hidden)`` is the scalar reward (as RewardHead's), ``attributes(hidden)`` the A values;
    ``scalar()`` the [D] weight and the bias of the scalar reward (combinationᵀ · weight, combination · bias), the
    head the fused pairwise loss reads for a preference objective on the combined score (their gradients reach
    weight and bias)."""

    def __init__(self, hidden_size: int, num_attributes: int, combination=None, bias: bool = False, device=None,
                 dtype=None):
        super().__init__()
        if hidden_size < 1 or num_attributes < 1:
            raise ValueError(f"AttributeHead: hidden_size and num_attributes must be at least 1, got "
                             f"{hidden_size}, {num_attributes}")
        self.hidden_size, self.num_attributes = hidden_size, num_attributes
        self.weight = nn.Parameter(torch.empty(num_attributes, hidden_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_attributes, device=device, dtype=dtype)) if bias else None
        c = torch.full((num_attributes,), 1.0 / num_attributes) if combination is None else \
            torch.as_tensor(combination, dtype=torch.float32).reshape(-1)
        if c.numel() != num_attributes:
            raise ValueError(f"AttributeHead: {c.numel()} combination weights for {num_attributes} attributes")
        # a plain float32 tensor, not a buffer: no dtype cast of the model (bf16 training) rounds the weights
        self.combination = c.float()
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(hidden_size + 1))

    def attributes(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., D] → attributes [..., A] in float32 (float64 for float64 hidden)."""
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        out = hidden.to(acc) @ self.weight.to(acc).t()
        return out + self.bias.to(acc) if self.bias is not None else out

    def rewards(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., D] → the combined scalar reward [...]."""
        out = self.attributes(hidden)
        return out @ self.combination.to(out.device, out.dtype)

    def scalar(self):
        """(weight [D], bias [1] or None) of the combined scalar reward, in float32 (whatever the head's dtype),
        differentiable in this head's parameters."""
        c = self.combination.to(self.weight.device)
        return c @ self.weight.float(), None if self.bias is None else (c @ self.bias.float()).reshape(1)

    def extra_repr(self):
        return f"hidden_size={self.hidden_size}, num_attributes={self.num_attributes}, bias={self.bias is not None}"
