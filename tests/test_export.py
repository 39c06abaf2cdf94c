"""The export: one streaming writer behind write_export / rmfast-export (a state dict) and export_model (a
live model, gathered one group at a time under ZeRO-3). Checked against the former whole-model export
(``reference_export`` below: a full AutoModelForSequenceClassification through save_pretrained), loaded by
plain transformers; and, on two ranks at ZeRO-3, each rank's peak memory while it exports."""

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rmfast.export import export_model, load_checkpoint_state, main as export_main, write_export
from rmfast.model import RewardModel
from rmfast.nn import RewardHead

METRICS = {"eval_reward_mean": 0.5, "eval_reward_std": 2.0}


def tiny_llama(vocab):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=0, eos_token_id=2, bos_token_id=1)


def build(vocab, bias=False, lora=None, seed=0):
    """A RewardModel on a tiny random Llama; lora=(r, alpha) adds PEFT adapters to q/v with B non-zero."""
    from transformers import AutoModel

    torch.manual_seed(seed)
    backbone = AutoModel.from_config(tiny_llama(vocab), attn_implementation="sdpa").eval()
    head = RewardHead(32, bias=bias)
    with torch.no_grad():
        head.weight.normal_()
        if bias:
            head.bias.fill_(0.25)
    model = RewardModel(backbone, head)
    if lora:
        from peft import LoraConfig, get_peft_model

        model.backbone = get_peft_model(backbone, LoraConfig(r=lora[0], lora_alpha=lora[1],
                                                             target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)  # PEFT starts B at zero, where merging changes nothing
    return model.eval()


def plain_state(model):
    """The RewardModel state dict without adapters: PEFT's own merge (merge_and_unload), not rmfast's."""
    backbone = model.backbone
    if hasattr(backbone, "merge_and_unload"):
        backbone = copy.deepcopy(backbone).merge_and_unload()
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
    return state


def reference_export(backbone_config, state, tokenizer, out, eval_metrics=None, dtype=None):
    """The export as rmfast wrote it before the streaming writer (commit b47be10): the whole model built,
    loaded, resized (transformers' mean resizing) and saved by save_pretrained."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = copy.deepcopy(tokenizer)
    config = backbone_config.__class__.from_dict(backbone_config.to_dict())
    config.num_labels, config.problem_type, grow = 1, "regression", 0
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "<|rmfast_pad|>"})
        grow = max(len(tokenizer) - config.vocab_size, 0)
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id < config.vocab_size else None
    config.rmfast_reward_mean, config.rmfast_reward_std = eval_metrics["eval_reward_mean"], eval_metrics["eval_reward_std"]
    config.architectures = None
    dtype = dtype or next(iter(state.values())).dtype
    seq = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    seq.base_model.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    with torch.no_grad():
        seq.score.weight.copy_(state["head.weight"].reshape(1, -1).float())
    if "head.bias" in state:
        seq.config.rmfast_score_bias = float(state["head.bias"].reshape(-1)[0])
    if grow:
        seq.resize_token_embeddings(config.vocab_size + grow)
    seq.config.pad_token_id = tokenizer.pad_token_id
    seq.to(dtype).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return Path(out)


@pytest.fixture(scope="module")
def bpe():
    from rmfast.data.tokenizers import train_bpe_tokenizer

    return train_bpe_tokenizer(["hello world", "a b c d", "the quick brown fox"] * 5, vocab_size=96)


def tokenizer_for(bpe, pad):
    """bpe with its own pad token ('own'), padding with EOS ('eos') or without one ('none')."""
    tok = copy.deepcopy(bpe)
    if pad == "eos":
        tok.pad_token = tok.eos_token
    elif pad == "none":
        tok.pad_token = None
    return tok


def load_hf(path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()


def sequences(eos, vocab, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist() + [eos]
            for _ in range(n)]


def hf_scores(model, seqs, pad_id):
    """Scores [n] of right-padded sequences, as plain transformers computes them (last non-pad token)."""
    width = max(map(len, seqs))
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])
    mask = (torch.arange(width) < torch.tensor([len(s) for s in seqs])[:, None]).long()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)


def engine_rewards(model, seqs):
    """The RewardModel's rewards [n]: its head on the backbone's last hidden state, one sequence at a time."""
    with torch.no_grad():
        out = [model.head.rewards(model.backbone(input_ids=torch.tensor([s])).last_hidden_state[0, -1:]) for s in seqs]
    return torch.cat(out)


def assert_same_weights(a, b, vocab):
    """a, b: state dicts of two loaded exports. Rows of the embedding past vocab (the added pad token, never
    read) only close: transformers adds noise of covariance 1e-9 · the embeddings' to their mean."""
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("embed_tokens.weight"):
            torch.testing.assert_close(x[vocab:], y[vocab:], rtol=0, atol=1e-5)
            x, y = x[:vocab], y[:vocab]
        assert torch.equal(x, y), k


CASES = {  # bias, pad, lora, dtype, max shard size
    "plain": (False, "own", None, None, None),
    "bias": (True, "own", None, None, None),
    "pad-is-eos": (True, "eos", None, None, None),
    "no-pad": (False, "none", None, None, None),
    "lora": (True, "eos", (4, 8), None, None),
    "sharded": (True, "eos", (4, 8), None, 20_000),
    "bf16": (False, "own", None, torch.bfloat16, 20_000),
}


@pytest.mark.parametrize("case", CASES)
def test_export_equals_the_former_whole_model_export(tmp_path, bpe, case):
    from transformers import AutoTokenizer

    bias, pad, lora, dtype, shard = CASES[case]
    tok, vocab = tokenizer_for(bpe, pad), len(bpe)
    model = build(vocab, bias=bias, lora=lora)
    config = tiny_llama(vocab)
    kwargs = {"max_shard_size": shard} if shard else {}
    new = write_export(config, model.state_dict(), tok, tmp_path / "new", METRICS, dtype, lora=lora, **kwargs)
    ref = reference_export(config, plain_state(model), tok, tmp_path / "ref", METRICS, dtype)
    files = sorted(p.name for p in new.glob("*.safetensors"))
    if shard:
        assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
        index = json.loads((new / "model.safetensors.index.json").read_text())
        assert sorted(set(index["weight_map"].values())) == files
    else:
        assert files == ["model.safetensors"]
    # the same config.json, weights and scores once plain transformers has loaded both
    assert json.loads((new / "config.json").read_text()) == json.loads((ref / "config.json").read_text())
    hf_new, hf_ref = load_hf(new), load_hf(ref)
    pad_added = pad != "own"
    assert_same_weights(hf_new.state_dict(), hf_ref.state_dict(), vocab)
    assert hf_new.config.pad_token_id != tok.eos_token_id
    assert hf_new.config.vocab_size == vocab + pad_added == len(AutoTokenizer.from_pretrained(new))
    seqs = sequences(tok.eos_token_id, vocab)
    scores = hf_scores(hf_new, seqs, hf_new.config.pad_token_id)
    assert torch.equal(scores, hf_scores(hf_ref, seqs, hf_ref.config.pad_token_id))
    # and they are the engine's rewards (transformers' score has no bias: the config keeps it)
    engine = engine_rewards(model, seqs)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(scores + getattr(hf_new.config, "rmfast_score_bias", 0.0), engine, rtol=tol, atol=tol)
    info = json.loads((new / "rmfast.json").read_text())
    assert info == {"eval": METRICS, "pad_token_added": pad_added}


def test_export_model_in_one_process_writes_what_write_export_writes(tmp_path, bpe):
    from safetensors.torch import load_file

    tok = tokenizer_for(bpe, "eos")
    model = build(len(bpe), bias=True, lora=(4, 8))
    export_model(model, tok, tmp_path / "live", METRICS, lora=(4, 8))
    write_export(model.backbone.get_base_model().config, model.state_dict(), tok, tmp_path / "dict", METRICS,
                 lora=(4, 8))
    a, b = load_file(tmp_path / "live" / "model.safetensors"), load_file(tmp_path / "dict" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_export_leaves_no_folder_and_keeps_the_previous_one(tmp_path, bpe, monkeypatch):
    import rmfast.export as export

    model, tok, out = build(len(bpe)), tokenizer_for(bpe, "own"), tmp_path / "export"
    flush = export._Shards._flush
    calls = []

    def failing(self):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        flush(self)

    monkeypatch.setattr(export._Shards, "_flush", failing)
    with pytest.raises(OSError, match="disk full"):
        write_export(model.backbone.config, model.state_dict(), tok, out, max_shard_size=20_000)
    assert list(tmp_path.iterdir()) == []  # neither the export nor its staging folder
    monkeypatch.setattr(export._Shards, "_flush", flush)
    write_export(model.backbone.config, model.state_dict(), tok, out, METRICS)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls.clear()
    monkeypatch.setattr(export._Shards, "_flush", failing)
    with pytest.raises(OSError):
        write_export(model.backbone.config, build(len(bpe), seed=1).state_dict(), tok, out, max_shard_size=20_000)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and [p.name for p in tmp_path.iterdir()] == ["export"]
    # a successful export replaces the earlier one whole; a folder that is no export is not replaced
    monkeypatch.setattr(export._Shards, "_flush", flush)
    write_export(model.backbone.config, build(len(bpe), seed=1).state_dict(), tok, out, max_shard_size=20_000)
    assert not (out / "model.safetensors").exists() and (out / "model.safetensors.index.json").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not an rmfast export"):
        write_export(model.backbone.config, model.state_dict(), tok, tmp_path / "mine")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "mine"]
