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
from . import errors


def demo_setup(out_dir, pairs=3000, seed=0, max_operand=9, max_history=2, difficulty="easy"):
    """Synthetic arithmetic pairs (out_dir/demo-data), a BPE tokenizer trained on them and a tiny Llama
    (out_dir/demo-model). Returns the config overrides that train on them (their output_dir is out_dir;
    rmfast-train --demo sets its own beside it)."""
    from transformers import LlamaConfig, LlamaModel

    from .data import generate_pairs
    from .data.synthetic import write_jsonl
    from .data.tokenizers import train_bpe_tokenizer

    out = Path(out_dir)
    kw = {"max_operand": max_operand, "max_history": max_history, "difficulty": difficulty}
    data = write_jsonl(generate_pairs(pairs, seed=seed, **kw), out / "demo-data" / "train.jsonl")
    evald = write_jsonl(generate_pairs(400, seed=seed + 1, **kw), out / "demo-data" / "eval.jsonl")
    model_dir = out / "demo-model"
    if not (model_dir / "config.json").exists():
        texts = [m["content"] for r in generate_pairs(2000, seed=seed + 2)
                 for m in r["prompt"] + r["chosen"] + r["rejected"]]
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
        "train.warmup_ratio": 0.05, "train.use_margin": False, "train.eval_every": 50, "train.save_every": 0,
        "train.weight_decay": 0.0,
        "train.log_every": 5, "train.tensorboard": False, "train.overwrite": True,
    }


def main(argv=None):
    parser = errors.ArgumentParser(prog="rmfast-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="YAML config (sections model, data, train)")
    parser.add_argument("--demo", action="store_true",
                        help="train a tiny model on synthetic arithmetic pairs on CPU (output: runs/demo)")
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' own messages (DeepSpeed, torch, transformers)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    config_module.add_arguments(parser)
    args = parser.parse_args(argv)
    if not args.verbose:
        quiet_libraries()
    try:
        overrides = config_module.overrides_from(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.demo:
        # the demo's model and data beside the run folder, not in it: --train.overwrite never clears a folder
        # that holds a run's inputs
        out = overrides.setdefault("train.output_dir", "runs/demo")
        overrides = {**demo_setup(f"{out.rstrip('/')}-inputs"), **overrides}
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

    # torch's deprecation notices for the collectives DeepSpeed calls (ZeRO-3 gathers, reduce-scatter): not
    # the user's to act on
    warnings.filterwarnings("ignore", message=r".*(reduce_scatter_tensor|all_gather_into_tensor|_all_gather_base).*")
    rank = int(os.environ.get("RANK", "0"))

    def log(message):
        if rank == 0:
            from tqdm.auto import tqdm

            tqdm.write(message)  # above the progress bar, never into it
            sys.stdout.flush()

    trainer = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import signal

        def stopped(signum, frame):  # the launcher ends every rank with SIGTERM when one of them fails
            raise errors.Stopped("stopped by the launcher (SIGTERM: another rank failed or the job was cancelled)")

        signal.signal(signal.SIGTERM, stopped)

    def body():
        nonlocal trainer
        installed("deepspeed", "rmfast-train trains on DeepSpeed")
        if config.model.lora_r:
            installed("peft", "LoRA (--model.lora_r) comes from PEFT")
        from .engine import Trainer, close_distributed

        try:
            trainer = Trainer(config, log=log)
            final = trainer.train()
        except errors.Stopped as exc:
            where = f"at step {trainer.step + 1}" if trainer is not None else "before training started"
            raise errors.Stopped(f"rank {rank}: {exc} {where}; {_resume_hint(config.train.output_dir)}") from None
        except RuntimeError as exc:
            lost = errors.lost_rank(exc)
            if lost is None or int(os.environ.get("WORLD_SIZE", "1")) < 2:
                raise
            where = f"at step {trainer.step + 1}" if trainer is not None else "before training started"
            raise errors.RankLost(f"rank {rank}: {lost} {where}; {_resume_hint(config.train.output_dir)}") from exc
        close_distributed()  # after a success only: see close_distributed
        if rank == 0 and "eval_accuracy" in final:
            pearson = ", ".join(f"{k[len('eval_'):-len('_pearson')]} {v:.3f}" for k, v in final.items()
                                if k.endswith("_pearson"))
            accuracy = f"accuracy {final['eval_accuracy']:.3f}, " if final.get("eval_pairs") or not pearson else ""
            print(f"final eval: {accuracy}loss {final['eval_loss']:.4f}{f', Pearson r {pearson}' if pearson else ''}",
                  flush=True)

    return errors.run("rmfast-train", body, interrupted=lambda: _resume_hint(config.train.output_dir),
                      rank=rank)


def quiet_libraries():
    """The libraries' start-up noise off (--verbose keeps it): DeepSpeed's accelerator and op-build messages,
    torch's CUDA_HOME note, transformers' loading bars and advice. Their errors still show."""
    logging.disable(logging.WARNING)  # DeepSpeed logs the accelerator it picked while it is imported
    try:
        import torch.utils.cpp_extension  # noqa: F401

        import deepspeed  # noqa: F401
    except ImportError:
        pass  # not installed: the run is refused with a line that says what to install
    finally:
        logging.disable(logging.NOTSET)
    for name in ("DeepSpeed", "torch.utils.cpp_extension", "torch.distributed", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def _resume_hint(output_dir):
    from .checkpoint import checkpoint_tags
    from .runfolder import RunFolder

    root = RunFolder(output_dir).checkpoints
    tags = checkpoint_tags(root)
    if not tags:
        return "no checkpoint was saved (--train.save_every N saves during a run)"
    return f"the last complete checkpoint is {root / tags[-1]}; continue with --train.resume latest"


def installed(module, why):
    """Refuse, in one line, a run that needs a package the install left out (the loss, the scorer and the
    server work without DeepSpeed and PEFT; training needs them: the `train` extra)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise errors.UserError(f"{why}, which is not installed: pip install 'rmfast[train]' (or pip install {module})")


def entry(argv=None):
    """The rmfast-train command: main, then out. With several ranks the process leaves without the
    interpreter's teardown: gloo's threads can abort a process at that point (std::terminate, SIGABRT) even
    after its group was destroyed, and the launcher then reports a run that succeeded as failed."""
    status = main(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(entry())
