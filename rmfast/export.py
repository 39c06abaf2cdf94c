"""Export: a Hugging Face folder that ``AutoModelForSequenceClassification.from_pretrained`` loads with one
label, the value head as its score, safetensors weights, the tokenizer, and the eval set's reward mean and
std in the config (``rmfast_reward_mean`` / ``rmfast_reward_std``).

Plain transformers reads the reward at the rightmost token that is not the pad id. rmfast reads it at the
last token (EOS). So that both agree, the export's pad id must differ from every real token: when the
tokenizer has no pad token, or pads with EOS, the export adds a pad token (one more embedding row)."""

import json
import sys
from pathlib import Path

import torch

from .model import RewardModel

PAD_TOKEN = "<|rmfast_pad|>"


def _full_state_dict(model, zero_stage):
    """A CPU state dict with every parameter whole (ZeRO-3 partitions are gathered)."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def merge_lora(state, r, alpha):
    """A RewardModel state dict with PEFT LoRA adapters → the plain one: W + (B @ A) · alpha / r, and the
    PEFT key prefixes removed. The value head (head.*) passes through untouched."""
    scale = alpha / r
    out = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        name = key.replace("backbone.base_model.model.", "backbone.").replace(".base_layer.", ".")
        if ".base_layer." in key and key.endswith(".weight"):
            stem = key[: -len(".base_layer.weight")]
            a, b = state[f"{stem}.lora_A.default.weight"], state[f"{stem}.lora_B.default.weight"]
            value = (value.float() + (b.float() @ a.float()) * scale).to(value.dtype)
        out[name] = value
    return out


def export_model(model: RewardModel, tokenizer, out_dir, eval_metrics=None, zero_stage=0, dtype=None, lora=None):
    """Write the HF export of a RewardModel (every rank must call it under ZeRO-3; rank 0 writes).
    lora: (r, alpha) when the backbone carries PEFT LoRA adapters; they are merged into the weights."""
    import torch.distributed as dist

    state = _full_state_dict(model, zero_stage)
    if lora:
        state = merge_lora(state, *lora)
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()
        return None
    config = model.backbone.get_base_model().config if lora else model.backbone.config
    path = write_export(config, state, tokenizer, out_dir, eval_metrics, dtype)
    if dist.is_initialized():
        dist.barrier()
    return path


def write_export(backbone_config, state, tokenizer, out_dir, eval_metrics=None, dtype=None):
    """state: RewardModel state dict (backbone.* and head.*) → HF sequence-classification folder."""
    from transformers import AutoModelForSequenceClassification

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _copy_tokenizer(tokenizer)
    config = backbone_config.__class__.from_dict(backbone_config.to_dict())
    config.num_labels = 1
    config.problem_type = "regression"
    grow = 0
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        grow = len(tokenizer) - config.vocab_size if len(tokenizer) > config.vocab_size else 0
    # a new pad id beyond the current vocabulary is set after the embeddings grow
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id < config.vocab_size else None
    if eval_metrics and "eval_reward_mean" in eval_metrics:
        config.rmfast_reward_mean = eval_metrics["eval_reward_mean"]
        config.rmfast_reward_std = eval_metrics["eval_reward_std"]
    config.architectures = None
    dtype = dtype or next(iter(state.values())).dtype
    seq = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    base = seq.base_model
    missing, unexpected = base.load_state_dict(backbone_state, strict=False)
    missing = [k for k in missing if "rotary" not in k and not k.endswith("inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"export: backbone weights do not fit {type(base).__name__}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    score = getattr(seq, "score", None) or getattr(seq, "classifier", None)
    with torch.no_grad():
        score.weight.copy_(state["head.weight"].reshape(1, -1).float())
    if "head.bias" in state:
        # transformers' score layers have no bias: the export's rewards are the engine's minus this constant
        # (pair orderings and accuracy are unchanged). It is kept in the config to add back.
        bias = float(state["head.bias"].reshape(-1)[0])
        seq.config.rmfast_score_bias = bias
        if score.bias is not None:
            with torch.no_grad():
                score.bias.fill_(bias)
            seq.config.rmfast_score_bias = 0.0
    if grow:
        seq.resize_token_embeddings(config.vocab_size + grow)
    seq.config.pad_token_id = tokenizer.pad_token_id
    seq = seq.to(dtype)
    seq.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "rmfast.json").write_text(json.dumps({"eval": eval_metrics or {}, "pad_token_added": bool(grow)}, indent=2))
    return out


def _copy_tokenizer(tokenizer):
    import copy

    return copy.deepcopy(tokenizer)


def load_checkpoint_state(checkpoint_dir):
    """A RewardModel state dict (fp32, whole) from an rmfast checkpoint folder of any ZeRO stage."""
    path = Path(checkpoint_dir)
    states = sorted(path.glob("*model_states.pt"))
    zero_files = list(path.glob("*optim_states.pt"))
    stage = 0
    if states:
        meta = torch.load(states[0], map_location="cpu", weights_only=False)
        stage = (meta.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0)
        if stage == 0 or not zero_files:
            return {k: v.float() for k, v in meta["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)


def main(argv=None):
    """rmfast-export: a Hugging Face model from an rmfast checkpoint."""
    import argparse

    from transformers import AutoConfig, AutoTokenizer

    from .checkpoint import resolve

    parser = argparse.ArgumentParser(prog="rmfast-export", description=main.__doc__)
    parser.add_argument("run", help="a training output dir (its latest checkpoint), a checkpoints dir, or a step folder")
    parser.add_argument("--out", required=True, help="where to write the Hugging Face folder")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = parser.parse_args(argv)
    run = Path(args.run)
    if (run / "checkpoints").exists():
        checkpoint = resolve(run / "checkpoints", "latest")
        out_root = run
    else:
        checkpoint = resolve(run, "latest") if (run / "latest").exists() else run
        out_root = checkpoint.parent.parent
    if not (out_root / "backbone").exists():
        print(f"rmfast-export: {out_root} has no backbone/ config (is it an rmfast run?)", file=sys.stderr)
        return 2
    state = load_checkpoint_state(checkpoint)
    run_config = json.loads((out_root / "config.json").read_text()) if (out_root / "config.json").exists() else {}
    model_config = run_config.get("model", {})
    if model_config.get("lora_r"):
        state = merge_lora(state, model_config["lora_r"], model_config["lora_alpha"])
    tokenizer = AutoTokenizer.from_pretrained(out_root / "tokenizer")
    config = AutoConfig.from_pretrained(out_root / "backbone")
    metrics = None
    metrics_file = out_root / "metrics.jsonl"
    if metrics_file.exists():
        evals = [json.loads(x) for x in metrics_file.read_text().splitlines() if "eval_reward_mean" in x]
        metrics = evals[-1] if evals else None
    from .model import DTYPES

    path = write_export(config, state, tokenizer, args.out, metrics, DTYPES[args.dtype])
    print(f"exported {checkpoint} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
