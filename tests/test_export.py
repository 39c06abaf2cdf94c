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

from rmfast import errors
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
    config.rmfast_reward_mean = eval_metrics["eval_reward_mean"]
    config.rmfast_reward_std = eval_metrics["eval_reward_std"]
    config.rmfast_eos_after_chat_template = False  # the reward-token convention every export records
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


def test_export_builds_no_model_while_a_zero3_config_is_registered(tmp_path, bpe):
    # the Trainer's ZeRO-3 runs register their DeepSpeed config with transformers, whose from_config would
    # then enter zero.Init (collectives) on rank 0 alone; the export's meta-device layout must not
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    model = build(len(bpe))
    registered = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    try:
        path = write_export(model.backbone.config, model.state_dict(), tokenizer_for(bpe, "own"), tmp_path / "e")
    finally:
        unset_hf_deepspeed_config()
        del registered
    assert (path / "model.safetensors").exists()


def test_an_eval_without_a_number_is_null_in_the_export_and_sets_no_normalization(tmp_path, bpe):
    """an eval set of one response has no reward std: rmfast.json says null (JSON every reader parses, not
    Python's NaN) and the config gets no rmfast_reward_mean/std that --normalize would divide by"""
    model = build(len(bpe))
    metrics = {"eval_reward_mean": 0.5, "eval_reward_std": float("nan"), "eval_accuracy": float("nan")}
    path = write_export(model.backbone.config, model.state_dict(), tokenizer_for(bpe, "own"), tmp_path / "e", metrics)
    strict = {"parse_constant": lambda c: pytest.fail(f"{c} written")}
    info = json.loads((path / "rmfast.json").read_text(), **strict)
    assert info["eval"] == {"eval_reward_mean": 0.5, "eval_reward_std": None, "eval_accuracy": None}
    config = json.loads((path / "config.json").read_text(), **strict)
    assert "rmfast_reward_mean" not in config and "rmfast_reward_std" not in config


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
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # the user's normal permissions, not mkdtemp's 0700
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls.clear()
    monkeypatch.setattr(export._Shards, "_flush", failing)
    with pytest.raises(OSError):
        write_export(model.backbone.config, build(len(bpe), seed=1).state_dict(), tok, out, max_shard_size=20_000)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    # a successful export replaces the earlier one whole; a folder that is no export is not replaced
    monkeypatch.setattr(export._Shards, "_flush", flush)
    write_export(model.backbone.config, build(len(bpe), seed=1).state_dict(), tok, out, max_shard_size=20_000)
    assert not (out / "model.safetensors").exists() and (out / "model.safetensors.index.json").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(errors.UserError, match="not an rmfast export"):
        write_export(model.backbone.config, model.state_dict(), tok, tmp_path / "mine")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "mine"]


# -- two ranks (torchrun, gloo, DeepSpeed on CPU)

