"""rmfast: fast reward-model training.

Public names: ``pairwise_reward_loss`` (the fused loss), ``PairwiseRewardOutput`` and ``rmfast.nn.RewardHead``.
Importing rmfast never needs the compiled extension or triton; they are loaded on first use.
"""

from . import nn
from .loss import PairwiseRewardOutput, pairwise_reward_loss

__version__ = "0.1.0"
__all__ = ["pairwise_reward_loss", "PairwiseRewardOutput", "nn", "__version__"]
