"""rmfast-train end to end on CPU: one rank and two ranks over gloo, ZeRO 0/2/3, SIGKILL and resume,
export after ZeRO-3, the non-finite guard, and the demo. Each run is its own process, as in real use."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import clean_env, command, free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def setup(engine_setup):
    return engine_setup


def args_for(setup, out, **overrides):
    base = {
        "model.name_or_path": setup / "model", "model.dtype": "fp32", "data.train": setup / "train.jsonl",
        "data.eval": setup / "eval.jsonl", "data.cache_dir": setup / "cache", "train.output_dir": out,
        "train.pairs_per_batch": 4, "train.lr": 1e-3, "train.max_steps": 12, "train.log_every": 1,
        "train.warmup_ratio": 0.0, "train.export": False, "train.tensorboard": False, "train.seed": 3,
    }
    base.update(overrides)
    args = []
    for k, v in base.items():
        args += [f"--{k}", str(v)]
    return args


def train(setup, out, nproc=1, **overrides):
    res = subprocess.run(command(nproc) + args_for(setup, out, **overrides), capture_output=True, text=True,
                         env=clean_env(), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def metrics(out):
    """The last record of each step (a resumed run repeats the steps after its checkpoint)."""
    train_rows, evals = {}, []
    for line in (Path(out) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            train_rows[rec["step"]] = rec
        elif "eval_accuracy" in rec:
            evals.append(rec)
    return [train_rows[s] for s in sorted(train_rows)], evals


def test_two_ranks_zero2_and_zero3_follow_one_rank_zero0(setup, tmp_path):
    # one rank with 2 micro-batches per step sees the same global batches as two ranks with one each; the eval
    # pairs carry margins that differ from pair to pair, in 5 micro-batches the two ranks share unevenly
    rows = [json.loads(line) for line in (setup / "eval.jsonl").read_text().splitlines()]
    margined = tmp_path / "eval-margins.jsonl"
    margined.write_text("".join(json.dumps({**r, "margin": (i % 7) * 0.5}) + "\n" for i, r in enumerate(rows)))
    common = {"data.eval": margined, "train.eval_pairs_per_batch": 8}
    train(setup, tmp_path / "zero0", nproc=1, **{"train.zero_stage": 0, "train.grad_accum": 2, **common})
    base, base_eval = metrics(tmp_path / "zero0")
    assert len(base) == 12
    for stage in (2, 3):
        train(setup, tmp_path / f"zero{stage}", nproc=2, **{"train.zero_stage": stage, **common})
        runs, evals = metrics(tmp_path / f"zero{stage}")
        # two-rank eval is one-rank eval on every metric (the loss subtracts each pair's own margin)
        assert evals[-1].keys() == base_eval[-1].keys()
        for key, value in base_eval[-1].items():
            assert evals[-1][key] == pytest.approx(value, abs=2e-4), (stage, key)
        a = np.array([r["loss"] for r in base])
        b = np.array([r["loss"] for r in runs])
        # fp32; the tolerance covers the different order of gradient reductions over 12 steps
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-4, err_msg=f"ZeRO-{stage} on 2 ranks")
        assert [r["step"] for r in runs] == list(range(1, 13))
    assert a[-1] < a[0]


def test_deepspeed_launcher_runs_as_torchrun_does(setup, tmp_path):
    # the multi-node path of the README: DeepSpeed's launcher starting rmfast-train on two ranks (bf16 at
    # ZeRO-3, where zero.Init makes the backbone bf16 and the head must follow)
    bindir = Path(sys.executable).parent
    out = tmp_path / "launcher"
    run = {"train.zero_stage": 3, "train.max_steps": 6, "model.dtype": "bf16", "model.lora_r": 4}
    cmd = [str(bindir / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(bindir / "rmfast-train")]
    res = subprocess.run(cmd + args_for(setup, out, **run), capture_output=True, text=True, env=clean_env(),
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "(bfloat16)" in res.stdout + res.stderr
    # the same run as two nodes of one rank each, each with a node-local cache (empty): each node tokenizes the
    # data once, node 1 after node 0 (tokenized once per node), and trains as the launcher's two ranks did
    port, procs = free_port(), []
    for node in (0, 1):
        env = {**clean_env(), "RMFAST_CACHE": str(tmp_path / f"node{node}")}
        args = args_for(setup, tmp_path / "torchrun", **run)
        at = args.index("--data.cache_dir")
        del args[at:at + 2]
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
             "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), "-m",
             "rmfast.cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    entries = [sorted((tmp_path / f"node{n}" / "tokenized").iterdir()) for n in (0, 1)]
    assert [len(e) for e in entries] == [2, 2] and [p.name for p in entries[0]] == [p.name for p in entries[1]]
    assert min(p.stat().st_mtime for p in entries[1]) >= max(p.stat().st_mtime for p in entries[0])
    a, _ = metrics(tmp_path / "torchrun")
    b, _ = metrics(out)
    assert [r["step"] for r in b] == list(range(1, 7))
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=0, atol=1e-6)


def test_prefix_shared_and_packed_training_follow_padded(setup, tmp_path):
    runs = {}
    for layout in ("padded", "packed", "prefix_shared"):
        res = train(setup, tmp_path / layout, **{"train.layout": layout, "train.tensorboard": layout == "padded"})
        assert f"layout: {layout}" in res.stdout
        runs[layout] = [r["loss"] for r in metrics(tmp_path / layout)[0]]
    # TensorBoard got the same training and eval curves as metrics.jsonl, under transformers' names
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "padded" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 13))
    np.testing.assert_allclose([e.value for e in events.Scalars("train/loss")], runs["padded"], rtol=1e-6)
    assert events.Scalars("eval/accuracy")[-1].value == metrics(tmp_path / "padded")[1][-1]["eval_accuracy"]
    assert not (tmp_path / "packed" / "tensorboard").exists()
    # same seeds, same batches: fp32 differences come only from the order of floating-point sums
    np.testing.assert_allclose(runs["prefix_shared"], runs["padded"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(runs["packed"], runs["padded"], rtol=0, atol=1e-4)


def test_zero3_with_cpu_offload_follows_zero0(setup, tmp_path):
    train(setup, tmp_path / "base", **{"train.max_steps": 8})
    train(setup, tmp_path / "offload", **{"train.max_steps": 8, "train.zero_stage": 3,
                                          "train.offload_optimizer": True, "train.offload_params": True})
    a = [r["loss"] for r in metrics(tmp_path / "base")[0]]
    b = [r["loss"] for r in metrics(tmp_path / "offload")[0]]
    np.testing.assert_allclose(b, a, rtol=0, atol=2e-4)


def test_sigkill_then_resume_matches_an_uninterrupted_run(setup, tmp_path):
    steps = {"train.max_steps": 40, "train.save_every": 5, "train.export": True, "train.keep_last": 2}
    train(setup, tmp_path / "whole", **steps)
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(1) + args_for(setup, out, **steps), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=clean_env())
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not latest.exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = latest.read_text()
    train(setup, out, **steps, **{"train.resume": "latest"})
    whole, whole_eval = metrics(tmp_path / "whole")
    resumed, resumed_eval = metrics(out)
    assert len(resumed) == 40 and killed_at.startswith("step-")
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in whole], rtol=0, atol=1e-6)
    assert [r["lr"] for r in resumed] == pytest.approx([r["lr"] for r in whole], rel=1e-9)
    assert resumed_eval[-1]["eval_loss"] == pytest.approx(whole_eval[-1]["eval_loss"], abs=1e-6)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "whole" / "export" / "model.safetensors")
    b = load_file(out / "export" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert len(kept) == 2  # keep_last
    # rmfast-export from the run's latest checkpoint writes the same weights as the end-of-run export, in the
    # run's dtype (fp32 here) unless told otherwise
    subprocess.run([sys.executable, "-m", "rmfast.export", str(out), "--out", str(tmp_path / "again")],
                   check=True, capture_output=True, env=clean_env())
    c = load_file(tmp_path / "again" / "model.safetensors")
    for k in b:
        torch.testing.assert_close(c[k], b[k], rtol=0, atol=1e-6)


def score_with_transformers(export_dir, jsonl, tokenizer_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export_dir)
    model = AutoModelForSequenceClassification.from_pretrained(export_dir, dtype=torch.float32).eval()
    rows = [json.loads(x) for x in Path(jsonl).read_text().splitlines()]
    chosen, rejected = [], []
    with torch.no_grad():
        for r in rows:
            for text, out in ((r["prompt"] + r["chosen"], chosen), (r["prompt"] + r["rejected"], rejected)):
                ids = tok(text)["input_ids"] + [tok.eos_token_id]
                out.append(model(input_ids=torch.tensor([ids])).logits.item())
    return torch.tensor(chosen), torch.tensor(rejected)


def test_export_after_zero3_scores_as_the_engine(setup, tmp_path):
    out = tmp_path / "z3"
    res = train(setup, out, nproc=2, **{"train.zero_stage": 3, "train.export": True, "train.max_steps": 8})
    # each rank loaded only its half of the weights (zero.Init), never the whole model
    held, total = (int(x.replace(",", "")) for x in
                   re.search(r"ZeRO-3: backbone loaded partitioned; rank 0 holds ([\d,]+) of ([\d,]+)",
                             res.stdout + res.stderr).groups())
    assert 0 < held <= total // 2 + 1000 and total > 10000
    # torch's deprecation notices for the collectives DeepSpeed's ZeRO-3 calls are not the user's to read
    assert "FutureWarning" not in res.stderr and "all_gather_into_tensor" not in res.stderr, res.stderr[-3000:]
    _, evals = metrics(out)
    final = evals[-1]
    c, r = score_with_transformers(out / "export", setup / "eval.jsonl", setup / "model")
    assert final["eval_pairs"] == len(c) == 40
    assert float(c.mean()) == pytest.approx(final["eval_chosen_mean"], abs=1e-4)
    assert float(r.mean()) == pytest.approx(final["eval_rejected_mean"], abs=1e-4)
    assert float((c > r).float().mean()) == pytest.approx(final["eval_accuracy"])
    config = json.loads((out / "export" / "config.json").read_text())
    assert config["rmfast_reward_mean"] == pytest.approx(final["eval_reward_mean"])


@pytest.mark.parametrize("nproc,stage", [(1, 0), (2, 3)], ids=["one-rank-zero0", "two-ranks-zero3"])
def test_lora_run_exports_merged_weights_and_its_trained_head(setup, tmp_path, nproc, stage):
    from safetensors.torch import load_file

    from rmfast.export import load_checkpoint_state

    out = tmp_path / "lora"
    train(setup, out, nproc=nproc, **{"model.lora_r": 4, "model.lora_alpha": 8, "train.export": True,
                                      "train.max_steps": 8, "train.lr": 1e-2, "train.zero_stage": stage})
    _, evals = metrics(out)
    c, r = score_with_transformers(out / "export", setup / "eval.jsonl", setup / "model")
    assert float(c.mean()) == pytest.approx(evals[-1]["eval_chosen_mean"], abs=1e-4)
    assert float((c > r).float().mean()) == pytest.approx(evals[-1]["eval_accuracy"])
    exported = load_file(out / "export" / "model.safetensors")
    base = load_file(setup / "model" / "model.safetensors")
    trained = load_checkpoint_state(out / "checkpoints" / (out / "checkpoints" / "latest").read_text())
    # the value head is trained and saved (not re-initialised on save)
    torch.testing.assert_close(exported["score.weight"].reshape(-1), trained["head.weight"].float(), rtol=0, atol=1e-6)
    # adapters merged into the attention weights; weights without adapters untouched
    q_proj = "layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(exported[f"model.{q_proj}"], base[q_proj])
    torch.testing.assert_close(exported["model.layers.0.mlp.up_proj.weight"], base["layers.0.mlp.up_proj.weight"])
    # rmfast-export from the checkpoint merges the same way
    subprocess.run([sys.executable, "-m", "rmfast.export", str(out), "--out", str(tmp_path / "again"),
                    "--dtype", "fp32"], check=True, capture_output=True, env=clean_env())
    again = load_file(tmp_path / "again" / "model.safetensors")
    for k in exported:
        torch.testing.assert_close(again[k], exported[k], rtol=0, atol=1e-6)


def test_non_finite_loss_stops_the_run_naming_the_step(setup, tmp_path):
    res = subprocess.run(command(1) + args_for(setup, tmp_path / "nan", **{"train.lr": 1e30}),
                         capture_output=True, text=True, env=clean_env(), timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]  # a failure, not a usage error
    assert "non-finite loss at step" in res.stderr and "nothing was trained on it" in res.stderr
    assert "Traceback" not in res.stderr


def test_demo_reaches_95_percent_eval_accuracy(tmp_path):
    res = subprocess.run([sys.executable, "-m", "rmfast.cli", "--demo", "--train.output_dir", str(tmp_path)],
                         capture_output=True, text=True, env=clean_env(), timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    _, evals = metrics(tmp_path)
    assert evals[0]["eval_accuracy"] < 0.8 and evals[-1]["eval_accuracy"] >= 0.95, evals


_NAN_AT_THIRD = r'''
import json, sys
from rmfast import config as config_module
from rmfast.engine import NonFiniteLoss, Trainer

trainer = Trainer(config_module.build(overrides=json.loads(sys.argv[1])), log=print)
forward, calls = trainer.forward, [0]


def third_is_nan(batch):  # the third micro-batch's loss is NaN, as a diverging batch's would be
    calls[0] += 1
    out = forward(batch)
    return out._replace(loss=out.loss * float("nan")) if calls[0] == 3 else out


trainer.forward = third_is_nan
try:
    trainer.train()
except NonFiniteLoss as exc:
    print("STOPPED", exc)
'''


@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_a_non_finite_micro_batch_is_skipped_or_stops_the_run(setup, tmp_path, mode):
    out = tmp_path / mode
    overrides = {"model.name_or_path": str(setup / "model"), "model.dtype": "fp32",
                 "data.train": [str(setup / "train.jsonl")], "data.cache_dir": str(setup / "cache"),
                 "train.output_dir": str(out), "train.pairs_per_batch": 4, "train.max_steps": 6,
                 "train.log_every": 1, "train.export": False, "train.tensorboard": False,
                 "train.on_nonfinite": mode}
    res = subprocess.run([sys.executable, "-c", _NAN_AT_THIRD, json.dumps(overrides)], capture_output=True,
                         text=True, env=clean_env(), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    steps, _ = metrics(out)
    if mode == "skip":
        assert "skipping non-finite loss at step 3" in res.stdout and "STOPPED" not in res.stdout
        assert [r["step"] for r in steps] == list(range(1, 7)) and all(np.isfinite(r["loss"]) for r in steps)
    else:
        assert "STOPPED non-finite loss at step 3" in res.stdout
        assert [r["step"] for r in steps] == [1, 2]  # nothing trained on step 3


def test_token_budget_cuts_micro_batches_by_layout_cost(setup, tmp_path):
    train(setup, tmp_path / "budget", **{"train.token_budget": 400, "train.layout": "prefix_shared"})
    steps, _ = metrics(tmp_path / "budget")
    assert len(steps) == 12 and all(r["tokens"] <= 400 for r in steps)
    assert len({r["pairs"] for r in steps}) > 1  # as many pairs as fit, not a fixed number


def test_resume_on_another_number_of_ranks_is_refused(setup, tmp_path):
    out = tmp_path / "run"
    train(setup, out, **{"train.max_steps": 2})
    res = subprocess.run(command(2) + args_for(setup, out, **{"train.max_steps": 4, "train.resume": "latest"}),
                         capture_output=True, text=True, env=clean_env(), timeout=600)
    assert res.returncode != 0
    assert "world_size: 1 then, 2 now (never allowed: resume with the same number of ranks)" in res.stderr


_LEAVES_ITS_GROUP = r'''
import json, os, sys
import torch.distributed as dist
from rmfast.cli import main

launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
before = {k: os.environ.get(k) for k in launcher}
runs, args = int(sys.argv[3]), sys.argv[4:]
status = [main(args + ["--train.output_dir", sys.argv[2] + "-1"])]
left = {"group": dist.is_initialized(), "env": {k: os.environ.get(k) for k in launcher} == before}
if runs == 2:  # a second run in this process, as a notebook or a sweep would start it
    status.append(main(args + ["--train.output_dir", sys.argv[2] + "-2"]))
    left["group_after_second"] = dist.is_initialized()
left["status"] = status
with open(sys.argv[1] + "-" + os.environ.get("RANK", "alone") + ".json", "w") as f:
    json.dump(left, f)
'''


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_finished_run_leaves_its_process_group(setup, tmp_path, nproc):
    # a gloo group alive when the interpreter exits can abort a run that succeeded (SIGABRT from std::terminate)
    # and, without a launcher, a second run in the same process starts afresh (a new group on a new port, and
    # DeepSpeed's references to the old one gone). Under a launcher torch cannot rendezvous twice in one process
    script = tmp_path / "leaves.py"
    script.write_text(_LEAVES_ITS_GROUP)
    launch = [sys.executable] if nproc == 1 else command(2)[:-2]  # torchrun, without its "-m rmfast.cli"
    env = clean_env()
    env["MASTER_ADDR"] = "localhost"  # set outside a launcher too: a launcher-less run must put it back
    res = subprocess.run(launch + [str(script), str(tmp_path / "left"), str(tmp_path / "run"), str(3 - nproc)] +
                         args_for(setup, tmp_path / "unused", **{"train.max_steps": 3, "train.eval_every": 3}),
                         capture_output=True, text=True, env=env, timeout=300)  # about 20 s
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    records = sorted(tmp_path.glob("left-*.json"))
    assert [p.name for p in records] == (["left-alone.json"] if nproc == 1 else ["left-0.json", "left-1.json"])
    for path in records:
        left = json.loads(path.read_text())
        # no group left, and the launcher variables as they were before the run (the launcher's stay)
        want = {"status": [0, 0], "group": False, "env": True, "group_after_second": False} if nproc == 1 else \
            {"status": [0], "group": False, "env": True}
        assert left == want, left
    if nproc == 2:
        return

    def curves(out):  # the speeds differ from run to run; what was computed must not
        steps, evals = metrics(out)
        return [r["loss"] for r in steps], [{k: v for k, v in r.items() if k.startswith("eval_")} for r in evals]

    first = curves(tmp_path / "run-1")
    assert len(first[0]) == 3 and len(first[1]) == 2 and first == curves(tmp_path / "run-2")  # the same seed


def test_the_process_group_builds_no_deepspeed_inference_op():
    """DeepSpeed's shared-memory all-reduce (a C++ build of minutes on a CPU machine's first run) serves
    only its inference all-reduce: rmfast's process group does without it, and training all-reduces still
    go through torch."""
    script = ("import torch\nfrom deepspeed.comm import comm as c\n"
              "from rmfast.distributed import close_distributed, init_distributed\n"
              "init_distributed(60)\n"
              "t = torch.ones(3)\n"
              "c.all_reduce(t)\n"
              "print(c.cdb.shm_comm_op, t.tolist())\n"
              "close_distributed()\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=clean_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split("\n")[-2] == "None [1.0, 1.0, 1.0]", res.stdout
