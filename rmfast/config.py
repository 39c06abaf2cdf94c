"""The training configuration: one typed object (dataclasses), read from YAML and overridden by flags.

Every field is a flag: ``--model.name_or_path DIR``, ``--train.lr 1e-5``, ``--data.train a.jsonl b.jsonl``.
The help text of each flag is the comment in its field's metadata."""

import math
import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional

from . import trackers
from .data.loader import DataConfig
from .paths import expand
from .errors import UserError


def _f(default, help, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _check_types(section, obj):
    """Every field holds its default's type (YAML can say anything): one line naming the field if not."""
    for f in dataclasses.fields(obj):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        value = getattr(obj, f.name)
        if value is None and default is None:
            continue
        want = f.metadata.get("type") or (type(default) if default is not None else str)
        if want in (int, float) and isinstance(value, str):
            value = _number(value, want)  # YAML 1.1 reads 1e-5 (no dot) as a string
            setattr(obj, f.name, value)
        ok = isinstance(value, want) and not (isinstance(value, bool) and want is not bool)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(obj, f.name, float(value))
            ok = True
        if not ok:
            raise UserError(f"{section}.{f.name} must be {want.__name__}, got {value!r}")
        choices = f.metadata.get("choices")
        if choices and isinstance(value, list):
            bad = [v for v in value if v not in choices]
            if bad:
                raise UserError(f"{section}.{f.name} takes {', '.join(map(str, choices))}, got {bad[0]!r}")
        elif choices and value not in choices:
            raise UserError(f"{section}.{f.name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _number(text, want):
    """'1e-5' → 1e-05, '3e3' → 3000 for an int field; text that is no number stays as it is (and is refused)."""
    try:
        number = float(text.strip().replace("_", ""))
    except ValueError:
        return text
    if want is int:
        return int(number) if number.is_integer() else text
    return number


def _require(ok, message):
    if not ok:
        raise UserError(message)


DATA_KINDS = ("pairs", "groups")


@dataclass
class DataSection(DataConfig):
    """The data section of the training config: rmfast.data.loader.DataConfig and what kind of rows the
    sources hold (the loader's own options are checked by DataConfig)."""

    kind: str = _f("pairs", "pairs (chosen / rejected rows), or groups: a prompt with K ranked or scored responses, "
                            "every comparison of a group in one step and its prompt computed once",
                   choices=list(DATA_KINDS))

    def __post_init__(self):
        super().__post_init__()
        _require(isinstance(self.kind, str) and self.kind in DATA_KINDS,
                 f"data.kind must be one of {', '.join(DATA_KINDS)}, got {self.kind!r}")

    def loader_config(self):
        """The plain DataConfig (what the pair loader and its cache key see)."""
        return DataConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DataConfig)})


