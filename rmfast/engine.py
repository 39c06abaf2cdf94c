"""The training loop: a RewardModel on DeepSpeed, one forward for every response of a micro-batch of groups
(a pair is a group of two), the fused loss over every comparison.

Read top to bottom: the builders (tokenizer, data, model, sampler, engine), then ``Trainer``: its ``__init__``
calls the builders, ``train`` runs ``train_step`` until the last step. The process group (distributed.py),
DeepSpeed's configuration (ds_config.py), evaluation (evaluation.py), metrics (metrics.py), checkpoints
(checkpoint.py) and export (export.py) live beside it."""

import contextlib
import hashlib
import json
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import layouts, rundir
from .attention import row_tokens
from .checkpoint import load_checkpoint, read_state, resolve, save_checkpoint
from .config import Config, attribute_combination, attributes_of, data_kind
from .data import load_data
from .data.sampler import PairSampler
from .distributed import close_distributed, init_distributed, on_rank0  # noqa: F401  (re-exported)
from .ds_config import deepspeed_config, make_optimizer  # noqa: F401  (re-exported)
from .errors import Failure, UserError
from .evaluation import Evaluator
from .metrics import MetricsLog, Window, train_line
from .model import DTYPES, enable_activation_checkpointing
from .nn import AttributeHead
from .runfolder import RunFolder
from .trackers import open_trackers


class NonFiniteLoss(Failure):
    """The loss was NaN or infinite: the run stopped before the update."""


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- builders


def build_tokenizer(model_config):
    """The run's tokenizer, given a pad token if it has none. Returns (tokenizer, whether the vocabulary
    grew)."""
    from transformers import AutoTokenizer

    path = model_config.tokenizer or model_config.name_or_path
    revision = None if model_config.tokenizer else model_config.revision  # the model's own tokenizer: its revision
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_config.trust_remote_code,
                                              revision=revision)
    return tokenizer, ensure_pad_token(tokenizer)


def build_data(config: Config, tokenizer, rank, log):
    """(train groups, eval groups or None), TokenizedGroups (data.kind says what the rows are: pairs become
    groups of two). Tokenized once per node: global rank 0 first, then the first rank of every other node
    (which finds its cache when the cache folder is shared, and tokenizes when it is node-local), then the
    rest, who read their node's cache."""
    # tokenizing a large source takes longer than train.collective_timeout: the others wait in a group of
    # their own without that limit
    import datetime

    world = dist.get_world_size()
    waiting = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1)) if world > 1 else None
    mine = load_phase(rank, int(os.environ.get("LOCAL_RANK", rank)))
    data = config.data.loader_config() if hasattr(config.data, "loader_config") else config.data
    for phase in range(3 if waiting is not None else 1):
        if phase == mine or waiting is None:
            train_pairs, eval_pairs, report = load_data(data, tokenizer, progress=rank == 0, kind=data_kind(config))
        if waiting is not None:
            dist.barrier(group=waiting)
    if waiting is not None:
        dist.destroy_process_group(waiting)
    ties = config.train.objective == "davidson"
    train_pairs, aside = with_comparisons(train_pairs, ties)
    if eval_pairs is not None:
        eval_pairs, eval_aside = with_comparisons(eval_pairs, ties) if len(eval_pairs) else (eval_pairs, 0)
        aside += eval_aside
    if rank == 0:
        for line in report.lines():
            log(f"data: {line}")
        if aside:
            log(f"data: {aside} pairs or groups set aside: weight 0, or ties, which {config.train.objective} has no "
                f"comparison in (--train.objective davidson trains on ties)")
        if eval_pairs is None or len(eval_pairs) == 0:
            log("data: no eval set (give --data.eval or --data.eval_fraction): training metrics only")
    return train_pairs, eval_pairs


def load_phase(rank, local_rank):
    """When a rank reads its data (build_data): 0 global rank 0, 1 the first rank of another node, 2 the rest."""
    return 0 if rank == 0 else (1 if local_rank == 0 else 2)


