"""The training loop: a RewardModel on DeepSpeed, one forward for chosen and rejected rows, the fused loss.

Read top to bottom: ``train(config)`` sets up the process group, data, model and DeepSpeed engine, then
runs steps; evaluation, metrics, checkpoints and export live in their own functions beside it."""

import json
import math
import os
import random
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import layouts
from .attention import IMPLEMENTATIONS, model_inputs, register, row_tokens
from .config import Config
from .model import DTYPES
from .data import load_data
from .data.sampler import PairSampler


class NonFiniteLoss(RuntimeError):
    pass


# ---------------------------------------------------------------- process group and devices


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed():
    """Join the launcher's process group (deepspeed / torchrun set RANK etc.), or make a one-process
    group when started without a launcher. Returns (rank, world_size, device)."""
    import deepspeed

    if "RANK" not in os.environ:  # no launcher: rendezvous with ourselves (avoids DeepSpeed's MPI probe)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- DeepSpeed configuration


def _merge(base, extra):
    for k, v in extra.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def deepspeed_config(config: Config, world_size):
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
    if t.offload_optimizer:
        if t.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage ≥ 1")
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if t.offload_params:
        if t.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        ds["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if t.deepspeed_config:
        with open(t.deepspeed_config) as f:
            _merge(ds, json.load(f))
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
    if torch.cuda.is_available():
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kw)
    return torch.optim.AdamW(groups, **kw)


# ---------------------------------------------------------------- the run


