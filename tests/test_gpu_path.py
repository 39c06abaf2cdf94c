"""What a GPU run would hit, checked on CPU: collectives on the trainer's device (NCCL takes no CPU tensors),
torch's fused AdamW instead of a JIT-built FusedAdam, torch's varlen_attn across its signatures, and a hot
loop with at most one host sync per optimizer step outside log steps, its batches built in a worker."""

import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from helpers import clean_env, reference_varlen
from rmfast import attention, engine
from rmfast.loss import PairwiseRewardOutput
from rmfast.metrics import Window


class _Stop(Exception):
    pass


@pytest.fixture
def collectives(monkeypatch):
    """Every all_reduce's tensor device, as a two-rank group would see them (the call then stops)."""
    seen = []

    def all_reduce(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise _Stop

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    return seen


def test_metrics_window_reduces_a_tensor_on_the_trainer_device(collectives):
    # meta stands in for cuda: a tensor made on the host would show up as cpu
    device = torch.device("meta")
    window = Window(device)
    out = PairwiseRewardOutput(torch.zeros((), device=device), torch.zeros(3, device=device),
                                      torch.zeros(3, device=device))

    class _Batch:
        pairs, tokens, positions, tie, ties = 3, 30, 32, None, 0

    window.add(out, _Batch)
    with pytest.raises(_Stop):
        window.reduce(world=2)
    assert collectives == [device]


def test_finite_check_reduces_on_the_loss_device(collectives):
    with pytest.raises(_Stop):
        engine._all_finite(torch.ones((), dtype=torch.bool, device="meta"))
    assert collectives == [torch.device("meta")]


def test_cuda_optimizer_is_torch_fused_adamw_with_no_build(monkeypatch):
    # DeepSpeed's FusedAdam is JIT-built with nvcc inside the first run on a fresh machine
    import deepspeed.ops.adam as ds_adam

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ds_adam, "FusedAdam", None)  # any use of it fails
    from rmfast import config as config_module

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = engine.make_optimizer(model, config_module.build(overrides={"model.name_or_path": "m"}))
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"] is True
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.0]
    assert [len(g["params"]) for g in optimizer.param_groups] == [1, 3]  # the matrix, then vectors


# ---------------------------------------------------------------- torch's varlen_attn signatures


def _old_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """An older torch's signature: no scale (1/sqrt(D)), no window, no GQA (equal heads required)."""
    assert key.shape[1] == query.shape[1] and is_causal and return_aux is None
    return reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, None, 0.0)


def _new_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert window_size == (-1, 0) and enable_gqa == (key.shape[1] != query.shape[1])
    return reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, 0.0)


def _torch_2_11_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                            window_size=(-1, -1)):
    """torch 2.11's signature (the lent GPU machine's): scale and window, but no enable_gqa (equal heads)."""
    assert window_size == (-1, 0) and key.shape[1] == query.shape[1] and return_aux is None
    return reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, 0.0)


@pytest.mark.parametrize("stand_in", [_old_varlen_attn, _torch_2_11_varlen_attn, _new_varlen_attn],
                         ids=["older", "torch-2.11", "newer"])
