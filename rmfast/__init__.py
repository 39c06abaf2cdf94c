"""rmfast: fast reward-model training.

Public names: ``pairwise_reward_loss`` (the fused loss), ``attribute_head`` (its [A, D] gather and projection),
``PairwiseRewardOutput`` and ``rmfast.nn.RewardHead``.
Importing rmfast never needs the compiled extension or triton; they are loaded on first use.
"""

from . import nn
from .loss import PairwiseRewardOutput, attribute_head, pairwise_reward_loss

__version__ = "0.1.0"
__all__ = ["pairwise_reward_loss", "attribute_head", "PairwiseRewardOutput", "nn", "__version__"]