class Trainer:
    def __init__(self, config: Config, log=print):
        from transformers import AutoConfig, AutoTokenizer, get_scheduler

        import deepspeed

        from .model import RewardModel

        self.config = config
        self.log = log
        t = config.train
        self.rank, self.world, self.device = init_distributed()
        self.dtype = DTYPES[config.model.dtype]  # what the model computes in (DeepSpeed casts to it)
        if config.model.dtype == "fp16" and self.device.type != "cuda":
            raise ValueError("model.dtype fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16); "
                             "use bf16 or fp32 on CPU")
        seed_everything(t.seed)
        self.out = Path(t.output_dir)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)

        # layout and attention, from the model's config alone: a bad choice is reported before any data is
        # tokenized or weights are loaded
        backbone_config = AutoConfig.from_pretrained(config.model.name_or_path,
                                                     trust_remote_code=config.model.trust_remote_code)
        self.layout, self.attention = choose_layout(backbone_config, config, self.device.type,
                                                    self.log if self.rank == 0 else None)

        # tokenizer and data (rank 0 tokenizes first; the others then read its cache)
        tok_path = config.model.tokenizer or config.model.name_or_path
        self.tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=config.model.trust_remote_code)
        added_pad = ensure_pad_token(self.tokenizer)
        if self.rank != 0:
            dist.barrier()
        self.train_pairs, self.eval_pairs, report = load_data(config.data, self.tokenizer, progress=self.rank == 0)
        if self.rank == 0:
            dist.barrier()
            for line in report.lines():
                self.log(f"data: {line}")

        # model. Under ZeRO-3 each rank builds and loads only its share of the weights (deepspeed.zero.Init,
        # which transformers' from_pretrained enters while an HfDeepSpeedConfig is alive), never the whole
        # model; the small value head is made whole and partitioned by deepspeed.initialize.
        self.ds_config = deepspeed_config(config, self.world)
        self.zero3 = self.ds_config["zero_optimization"].get("stage") == 3
        self._hf_deepspeed = None
        if self.zero3:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_deepspeed = HfDeepSpeedConfig(self.ds_config)  # transformers holds a weak reference
        self.model = RewardModel.from_pretrained(config.model.name_or_path, dtype="fp32",
                                                 head_bias=config.model.head_bias,
                                                 attn_implementation=config.model.attn_implementation,
                                                 trust_remote_code=config.model.trust_remote_code)
        if added_pad:
            self.model.backbone.resize_token_embeddings(len(self.tokenizer))
        if config.model.lora_r:
            self.model.backbone = add_lora(self.model.backbone, config.model)
        if self._hf_deepspeed is not None:
            # loaded: models built from now on (the export's, on rank 0 alone) must not enter zero.Init,
            # whose collectives would wait for the other ranks forever
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self._hf_deepspeed = None
            # zero.Init made the backbone's parameters bf16/fp16 already and deepspeed.initialize will not
            # cast the model again: parameters made outside it (the head, LoRA adapters) must match
            if self.dtype != torch.float32:
                for p in self.model.parameters():
                    if not hasattr(p, "ds_id") and p.is_floating_point():
                        p.data = p.data.to(self.dtype)
            parted = [p for p in self.model.parameters() if hasattr(p, "ds_tensor")]
            if self.rank == 0:
                held = sum(p.ds_tensor.numel() for p in parted)
                dtypes = sorted({str(p.ds_tensor.dtype).replace("torch.", "") for p in parted})
                self.log(f"ZeRO-3: backbone loaded partitioned; rank 0 holds {held:,} of "
                         f"{sum(p.ds_numel for p in parted):,} elements ({', '.join(dtypes)})")
        self.eager = getattr(self.model.backbone.config, "_attn_implementation", "") == "eager"
        if self.layout != "padded" and self.attention in IMPLEMENTATIONS:
            register()
            self.model.backbone.set_attn_implementation(IMPLEMENTATIONS[self.attention])
        if config.model.gradient_checkpointing:
            self.model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        # data order and schedule
        if t.token_budget:
            costs, combine = layout_costs(self.train_pairs, self.layout)
            self.sampler = PairSampler(costs, token_budget=t.token_budget, combine=combine, seed=t.seed,
                                       rank=self.rank, world_size=self.world)
        else:  # grouped by length alone, so every layout sees the same batches in the same order
            costs = self.train_pairs.chosen_lengths + self.train_pairs.rejected_lengths
            self.sampler = PairSampler(costs, pairs_per_batch=t.pairs_per_batch, seed=t.seed, rank=self.rank,
                                       world_size=self.world)
        steps_per_epoch = max(1, len(self.sampler) // t.grad_accum)
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))

        optimizer = make_optimizer(self.model, config)
        scheduler = get_scheduler(t.scheduler if t.scheduler != "constant" else "constant_with_warmup", optimizer,
                                  num_warmup_steps=int(t.warmup_ratio * self.total_steps),
                                  num_training_steps=self.total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config)
        if self.zero3:
            # the fused loss reads the head's parameters without calling the head's forward: make ZeRO-3
            # gather them with the model's own forward, whatever their size (small ones are also kept
            # whole by stage3_param_persistence_threshold, but that is a setting)
            for p in self.model.head.parameters():
                deepspeed.zero.register_external_parameter(self.model, p)
        self.step = 0
        self.metrics_file = self.out / "metrics.jsonl"
        self.tb = _tensorboard(self.out / "tensorboard", self.log) if (t.tensorboard and self.rank == 0) else None
        if self.rank == 0:
            (self.out / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
            self.tokenizer.save_pretrained(self.out / "tokenizer")
            self.model.backbone.config.save_pretrained(self.out / "backbone")
        if t.resume:
            self.resume(t.resume)

    # -- one micro-batch
    def batch(self, pairs, indices):
        t = self.config.train
        if self.layout == "padded":
            batch = layouts.padded(pairs, indices, self.tokenizer.pad_token_id, use_margin=t.use_margin)
        else:
            make = layouts.packed if self.layout == "packed" else layouts.prefix_shared
            rows = t.row_tokens or row_tokens(self.attention, self.device.type)
            batch = make(pairs, indices, self.tokenizer.pad_token_id, max_tokens=rows, use_margin=t.use_margin)
        return batch.to(self.device)

    def forward(self, batch):
        inputs = model_inputs(batch, self.attention, dtype=self.dtype, eager=self.eager)
        mask, position_ids = inputs.pop("attention_mask"), inputs.pop("position_ids")
        return self.engine(batch.input_ids, mask, batch.chosen_index, batch.rejected_index,
                           position_ids=position_ids, margin=batch.margin,
                           center_coef=self.config.train.center_coef, backend=self.config.train.loss_backend,
                           **inputs)

    def train(self):
        t = self.config.train
        from tqdm.auto import tqdm

        interactive = self.rank == 0 and sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step",
                   disable=not interactive, dynamic_ncols=True)
        if self.step == 0:  # where the model starts, to compare the end with
            self.write_metrics(self.evaluate())
        window = _Window()
        self.engine.train()
        while self.step < self.total_steps:
            for indices in self.sampler:
                batch = self.batch(self.train_pairs, indices)
                out = self.forward(batch)
                if not _all_finite(out.loss):
                    where = f"step {self.step + 1} (micro-batch of pairs {indices[:4]}…)"
                    if t.on_nonfinite == "stop":
                        raise NonFiniteLoss(f"non-finite loss at {where}; nothing was trained on it. "
                                            f"Lower the learning rate, use bf16/fp32, or pass --train.on_nonfinite skip")
                    self.log(f"skipping non-finite loss at {where}")
                    continue
                self.engine.backward(out.loss)
                boundary = self.engine.is_gradient_accumulation_boundary()
                self.engine.step()
                window.add(out, batch)
                if not boundary:
                    continue
                self.step += 1
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    record = window.reduce(self.world)
                    record.update(step=self.step, lr=self.scheduler.get_last_lr()[0])
                    self.write_metrics(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}",
                                    pairs_s=f"{record['pairs_per_s']:.1f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    if not interactive:  # logs and CI: one plain line instead of a bar
                        self.log(f"step {self.step}/{self.total_steps}  loss {record['loss']:.4f}  "
                                 f"accuracy {record['accuracy']:.3f}  pairs/s {record['pairs_per_s']:.1f}  "
                                 f"tokens/s {record['tokens_per_s']:.0f}  lr {record['lr']:.2e}")
                    window = _Window()
                bar.update(1)
                if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
                    self.write_metrics(self.evaluate())
                if t.save_every and self.step % t.save_every == 0 and self.step < self.total_steps:
                    self.save()
                if self.step >= self.total_steps:
                    break
        bar.close()
        final = self.evaluate()
        self.write_metrics(final)
        if self.tb is not None:
            self.tb.close()  # flushes the event file
        self.save()
        if t.export:
            from .export import export_model

            export_model(self.engine.module, self.tokenizer, self.out / "export", final, zero_stage=t.zero_stage,
                         lora=config_lora(self.config.model))
            if self.rank == 0:
                self.log(f"exported to {self.out / 'export'}")
        return final

    # -- evaluation over the whole eval set, sharded and gathered
    @torch.no_grad()
    def evaluate(self):
        pairs = self.eval_pairs
        if pairs is None or len(pairs) == 0:
            return {"step": self.step, "eval": "no eval set"}
        self.engine.eval()
        size = self.config.train.eval_pairs_per_batch
        batches = [list(range(i, min(i + size, len(pairs)))) for i in range(0, len(pairs), size)]
        # Every rank runs the same number of forwards (ZeRO-3 needs it); padding batches are not counted.
        n = -(-len(batches) // self.world) * self.world
        chosen, rejected = [], []
        for k in range(self.rank, n, self.world):
            out = self.forward(self.batch(pairs, batches[k % len(batches)]))
            if k < len(batches):
                chosen.append(out.chosen_rewards.float().cpu())
                rejected.append(out.rejected_rewards.float().cpu())
        gathered = [None] * self.world
        dist.all_gather_object(gathered, (chosen, rejected))
        rc = torch.cat([c for g in gathered for c in g[0]])
        rr = torch.cat([r for g in gathered for r in g[1]])
        margin = torch.from_numpy(np.nan_to_num(pairs.margin, nan=0.0)) if self.config.train.use_margin else 0
        diff = rc - rr
        self.engine.train()
        return {
            "step": self.step, "eval_pairs": int(rc.numel()),
            "eval_loss": float(torch.nn.functional.softplus(-(diff - margin)).mean()) if rc.numel() == len(pairs) else float("nan"),
            "eval_accuracy": float((diff > 0).float().mean()),
            "eval_margin": float(diff.mean()),
            "eval_chosen_mean": float(rc.mean()), "eval_chosen_std": float(rc.std()) if rc.numel() > 1 else 0.0,
            "eval_rejected_mean": float(rr.mean()), "eval_rejected_std": float(rr.std()) if rr.numel() > 1 else 0.0,
            "eval_reward_mean": float(torch.cat([rc, rr]).mean()), "eval_reward_std": float(torch.cat([rc, rr]).std()),
        }

    def write_metrics(self, record):
        if self.rank != 0:
            return
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])
        if "eval_accuracy" in record:
            self.log(f"eval at step {record['step']}: loss {record['eval_loss']:.4f}  "
                     f"accuracy {record['eval_accuracy']:.3f}  margin {record['eval_margin']:.3f}")

    # -- checkpoints
    def save(self):
        from .checkpoint import save_checkpoint

        save_checkpoint(self, self.out / "checkpoints", keep_last=self.config.train.keep_last)

    def resume(self, where):
        from .checkpoint import load_checkpoint

        tag = load_checkpoint(self, self.out / "checkpoints", where)
        self.log(f"resumed from {tag} at step {self.step}")


