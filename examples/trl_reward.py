"""The fused loss inside TRL's RewardTrainer: same data pipeline, same model, only compute_loss changes.

TRL's collator stacks chosen rows then rejected rows into one `input_ids` batch; the stock loss runs the
sequence-classification model on it and takes `-logsigmoid(r_c - r_r - margin)`. Here the backbone runs
once and `pairwise_reward_loss` gathers each row's last real token (from the attention mask, for right or
left padding), applies the value head and computes the loss — with TRL's margin and centering options.

    python examples/trl_reward.py      # a few steps on a tiny model and synthetic pairs, on CPU
"""

import torch
from trl import RewardTrainer

from rmfast import pairwise_reward_loss


class FusedRewardTrainer(RewardTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        R, L = ids.shape
        last = (mask * torch.arange(L, device=mask.device)).argmax(1)  # the last real token of each row
        rows = torch.arange(R, device=ids.device) * L + last
        P = R // 2
        out = pairwise_reward_loss(hidden, model.score.weight, rows[:P], rows[P:], bias=model.score.bias,
                                   margin=inputs.get("margin"),
                                   center_coef=self.args.center_rewards_coefficient or 0.0)
        return (out.loss, {"rewards_chosen": out.chosen_rewards}) if return_outputs else out.loss


def train(trainer_cls, out_dir, steps=8, n_pairs=64):
    """Train a tiny Llama on synthetic pairs with `trainer_cls`; returns the logged loss of every step."""
    import datasets
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from trl import RewardConfig

    from rmfast.data import generate_pairs
    from rmfast.data.tokenizers import train_bpe_tokenizer

    rows = generate_pairs(n_pairs, seed=0, style="implicit", difficulty="easy")
    tok = train_bpe_tokenizer([r["chosen"] for r in rows], vocab_size=400)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_labels=1, pad_token_id=tok.pad_token_id))
    args = RewardConfig(str(out_dir), per_device_train_batch_size=8, max_steps=steps, learning_rate=1e-3,
                        logging_steps=1, report_to=[], use_cpu=True, seed=0, save_strategy="no",
                        bf16=False)  # TRL defaults to bf16 autocast; fp32 here so both losses can be compared
    dataset = datasets.Dataset.from_list([{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tok)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def main():
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        print([round(x, 4) for x in train(FusedRewardTrainer, out)])


if __name__ == "__main__":
    main()
