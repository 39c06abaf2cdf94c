"""Train a few steps on pairs with whichever rmfast is first on sys.path and write the per-step losses and the
final eval as JSON: run it with two checkouts on PYTHONPATH in turn to compare their pair training.

    python benchmarks/check/pair_path_run.py SETUP --make            # the data and tokenizer, once
    PYTHONPATH=CHECKOUT python benchmarks/check/pair_path_run.py SETUP ARCH LAYOUT OUT.json

ARCH: one of tests/helpers.py's tiny architectures (llama, mistral, qwen2, qwen3, gemma2, phi3, gpt2), with
-nodrop for dropout 0; MAXLEN in the environment sets data.max_length (default 1024). The model is made once
per ARCH in SETUP by the first run (run this checkout's first: tests/helpers.py reads it) and shared.
Results: benchmarks/results/one_stack_pair_path.md."""

import json
import os
import random
import sys
import tempfile
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[2] / "tests"


def make_setup(setup):
    from rmfast.data import generate_pairs
    from rmfast.data.synthetic import write_jsonl
    from rmfast.data.tokenizers import train_bpe_tokenizer

    rows = generate_pairs(80, seed=0, style="explicit", difficulty="easy")
    rng = random.Random(0)
    for r in rows:  # margins that differ: some absent, some 0, the rest 0–2
        x = rng.random()
        if x < 0.6:
            r["margin"] = round(rng.uniform(0, 2), 2) if x > 0.1 else 0.0
    tok = train_bpe_tokenizer([r["prompt"] + r["chosen"] for r in rows], vocab_size=300)
    tok.save_pretrained(setup / "tok")
    write_jsonl(rows[:60], setup / "train.jsonl")
    write_jsonl(rows[60:], setup / "eval.jsonl")


def make_model(setup, arch, nodrop, model_dir):
    sys.path.insert(0, str(TESTS))
    from helpers import tiny_config
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(setup / "tok")
    cfg = tiny_config(arch, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, bos_id=tok.bos_token_id, vocab=len(tok))
    cfg.max_position_embeddings = 512
    if nodrop:
        cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    torch.manual_seed(0)
    AutoModel.from_config(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)


def main():
    setup = Path(sys.argv[1])
    if sys.argv[2] == "--make":
        return make_setup(setup)
    arch, layout, out = sys.argv[2], sys.argv[3], sys.argv[4]
    nodrop = arch.endswith("-nodrop")
    arch = arch.removesuffix("-nodrop")
    model_dir = setup / (f"model-{arch}" + ("-nodrop" if nodrop else ""))
    if not model_dir.exists():
        make_model(setup, arch, nodrop, model_dir)
    from rmfast import config as config_module
    from rmfast.engine import Trainer, close_distributed

    work = Path(tempfile.mkdtemp())
    config = config_module.build(overrides={
        "model.name_or_path": str(model_dir), "model.dtype": "fp32", "data.train": [str(setup / "train.jsonl")],
        "data.eval": [str(setup / "eval.jsonl")], "data.cache_dir": str(work / "cache"),
        "data.max_length": int(os.environ.get("MAXLEN", "1024")), "train.output_dir": str(work / "run"),
        "train.layout": layout, "train.pairs_per_batch": 6, "train.lr": 1e-3, "train.max_steps": 5,
        "train.log_every": 1, "train.warmup_ratio": 0.0, "train.export": False, "train.tensorboard": False,
        "train.seed": 3, "train.center_coef": 0.01})
    trainer = Trainer(config, log=lambda m: None)
    final = trainer.train()
    close_distributed()
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    json.dump({"losses": [r["loss"] for r in records if "loss" in r],
               "eval": {k: v for k, v in final.items() if k.startswith("eval_")}, "attention": trainer.attention},
              open(out, "w"))


if __name__ == "__main__":
    main()