def add_lora(backbone, model_config):
    """Wrap the backbone with PEFT LoRA adapters; the value head (outside it) stays fully trainable."""
    from peft import LoraConfig, get_peft_model

    targets = model_config.lora_target_modules
    targets = "all-linear" if targets in (["all-linear"], "all-linear") else list(targets)
    lora = LoraConfig(r=model_config.lora_r, lora_alpha=model_config.lora_alpha,
                      lora_dropout=model_config.lora_dropout, target_modules=targets, bias="none")
    return get_peft_model(backbone, lora)


def config_lora(model_config):
    """(r, alpha) when the run trains LoRA adapters, for merging them at export; else None."""
    return (model_config.lora_r, model_config.lora_alpha) if model_config.lora_r else None


def choose_layout(backbone_config, config: Config, device_type="cpu", log=None):
    """(layout, attention) for this model: 'auto' takes prefix_shared where supported, else padded."""
    from .attention import check_support, resolve_attention

    t = config.train
    layout = t.layout
    if layout == "auto":
        try:
            check_support(backbone_config, "prefix_shared", config.data.max_length, t.attention)
            layout = "prefix_shared"
        except ValueError as exc:
            layout = "padded"
            if log:
                log(f"layout: padded ({exc})")
    check_support(backbone_config, layout, config.data.max_length, t.attention)
    attention = (resolve_attention(backbone_config, t.attention, device_type, DTYPES[config.model.dtype])
                 if layout != "padded" else "padding mask")
    if log:
        log(f"layout: {layout}, attention: {attention}")
    return layout, attention


