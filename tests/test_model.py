"""RewardModel on tiny transformers models: last-token rewards, padding, and the Hugging Face export."""

import numpy as np
import pytest
import torch

from rmfast import layouts
from rmfast.data import TokenizedPairs
from rmfast.export import write_export
from rmfast.model import RewardModel
from rmfast.nn import RewardHead

VOCAB = 96


def tiny_config(arch, pad_id=0, eos_id=2, bos_id=1, vocab=VOCAB):
    import transformers as tf

    common = dict(vocab_size=vocab, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=bos_id)
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, **common)
    if arch == "llama":
        return tf.LlamaConfig(**llama_like)
    if arch == "mistral":
        return tf.MistralConfig(**llama_like, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if arch == "qwen3":
        return tf.Qwen3Config(**llama_like, head_dim=8)
    if arch == "gemma2":
        return tf.Gemma2Config(**llama_like, head_dim=8, query_pre_attn_scalar=8, sliding_window=64)
    if arch == "phi3":
        return tf.Phi3Config(**llama_like)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common)
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2"]


def build(tmp_path, arch, bias=False, seed=0, vocab=VOCAB):
    from transformers import AutoModel

    torch.manual_seed(seed)
    backbone = AutoModel.from_config(tiny_config(arch, vocab=vocab),
                                     attn_implementation="eager" if arch == "gemma2" else "sdpa")
    backbone.eval()
    head = RewardHead(backbone.config.hidden_size if hasattr(backbone.config, "hidden_size") else 32, bias=bias)
    with torch.no_grad():
        head.weight.normal_()
        if bias:
            head.bias.fill_(0.25)
    return RewardModel(backbone, head)


def pairs_of(seqs_c, seqs_r):
    n = len(seqs_c)
    return TokenizedPairs([np.array(s, np.int32) for s in seqs_c], [np.array(s, np.int32) for s in seqs_r],
                          np.zeros(n, np.int32), np.zeros(n, np.int32), np.full(n, np.nan, np.float32),
                          [f"row {i}" for i in range(n)])


def random_pairs(n=4, eos=2, seed=0):
    rng = np.random.default_rng(seed)
    c = [list(rng.integers(3, VOCAB, rng.integers(3, 12))) + [eos] for _ in range(n)]
    r = [list(rng.integers(3, VOCAB, rng.integers(3, 12))) + [eos] for _ in range(n)]
    return pairs_of(c, r)


def one_by_one(model, seqs):
    """Reward of each sequence run alone (no padding at all)."""
    out = []
    for s in seqs:
        ids = torch.tensor([list(s)])
        h = model.hidden_states(ids, torch.ones_like(ids))
        out.append(model.head.rewards(h[0, -1]).item())
    return torch.tensor(out)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batch_rewards_equal_unpadded_rewards(tmp_path, arch, padding_side):
    model = build(tmp_path, arch)
    pairs = random_pairs()
    batch = layouts.padded(pairs, [0, 1, 2, 3], pad_id=0, padding_side=padding_side)
    with torch.no_grad():
        out = model(batch.input_ids, batch.attention_mask, batch.chosen_index, batch.rejected_index,
                    position_ids=batch.position_ids)
    torch.testing.assert_close(out.chosen_rewards, one_by_one(model, pairs.chosen), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.rejected_rewards, one_by_one(model, pairs.rejected), atol=1e-4, rtol=1e-4)


def test_pad_equal_to_eos_gives_correct_rewards(tmp_path):
    model = build(tmp_path, "llama")
    pairs = random_pairs()
    batch = layouts.padded(pairs, [0, 1, 2, 3], pad_id=2)  # pad id == eos id: lengths decide, not pad ids
    with torch.no_grad():
        out = model(batch.input_ids, batch.attention_mask, batch.chosen_index, batch.rejected_index)
    torch.testing.assert_close(out.chosen_rewards, one_by_one(model, pairs.chosen), atol=1e-4, rtol=1e-4)


def test_padded_layout_puts_chosen_rows_first():
    pairs = pairs_of([[5, 6, 2], [7, 2]], [[8, 2], [9, 9, 9, 2]])
    batch = layouts.padded(pairs, [0, 1], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 2, 0], [7, 2, 0, 0], [8, 2, 0, 0], [9, 9, 9, 2]]
    assert batch.chosen_index.tolist() == [2, 5] and batch.rejected_index.tolist() == [9, 15]
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
        ours = model(ours_batch.input_ids, ours_batch.attention_mask, ours_batch.chosen_index,
                     ours_batch.rejected_index)
    # transformers' score layers have no bias; the export keeps it in its config
    hf_scores = hf_scores + hf.config.rmfast_score_bias
    assert hf.config.rmfast_score_bias == pytest.approx(bias)
    torch.testing.assert_close(hf_scores, torch.cat([ours.chosen_rewards, ours.rejected_rewards]), atol=1e-4, rtol=1e-4)
    reloaded = RewardModel.from_pretrained(path)
    with torch.no_grad():
        again = reloaded(batch.input_ids, batch.attention_mask, batch.chosen_index, batch.rejected_index)
    torch.testing.assert_close(again.chosen_rewards + bias, ours.chosen_rewards, atol=1e-4, rtol=1e-4)
