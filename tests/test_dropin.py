"""The drop-in: rmfast's fused loss inside a Hugging Face Trainer follows TRL's eager last-token loss."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("hf_trainer_reward", ROOT / "examples" / "hf_trainer_reward.py")
example = importlib.util.module_from_spec(spec)
sys.modules["hf_trainer_reward"] = example
spec.loader.exec_module(example)


class EagerRewardTrainer(example.FusedRewardTrainer):
    """TRL RewardTrainer's loss: two forwards of the sequence-classification model, -logsigmoid(r_c - r_r)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        c = model(input_ids=inputs["input_ids_chosen"], attention_mask=inputs["attention_mask_chosen"]).logits
        r = model(input_ids=inputs["input_ids_rejected"], attention_mask=inputs["attention_mask_rejected"]).logits
        return -F.logsigmoid(c - r).mean()


def test_fused_loss_in_hf_trainer_follows_the_eager_last_token_loss(tmp_path):
    fused = example.train(example.FusedRewardTrainer, tmp_path / "fused", steps=6, n_pairs=48)
    eager = example.train(EagerRewardTrainer, tmp_path / "eager", steps=6, n_pairs=48)
    assert len(fused) == len(eager) == 6
    assert fused == pytest.approx(eager, abs=1e-4)
    assert fused[-1] < fused[0]


def test_fused_loss_in_trl_reward_trainer_follows_its_own_loss(tmp_path):
    from trl import RewardTrainer

    spec = importlib.util.spec_from_file_location("trl_reward", ROOT / "examples" / "trl_reward.py")
    trl_example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trl_example)
    fused = trl_example.train(trl_example.FusedRewardTrainer, tmp_path / "fused", steps=6, n_pairs=48)
    stock = trl_example.train(RewardTrainer, tmp_path / "stock", steps=6, n_pairs=48)
    assert len(fused) == len(stock) == 6
    assert fused == pytest.approx(stock, abs=1e-4)
    assert fused[-1] < fused[0]