def layout_costs(pairs, layout):
    """Token positions each pair costs in a layout, and how a batch's cost follows from them."""
    c, r = pairs.chosen_lengths, pairs.rejected_lengths
    if layout == "padded":
        return 2 * np.maximum(c, r), "max"
    if layout == "packed":
        return c + r, "sum"
    return c + r - pairs.shared.astype(np.int64), "sum"


class _Window:
    """Training metrics accumulated over the micro-batches since the last log line."""

    def __init__(self):
        self.loss = self.correct = self.pairs = self.tokens = self.positions = self.batches = 0.0
        self.start = time.perf_counter()

    def add(self, out, batch):
        # loss and correct pairs stay on the device until reduce(): no host sync per micro-batch
        self.loss = self.loss + out.loss.detach().float()
        self.correct = self.correct + (out.chosen_rewards.detach() > out.rejected_rewards.detach()).sum()
        self.pairs += batch.pairs
        self.tokens += batch.tokens
        self.positions += batch.positions
        self.batches += 1

    def reduce(self, world):
        t = torch.tensor([float(self.loss), float(self.correct), self.pairs, self.tokens, self.positions,
                          self.batches], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(t)
        loss, correct, pairs, tokens, positions, batches = t.tolist()
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"loss": loss / max(batches, 1), "accuracy": correct / max(pairs, 1),
                "pairs_per_s": pairs / elapsed, "tokens_per_s": tokens / elapsed,
                "positions_per_pair": positions / max(pairs, 1)}


def _all_finite(loss):
    flag = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=loss.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag)
    return flag.item() == 0


def ensure_pad_token(tokenizer):
    """Give a tokenizer without a pad token one. Returns True when the vocabulary grew. Rewards never
    depend on the pad id (last tokens come from lengths), so pad == eos is fine as it is."""
    if tokenizer.pad_token_id is not None:
        return False
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        return False
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return True


def _tensorboard(path, log):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log("tensorboard is not installed: metrics go to metrics.jsonl only (pip install tensorboard, or pass "
            "--train.tensorboard false to silence this)")
        return None
    return SummaryWriter(str(path), flush_secs=30)
