"""The fused loss inside a Hugging Face `Trainer`: a reward model trained by your own Trainer setup.

The model is a plain `AutoModelForSequenceClassification` with one label; only `compute_loss` changes.
Batches carry TRL's columns: input_ids_chosen / attention_mask_chosen / input_ids_rejected /
attention_mask_rejected (right padding). Chosen and rejected rows go through the backbone in one forward,
and `pairwise_reward_loss` reads each row's reward at its last real token, located from the mask.

    python examples/hf_trainer_reward.py      # a few steps on a tiny model and synthetic pairs, on CPU
"""

import torch
from transformers import Trainer

from rmfast import pairwise_reward_loss


def pad_pairs(features, pad_id):
    """Collate TRL-style features (lists of ids) into right-padded tensors."""
    batch = {}
    for side in ("chosen", "rejected"):
        seqs = [f[f"input_ids_{side}"] for f in features]
        L = max(len(s) for s in seqs)
        batch[f"input_ids_{side}"] = torch.tensor([s + [pad_id] * (L - len(s)) for s in seqs])
        batch[f"attention_mask_{side}"] = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs])
    return batch


def last_token_rows(mask_chosen, mask_rejected, length):
    """Flat row indices of each sequence's last real token in the [2P, L] concatenation (right padding)."""
    P = mask_chosen.shape[0]
    ends = torch.cat([mask_chosen.sum(1), mask_rejected.sum(1)]) - 1
    rows = torch.arange(2 * P, device=ends.device) * length + ends
    return rows[:P], rows[P:]


class FusedRewardTrainer(Trainer):
    """A Trainer whose loss is rmfast's fused pairwise loss (margin / centering optional)."""

    def __init__(self, *args, center_coef=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.center_coef = center_coef

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        c_ids, r_ids = inputs["input_ids_chosen"], inputs["input_ids_rejected"]
        c_mask, r_mask = inputs["attention_mask_chosen"], inputs["attention_mask_rejected"]
        L = max(c_ids.shape[1], r_ids.shape[1])
        pad = lambda t: torch.nn.functional.pad(t, (0, L - t.shape[1]))  # noqa: E731
        ids = torch.cat([pad(c_ids), pad(r_ids)])
        mask = torch.cat([pad(c_mask), pad(r_mask)])
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # one forward
        chosen, rejected = last_token_rows(pad(c_mask), pad(r_mask), L)
        out = pairwise_reward_loss(hidden, model.score.weight, chosen, rejected, bias=model.score.bias,
                                   margin=inputs.get("margin"), center_coef=self.center_coef)
        if return_outputs:
            return out.loss, {"rewards_chosen": out.chosen_rewards, "rewards_rejected": out.rejected_rewards}
        return out.loss


def tiny_setup(n_pairs=64, seed=0):
    """Synthetic pairs as TRL-style features, a BPE tokenizer and a tiny Llama classification model."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rmfast.data import generate_pairs
    from rmfast.data.tokenizers import train_bpe_tokenizer

    rows = generate_pairs(n_pairs, seed=seed, style="explicit", difficulty="easy")
    tok = train_bpe_tokenizer([r["prompt"] + r["chosen"] for r in rows], vocab_size=400)
    features = [{"input_ids_chosen": tok(r["prompt"] + r["chosen"])["input_ids"] + [tok.eos_token_id],
                 "input_ids_rejected": tok(r["prompt"] + r["rejected"])["input_ids"] + [tok.eos_token_id]}
                for r in rows]
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_labels=1, pad_token_id=tok.pad_token_id))
    return features, tok, model


def train(trainer_cls, out_dir, steps=8, n_pairs=64):
    """Train the tiny setup with `trainer_cls` on CPU; returns the logged loss of every step."""
    from transformers import TrainingArguments

    features, tok, model = tiny_setup(n_pairs)
    args = TrainingArguments(str(out_dir), per_device_train_batch_size=8, max_steps=steps, learning_rate=1e-3,
                             logging_steps=1, report_to=[], remove_unused_columns=False, use_cpu=True, seed=0,
                             save_strategy="no")
    trainer = trainer_cls(model=model, args=args, train_dataset=features,
                          data_collator=lambda f: pad_pairs(f, tok.pad_token_id))
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def main():
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        print([round(x, 4) for x in train(FusedRewardTrainer, out)])


if __name__ == "__main__":
    main()