def test_torch_varlen_call_adapts_to_the_installed_signature(stand_in):
    torch.manual_seed(0)
    run = attention.torch_varlen_adapter(stand_in)
    nq, nk = [3, 1, 6], [3, 4, 9]  # keys outnumber queries in two blocks: bottom-right causal
    cu = lambda n: torch.tensor([0] + n).cumsum(0, dtype=torch.int32)  # noqa: E731
    q = torch.randn(sum(nq), 4, 8)
    k, v = torch.randn(sum(nk), 2, 8), torch.randn(sum(nk), 2, 8)  # grouped-query heads
    got = run(q, k, v, cu(nq), cu(nk), max(nq), max(nk), 0.3, 0.0)
    want = reference_varlen(q, k, v, cu(nq), cu(nk), max(nq), max(nk), 0.3, 0.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_varlen_signature_without_causal_keywords_is_refused_with_advice():
    with pytest.raises(RuntimeError, match="--train.attention flex"):
        attention.torch_varlen_adapter(lambda query, key, value, cu_seq_q, cu_seq_k, max_q, max_k: None)


# ---------------------------------------------------------------- host syncs in the hot loop

_COUNT_SYNCS = r'''
import json, sys, threading
from pathlib import Path
import torch
from rmfast import config as config_module
from rmfast.engine import Trainer

ROOT = Path(__import__("rmfast").__file__).parent
config = config_module.build(overrides=json.loads(sys.argv[1]))
trainer = Trainer(config, log=lambda _: None)
state = {"step": None, "log_steps": set()}
syncs, builders = {}, set()
main = threading.main_thread()


def counting(name):
    original = getattr(torch.Tensor, name)

    def wrapper(self, *args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        if threading.current_thread() is main and state["step"] is not None and caller.startswith(str(ROOT)):
            syncs.setdefault(state["step"], []).append(f"{name} in {Path(caller).name}")
        return original(self, *args, **kwargs)
    setattr(torch.Tensor, name, wrapper)


for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"):
    counting(name)
step, log_step, make_batch = trainer.train_step, trainer._log_step, trainer.make_batch


def train_step(*args):
    state["step"] = trainer.step + 1
    try:
        return step(*args)
    finally:
        state["step"] = None


def logged(*args):
    state["log_steps"].add(trainer.step)
    state["step"] = trainer.step  # a log step's own syncs are allowed
    try:
        return log_step(*args)
    finally:
        state["step"] = None


def building(*args):
    builders.add(threading.current_thread().name)
    return make_batch(*args)


trainer.train_step, trainer._log_step, trainer.make_batch = train_step, logged, building
trainer.train()
print("RESULT " + json.dumps({"syncs": syncs, "log_steps": sorted(state["log_steps"]), "builders": sorted(builders)}))
'''


@pytest.mark.slow
@pytest.mark.parametrize("on_nonfinite", ["stop", "skip"])
def test_hot_loop_syncs_once_per_optimizer_step_and_builds_batches_ahead(engine_setup, tmp_path, on_nonfinite):
    overrides = {
        "model.name_or_path": str(engine_setup / "model"), "model.dtype": "fp32",
        "data.train": [str(engine_setup / "train.jsonl")], "data.cache_dir": str(engine_setup / "cache"),
        "train.output_dir": str(tmp_path / "run"), "train.layout": "prefix_shared", "train.pairs_per_batch": 4,
        "train.grad_accum": 3, "train.max_steps": 6, "train.log_every": 4, "train.export": False,
        "train.tensorboard": False, "train.on_nonfinite": on_nonfinite,
    }
    res = subprocess.run([sys.executable, "-c", _COUNT_SYNCS, json.dumps(overrides)], capture_output=True,
                         text=True, env=clean_env(), timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    found = json.loads(next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))[7:])
    assert found["log_steps"] == [4, 6]
    per_step = {int(k): v for k, v in found["syncs"].items()}
    allowed = 1 if on_nonfinite == "stop" else 3  # skip checks each of the step's 3 micro-batches
    for step in range(1, 7):
        if step not in found["log_steps"]:
            assert len(per_step.get(step, [])) <= allowed, (step, per_step.get(step))
    assert len(per_step.get(1, [])) == allowed  # the check itself is there
    assert found["builders"] and all(name.startswith("rmfast-batches") for name in found["builders"])


# ---------------------------------------------------------------- the extension's backward, d_weight included

_EXTENSION_DEVICES = [pytest.param("cpu", id="cpu"),
                      pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                reason="no CUDA GPU"))]


