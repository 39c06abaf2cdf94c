"""The training config: YAML, flag overrides, DeepSpeed config generation and merging, --help."""

import argparse
import re
import json
import subprocess
import sys

import pytest

from rmfast import config as config_module
from rmfast.engine import deepspeed_config, ensure_pad_token


def parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?")
    config_module.add_arguments(parser)
    args = parser.parse_args(argv)
    return config_module.build(args.config, config_module.overrides_from(args))


def test_yaml_then_flags_override_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name_or_path: m\n  dtype: fp32\ndata:\n  train: [a.jsonl]\n"
                    "train:\n  lr: 0.001\n  zero_stage: 2\n")
    cfg = parse([str(path), "--train.lr", "2e-5", "--data.train", "x.jsonl", "y.jsonl@0.5",
                 "--train.use_margin", "false", "--data.columns", '{"chosen": "good"}'])
    assert cfg.model.name_or_path == "m" and cfg.model.dtype == "fp32"
    assert cfg.train.lr == 2e-5 and cfg.train.zero_stage == 2 and cfg.train.use_margin is False
    assert cfg.data.train == ["x.jsonl", "y.jsonl@0.5"] and cfg.data.columns == {"chosen": "good"}


@pytest.mark.parametrize("text,message", [
    ("modle:\n  dtype: fp32\n", "unknown sections"),
    ("train:\n  learning_rat: 1\n", "unknown train option 'learning_rat'"),
    ("learning_rat: 1\n", r"unknown sections \['learning_rat'\]"),
])
def test_yaml_mistakes_are_named(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        config_module.build(str(path))


def test_bad_choice_is_refused_by_the_parser():
    with pytest.raises(SystemExit):
        parse(["--train.zero_stage", "5"])


def test_deepspeed_config_from_options_and_user_json_merged_over_it(tmp_path):
    user = tmp_path / "ds.json"
    zero = {"reduce_bucket_size": 1000, "stage3_prefetch_bucket_size": "auto"}
    user.write_text(json.dumps({"zero_optimization": zero, "gradient_clipping": 1.0, "train_batch_size": "auto"}))
    cfg = parse(["--train.zero_stage", "3", "--train.offload_optimizer", "true", "--train.offload_params", "true",
                 "--train.grad_accum", "4", "--train.pairs_per_batch", "2", "--model.dtype", "bf16",
                 "--train.deepspeed_config", str(user)])
    ds = deepspeed_config(cfg, world_size=8, hidden_size=64)
    assert ds["train_batch_size"] == 2 * 4 * 8 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert z["reduce_bucket_size"] == 1000 and ds["gradient_clipping"] == 1.0
    assert z["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)  # "auto" as transformers fills it


@pytest.mark.parametrize("user,words", [
    ({"train_batch_size": 64}, ["train_batch_size is 64", "train.pairs_per_batch"]),
    ({"gradient_accumulation_steps": 2}, ["gradient_accumulation_steps is 2", "train.grad_accum"]),
    ({"bf16": {"enabled": True}}, ["bf16.enabled is True", "model.dtype"]),
    ({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}, ["'optimizer' section", "train.lr"]),
    ({"zero_optimization": {"sub_group_size": "auto"}}, ["sub_group_size is \"auto\""]),
    ("{not json", ["not valid JSON", "line 1"]),
])
def test_a_deepspeed_json_that_disagrees_is_refused_naming_the_key(tmp_path, user, words):
    from rmfast.errors import UserError

    path = tmp_path / "ds.json"
    path.write_text(user if isinstance(user, str) else json.dumps(user))
    cfg = parse(["--model.dtype", "fp32", "--train.deepspeed_config", str(path)])
    with pytest.raises(UserError) as caught:
        deepspeed_config(cfg, world_size=2)
    assert str(path) in str(caught.value) and all(w in str(caught.value) for w in words), str(caught.value)


def test_offload_needs_a_zero_stage():
    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_config(parse(["--train.offload_optimizer", "true"]), 1)
    with pytest.raises(ValueError, match="zero_stage 3"):
        deepspeed_config(parse(["--train.zero_stage", "2", "--train.offload_params", "true"]), 1)


def test_tokenizer_without_pad_gets_one():
    from rmfast.data.tokenizers import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["a b c"] * 5, vocab_size=300)
    tok.pad_token = None
    assert ensure_pad_token(tok) is False and tok.pad_token_id == tok.eos_token_id
    tok.pad_token = None
    tok.eos_token = None
    assert ensure_pad_token(tok) is True and tok.pad_token == "<|pad|>"


def test_help_lists_every_section(capsys):
    from rmfast import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for text in ("--demo", "model options", "data options", "train options", "--train.zero_stage",
                 "--data.on_bad_row", "torchrun --nproc_per_node", "--learning_rate"):
        assert text in out


def test_missing_model_or_data_is_an_error_with_advice(capsys):
    from rmfast import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main([])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--demo" in err
    # two lines, not argparse's whole usage block of every option
    assert len(err.splitlines()) == 2 and "usage:" not in err and "--help" in err


@pytest.mark.slow  # a process of its own (imports torch and the libraries): over 5 s
def test_attention_that_cannot_run_here_is_refused_before_data_is_read(tmp_path):
    # a model folder with a config only, and no data file at all: the refusal must come first, as one line
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=64).save_pretrained(tmp_path / "model")
    out = subprocess.run([sys.executable, "-m", "rmfast.cli", "--model.name_or_path", str(tmp_path / "model"),
                          "--data.train", str(tmp_path / "missing.jsonl"), "--train.output_dir", str(tmp_path / "o"),
                          "--train.attention", "varlen"], capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    assert "rmfast-train: attention 'varlen' needs a CUDA GPU" in out.stderr
    assert "Traceback" not in out.stderr and "missing.jsonl" not in out.stderr


@pytest.mark.parametrize("flag,value,message", [
    ("train.log_every", 0, "train.log_every must be ≥ 1, got 0"),
    ("train.grad_accum", 0, "train.grad_accum must be ≥ 1, got 0"),
    ("train.max_steps", -5, "train.max_steps must be ≥ 0, got -5"),
    ("train.epochs", 0.0, "train.epochs must be > 0"),
    ("train.lr", 0.0, "train.lr must be > 0"),
    ("train.warmup_ratio", 1.5, "train.warmup_ratio must be in [0, 1]"),
    ("train.adam_betas", [0.9], "train.adam_betas must be two values"),
    ("train.lr", "fast", "train.lr must be float, got 'fast'"),
    ("train.zero_stage", 5, "train.zero_stage must be one of 0, 1, 2, 3"),
    ("train.layout", "pad", "train.layout must be one of"),
    ("train.export", "yes", "train.export must be bool"),
    ("model.lora_r", -1, "model.lora_r must be ≥ 0"),
    ("model.dtype", "fp8", "model.dtype must be one of"),
])
def test_bad_values_are_refused_when_the_config_is_built(flag, value, message):
    # YAML bypasses argparse's types and choices: the config checks every value itself
    with pytest.raises(ValueError, match=re.escape(message)):
        config_module.build(overrides={flag: value})


def test_yaml_ints_for_floats_are_taken_as_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1\n  warmup_ratio: 0\n")
    cfg = config_module.build(str(path))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_numbers_as_people_write_them_in_yaml(tmp_path):
    # YAML 1.1 reads 1e-5 (no dot) as a string
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-5\n  max_steps: 1e3\n  warmup_ratio: 3e-2\n")
    cfg = config_module.build(str(path))
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.warmup_ratio) == (1e-5, 1000, 0.03)
    assert isinstance(cfg.train.max_steps, int)
    for text, message in (("  max_steps: 1e-1\n", "train.max_steps must be int, got '1e-1'"),
                          ("  lr: fast\n", "train.lr must be float, got 'fast'")):
        path.write_text("train:\n" + text)
        with pytest.raises(ValueError, match=re.escape(message)):
            config_module.build(str(path))


