"""What several test files share: tiny models of every supported architecture, pairs, the exactness check
against padded, and how end-to-end runs are launched."""

import os
import socket
import sys

import numpy as np
import torch

from rmfast.data import TokenizedGroups
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
    """Pairs (whole chosen and rejected id sequences) as the groups of two training reads."""
    return TokenizedGroups.of_pairs(seqs_c, seqs_r, locations=[f"row {i}" for i in range(len(seqs_c))])


def sides(groups, k):
    """Whole sequence k (0: chosen, 1: rejected) of every pair of a TokenizedGroups of pairs."""
    return [groups.sequence(i, k) for i in range(len(groups))]


def random_pairs(n=4, eos=2, seed=0):
    rng = np.random.default_rng(seed)
    c = [list(rng.integers(3, VOCAB, rng.integers(3, 12))) + [eos] for _ in range(n)]
    r = [list(rng.integers(3, VOCAB, rng.integers(3, 12))) + [eos] for _ in range(n)]
    return pairs_of(c, r)


def edge_pairs(seed=0):
    rng = np.random.default_rng(seed)
    c, r = [], []
    for _ in range(5):  # a shared prompt, then different responses
        p = list(rng.integers(3, 96, rng.integers(2, 9)))
        c.append(p + list(rng.integers(3, 96, rng.integers(1, 6))) + [2])
        r.append(p + list(rng.integers(3, 96, rng.integers(1, 6))) + [2])
    c.append([5, 6, 7, 2]), r.append([5, 6, 7, 8, 2])      # one response a prefix of the other
    c.append([5, 6, 2]), r.append([5, 6, 7, 2])            # one-token response
    c.append([9, 2]), r.append([10, 2])                    # nothing in common
    return pairs_of(c, r)


def rewards_and_grads(model, batch, how="dense"):
    """Rewards [2P] (chosen then rejected) and every parameter's gradient of a batch run with attention
    `how` (ignored by padded batches)."""
    model.zero_grad()
    model.set_attention(how)
    out = model(batch)
    (out.loss + 0.1 * out.chosen_rewards.sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat([out.chosen_rewards, out.rejected_rewards]).detach(), grads


def assert_equal_to_padded(got_r, got_g, ref_r, ref_g):
    """fp32 exactness: rewards within 1e-5, every parameter gradient within 1e-4 of its largest entry."""
    assert (got_r - ref_r).abs().max() <= 1e-5
    assert got_g.keys() == ref_g.keys()
    for name, g in ref_g.items():
        scale = g.abs().max().item() or 1.0
        assert (got_g[name] - g).abs().max().item() <= 1e-4 * scale + 1e-6, name


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(nproc):
    if nproc == 1:
        return [sys.executable, "-m", "rmfast.cli"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), "-m", "rmfast.cli"]


def clean_env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def train_cli(flags):
    """rmfast-train as a user runs it, in its own process, with `--section.field value` flags (a list value
    gives several); asserts it exits 0 and returns the finished process."""
    import subprocess

    argv = []
    for k, v in flags.items():
        argv += [f"--{k}", *([str(x) for x in v] if isinstance(v, list) else [str(v)])]
    env = clean_env()
    env["OMP_NUM_THREADS"] = "1"  # two test workers on two cores: a second thread each would only contend
    res = subprocess.run(command(1) + argv, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, dropout):
    """The varlen kernels' contract in plain torch, checking what they require of their inputs: per block,
    causal attention aligned to the bottom right (query i of n sees keys up to i + m - n of m)."""
    assert q.dim() == k.dim() == v.dim() == 3 and q.shape[0] == cu_q[-1] and k.shape[0] == cu_k[-1]
    assert cu_q.dtype == cu_k.dtype == torch.int32 and len(cu_q) == len(cu_k)
    assert isinstance(max_q, int) and isinstance(max_k, int)
    assert max_q == int(cu_q.diff().max()) and max_k == int(cu_k.diff().max())
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and dropout == 0
    groups = q.shape[1] // k.shape[1]
    out = []
    for i in range(len(cu_q) - 1):
        qs = q[cu_q[i]:cu_q[i + 1]].transpose(0, 1)
        ks = k[cu_k[i]:cu_k[i + 1]].transpose(0, 1).repeat_interleave(groups, 0)
        vs = v[cu_k[i]:cu_k[i + 1]].transpose(0, 1).repeat_interleave(groups, 0)
        n, m = qs.shape[1], ks.shape[1]
        mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(diagonal=m - n)
        out.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
                   .transpose(0, 1))
    return torch.cat(out)