def with_comparisons(groups, ties=False):
    """(the groups with something to train on, how many were set aside): a group of weight 0 never is, nor one
    whose responses all score the same unless `ties` (the davidson objective: every pair of responses is then
    a comparison or a tie), unless it has attribute values (the regression objectives)."""
    sizes = groups.sizes
    keep = (groups.weight > 0) & (sizes >= 2)
    if not ties and len(groups):
        flat = np.concatenate(list(groups.scores)).astype(np.float64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        keep &= np.maximum.reduceat(flat, starts) > np.minimum.reduceat(flat, starts)
    if groups.attributes is not None:
        valued = np.fromiter((np.isfinite(a).any() for a in groups.attributes), bool, count=len(groups))
        keep |= (groups.weight > 0) & valued
    if keep.all():
        return groups, 0
    if not keep.any():
        raise UserError(f"nothing to train on: every one of the {len(groups)} pairs or groups is a tie or has weight "
                        f"0 (ties train with --train.objective davidson)")
    return groups.subset(np.flatnonzero(keep)), int((~keep).sum())


def build_model(config: Config, ds_config, dtype, grow_vocab, log):
    """The RewardModel, LoRA-wrapped when asked. Under ZeRO-3 each rank builds and loads only its share of
    the weights (deepspeed.zero.Init, which transformers' from_pretrained enters while an HfDeepSpeedConfig
    is alive), never the whole model; the small value head is made whole and partitioned by
    deepspeed.initialize."""
    from .model import RewardModel

    m = config.model
    zero3 = ds_config["zero_optimization"].get("stage") == 3
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_deepspeed = HfDeepSpeedConfig(ds_config)  # noqa: F841  transformers holds a weak reference
    model = RewardModel.from_pretrained(m.name_or_path, dtype="fp32", head_bias=m.head_bias,
                                        attn_implementation=m.attn_implementation,
                                        trust_remote_code=m.trust_remote_code, revision=m.revision)
    if grow_vocab:
        model.backbone.resize_token_embeddings(grow_vocab)
    if m.lora_r:
        model.backbone = add_lora(model.backbone, m)
    if config.train.objective == "davidson":
        model.add_tie_parameter(config.train.tie_nu, config.train.learn_tie_nu)
    had = list(getattr(model.backbone.config, "id2label", {}).values()) if isinstance(model.head, AttributeHead) else []
    if had and config.data.attributes and [str(n) for n in had] != list(config.data.attributes):
        raise UserError(f"{m.name_or_path} has an attribute head for {', '.join(map(str, had))} (in that order); "
                        f"--data.attributes gives {', '.join(config.data.attributes)}: name the same attributes in the "
                        f"same order, or start from a model without an attribute head")
    if config.data.attributes:
        model.use_attribute_head(len(config.data.attributes), attribute_combination(config))
    elif isinstance(model.head, AttributeHead):
        names = list(getattr(model.backbone.config, "id2label", {}).values())
        raise UserError(f"{m.name_or_path} has an attribute head ({model.head.num_attributes} outputs: "
                        f"{', '.join(map(str, names))}); train it on attribute columns: --data.attributes "
                        f"{' '.join(map(str, names))} --train.objective regression (or regression+bradley_terry)")
    if zero3:
        _finish_zero3_load(model, dtype, log)
    if m.gradient_checkpointing:
        enable_activation_checkpointing(model.backbone)
    return model


def _finish_zero3_load(model, dtype, log):
    # loaded: models built from now on (the export's, on rank 0 alone) must not enter zero.Init, whose
    # collectives would wait for the other ranks forever
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    # zero.Init made the backbone's parameters bf16/fp16 already and deepspeed.initialize will not cast the
    # model again: parameters made outside it (the head, LoRA adapters) must match
    if dtype != torch.float32:
        for p in model.parameters():
            if not hasattr(p, "ds_id") and p.is_floating_point():
                p.data = p.data.to(dtype)
    parted = [p for p in model.parameters() if hasattr(p, "ds_tensor")]
    held = sum(p.ds_tensor.numel() for p in parted)
    dtypes = sorted({str(p.ds_tensor.dtype).replace("torch.", "") for p in parted})
    log(f"ZeRO-3: backbone loaded partitioned; rank 0 holds {held:,} of {sum(p.ds_numel for p in parted):,} "
        f"elements ({', '.join(dtypes)})")


def build_sampler(config: Config, groups, layout, rank, world):
    """With a token budget, micro-batches are cut by what groups cost in the layout; with a fixed number
    (train.pairs_per_batch pairs or groups) they are grouped by their whole sequences' length alone, so that
    every layout sees the same batches in the same order."""
    t = config.train
    if t.token_budget:
        costs, combine = layouts.costs(groups, layout)
        return PairSampler(costs, token_budget=t.token_budget, combine=combine, seed=t.seed, rank=rank,
                           world_size=world)
    return PairSampler(groups.lengths("packed"), pairs_per_batch=t.pairs_per_batch, seed=t.seed, rank=rank,
                       world_size=world)


def build_engine(model, config: Config, ds_config, total_steps):
    """(DeepSpeed engine, its scheduler): AdamW and a transformers schedule with warm-up."""
    import deepspeed
    from transformers import get_scheduler

    t = config.train
    optimizer = make_optimizer(model, config)
    scheduler = get_scheduler(t.scheduler if t.scheduler != "constant" else "constant_with_warmup", optimizer,
                              num_warmup_steps=int(t.warmup_ratio * total_steps), num_training_steps=total_steps)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    if ds_config["zero_optimization"].get("stage") == 3:
        # the fused loss reads the head's parameters without calling the head's forward: make ZeRO-3 gather
        # them with the model's own forward, whatever their size
        for p in model.head.parameters():
            deepspeed.zero.register_external_parameter(model, p)
    return engine, scheduler


# ---------------------------------------------------------------- the run


class Trainer:
    """rmfast-train's run: built from parts (tokenizer, data, model, sampler, engine, metrics), then
    train() → train_step() → the engine's forward, backward and step. Its resumable state is
    state_dict() / load_state_dict(); checkpoint.py saves it beside DeepSpeed's."""

    def __init__(self, config: Config, log=print, *, make_sampler=None):
        """make_sampler(config, train groups, layout, rank, world) → a PairSampler: build_sampler unless given
        (a benchmark's fixed order, say)."""
        from transformers import AutoConfig

        self.config, self.log = config, log
        t, m = config.train, config.model
        self.rank, self.world, self.device = init_distributed(t.collective_timeout)
        self.dtype = DTYPES[m.dtype]  # what the model computes in (DeepSpeed casts to it)
        if m.dtype == "fp16" and self.device.type != "cuda":
            raise UserError("model.dtype fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16); "
                            "use bf16 or fp32 on CPU")
        seed_everything(t.seed)
        self.out = Path(t.output_dir)
        self.folder = RunFolder(self.out)
        # one run per folder, locked while it trains (rank 0 holds the lock; every rank sees a refusal)
        self._lock = on_rank0(self.rank, lambda: rundir.claim(self.out, t.resume, t.overwrite,
                                                                      run_inputs(config)))
        # layout and attention from the model's config alone: a bad choice is reported before any data is
        # tokenized or weights are loaded
        check_model_path(m.name_or_path, "model.name_or_path")
        if m.tokenizer:
            check_model_path(m.tokenizer, "model.tokenizer")
        backbone_config = AutoConfig.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code,
                                                     revision=m.revision)
        self.layout, self.attention = choose_layout(backbone_config, config, self.device.type,
                                                    self.log if self.rank == 0 else None)
        # the DeepSpeed config is checked before any data is read
        self.ds_config = deepspeed_config(config, self.world, getattr(backbone_config, "hidden_size", None))
        self.tokenizer, grew = build_tokenizer(m)
        self.train_pairs, self.eval_pairs = build_data(config, self.tokenizer, self.rank, self.log)
        self.identity = run_identity(config, backbone_config, self.tokenizer, self.world)
        self.model = build_model(config, self.ds_config, self.dtype, len(self.tokenizer) if grew else 0,
                                 self.log if self.rank == 0 else (lambda _: None))
        if self.layout != "padded":
            self.model.set_attention(self.attention)
        self.sampler = (make_sampler or build_sampler)(config, self.train_pairs, self.layout, self.rank, self.world)
        steps_per_epoch = max(1, len(self.sampler) // t.grad_accum)
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
        self.engine, self.scheduler = build_engine(self.model, config, self.ds_config, self.total_steps)
        self.step = 0
        self._position = self.sampler.state_dict()  # where the sampler stands after the last trained batch
        self.metrics = MetricsLog(self.folder.metrics, self.rank, self.log,
                                  open_trackers(config, self.out, self.rank, self.log))
        self.evaluator = Evaluator(self.eval_pairs, self.engine, lambda *a: self.make_batch(*a), t.eval_pairs_per_batch,
                                   self.rank, self.world, objective=t.objective, log_nu=self._log_nu,
                                   attributes=list(config.data.attributes)) if self.eval_pairs is not None else None
        if self.rank == 0:
            self._save_run_files()
        if t.resume:
            self.resume(t.resume)

    def _save_run_files(self):
        self.folder.config.write_text(json.dumps(self.config.to_dict(), indent=2, default=str))
        with carrying_template(self.tokenizer, self.config.data.chat_template):
            self.tokenizer.save_pretrained(self.folder.tokenizer)
        self.model.backbone.config.save_pretrained(self.folder.backbone)

    def _log_nu(self):
        """Davidson's log ν as trained so far (0 when the objective has none)."""
        p = self.model.tie_log_nu
        if p is None:
            return 0.0
        from .model import _gathered

        with _gathered([p]):
            return float(p.detach().float().reshape(-1)[0])

    def use_sampler(self, sampler):
        """Take micro-batches from `sampler` from its start on (the step count stays)."""
        self.sampler = sampler
        self._position = sampler.state_dict()

    # -- resumable state
    def state_dict(self):
        return {"step": self.step, "sampler": self._position, "world_size": self.world, "run": self.identity}

    def load_state_dict(self, state, where="the checkpoint"):
        rundir.check_resume(state.get("run"), self.identity, where, self.config.train.resume_allow_changes)
        if state["world_size"] != self.world:
            raise UserError(f"{where} was saved by {state['world_size']} ranks; resume it with the same number "
                            f"(this run has {self.world})")
        self.step = state["step"]
        self.sampler.load_state_dict(state["sampler"])
        self._position = self.sampler.state_dict()

    # -- micro-batches
    def make_batch(self, groups, indices):
        """A micro-batch of groups `indices` on the training device with its attention inputs built (pinned
        host memory first on CUDA, so that the copy does not wait)."""
        t = self.config.train
        rows = t.row_tokens or row_tokens(self.attention, self.device.type)
        batch = layouts.make(self.layout, groups, indices, self.tokenizer.pad_token_id, max_tokens=rows,
                             use_margin=t.use_margin, margin_scale=t.margin_scale, weighting=t.group_weighting,
                             ties=t.objective == "davidson")
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        return self.model.prepare(batch.to(self.device))

    def micro_batches(self, pool):
        """Forever, epoch after epoch: (indices, batch, the sampler's state once it is taken), each batch
        built in `pool`'s worker thread while the one before it computes."""
        def upcoming():
            while True:
                for indices in self.sampler:
                    yield indices, self.sampler.state_dict()

        ahead = upcoming()
        indices, position = next(ahead)
        future = pool.submit(self.make_batch, self.train_pairs, indices)
        while True:
            nxt_indices, nxt_position = next(ahead)
            nxt = pool.submit(self.make_batch, self.train_pairs, nxt_indices)
            yield indices, future.result(), position
            indices, position, future = nxt_indices, nxt_position, nxt

    def forward(self, batch):
        # the layouts build valid indices, so the op's own range check (a host sync on CUDA) is not needed
        t = self.config.train
        return self.engine(batch, center_coef=t.center_coef, backend=t.loss_backend, check_indices=False,
                           objective=t.objective)

    # -- the loop
    def train(self):
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        t = self.config.train
        interactive = self.rank == 0 and sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step",
                   disable=not interactive, dynamic_ncols=True)
        if self.step == 0:  # where the model starts, to compare the end with
            self.metrics.write(self.evaluate())
        window = Window(self.device)
        self.engine.train()
        with ThreadPoolExecutor(1, thread_name_prefix="rmfast-batches") as pool:
            batches = self.micro_batches(pool)
            while self.step < self.total_steps:
                self.train_step(batches, window)
                self.step += 1
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    window = self._log_step(window, bar, interactive)
                if self.step < self.total_steps:
                    if t.eval_every and self.step % t.eval_every == 0:
                        self.metrics.write(self.evaluate())
                    if t.save_every and self.step % t.save_every == 0:
                        self.save()
            batches.close()
        bar.close()
        return self._finish()

    def train_step(self, batches, window):
        """One optimizer step: forward and backward of micro-batches up to DeepSpeed's accumulation boundary,
        then the update. With on_nonfinite stop, the step's losses are checked once, at the boundary and
        before the update (the step's one host sync); skip checks each micro-batch (one sync each)."""
        skip = self.config.train.on_nonfinite == "skip"
        finite, skipped = None, 0
        while True:
            indices, batch, self._position = next(batches)
            out = self.forward(batch)
            ok = torch.isfinite(out.loss.detach()).all()
            if skip and not _all_finite(ok):
                self.log(f"skipping non-finite loss at step {self.step + 1} (micro-batch of groups "
                         f"{indices[:4]}…)")
                skipped += 1
                if skipped > len(self.sampler):
                    raise NonFiniteLoss(f"every micro-batch of a whole epoch ({skipped}) gave a non-finite loss at "
                                        f"step {self.step + 1}: the model diverged. Lower the learning rate")
                continue
            finite = ok if finite is None else finite & ok
            self.engine.backward(out.loss)
            boundary = self.engine.is_gradient_accumulation_boundary()
            if boundary and not skip and not _all_finite(finite):
                raise NonFiniteLoss(f"non-finite loss at step {self.step + 1} (its last micro-batch: groups "
                                    f"{indices[:4]}…); nothing was trained on it. Lower the learning rate, use "
                                    f"bf16/fp32, or pass --train.on_nonfinite skip")
            self.engine.step()
            window.add(out, batch)
            if boundary:
                return

    def _log_step(self, window, bar, interactive):
        record = window.reduce(self.world)
        record.update(step=self.step, lr=self.scheduler.get_last_lr()[0])
        self.metrics.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}",
                        pairs_s=f"{record['pairs_per_s']:.1f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if not interactive:  # logs and CI: one plain line instead of a bar
            self.log(train_line(record, self.total_steps))
        return Window(self.device)

    def _finish(self):
        final = self.evaluate()
        self.metrics.write(final)
        self.metrics.close()
        self.save()
        if self.config.train.export:
            from .export import export_model

            with carrying_template(self.tokenizer, self.config.data.chat_template):
                export_model(self.engine.module, self.tokenizer, self.folder.export, final,
                             lora=config_lora(self.config.model),
                             eos_after_template=self.config.data.eos_after_template,
                             attributes=attributes_of(self.config.data.attributes,
                                                      self.config.train.attribute_weights))
            if self.rank == 0:
                self.log(f"exported to {self.folder.export}")
        return final

    # -- evaluation over the whole eval set, sharded and gathered (evaluation.py)
    def evaluate(self):
        if self.evaluator is None or len(self.eval_pairs) == 0:
            return {"step": self.step, "eval": "no eval set"}
        record = {"step": self.step, **self.evaluator()}
        if self.rank == 0 and (self.eval_pairs.sizes > 2).any():  # groups, not only pairs
            self.log(f"eval groups at step {self.step}: top-1 accuracy {record['eval_top1_accuracy']:.3f}  "
                     f"Kendall tau {record['eval_kendall_tau']:.3f}  ({record['eval_groups']} groups, "
                     f"{record['eval_pairs']} comparisons)")
        return record

    # -- checkpoints
    def save(self):
        save_checkpoint(self.engine, self.folder.checkpoints, self.step, self.state_dict(), self.rank,
                        keep_last=self.config.train.keep_last)

    def resume(self, where):
        path = resolve(self.folder.checkpoints, where)
        self.load_state_dict(read_state(path), where=str(path))
        load_checkpoint(self.engine, path, self.rank)
        if self.rank == 0:
            rundir.cut_metrics(self.metrics.path, self.step)
        self.log(f"resumed from {path.name} at step {self.step}")