def test_transformers_option_names_stand_for_ours(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: m\nlearning_rate: 1e-5\nper_device_train_batch_size: 4\nbf16: false\n"
                    "train:\n  gradient_accumulation_steps: 2\n  num_train_epochs: 3\n")
    cfg = parse([str(path), "--lr_scheduler_type", "linear", "--center_rewards_coefficient", "0.01"])
    assert (cfg.model.name_or_path, cfg.train.lr, cfg.train.pairs_per_batch, cfg.model.dtype) == ("m", 1e-5, 4, "fp32")
    assert (cfg.train.grad_accum, cfg.train.epochs, cfg.train.scheduler, cfg.train.center_coef) == (2, 3.0, "linear",
                                                                                                     0.01)
    assert parse(["--fp16", "true", "--per_device_eval_batch_size", "7"]).model.dtype == "fp16"
    with pytest.raises(ValueError, match=r"learning_rate \(2e-05\) and train.lr \(1e-05\) disagree"):
        parse(["--learning_rate", "2e-5", "--train.lr", "1e-5"])
    path.write_text("bf16: true\nmodel:\n  dtype: fp32\n")
    with pytest.raises(ValueError, match="bf16: True and model.dtype .'fp32'. disagree"):
        config_module.build(str(path))
    with pytest.raises(SystemExit):  # argparse checks an alias's value as the option's own
        parse(["--lr_scheduler_type", "warmup_stable"])


@pytest.mark.slow  # a process of its own (imports torch and the libraries): over 5 s
def test_a_bad_value_is_one_line_before_anything_loads(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rmfast.cli", "--model.name_or_path", str(tmp_path / "none"),
                          "--data.train", str(tmp_path / "missing.jsonl"), "--train.log_every", "0"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "train.log_every must be ≥ 1, got 0" in out.stderr
    assert "Traceback" not in out.stderr and "missing.jsonl" not in out.stderr
