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
        pairs, tokens, positions = 3, 30, 32

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
