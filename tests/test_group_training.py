"""rmfast-train on groups (data.kind groups) end to end on CPU: a tiny model learns to rank synthetic groups,
prefix_shared training follows padded training, two ranks follow one. Each run is its own process, as in real
use. (Pair rows read as groups give the pair reader's tokens exactly, tests/test_group_data.py; below the
readers pairs and groups are one code path.)"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import clean_env, command, train_cli
from rmfast.data import generate_groups
from rmfast.data.synthetic import write_jsonl

pytestmark = pytest.mark.slow


def metrics(out):
    steps, evals = [], []
    for line in (Path(out) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            steps.append(rec)
        elif "eval_accuracy" in rec:
            evals.append(rec)
    return steps, evals


def base_args(setup, out, **overrides):
    args = {
        "model.name_or_path": setup / "model", "model.dtype": "fp32", "data.cache_dir": setup / "cache",
        "train.output_dir": out, "train.pairs_per_batch": 4, "train.lr": 1e-3, "train.max_steps": 8,
        "train.log_every": 1, "train.warmup_ratio": 0.0, "train.export": False, "train.tensorboard": False,
        "train.seed": 3,
    }
    args.update(overrides)
    return args


@pytest.fixture(scope="module")
def groups_data(engine_setup, tmp_path_factory):
    """Explicit-style groups of 3 and 4 answers, in the vocabulary of engine_setup's tokenizer."""
    root = tmp_path_factory.mktemp("groups")
    rows = generate_groups(60, k=4, seed=5, style="explicit", max_history=1, shape="scores")
    rows += generate_groups(40, k=3, seed=6, style="explicit", max_history=1, shape="ranking")
    write_jsonl(rows[:50] + rows[60:90], root / "train.jsonl")
    write_jsonl(rows[50:60] + rows[90:], root / "eval.jsonl")
    return root


def test_groups_learn_to_rank_held_out_groups(tmp_path):
    # the pair demo's model (a 2-layer Llama, hidden 128, BPE of 512) on ranked groups of 4 answers: the right
    # one and three wrong ones, ranked by how far they are from the truth — every comparison counts, so the
    # model must order the wrong answers too, not only find the right one
    from rmfast.cli import demo_setup

    demo = demo_setup(tmp_path / "demo", pairs=10)
    kw = {"k": 4, "max_operand": 3, "max_history": 0, "shape": "ranking"}
    train = write_jsonl(generate_groups(600, seed=0, **kw), tmp_path / "train.jsonl")
    held_out = write_jsonl(generate_groups(100, seed=1, **kw), tmp_path / "eval.jsonl")
    out = tmp_path / "run"
    res = train_cli({
        "model.name_or_path": demo["model.name_or_path"], "model.dtype": "fp32", "data.kind": "groups",
        "data.train": train, "data.eval": held_out, "data.max_length": 256, "train.output_dir": out,
        "train.pairs_per_batch": 16, "train.lr": 3e-3, "train.epochs": 6.0, "train.warmup_ratio": 0.05,
        "train.log_every": 10, "train.export": True, "train.tensorboard": False})
    assert "layout: prefix_shared" in res.stdout
    assert "data: 700 rows read, 700 groups kept (4200 comparisons); 0 truncated" in res.stdout
    assert "data: 0 tied response pairs (no comparison), 0 identical responses merged" in res.stdout
    assert "eval groups at step 0: top-1 accuracy" in res.stdout
    steps, evals = metrics(out)
    first, last = evals[0], evals[-1]
    assert last["eval_pairs"] == 600 and last["eval_groups"] == 100
    assert first["eval_accuracy"] < 0.8
    assert last["eval_accuracy"] >= 0.95, evals
    assert last["eval_kendall_tau"] > 0.85 and last["eval_top1_accuracy"] > 0.8, last
    assert all(r["pairs"] % 6 == 0 for r in steps)  # comparisons: 6 per group of 4
    assert {"loss", "accuracy", "pairs", "tokens", "pairs_per_s", "tokens_per_s", "positions_per_pair"} <= set(steps[0])
    exported = json.loads((out / "export" / "config.json").read_text())
    assert exported["rmfast_reward_mean"] == pytest.approx(last["eval_reward_mean"])
    saved = json.loads((out / "config.json").read_text())
    assert saved["data"]["kind"] == "groups"
    # rmfast-score on the export measures the held-out groups as the engine's last eval did
    from rmfast.score import main as score_main

    summary = tmp_path / "summary.json"
    assert score_main([str(out / "export"), str(held_out), "--out", str(tmp_path / "scores.jsonl"),
                       "--summary", str(summary)]) == 0
    scored = json.loads(summary.read_text())["overall"]
    assert scored["groups"] == 100 and scored["comparisons"] == 600
    assert scored["comparison_accuracy"] == pytest.approx(last["eval_accuracy"], abs=1 / 600)
    assert scored["top1_accuracy"] == pytest.approx(last["eval_top1_accuracy"], abs=1 / 100)
    assert scored["kendall_tau"] == pytest.approx(last["eval_kendall_tau"], abs=2 / 600)