def run_inputs(config):
    """What a run reads, as (what, path) pairs: the run folder may be none of them nor hold them."""
    from .data.loader import Source

    m, d = config.model, config.data
    found = [("the model folder", m.name_or_path)] + ([("the tokenizer folder", m.tokenizer)] if m.tokenizer else [])
    for flag, specs in (("data.train", d.train), ("data.eval", d.eval)):
        found += [(f"{flag} source", Source.parse(spec).path) for spec in specs]
    return found


def check_model_path(path, flag):
    """A model or tokenizer reference must be a folder with a config, or look like a hub id (org/name, or a
    bare name such as gpt2)."""
    p = Path(path).expanduser()
    if p.exists():
        files = ("config.json", "tokenizer.json", "tokenizer_config.json")
        if not p.is_dir() or not any((p / f).exists() for f in files):
            raise UserError(f"{flag} {path}: not a model folder (no config.json or tokenizer files in it)")
        return
    if str(path).startswith((".", "/", "~")) or str(path).count("/") > 1 or not str(path).strip():
        raise UserError(f"{flag} {path}: no such folder (and not a hub id like org/name or gpt2)")


@contextlib.contextmanager
def carrying_template(tokenizer, chat_template):
    """The tokenizer holding the run's data.chat_template while it is saved (tokenizer/, the export): whoever
    scores the export renders conversations with the template the model was trained on. The tokenizer the
    run tokenizes and fingerprints with is left as it was loaded."""
    if not chat_template:
        yield tokenizer
        return
    before = tokenizer.chat_template
    tokenizer.chat_template = chat_template
    try:
        yield tokenizer
    finally:
        tokenizer.chat_template = before


