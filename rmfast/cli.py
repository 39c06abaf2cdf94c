"""rmfast-train: train a reward model.

  rmfast-train --demo                                   # tiny model, synthetic data, CPU, about a minute
  rmfast-train config.yaml [--train.lr 2e-5 ...]        # a YAML config, any field overridden by a flag
  rmfast-train --model.name_or_path DIR --data.train pairs.jsonl --train.output_dir runs/rm

Several processes: start it with a launcher —
  deepspeed --num_gpus 8 $(which rmfast-train) config.yaml
  torchrun --nproc_per_node 8 $(which rmfast-train) config.yaml
  deepspeed --hostfile hosts --num_nodes 2 --num_gpus 8 $(which rmfast-train) config.yaml
"""

import argparse
import logging
import os
import warnings
import sys
from pathlib import Path

from . import config as config_module


def demo_setup(out_dir, pairs=3000, seed=0, max_operand=9, max_history=2, difficulty="easy"):
    """Synthetic arithmetic pairs, a BPE tokenizer trained on them and a tiny Llama, written under out_dir.
    Returns the config overrides that train on them."""
    from transformers import LlamaConfig, LlamaModel

    from .data import generate_pairs
    from .data.synthetic import write_jsonl
    from .data.tokenizers import train_bpe_tokenizer

    out = Path(out_dir)
    data = write_jsonl(generate_pairs(pairs, seed=seed, max_operand=max_operand, max_history=max_history, difficulty=difficulty), out / "demo-data" / "train.jsonl")
    evald = write_jsonl(generate_pairs(400, seed=seed + 1, max_operand=max_operand, max_history=max_history, difficulty=difficulty), out / "demo-data" / "eval.jsonl")
    model_dir = out / "demo-model"
    if not (model_dir / "config.json").exists():
        texts = [m["content"] for r in generate_pairs(2000, seed=seed + 2) for m in r["prompt"] + r["chosen"] + r["rejected"]]
        tok = train_bpe_tokenizer(texts, vocab_size=512)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
        import torch

        torch.manual_seed(seed)
        LlamaModel(cfg).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    return {
        "model.name_or_path": str(model_dir), "model.dtype": "fp32",
        "data.train": [str(data)], "data.eval": [str(evald)], "data.max_length": 256,
        "train.output_dir": str(out), "train.pairs_per_batch": 32, "train.lr": 2e-3, "train.epochs": 2.0,
        "train.warmup_ratio": 0.05, "train.use_margin": False, "train.eval_every": 50, "train.save_every": 0, "train.weight_decay": 0.0,
        "train.log_every": 5, "train.tensorboard": False,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="rmfast-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="YAML config (sections model, data, train)")
    parser.add_argument("--demo", action="store_true",
                        help="train a tiny model on synthetic arithmetic pairs on CPU (output: runs/demo)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    config_module.add_arguments(parser)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if "." in k}
    if args.demo:
        out = overrides.get("train.output_dir", "runs/demo")
        overrides = {**demo_setup(out), **overrides}
    elif not args.config and "model.name_or_path" not in overrides:
        parser.error("give a YAML config, --model.name_or_path and --data.train, or --demo")
    try:
        config = config_module.build(args.config, overrides)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        parser.error(str(exc))
    if not config.model.name_or_path:
        parser.error("model.name_or_path is not set")
    if not config.data.train:
        parser.error("data.train is not set: give at least one source")

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.*")  # DeepSpeed's, once per step
    from .data import DataError
    from .engine import NonFiniteLoss, Trainer

    rank = int(os.environ.get("RANK", "0"))

    def log(message):
        if rank == 0:
            print(message, flush=True)

    try:
        trainer = Trainer(config, log=log)
        final = trainer.train()
    except (DataError, NonFiniteLoss, FileNotFoundError, ValueError) as exc:
        print(f"rmfast-train: {exc}", file=sys.stderr)
        return 2
    if rank == 0 and "eval_accuracy" in final:
        print(f"final eval: accuracy {final['eval_accuracy']:.3f}, loss {final['eval_loss']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