def test_prefix_shared_group_training_follows_padded(engine_setup, groups_data, tmp_path):
    runs, evals = {}, {}
    for layout in ("padded", "prefix_shared"):
        out = tmp_path / layout
        res = train_cli(base_args(engine_setup, out, **{
            "data.kind": "groups", "data.train": groups_data / "train.jsonl", "data.eval": groups_data / "eval.jsonl",
            "train.layout": layout, "train.group_weighting": "group", "train.margin_scale": 0.1}))
        assert f"layout: {layout}" in res.stdout
        steps, ev = metrics(out)
        assert [r["step"] for r in steps] == list(range(1, 9))
        runs[layout], evals[layout] = [r["loss"] for r in steps], ev[-1]
        assert [r["pairs"] for r in steps] == [r["pairs"] for r in metrics(tmp_path / "padded")[0]]
    # same seeds, same groups in the same batches: fp32 differences come only from the order of sums
    np.testing.assert_allclose(runs["prefix_shared"], runs["padded"], rtol=0, atol=1e-4)
    for key in ("eval_loss", "eval_accuracy", "eval_top1_accuracy", "eval_kendall_tau", "eval_reward_mean"):
        assert evals["prefix_shared"][key] == pytest.approx(evals["padded"][key], abs=1e-4), key
    assert evals["padded"]["eval_groups"] == 20 and evals["padded"]["eval_pairs"] == 10 * 6 + 10 * 3


@pytest.mark.slow
def test_two_ranks_zero3_on_groups_follow_one_rank_zero0(engine_setup, groups_data, tmp_path):
    """Groups sharded over two ranks (gloo) at ZeRO-3 follow one rank at ZeRO-0 that takes both ranks'
    micro-batches in one step; the eval over the two ranks' shards, gathered, is the one-rank eval. The groups
    are rated too (a length attribute per response, a fifth missing) and trained with regression +
    Bradley–Terry: the [A, D] attribute head is partitioned, gathered for the combined head the fused loss
    reads, and exported as an A-label model from the two ranks."""
    rng = np.random.default_rng(0)
    for split in ("train", "eval"):
        rows = [json.loads(x) for x in (groups_data / f"{split}.jsonl").read_text().splitlines()]
        for r in rows:
            r["words"] = [None if rng.random() < 0.2 else len(x.split()) for x in r["responses"]]
            r["chars"] = [len(x) / 10 for x in r["responses"]]
        write_jsonl(rows, tmp_path / f"{split}.jsonl")
    runs = {}
    for nproc, stage, accum in ((1, 0, 2), (2, 3, 1)):
        out = tmp_path / f"zero{stage}"
        args = base_args(engine_setup, out, **{
            "data.kind": "groups", "data.train": tmp_path / "train.jsonl", "data.eval": tmp_path / "eval.jsonl",
            "data.attributes": "words chars", "train.objective": "regression+bradley_terry",
            "train.zero_stage": stage, "train.grad_accum": accum, "train.eval_every": 8, "train.export": stage == 3})
        flat = []
        for k, v in args.items():
            flat += [f"--{k}", *(str(v).split() if k == "data.attributes" else [str(v)])]
        res = subprocess.run(command(nproc) + flat, capture_output=True, text=True, env=clean_env(), timeout=900)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
        runs[nproc] = metrics(out)
    (one, one_eval), (two, two_eval) = runs[1], runs[2]
    assert [r["step"] for r in two] == list(range(1, 9)) and [r["pairs"] for r in two] == [r["pairs"] for r in one]
    # fp32; the tolerance covers the different order of gradient reductions over 8 steps
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=0, atol=2e-4)
    for key in ("eval_pairs", "eval_groups", "eval_accuracy", "eval_top1_accuracy", "eval_attribute_values"):
        assert two_eval[-1][key] == one_eval[-1][key], key
    for key in ("eval_loss", "eval_words_pearson", "eval_chars_rmse"):
        assert two_eval[-1][key] == pytest.approx(one_eval[-1][key], abs=1e-3), key
    config = json.loads((tmp_path / "zero3" / "export" / "config.json").read_text())
    assert config["id2label"] == {"0": "words", "1": "chars"} and config["rmfast_attribute_weights"] == [0.5, 0.5]


def test_group_options_are_checked_before_anything_loads(engine_setup, tmp_path):
    from rmfast import config as config_module

    with pytest.raises(ValueError, match="data.kind must be one of pairs, groups"):
        config_module.build(None, {"data.kind": "triples"})
    with pytest.raises(ValueError, match="train.group_weighting must be one of comparison, group"):
        config_module.build(None, {"train.group_weighting": "response"})
    with pytest.raises(ValueError, match="train.margin_scale must be ≥ 0"):
        config_module.build(None, {"train.margin_scale": -1.0})
    assert config_module.build(None, {"data.kind": "groups", "train.layout": "packed"}).train.layout == "packed"


def test_rmfast_data_synth_groups_and_inspect(tmp_path):
    from rmfast.data.cli import main
    from rmfast.data.loader import DataConfig, Source, read_groups

    path = tmp_path / "g.jsonl"
    assert main(["synth", "--groups", "4", "--pairs", "30", "--out", str(path)]) == 0
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == 30 and all(len(r["responses"]) == 4 and sorted(r["ranking"]) == [0, 1, 2, 3] for r in rows)
    groups, report = read_groups(Source.parse(str(path)), DataConfig(train=[str(path)]))
    assert len(groups) == 30 and not report.bad
    res = subprocess.run([sys.executable, "-m", "rmfast.data.cli", "inspect", str(path), "--vocab-size", "300"],
                         capture_output=True, text=True, env=clean_env(), timeout=300)
    assert res.returncode == 0, res.stderr
    assert "30 rows read, 30 groups kept (180 comparisons)" in res.stdout
    assert "responses per group: 4: 30 groups" in res.stdout
    assert "token positions per comparison: padded" in res.stdout and "prefix shared" in res.stdout