@pytest.mark.parametrize("device", _EXTENSION_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("layout", ["rows", "strided", "one-row"])
@pytest.mark.parametrize("M", [5, 70], ids=["one-block", "blocks"])  # the CUDA kernel takes 32 rows a block
def test_extension_backward_gives_d_hidden_and_d_weight_of_float64(device, dtype, layout, M):
    # the op's whole contract, d_weight too (rmfast/loss.py takes only d_hidden from it today): d_hidden is
    # zeros except row rows[i] = coef[i]·w; d_weight = Σ coef[i]·hidden[rows[i]] over rows[i] >= 0
    from rmfast import backends

    why = backends.unavailable_reason(device, device)
    if why:
        pytest.skip(why)
    g = torch.Generator().manual_seed(M)
    N, D = 50, 300  # D not a multiple of the 256-thread column block
    if layout == "rows":
        hidden = torch.randn(N, D, generator=g)
    elif layout == "strided":
        hidden = torch.randn(D, N, generator=g).t()  # column stride N
    else:  # what backends.py passes: one row expanded (stride 0), for d_hidden's shape and dtype only
        hidden = torch.randn(1, D, generator=g).expand(N, D)
    hidden = hidden.to(device=device, dtype=dtype)
    weight = torch.randn(D, generator=g).to(device)
    distinct = torch.randperm(N, generator=g)[: (M + 1) // 2]
    rows = torch.cat([distinct, distinct])[:M]  # repeated rows, each with one coefficient
    rows[1] = -1  # an entry to skip
    per_row = torch.randn(N, generator=g)
    coef = per_row[rows.clamp(min=0)].to(device)
    rows = rows.to(device)
    d_hidden, d_weight = torch.ops.rmfast.pairwise_loss_bwd(hidden, weight, rows, coef, True)

    h64, w64, c64 = hidden.double().cpu(), weight.double().cpu(), coef.double().cpu()
    live = rows.cpu() >= 0
    want_w = (c64[live, None] * h64[rows.cpu()[live]]).sum(0)
    want_h = torch.zeros(N, D, dtype=torch.float64)
    want_h[rows.cpu()[live]] = c64[live, None] * w64
    assert d_hidden.dtype == dtype and d_hidden.shape == (N, D) and d_weight.dtype == torch.float32
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(d_hidden.double().cpu(), want_h, rtol=tol, atol=tol)
    torch.testing.assert_close(d_weight.double().cpu(), want_w, rtol=1e-4, atol=1e-4 * want_w.abs().max().item())


# ---------------------------------------------------------------- FlexAttention on CUDA: head_dim >= 16


def test_flex_on_cuda_refuses_head_dim_below_16_in_one_line():
    from helpers import tiny_config

    small = tiny_config("llama")  # head_dim 8
    with pytest.raises(ValueError, match="head_dim >= 16, this model has 8") as info:
        attention.resolve_attention(small, "flex", "cuda", torch.bfloat16)
    assert "\n" not in str(info.value)
    assert attention.resolve_attention(_llama_head_dim_16().backbone.config, "flex", "cuda", torch.bfloat16) == "flex"
    assert attention.resolve_attention(small, "flex", "cpu", torch.float32, training=False) == "flex"  # scoring


def _llama_head_dim_16(seed=0):
    """The tests' tiny Llama with heads of 16 (hidden 64, 4 heads, 2 key-value heads): torch's compiled
    FlexAttention refuses smaller ones."""
    from transformers import AutoModel, LlamaConfig

    from helpers import VOCAB
    from rmfast.model import RewardModel
    from rmfast.nn import RewardHead

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                      eos_token_id=2, bos_token_id=1)
    torch.manual_seed(seed)
    backbone = AutoModel.from_config(cfg, attn_implementation="sdpa")
    backbone.eval()
    head = RewardHead(64)
    with torch.no_grad():
        head.weight.normal_()
    return RewardModel(backbone, head)


@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
def test_flex_rewards_at_head_dim_16_equal_padded(layout):
    # the model of the CUDA gradient tests below, checked here too (forward: FlexAttention has no CPU backward)
    from helpers import edge_pairs
    from rmfast import layouts

    pairs = edge_pairs()
    idx = list(range(len(pairs)))
    model = _llama_head_dim_16()
    with torch.no_grad():
        ref = model(layouts.padded(pairs, idx, 0))
        model.set_attention("flex")
        got = model(getattr(layouts, layout)(pairs, idx, 0, max_tokens=layouts.ONE_ROW))
    torch.testing.assert_close(torch.cat([got.chosen_rewards, got.rejected_rewards]),
                               torch.cat([ref.chosen_rewards, ref.rejected_rewards]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", _EXTENSION_DEVICES)
def test_extension_ops_on_nothing_return_empty_or_zero_outputs(device):
    # no pairs, no rows, no responses: the ops return at once (a CUDA grid of no blocks is a launch error) with
    # the outputs' shapes, sums and losses 0, never memory as allocated
    from rmfast import backends

    why = backends.unavailable_reason(device, device)
    if why:
        pytest.skip(why)
    hidden, weight = torch.randn(6, 40, device=device), torch.randn(40, device=device)
    none = torch.zeros(0, dtype=torch.long, device=device)
    rc, rr, loss = torch.ops.rmfast.pairwise_loss_fwd(hidden, weight, None, none, none, None,
                                                      torch.zeros(1, device=device), torch.zeros(0, dtype=torch.bool,
                                                                                             device=device))
    assert rc.shape == rr.shape == loss.shape == (0,)
    d_hidden, d_weight = torch.ops.rmfast.pairwise_loss_bwd(hidden, weight, none, torch.zeros(0, device=device), True)
    assert d_hidden.shape == hidden.shape and not d_hidden.any() and d_weight.shape == (40,) and not d_weight.any()
    for _ in range(3):
        out, sums, rows = torch.ops.rmfast.attribute_head_fwd(hidden, weight.expand(3, 40), None, none,
                                                              torch.zeros(0, 3, device=device), None, True)
        assert out.shape == (0, 3) and rows.shape[0] == 0 and sums.cpu().tolist() == [0.0, 0.0]
    pl_loss, coef = torch.ops.rmfast.plackett_luce_fwd(torch.zeros(0, device=device), none,
                                                       torch.zeros(0, device=device), torch.zeros(0, device=device))
    assert float(pl_loss) == 0.0 and coef.shape == (0,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_extension_ops_refuse_an_input_on_another_device_on_cuda():
    # the dispatcher runs the CUDA kernel when hidden is on the GPU: a CPU tensor beside it is refused with a
    # message, not read through its host pointer on the device
    from rmfast import backends

    why = backends.unavailable_reason("cuda", "cuda")
    if why:
        pytest.skip(why)
    hidden, weight = torch.randn(6, 40, device="cuda"), torch.randn(40, device="cuda")
    index = torch.tensor([0, 1], device="cuda")
    with pytest.raises(RuntimeError, match="log_nu is on cpu"):
        torch.ops.rmfast.pairwise_loss_fwd(hidden, weight, None, index[:1], index[1:], None, torch.zeros(1), None)
    with pytest.raises(RuntimeError, match="target is on cpu"):
        torch.ops.rmfast.attribute_head_fwd(hidden, weight[None], None, index, torch.zeros(2, 1), None, False)
    with pytest.raises(RuntimeError, match="scores is on cpu"):
        torch.ops.rmfast.plackett_luce_fwd(torch.zeros(2, device="cuda"), index, torch.zeros(2),
                                           torch.ones(2, device="cuda"))
    torch.cuda.synchronize()  # the context is still usable
    assert float(torch.ops.rmfast.pairwise_loss_fwd(hidden, weight, None, index[:1], index[1:], None)[2][0]) > 0


def _assert_grads_close(got_r, got_g, ref_r, ref_g):
    assert (got_r - ref_r).abs().max() <= 1e-4
    for name, g in ref_g.items():
        assert (got_g[name] - g).abs().max().item() <= 1e-3 * (g.abs().max().item() or 1.0) + 1e-6, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
def test_flex_attention_gradients_at_head_dim_16_equal_padded_on_cuda(layout):
    from helpers import edge_pairs, rewards_and_grads
    from rmfast import layouts

    pairs = edge_pairs()
    idx = list(range(len(pairs)))
    model = _llama_head_dim_16().cuda()
    ref_r, ref_g = rewards_and_grads(model, layouts.padded(pairs, idx, 0).to("cuda"))
    got_r, got_g = rewards_and_grads(model, getattr(layouts, layout)(pairs, idx, 0, max_tokens=layouts.ONE_ROW)
                                     .to("cuda"), "flex")
    _assert_grads_close(got_r, got_g, ref_r, ref_g)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_flex_attention_group_gradients_at_head_dim_16_equal_padded_on_cuda():
    from rmfast import layouts
    from test_groups import edge_groups, group_rewards_and_grads

    groups = edge_groups()
    idx = list(range(len(groups)))
    model = _llama_head_dim_16().cuda()
    ref_r, ref_g = group_rewards_and_grads(model, layouts.padded(groups, idx, 0).to("cuda"))
    got_r, got_g = group_rewards_and_grads(model, layouts.prefix_shared(groups, idx, 0, layouts.ONE_ROW).to("cuda"),
                                           "flex")
    _assert_grads_close(got_r, got_g, ref_r, ref_g)
