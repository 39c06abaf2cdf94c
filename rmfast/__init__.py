"""rmfast: fast reward-model training.

Public names: ``pairwise_reward_loss`` (the fused loss; Davidson's with ties given ``log_nu``), ``attribute_head``
(its [A, D] gather and projection), ``attribute_regression_loss`` (the same with the masked squared error),
``plackett_luce_loss`` (listwise, over ranked groups), their outputs' named tuples and ``rmfast.nn.RewardHead``.
Importing rmfast never needs the compiled extension or triton; they are loaded on first use.
"""

from . import nn
from .loss import (AttributeRegressionOutput, PairwiseRewardOutput, PlackettLuceOutput, attribute_head,
                   attribute_regression_loss, pairwise_reward_loss, plackett_luce_loss)

__version__ = "0.1.0"
__all__ = ["pairwise_reward_loss", "attribute_head", "attribute_regression_loss", "plackett_luce_loss",
           "PairwiseRewardOutput", "AttributeRegressionOutput", "PlackettLuceOutput", "nn", "__version__"]