def run_identity(config, backbone_config, tokenizer, world):
    """What this run's checkpoints record of it, for a resume to be checked against (rundir.identity)."""
    from .data.loader import Source, tokenizer_fingerprint
    from .data.sources import fingerprint

    data = []
    for spec in config.data.train:
        source = Source.parse(spec)
        data.append([str(spec), hashlib.sha256(fingerprint(source.path, source.split).encode()).hexdigest()[:16]])
    return rundir.identity(config, backbone_config, tokenizer_fingerprint(tokenizer), data, world)


def add_lora(backbone, model_config):
    """Wrap the backbone with PEFT LoRA adapters; the value head (outside it) stays fully trainable."""
    from peft import LoraConfig, get_peft_model

    targets = model_config.lora_target_modules
    targets = "all-linear" if targets in (["all-linear"], "all-linear") else list(targets)
    lora = LoraConfig(r=model_config.lora_r, lora_alpha=model_config.lora_alpha, use_rslora=model_config.lora_rslora,
                      lora_dropout=model_config.lora_dropout, target_modules=targets, bias="none")
    return get_peft_model(backbone, lora)


def config_lora(model_config):
    """(r, alpha, rslora) when the run trains LoRA adapters, for merging them at export; else None."""
    return (model_config.lora_r, model_config.lora_alpha, model_config.lora_rslora) if model_config.lora_r else None


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


def _all_finite(ok):
    """Whether `ok` (a bool tensor on the device) holds on every rank: one all-reduce and one host sync."""
    flag = (~ok).to(torch.float32).reshape(1)
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