ZERO_SCRIPT = r'''
"""argv: out folder, mode ('memory': a 46 MB Llama; 'lora': a tiny one with adapters, an optimizer and a
checkpoint), ZeRO stage. Exports with export_model and records each rank's memory around the export."""
import copy
import gc
import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaModel

from rmfast.distributed import init_distributed
from rmfast.export import export_model
from rmfast.model import RewardModel
from rmfast.nn import RewardHead

out, mode, stage = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
init_distributed()  # as rmfast-train joins (gloo on CPU, DeepSpeed's shared-memory op not built)
rank = dist.get_rank()
tok = AutoTokenizer.from_pretrained(out / "tokenizer")
big = mode == "memory"
cfg = LlamaConfig(vocab_size=1024 if big else len(tok), hidden_size=512 if big else 64,
                  intermediate_size=512 if big else 128, num_hidden_layers=8 if big else 2, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
torch.manual_seed(0)
model = RewardModel(LlamaModel(cfg), RewardHead(cfg.hidden_size, bias=True))
with torch.no_grad():
    model.head.weight.normal_()
    model.head.bias.fill_(0.25)
lora = (4, 8) if mode == "lora" else None
if lora:
    from peft import LoraConfig, get_peft_model

    model.backbone = get_peft_model(model.backbone, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # PEFT starts B at zero, where merging changes nothing
if rank == 0:  # the full weights, for the test to compare with; PEFT's own merge for the merged ones
    save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, str(out / "reference.safetensors"))
    if lora:
        merged = {f"backbone.{k}": v for k, v in copy.deepcopy(model.backbone).merge_and_unload().state_dict().items()}
        merged.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
        save_file({k: v.detach().clone() for k, v in merged.items()}, str(out / "merged.safetensors"))
        del merged
    cfg.save_pretrained(out / "backbone")
ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
             "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
if lora:  # an optimizer and a transformers schedule, as rmfast-train has, and a checkpoint of them
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    engine.save_checkpoint(str(out / "checkpoints"), tag="step-1", save_latest=False)
else:
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
del model
gc.collect()
params = list(engine.module.parameters())
if stage == 3:
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in params)  # partitioned: the full data is gone
held = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params) if stage == 3 else 0
largest = max(p.ds_numel * p.ds_tensor.element_size() for p in params) if stage == 3 else 0


def status(field):
    """A /proc/self/status memory field in bytes (VmRSS: resident now; VmHWM: its peak)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024


dist.barrier()
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS, so VmHWM below is the export's peak
before = status("VmRSS")
export_model(engine.module, tok, out / "export", {"eval_reward_mean": 0.5, "eval_reward_std": 2.0},
             lora=lora, max_shard_size=SHARD)
peak = status("VmHWM")
(out / f"memory-{rank}.json").write_text(json.dumps({"before": before, "peak": peak, "held": held, "largest": largest}))
if lora:  # rank 0 refuses a folder that is no export: every rank must raise, none wait in a gather
    if rank == 0:
        (out / "mine").mkdir()
        (out / "mine" / "notes.txt").write_text("keep")
    dist.barrier()
    try:
        export_model(engine.module, tok, out / "mine", lora=lora)
        raised = None
    except Exception as e:
        raised = type(e).__name__
    (out / f"refused-{rank}.txt").write_text(str(raised))
dist.destroy_process_group()  # after the last collective: a gloo group alive at exit can abort the process
# and leave without the interpreter's teardown, as rmfast-train does on several ranks: threads of gloo and
# DeepSpeed still running then can abort a finished process ("terminate called without an active exception")
sys.stdout.flush()
sys.stderr.flush()
import os  # noqa: E402

os._exit(0)
'''
SHARD = 4 * 2**20  # bytes per file in the ZeRO runs: the memory test's model writes 12 of them
ALLOWANCE = 8 * 2**20  # bytes: allocator slack, gloo's buffers, first-call imports


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    # big allocations mmapped and unmapped when freed, so the resident size follows what is alive
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    return env


def run_two_ranks(tmp_path, bpe, mode, stage):
    """Runs ZERO_SCRIPT on two ranks; returns its folder and each rank's memory record."""
    out = tmp_path / "run"
    bpe.save_pretrained(out / "tokenizer")
    script = tmp_path / "zero_export.py"
    script.write_text(ZERO_SCRIPT.replace("max_shard_size=SHARD", f"max_shard_size={SHARD}"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script), str(out), mode, str(stage)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return out, [json.loads((out / f"memory-{r}.json").read_text()) for r in (0, 1)]


def exported_weights(path):
    """{key: tensor} of an export, whether one file or shards."""
    from safetensors.torch import load_file

    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(f))
    return state


def assert_export_holds(path, reference, prefix="model"):
    """The export's tensors are reference's (a RewardModel state dict) under transformers' names."""
    got = exported_weights(path)
    want = {f"{prefix}.{k[len('backbone.'):]}": v for k, v in reference.items() if k.startswith("backbone.")}
    want["score.weight"] = reference["head.weight"].reshape(1, -1)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.slow
