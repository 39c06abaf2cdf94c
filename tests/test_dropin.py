"""The drop-in: rmfast's fused loss inside a Hugging Face Trainer follows TRL's eager last-token loss."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
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


def run(trainer_cls, tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification, TrainingArguments

    from rmfast.data import generate_pairs
    from rmfast.data.tokenizers import train_bpe_tokenizer

    rows = generate_pairs(48, seed=0, style="explicit", difficulty="easy")
    tok = train_bpe_tokenizer([r["prompt"] + r["chosen"] for r in rows], vocab_size=400)
    features = [{"input_ids_chosen": tok(r["prompt"] + r["chosen"])["input_ids"] + [tok.eos_token_id],
                 "input_ids_rejected": tok(r["prompt"] + r["rejected"])["input_ids"] + [tok.eos_token_id]}
                for r in rows]
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_labels=1, pad_token_id=tok.pad_token_id))
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=8, max_steps=6, learning_rate=1e-3,
                             logging_steps=1, report_to=[], remove_unused_columns=False, use_cpu=True, seed=0,
                             save_strategy="no")
    trainer = trainer_cls(model=model, args=args, train_dataset=features,
                          data_collator=lambda f: example.pad_pairs(f, tok.pad_token_id))
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_fused_loss_in_hf_trainer_follows_the_eager_last_token_loss(tmp_path):
    fused = run(example.FusedRewardTrainer, tmp_path / "fused")
    eager = run(EagerRewardTrainer, tmp_path / "eager")
    assert len(fused) == len(eager) == 6
    assert fused == pytest.approx(eager, abs=1e-4)
    assert fused[-1] < fused[0]
