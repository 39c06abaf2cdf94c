"""RewardModel on tiny transformers models: last-token rewards, padding, and the Hugging Face export."""

import pytest
import torch

from helpers import ARCHS, VOCAB, build, pairs_of, random_pairs, sides
from rmfast import layouts
from rmfast.export import write_export
from rmfast.model import RewardModel

def one_by_one(model, seqs):
    """Reward of each sequence run alone (no padding at all)."""
    out = []
    for s in seqs:
        batch = layouts.padded(pairs_of([s], [s]), [0], pad_id=0)
        out.append(model.rewards(batch, batch.chosen_index).item())  # the pair (s, s): its one comparison
    return torch.tensor(out)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batch_rewards_equal_unpadded_rewards(tmp_path, arch, padding_side):
    model = build(tmp_path, arch)
    pairs = random_pairs()
    batch = layouts.padded(pairs, [0, 1, 2, 3], pad_id=0, padding_side=padding_side)
    with torch.no_grad():
        out = model(batch)
    torch.testing.assert_close(out.chosen_rewards, one_by_one(model, sides(pairs, 0)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.rejected_rewards, one_by_one(model, sides(pairs, 1)), atol=1e-4, rtol=1e-4)


def test_pad_equal_to_eos_gives_correct_rewards(tmp_path):
    model = build(tmp_path, "llama")
    pairs = random_pairs()
    batch = layouts.padded(pairs, [0, 1, 2, 3], pad_id=2)  # pad id == eos id: lengths decide, not pad ids
    with torch.no_grad():
        out = model(batch)
    torch.testing.assert_close(out.chosen_rewards, one_by_one(model, sides(pairs, 0)), atol=1e-4, rtol=1e-4)


def test_padded_layout_puts_chosen_rows_first():
    pairs = pairs_of([[5, 6, 2], [7, 2]], [[8, 2], [9, 9, 9, 2]])
    batch = layouts.padded(pairs, [0, 1], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 2, 0], [7, 2, 0, 0], [8, 2, 0, 0], [9, 9, 9, 2]]
    assert batch.chosen_index.tolist() == [2, 5] and batch.rejected_index.tolist() == [9, 15]
    assert batch.response_index.tolist() == [2, 9, 5, 15]  # group after group: pair 0's two, then pair 1's
    assert batch.tokens == 11 and batch.positions == 16


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_export_scores_exactly_as_the_engine(tmp_path, arch, pad_is_eos):
    from transformers import AutoModelForSequenceClassification

    from rmfast.data.tokenizers import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["hello world", "a b c d"] * 5, vocab_size=VOCAB)
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    model = build(tmp_path, arch, bias=True)
    state = {k: v for k, v in model.state_dict().items()}
    bias = float(model.head.bias)
    path = write_export(model.backbone.config, state, tok, tmp_path / "export",
                        {"eval_reward_mean": 0.5, "eval_reward_std": 2.0})
    hf = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    assert hf.config.num_labels == 1 and hf.config.rmfast_reward_mean == 0.5
    assert hf.config.pad_token_id != tok.eos_token_id
    pairs = random_pairs(eos=tok.eos_token_id)
    # plain transformers: right-padded batch with the exported tokenizer's pad id
    batch = layouts.padded(pairs, [0, 1, 2, 3], pad_id=hf.config.pad_token_id)
    ours_batch = layouts.padded(pairs, [0, 1, 2, 3], pad_id=0)  # the engine never reads pad ids
    with torch.no_grad():
        hf_scores = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.squeeze(-1)
        ours = model(ours_batch)
    # transformers' score layers have no bias; the export keeps it in its config
    hf_scores = hf_scores + hf.config.rmfast_score_bias
    assert hf.config.rmfast_score_bias == pytest.approx(bias)
    torch.testing.assert_close(hf_scores, torch.cat([ours.chosen_rewards, ours.rejected_rewards]), atol=1e-4,
                               rtol=1e-4)  # rows: the chosen ones, then the rejected ones
    reloaded = RewardModel.from_pretrained(path)
    with torch.no_grad():
        again = reloaded(batch)
    torch.testing.assert_close(again.chosen_rewards + bias, ours.chosen_rewards, atol=1e-4, rtol=1e-4)