def test_zero3_export_gathers_one_tensor_at_a_time(tmp_path, bpe):
    from safetensors.torch import load_file

    out, memory = run_two_ranks(tmp_path, bpe, "memory", 3)
    reference = load_file(out / "reference.safetensors")
    full = sum(v.numel() * v.element_size() for v in reference.values())
    assert 30 * 2**20 < full < 60 * 2**20
    for rank, m in enumerate(memory):
        # rank 0 holds the file being filled, a gathered tensor and its CPU copy; rank 1 the gathered tensor
        bound = (SHARD if rank == 0 else 0) + 2 * m["largest"] + ALLOWANCE
        grew = m["peak"] - m["before"]
        assert grew < bound, f"rank {rank}: the export took {grew / 2**20:.1f} MiB, more than {bound / 2**20:.1f}"
        assert m["held"] < full * 0.55 and grew < m["held"] / 2  # far from a whole model
    assert len(list((out / "export").glob("model-*-of-*.safetensors"))) > 5
    assert_export_holds(out / "export", reference)
    config = json.loads((out / "export" / "config.json").read_text())
    assert config["rmfast_score_bias"] == 0.25 and config["rmfast_reward_mean"] == 0.5


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3, 0])
def test_lora_export_on_two_ranks_and_rmfast_export_agree(tmp_path, bpe, stage):
    from safetensors.torch import load_file

    out, _ = run_two_ranks(tmp_path, bpe, "lora", stage)
    assert_export_holds(out / "export", load_file(out / "merged.safetensors"))
    assert [(out / f"refused-{r}.txt").read_text() for r in (0, 1)] == ["UserError", "RuntimeError"]
    # the checkpoint (model states read with weights_only=True) holds the trained weights, adapters apart
    checkpoint = load_checkpoint_state(out / "checkpoints" / "step-1")
    reference = load_file(out / "reference.safetensors")
    assert checkpoint.keys() == reference.keys() and all(torch.equal(checkpoint[k], reference[k]) for k in reference)
    # rmfast-export from that checkpoint writes the end-of-run export's weights and config
    (out / "checkpoints" / "latest").write_text("step-1")
    (out / "checkpoints" / "step-1" / "COMPLETE").write_text("")  # as rmfast's own saves mark it
    (out / "config.json").write_text(json.dumps({"model": {"lora_r": 4, "lora_alpha": 8},
                                                 "data": {"eos_after_template": False}}))
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, **METRICS}) + "\n")
    assert export_main([str(out), "--out", str(tmp_path / "again"), "--dtype", "fp32"]) == 0
    a, b = exported_weights(out / "export"), exported_weights(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    exported = json.loads((out / "export" / "config.json").read_text())
    assert exported == json.loads((tmp_path / "again" / "config.json").read_text())


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2"])
def test_lora_on_every_linear_layer_exports_what_the_trained_model_scores(tmp_path, arch, rslora):
    """all-linear LoRA (GPT-2's Conv1D layers store their weights transposed; a square one would merge wrong
    silently) and rsLoRA (alpha / sqrt(r)): the export's weights are PEFT's own merge (merge_and_unload), and
    plain transformers scores as the LoRA model did."""
    from types import SimpleNamespace

    from transformers import AutoModelForSequenceClassification

    from helpers import VOCAB, build as build_arch
    from rmfast.data.tokenizers import train_bpe_tokenizer
    from rmfast.engine import add_lora, config_lora
    from safetensors.torch import load_file

    tok = train_bpe_tokenizer([f"{i} plus {i} is {2 * i}" for i in range(40)], vocab_size=VOCAB)
    model = build_arch(None, arch, vocab=len(tok))
    base_config = copy.deepcopy(model.backbone.config)
    options = SimpleNamespace(lora_r=4, lora_alpha=8.0, lora_dropout=0.0, lora_target_modules=["all-linear"],
                              lora_rslora=rslora)
    model.backbone = add_lora(model.backbone, options)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    model.eval()
    ids = torch.tensor([tok("3 plus 3 is 6")["input_ids"] + [tok.eos_token_id]])
    with torch.no_grad():
        want = model.head.rewards(model.backbone(input_ids=ids).last_hidden_state[0, -1:]).item()
    path = write_export(base_config, model.state_dict(), tok, tmp_path / "export", lora=config_lora(options))
    merged = plain_state(model)  # PEFT's merge
    got = load_file(path / "model.safetensors")
    prefix = AutoModelForSequenceClassification.from_config(base_config).base_model_prefix
    for key, value in merged.items():
        if key.startswith("backbone.") and "rotary" not in key:
            name = f"{prefix}.{key[len('backbone.'):]}"
            if name in got and got[name].shape == value.shape:
                torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
    hf = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert hf(input_ids=ids).logits.item() == pytest.approx(want, abs=1e-4)