@dataclass
class ModelConfig:
    name_or_path: str = _f("", "backbone: a local folder or hub id (a *ForSequenceClassification checkpoint keeps "
                               "its head)")
    revision: Optional[str] = _f(None, "a branch, tag or commit of a hub model (default: its main branch)")
    tokenizer: Optional[str] = _f(None, "tokenizer folder or id (default: the model's)")
    dtype: str = _f("bf16", "training precision", choices=["bf16", "fp16", "fp32"])
    head_bias: bool = _f(False, "give the value head a bias")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward to save memory")
    attn_implementation: str = _f("auto", "transformers attention implementation (auto: its best supported one)")
    trust_remote_code: bool = _f(False, "allow model code from the checkpoint")
    lora_r: int = _f(0, "LoRA rank through PEFT (0: train every weight); the value head is always trained")
    lora_alpha: float = _f(16.0, "LoRA alpha (scale = alpha / r)")
    lora_rslora: bool = _f(False, "rank-stabilised LoRA: scale = alpha / sqrt(r)")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    lora_target_modules: list = _f(["q_proj", "k_proj", "v_proj", "o_proj"],
                                   "modules that get LoRA adapters (names, or all-linear)")

    def __post_init__(self):
        _check_types("model", self)
        _require(self.lora_r >= 0, f"model.lora_r must be ≥ 0 (0: no LoRA), got {self.lora_r}")
        _require(self.lora_alpha > 0, f"model.lora_alpha must be > 0, got {self.lora_alpha}")
        _require(0 <= self.lora_dropout < 1, f"model.lora_dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass
class TrainConfig:
    output_dir: str = _f("runs/reward-model", "where checkpoints, metrics and the export go")
    seed: int = _f(42, "seed of initialisation, data order and dropout")
    epochs: float = _f(1.0, "passes over the training pairs (ignored when max_steps > 0)")
    max_steps: int = _f(0, "optimizer steps to run (0: from epochs)")
    layout: str = _f("auto", "padded, packed, or prefix_shared (the prompt computed once); auto: prefix_shared "
                             "where the architecture supports it, else padded",
                     choices=["auto", "padded", "packed", "prefix_shared"])
    attention: str = _f("auto", "attention of the packed layouts: varlen (flash-attention varlen kernel, CUDA, "
                                "bf16/fp16), flex (FlexAttention BlockMask, CUDA), segments (one sdpa per block) "
                                "or dense (one 4-D mask, the reference); auto: varlen on CUDA in bf16/fp16 when "
                                "a varlen kernel is present, else flex on CUDA, segments on CPU",
                        choices=["auto", "varlen", "flex", "segments", "dense"])
    row_tokens: int = _f(0, "packed layouts: tokens per packed row (0: one row per micro-batch with segment "
                            "attention, rows as long as the longest sequence or pair with the dense mask)")
    pairs_per_batch: int = _f(8, "pairs (groups) per micro-batch per rank when token_budget is 0")
    token_budget: int = _f(0, "tokens per micro-batch per rank instead of a fixed number of pairs (groups)")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(1e-5, "peak learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_betas: list = _f([0.9, 0.95], "AdamW betas")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    scheduler: str = _f("cosine", "learning-rate schedule after warm-up (transformers' schedulers)",
                        choices=["cosine", "linear", "constant"])
    warmup_ratio: float = _f(0.03, "share of steps spent warming up")
    max_grad_norm: float = _f(1.0, "gradient clipping (0: off)")
    use_margin: bool = _f(True, "pass the data's margin column to the loss (a zero margin is a margin, not a tie)")
    center_coef: float = _f(0.0, "reward centering: center_coef · mean((r_c + r_r)²)")
    group_weighting: str = _f("comparison", "every comparison counts the same (comparison), or every group the "
                                            "same, its loss divided by its comparisons (group; a pair has one)",
                              choices=["comparison", "group"])
    objective: str = _f("bradley_terry", "the loss over a micro-batch's comparisons: bradley_terry (pairwise), "
                                         "davidson (ties kept: a tie column, equal scores), plackett_luce (each "
                                         "group's whole ranking), regression (an attribute head on "
                                         "data.attributes, masked MSE) or regression+bradley_terry (both, "
                                         "Bradley–Terry on the combined score); see rmfast/objective.py",
                        choices=["bradley_terry", "davidson", "plackett_luce", "regression",
                                 "regression+bradley_terry"])
    attribute_weights: list = _f([], "regression: the fixed combination of the attributes that is the scalar "
                                     "reward (one weight per data.attributes; default: their mean)", item=float)
    tie_nu: float = _f(1.0, "davidson: the tie parameter ν's starting value (> 0)")
    learn_tie_nu: bool = _f(True, "davidson: learn ν with the model (false: keep tie_nu fixed)")
    margin_scale: float = _f(0.0, "add margin_scale · (score_better − score_worse) to each comparison's margin "
                                  "(0: none; a pair's scores differ by 1)")
    loss_backend: str = _f("auto", "fused-loss backend", choices=["auto", "triton", "cuda", "cpu", "torch"])
    zero_stage: int = _f(0, "DeepSpeed ZeRO stage", choices=[0, 1, 2, 3])
    offload_optimizer: bool = _f(False, "keep optimizer states on CPU (ZeRO ≥ 1)")
    offload_params: bool = _f(False, "keep parameters on CPU (ZeRO 3)")
    deepspeed_config: Optional[str] = _f(None, "your DeepSpeed JSON, merged over the generated one")
    eval_every: int = _f(0, "evaluate every N optimizer steps (0: only at the end)")
    eval_pairs_per_batch: int = _f(16, "pairs (groups) per evaluation micro-batch")
    log_every: int = _f(10, "write metrics every N optimizer steps (each waits for the GPU once)")
    save_every: int = _f(0, "checkpoint every N optimizer steps (0: only at the end)")
    keep_last: int = _f(2, "checkpoints to keep")
    resume: Optional[str] = _f(None, "'latest' or a checkpoint folder to continue from")
    resume_allow_changes: bool = _f(False, "let a resume go on with other data, model path, layout, batch size "
                                           "or grad_accum than the run that saved it (never another architecture, "
                                           "tokenizer, LoRA setting or number of ranks)")
    overwrite: bool = _f(False, "start a new run in an output_dir that holds one, deleting its checkpoints, "
                                "metrics and export")
    collective_timeout: int = _f(600, "seconds a rank waits for the others in a collective before the run stops "
                                      "(a frozen or dead rank); longer than your slowest checkpoint save")
    on_nonfinite: str = _f("stop", "a NaN/inf loss stops the run, or skips that step", choices=["stop", "skip"])
    export: bool = _f(True, "export a Hugging Face model to OUTPUT_DIR/export at the end")
    report_to: list = _f(list(trackers.DEFAULT), "experiment trackers (each needs its library installed): "
                                                 "tensorboard (OUTPUT_DIR/tensorboard), wandb, mlflow, trackio, "
                                                 "or none", choices=list(trackers.CHOICES))
    tensorboard: Optional[bool] = _f(None, "the older switch: true adds tensorboard to report_to, false removes it",
                                     type=bool)

    def __post_init__(self):
        """Every bad value is refused here, in one line naming the flag, before anything is loaded."""
        if isinstance(self.report_to, str):  # report_to: wandb, as transformers takes it
            self.report_to = [self.report_to]
        _check_types("train", self)
        for name in ("grad_accum", "log_every", "pairs_per_batch", "eval_pairs_per_batch"):
            _require(getattr(self, name) >= 1, f"train.{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("max_steps", "token_budget", "row_tokens", "eval_every", "save_every", "keep_last",
                     "weight_decay", "max_grad_norm", "center_coef", "margin_scale"):
            _require(getattr(self, name) >= 0, f"train.{name} must be ≥ 0, got {getattr(self, name)}")
        _require(self.collective_timeout >= 10, f"train.collective_timeout must be ≥ 10 seconds, got "
                                                f"{self.collective_timeout}")
        _require(self.max_steps > 0 or self.epochs > 0,
                 f"train.epochs must be > 0 (or set train.max_steps), got {self.epochs}")
        _require(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _require(math.isfinite(self.tie_nu) and self.tie_nu > 0, f"train.tie_nu must be > 0, got {self.tie_nu}")
        _require(0 <= self.warmup_ratio <= 1, f"train.warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        _require(self.adam_eps > 0, f"train.adam_eps must be > 0, got {self.adam_eps}")
        _require(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
                 f"train.adam_betas must be two values in [0, 1), got {self.adam_betas}")
        _require(not self.offload_optimizer or self.zero_stage >= 1,
                 "train.offload_optimizer needs train.zero_stage ≥ 1")
        _require(not self.offload_params or self.zero_stage == 3, "train.offload_params needs train.zero_stage 3")
        trackers.check(self.report_to, self.tensorboard)


def attributes_of(names, weights=()):
    """(attribute names, the fixed combination of them that is the scalar reward: `weights`, else their mean),
    or None without names: what a run's data.attributes and train.attribute_weights say (a Config's, or a
    saved run's config.json)."""
    names = [str(n) for n in names or []]
    if not names:
        return None
    return names, [float(w) for w in weights or []] or [1.0 / len(names)] * len(names)


def attribute_combination(config):
    """The combination of attributes_of a Config ([A] floats), or None without data.attributes."""
    spec = attributes_of(getattr(config.data, "attributes", None), config.train.attribute_weights)
    return None if spec is None else spec[1]


def data_kind(config):
    """'pairs' or 'groups' (a Config built with a plain DataConfig holds pairs; attribute rows are groups)."""
    if getattr(config.data, "attributes", None):
        return "groups"
    return getattr(config.data, "kind", "pairs")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataSection = field(default_factory=DataSection)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        regression = self.train.objective in ("regression", "regression+bradley_terry")
        attributes = list(getattr(self.data, "attributes", []) or [])
        _require(not regression or attributes, f"train.objective {self.train.objective} regresses attribute columns: "
                                               f"name them with --data.attributes (e.g. helpfulness correctness)")
        _require(regression or not attributes, f"data.attributes {attributes} are trained by --train.objective "
                                               f"regression or regression+bradley_terry, not {self.train.objective}")
        w = self.train.attribute_weights
        _require(not w or len(w) == len(attributes),
                 f"train.attribute_weights gives {len(w)} weights for {len(attributes)} data.attributes")
        _require(all(isinstance(x, (int, float)) and math.isfinite(x) for x in w),
                 f"train.attribute_weights must be finite numbers, got {w}")

    def to_dict(self):
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "data": DataSection, "train": TrainConfig}

# transformers' / TRL's names for the same settings (RewardConfig, TrainingArguments): accepted at the top of a
# YAML file, in a section, and as flags (--learning_rate 1e-5)
ALIASES = {
    "learning_rate": "train.lr", "per_device_train_batch_size": "train.pairs_per_batch",
    "per_device_eval_batch_size": "train.eval_pairs_per_batch", "gradient_accumulation_steps": "train.grad_accum",
    "num_train_epochs": "train.epochs", "max_steps": "train.max_steps", "seed": "train.seed",
    "output_dir": "train.output_dir", "weight_decay": "train.weight_decay", "warmup_ratio": "train.warmup_ratio",
    "max_grad_norm": "train.max_grad_norm", "lr_scheduler_type": "train.scheduler",
    "center_rewards_coefficient": "train.center_coef", "logging_steps": "train.log_every",
    "save_steps": "train.save_every", "eval_steps": "train.eval_every", "save_total_limit": "train.keep_last",
    "resume_from_checkpoint": "train.resume", "deepspeed": "train.deepspeed_config",
    "model_name_or_path": "model.name_or_path", "gradient_checkpointing": "model.gradient_checkpointing",
    "max_length": "data.max_length", "bf16": "model.dtype", "fp16": "model.dtype", "report_to": "train.report_to",
}


def _precision(values):
    """bf16 / fp16 (booleans, as TRL writes them) as model.dtype."""
    if values.pop("bf16", None):
        return "bf16"
    if values.pop("fp16", None):
        return "fp16"
    return None


def _resolve_aliases(found, where):
    """{alias or section.name: value} → {section.name: value}; one line when an alias and the option it
    stands for disagree."""
    out = {k: v for k, v in found.items() if "." in k}
    flags = {k: v for k, v in found.items() if "." not in k}
    precision = {k: flags.pop(k) for k in ("bf16", "fp16") if k in flags}
    for name, value in flags.items():
        if name not in ALIASES:
            raise UserError(f"{where}: unknown option {name!r}; the options are model.*, data.*, train.* (and "
                            f"transformers' names: {', '.join(sorted(ALIASES))})")
        key = ALIASES[name]
        if key in out and out[key] != value:
            raise UserError(f"{where}: {name} ({value!r}) and {key} ({out[key]!r}) disagree; give one of them")
        out[key] = value
    if precision:
        bad = {k: v for k, v in precision.items() if not isinstance(v, bool)}
        if bad:
            raise UserError(f"{where}: {', '.join(bad)} must be true or false, got {bad}")
        dtype = _precision(dict(precision)) or "fp32"
        if "model.dtype" in out and out["model.dtype"] != dtype:
            raise UserError(f"{where}: {', '.join(f'{k}: {v}' for k, v in precision.items())} and model.dtype "
                            f"({out['model.dtype']!r}) disagree; give one of them")
        out["model.dtype"] = dtype
    return out

_DATA_HELP = {
    "train": "training sources: files, folders, datasets dirs or hub names (PATH or PATH@WEIGHT)",
    "eval": "evaluation sources (default: a seeded eval_fraction of train)",
    "eval_fraction": "share of each train source held out for evaluation when no eval source is given",
    "format": "row format", "columns": "column names, as JSON: {\"chosen\": \"good\", ...}",
    "max_length": "tokens per sequence", "overlong": "truncate over-long pairs, or drop them",
    "min_prompt_tokens": "prompt tokens truncation keeps", "chat_template": "Jinja chat template (text or file)",
    "on_bad_row": "stop on a bad row, or skip and count it", "cache_dir": "tokenization cache folder",
    "seed": "seed of the eval split and source weights", "num_proc": "tokenization processes (0: automatic)",
    "attributes": "attribute columns (a number per response, e.g. helpfulness correctness): rows are read as "
                  "groups (one response is a group of one), for the regression objectives",
    "eos_after_template": "append EOS after a chat template's own end too, as runs of rmfast before this option "
                          "did (off: the reward is read where apply_chat_template ends, as transformers, vLLM "
                          "and RewardBench read it)",
}


def _parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(parser):
    """One flag per config field, grouped by section."""
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} options")
        for f in dataclasses.fields(cls):
            help_text = f.metadata.get("help") or _DATA_HELP.get(f.name, "")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kw = {"dest": f"{section}.{f.name}", "default": argparse.SUPPRESS,
                  "help": f"{help_text} (default: {default})"}
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
            if isinstance(default, bool) or f.metadata.get("type") is bool:
                kw.update(type=_parse_bool, metavar="BOOL")
            elif isinstance(default, list):
                kw.update(nargs="+", type=f.metadata.get("item", float if default and isinstance(default[0], float)
                                                         else str))
            elif isinstance(default, dict):
                kw.update(type=json.loads, metavar="JSON")
            elif isinstance(default, (int, float)):
                kw.update(type=type(default))
            group.add_argument(f"--{section}.{f.name}", **kw)
    group = parser.add_argument_group("transformers' option names (each stands for the option named)")
    for name, key in ALIASES.items():
        if name in ("bf16", "fp16"):
            group.add_argument(f"--{name}", dest=name, type=_parse_bool, metavar="BOOL", default=argparse.SUPPRESS,
                               help="train in this precision (model.dtype)")
            continue
        section, field_name = key.split(".", 1)
        action = next(a for a in parser._actions if a.dest == key)
        group.add_argument(f"--{name}", dest=f"alias:{name}", type=action.type, nargs=action.nargs,
                           choices=action.choices, metavar=action.metavar, default=argparse.SUPPRESS,
                           help=f"= --{key}")


def overrides_from(args):
    """The {"section.name": value} overrides of parsed flags, transformers' names resolved."""
    found = {}
    for key, value in vars(args).items():
        if "." in key or key in ("bf16", "fp16"):
            found[key] = value
        elif key.startswith("alias:"):
            found[key[len("alias:"):]] = value
    return _resolve_aliases(found, "flags")


def build(yaml_path=None, overrides=None):
    """A Config from an optional YAML file and a {"section.field": value} dict of overrides."""
    values = {s: {} for s in SECTIONS}
    if yaml_path:
        import yaml

        try:
            with open(yaml_path) as f:
                loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise UserError(f"{yaml_path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{yaml_path}: expected sections (model:, data:, train:) holding options")
        unknown = [k for k in loaded if k not in SECTIONS and k not in ALIASES]
        if unknown:
            raise UserError(f"{yaml_path}: unknown sections {sorted(unknown)}; use {', '.join(SECTIONS)} (or "
                            f"transformers' option names, such as learning_rate, at the top)")
        if not all(isinstance(v, (dict, type(None))) for k, v in loaded.items() if k in SECTIONS):
            raise UserError(f"{yaml_path}: expected sections (model:, data:, train:) holding options")
        found = {}
        for section, items in loaded.items():
            if section not in SECTIONS:  # a flat transformers-style option, or a mistake
                found[section] = items
                continue
            names = {f.name for f in dataclasses.fields(SECTIONS[section])}
            for name, value in (items or {}).items():
                if name in names:
                    found[f"{section}.{name}"] = value
                elif name in ALIASES:
                    found[name] = value
                else:
                    raise UserError(f"{yaml_path}: unknown {section} option {name!r}")
        for key, value in _resolve_aliases(found, yaml_path).items():
            section, name = key.split(".", 1)
            values[section][name] = value
    for key, value in _resolve_aliases(dict(overrides or {}), "flags").items():
        section, name = key.split(".", 1)
        values[section][name] = value
    for key in PATHS:  # "~/runs/rm" and "$SCRATCH/data.jsonl" mean what they mean in a shell
        section, name = key.split(".", 1)
        if name in values[section]:
            value = values[section][name]
            values[section][name] = [expand(v) for v in value] if isinstance(value, list) else expand(value)
    return Config(**{s: SECTIONS[s](**values[s]) for s in SECTIONS})


# the options that hold paths (a hub id passes through expand unchanged)
PATHS = ("model.name_or_path", "model.tokenizer", "data.train", "data.eval", "data.cache_dir", "train.output_dir",
         "train.deepspeed_config", "train.resume")
