"""DeepSpeed's configuration from rmfast's options (a user's JSON merged over it, checked), and the
optimizer."""

import json

import torch

from .config import Config
from .errors import UserError



def _merge(base, extra):
    for k, v in extra.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


# what rmfast-train decides from its own options (its sampler, resume checks and optimizer depend on them):
# a user's DeepSpeed JSON may repeat them or say "auto", never set them otherwise
OWNED_DS = {"train_micro_batch_size_per_gpu": "train.pairs_per_batch",
            "gradient_accumulation_steps": "train.grad_accum",
            "train_batch_size": "train.pairs_per_batch × train.grad_accum × ranks",
            "gradient_clipping": "train.max_grad_norm", "bf16.enabled": "model.dtype", "fp16.enabled": "model.dtype",
            "zero_optimization.stage": "train.zero_stage"}


def _user_deepspeed(path, ours, hidden_size=None):
    """The user's DeepSpeed JSON, checked against `ours` and with its "auto" values filled as transformers'
    DeepSpeed integration fills them: rmfast's own value for an owned key, ZeRO-3 bucket sizes from the
    model's hidden size. A key rmfast owns set to another value is refused in one line naming the file, the
    key and the option to use instead."""

    try:
        with open(path) as f:
            user = json.load(f)
    except OSError as exc:
        raise UserError(f"train.deepspeed_config {path}: cannot be read ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"train.deepspeed_config {path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(user, dict):
        raise UserError(f"train.deepspeed_config {path}: expected a JSON object of DeepSpeed options")
    for section in ("optimizer", "scheduler"):
        if section in user:
            raise UserError(f"train.deepspeed_config {path}: remove its {section!r} section; rmfast-train builds the "
                            f"optimizer and schedule from train.lr, train.adam_betas, train.weight_decay, "
                            f"train.scheduler and train.warmup_ratio")

    def walk(node, prefix):
        for key, value in list(node.items()):
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, f"{name}.")
                continue
            mine = ours
            for part in name.split("."):
                mine = mine.get(part) if isinstance(mine, dict) else None
            if value == "auto":
                filled = _auto_value(name, mine, hidden_size)
                if filled is None:
                    raise UserError(f"train.deepspeed_config {path}: {name} is \"auto\", which rmfast cannot fill; "
                                    f"give a value")
                node[key] = filled
            elif name in OWNED_DS and mine is not None and value != mine:
                raise UserError(f"train.deepspeed_config {path}: {name} is {value!r} but this run has {mine!r} from "
                                f"{OWNED_DS[name]}; remove it from the file or set the option instead")
    walk(user, "")
    return user


def _auto_value(name, mine, hidden_size):
    """What "auto" means for one DeepSpeed key (as transformers' HfTrainerDeepSpeedConfig fills it)."""
    if mine is not None:
        return mine
    if hidden_size:
        sizes = {"zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
                 "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                 "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size}
        return sizes.get(name)
    return None


def deepspeed_config(config: Config, world_size, hidden_size=None):
    """DeepSpeed's config from rmfast's options, with the user's DeepSpeed JSON merged over it (checked:
    _user_deepspeed). hidden_size: the model's, for "auto" ZeRO-3 bucket sizes."""
    t = config.train
    micro = t.pairs_per_batch
    ds = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": micro * t.grad_accum * world_size,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": config.model.dtype == "bf16"},
        "fp16": {"enabled": config.model.dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.offload_optimizer:  # stages checked by TrainConfig
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if t.offload_params:
        ds["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if t.deepspeed_config:
        _merge(ds, _user_deepspeed(t.deepspeed_config, ds, hidden_size))
    return ds


def make_optimizer(model, config: Config):
    t = config.train
    # matrices decay, vectors (norms, biases, the value head) do not; ZeRO-3-partitioned parameters are
    # flat until gathered, so their real shape is ds_shape
    dims = lambda p: len(getattr(p, "ds_shape", p.shape))  # noqa: E731
    decay = [p for n, p in model.named_parameters() if p.requires_grad and dims(p) >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and dims(p) < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"lr": t.lr, "betas": tuple(t.adam_betas), "eps": t.adam_eps}
    if t.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    # torch's fused AdamW on CUDA: one kernel per step like DeepSpeed's FusedAdam, which DeepSpeed would
    # first JIT-build with nvcc inside the run (a minute or more on a fresh machine)
    return torch.optim.AdamW(groups, fused=torch.cuda.is_available(), **kw)
