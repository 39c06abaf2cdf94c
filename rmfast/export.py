"""Export: a Hugging Face folder that ``AutoModelForSequenceClassification.from_pretrained`` loads with one
label, the value head as its score, safetensors weights, the tokenizer, and the eval set's reward mean and
std in the config (``rmfast_reward_mean`` / ``rmfast_reward_std``).

Plain transformers reads the reward at the rightmost token that is not the pad id. rmfast reads it at the
last token (EOS). So that both agree, the export's pad id must differ from every real token: when the
tokenizer has no pad token, or pads with EOS, the export adds a pad token (one more embedding row).

One path writes every export, streaming: a source hands over the weights one layer at a time (a tensor,
or a LoRA layer's base weight with its adapters), and ``_Export`` merges the adapters, renames the keys to
the sequence-classification model's, casts, and appends them to safetensors shards of at most
``max_shard_size`` bytes. Two sources feed it: a state dict (``write_export``, ``rmfast-export``), and a
live, possibly ZeRO-3-partitioned model (``export_model``), whose parameters are gathered one layer at a
time so that no rank ever holds more than its partition plus that layer, and rank 0 (which writes) never
builds the whole model. The folder is written beside the target and renamed into place at the end."""

import contextlib
import copy
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import runfolder
from .errors import UserError
from .metrics import json_text
from .runfolder import RunFolder

PAD_TOKEN = "<|rmfast_pad|>"
# the export's config key of the reward-token convention: true when the model was trained with EOS appended
# after a chat template's own end (rmfast before the convention was recorded; an rmfast export without the key
# was made so), false when a conversation's reward is read where apply_chat_template ends
EOS_AFTER_TEMPLATE = "rmfast_eos_after_chat_template"
MAX_SHARD_SIZE = 2 * 1024**3  # bytes per safetensors file; rank 0 holds at most one file's tensors in memory
_LORA = (".base_layer.", ".lora_A.", ".lora_B.")


# -- LoRA: a layer's base weight and its two adapters travel together, merged as they pass

def _stem(key):
    """The LoRA layer a key belongs to (its module path), or the key itself when it is no LoRA tensor."""
    for part in _LORA:
        if part in key:
            return key[: key.index(part)]
    return key


def _layers(keys):
    """keys (a state dict's order) → lists of keys exported together ("layers"): each LoRA layer's tensors
    form one list, every other key its own. The order is deterministic, so every rank gathers the same sequence."""
    layers = {}
    for key in keys:
        layers.setdefault(_stem(key), []).append(key)
    return list(layers.values())


def lora_scale(lora):
    """PEFT's scaling of a LoRA layer: alpha / r, or alpha / √r with rsLoRA. lora: (r, alpha[, rslora])."""
    r, alpha, rslora = (*lora, False)[:3]
    return alpha / (math.sqrt(r) if rslora else r)


def _merge_layer(layer, scale, fan_in_fan_out=()):
    """One layer of a PEFT LoRA RewardModel state dict → plain keys and tensors: W + ΔW, ΔW = (B @ A) · scale
    transposed where the layer stores its weight [in, out] (GPT-2's Conv1D, PEFT's fan_in_fan_out), as PEFT's
    own get_delta_weight computes it (peft.utils.transpose), in fp32 and cast back to W's dtype; adapters
    dropped, PEFT prefixes removed. A: [r, in], B: [out, r]. fan_in_fan_out: the plain names (backbone.…) of
    such layers."""
    from peft.utils import transpose

    out = {}
    for key, value in layer.items():
        if ".lora_" in key:
            continue
        name = key.replace("backbone.base_model.model.", "backbone.").replace(".base_layer.", ".")
        if ".base_layer." in key and key.endswith(".weight"):
            stem = key[: -len(".base_layer.weight")]
            try:
                a, b = layer[f"{stem}.lora_A.default.weight"], layer[f"{stem}.lora_B.default.weight"]
            except KeyError:
                raise ValueError(f"export: {stem} has a LoRA base layer but no lora_A/lora_B.default adapters "
                                 f"(only Linear LoRA layers are merged)") from None
            transposed = name[: -len(".weight")] in fan_in_fan_out
            delta = transpose(b.float() @ a.float(), transposed) * scale
            if delta.shape != value.shape:
                raise ValueError(f"export: {stem}'s LoRA update has shape {tuple(delta.shape)}, its weight "
                                 f"{tuple(value.shape)}")
            value = (value.float() + delta).to(value.dtype)
        out[name] = value
    return out


# -- the target: names, shapes and config of the sequence-classification model, from a meta-device build

@dataclass
class _Target:
    config: object           # the export's config (one label, pad id, grown vocabulary)
    tokenizer: object        # a copy, with the added pad token if any
    prefix: str              # the base model's attribute, e.g. "model" (backbone.X → model.X)
    head: str                # "score" or "classifier": head.weight [D] → score.weight [1, D]
    head_bias: bool          # whether that Linear has a bias
    embedding: str           # the input embedding's key, e.g. "model.embed_tokens.weight"
    rows: int                # embedding rows the export has (more than the trained ones when a pad is added)
    shapes: dict             # every key the model's state dict has → its shape
    architecture: str        # e.g. "LlamaForSequenceClassification"
    fan_in_fan_out: set      # backbone.… names of the layers that store their weight [in, out] (Conv1D)
    grown: bool = False
    written: set = field(default_factory=set)


@contextlib.contextmanager
def _no_zero3_init():
    """While a ZeRO-3 config is registered with transformers (the Trainer's, at ZeRO-3), from_config builds
    models inside zero.Init, whose collectives would wait for the other ranks: not for a meta-device model."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        yield
        return
    registered = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


def _target(backbone_config, tokenizer, labels=None):
    """The export's layout, from the model built on the meta device (no memory, no zero.Init, no collective).
    labels: the attribute names of an attribute head (one label each), else one label."""
    from torch import nn
    from transformers import AutoModelForSequenceClassification

    tokenizer = copy.deepcopy(tokenizer)
    config = backbone_config.__class__.from_dict(backbone_config.to_dict())
    config.num_labels = len(labels) if labels else 1
    if labels:
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
    config.problem_type = "regression"
    grow = 0
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        grow = max(len(tokenizer) - config.vocab_size, 0)
    config.vocab_size += grow
    config.pad_token_id = tokenizer.pad_token_id
    config.architectures = None
    with torch.device("meta"), _no_zero3_init():
        seq = AutoModelForSequenceClassification.from_config(config)
    head = next(n for n in ("score", "classifier") if isinstance(getattr(seq, n, None), nn.Linear))
    names = {id(p): n for n, p in seq.named_parameters()}
    embedding = seq.get_input_embeddings().weight
    from transformers.pytorch_utils import Conv1D

    prefix = seq.base_model_prefix + "."
    conv = {f"backbone.{n[len(prefix):]}" for n, m in seq.named_modules()
            if isinstance(m, Conv1D) and n.startswith(prefix)}
    return _Target(fan_in_fan_out=conv, config=seq.config, tokenizer=tokenizer, prefix=seq.base_model_prefix, head=head,
                   head_bias=getattr(seq, head).bias is not None, embedding=names[id(embedding)],
                   rows=embedding.shape[0], shapes={k: tuple(v.shape) for k, v in seq.state_dict().items()},
                   architecture=type(seq).__name__, grown=grow > 0)


def _grow(weight, rows, dtype):
    """Embedding [V, D] → [rows, D] in dtype; the new rows are the mean of the trained ones (transformers'
    mean resizing, less its 1e-9-covariance noise). The added pad token is never read by a score."""
    out = torch.empty((rows, weight.shape[1]), dtype=dtype)
    out[: weight.shape[0]].copy_(weight)
    out[weight.shape[0]:] = weight.mean(0, dtype=torch.float32).to(dtype)
    return out


# -- safetensors shards, written as the tensors arrive

class _Shards:
    """Tensors appended one by one into files of at most max_bytes (a bigger tensor gets a file of its
    own); named as transformers names them, with model.safetensors.index.json when there are several."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending, self.pending_bytes, self.storages = {}, 0, set()
        self.files, self.total, self.count = [], 0, 0

    def add(self, name, tensor):
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        storage = tensor.untyped_storage().data_ptr()
        # safetensors refuses tensors that share memory (a caller's tied weights, say)
        tensor = tensor.contiguous() if storage not in self.storages else tensor.clone()
        self.storages.add(storage)
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total += size
        self.count += tensor.numel()

    def _flush(self):
        from safetensors.torch import save_file

        path = self.folder / f"part-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes, self.storages = {}, 0, set()

    def close(self):
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        if n == 1:
            self.files[0][0].rename(self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, (path, keys) in enumerate(self.files, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_parameters": self.count, "total_size": self.total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# -- the export: feed layers, then finish

def check_target(out: Path):
    """Refuse an export folder inside a run's checkpoints/ (a later save or resume there would delete it),
    and a folder that exists and is not an earlier export (it would be replaced)."""
    from .checkpoint import MARKER

    for folder in [out, *out.resolve().parents]:
        if folder.name == runfolder.CHECKPOINTS and ((folder / "latest").exists()
                                                     or any(folder.glob(f"step-*/{MARKER}"))):
            raise UserError(f"export: {out} is inside {folder}, a run's checkpoint folder, where rmfast's saves and "
                            f"resumes manage what lives; write the export elsewhere (OUTPUT_DIR/export, say)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (out / "rmfast.json").exists():
        raise UserError(f"export: {out} exists and is not an rmfast export; nothing was replaced: give a new or empty "
                        f"folder, or an earlier export to replace")


def _staging(out: Path):
    """A fresh folder beside out for the export to be written in. out may be absent, empty or an earlier
    export (replaced at the end); anything else is refused rather than deleted."""
    check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # what a crashed export to the same target left beside it
    for stale in [*out.parent.glob(f".{out.name}.*.tmp"), *out.parent.glob(f".{out.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the export private to its writer
    return tmp


def _publish(tmp: Path, out: Path):
    """Rename the finished folder into place; an earlier export there is moved aside first, then removed."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)


class _Export:
    """Streams a RewardModel's weights (rmfast keys: backbone.*, head.*) into a Hugging Face folder:
    feed() one layer at a time (CPU tensors, a LoRA layer's together), then finish(); abort() on failure.
    dtype: the export's floating dtype (None: the first tensor's). lora: (r, alpha) to merge adapters."""

    def __init__(self, backbone_config, tokenizer, out_dir, dtype=None, lora=None, max_shard_size=MAX_SHARD_SIZE,
                 eos_after_template=False, attributes=None):
        self.out = Path(out_dir)
        self.attributes = attributes  # (names, combination) of an attribute head, or None
        self.target = _target(backbone_config, tokenizer, attributes[0] if attributes else None)
        self.dtype, self.lora, self.score_bias, self.tie_nu = dtype, lora, None, None
        self.eos_after_template = bool(eos_after_template)
        self.tmp = _staging(self.out)
        self.shards = _Shards(self.tmp, max_shard_size)

    def feed(self, layer):
        """layer: {rmfast key: CPU tensor}; a LoRA layer's base weight and adapters come in one layer."""
        if self.lora:
            layer = _merge_layer(layer, lora_scale(self.lora), self.target.fan_in_fan_out)
        for key, value in layer.items():
            self.dtype = self.dtype or value.dtype
            named = self._rename(key, value)
            if named is not None:
                self._put(*named)

    def _rename(self, key, value):
        """rmfast key and tensor → the sequence-classification model's key and tensor (None: kept in config)."""
        t = self.target
        if key.startswith("backbone."):
            return f"{t.prefix}.{key[len('backbone.'):]}", value
        if key == "head.weight":
            return f"{t.head}.weight", value.reshape(-1, value.shape[-1])
        if key == "head.bias":
            # transformers' score layers have no bias: the export's rewards are the engine's minus this constant
            # (pair orderings and accuracy are unchanged). It is kept in the config to add back (one per
            # attribute for an attribute head).
            bias = value.detach().reshape(-1).double()
            self.score_bias = bias.tolist() if self.attributes else float(bias[0])
            if not t.head_bias:
                return None
            self.score_bias = [0.0] * len(bias) if self.attributes else 0.0
            return f"{t.head}.bias", value.reshape(-1)
        if key == "tie_log_nu":  # Davidson's tie parameter (the davidson objective): kept in the config
            self.tie_nu = float(value.detach().double().exp().reshape(-1)[0])
            return None
        raise ValueError(f"export: unexpected weight {key} (neither backbone.* nor head.*)")

    def _put(self, name, value):
        t = self.target
        if name not in t.shapes:
            raise ValueError(f"export: {name} is no weight of {t.architecture} (the backbone does not fit it)")
        if name == t.embedding and t.rows > value.shape[0]:
            value = _grow(value, t.rows, self.dtype)
        elif value.is_floating_point():
            value = value.to(self.dtype)
        if tuple(value.shape) != t.shapes[name]:
            raise ValueError(f"export: {name} has shape {tuple(value.shape)}, {t.architecture} wants {t.shapes[name]}")
        t.written.add(name)
        self.shards.add(name, value)

    def finish(self, eval_metrics=None):
        """Write the last shard, config, tokenizer and rmfast.json, and move the folder into place."""
        t = self.target
        missing = [k for k in t.shapes if k not in t.written and "rotary" not in k and not k.endswith("inv_freq")]
        if missing:
            raise ValueError(f"export: weights of {t.architecture} missing from the model: {missing[:5]}")
        self.shards.close()
        config = t.config
        config.architectures = [t.architecture]
        # as save_pretrained records it: transformers 5 as `dtype`, 4.x as `torch_dtype` (then no property)
        key = "dtype" if isinstance(getattr(type(config), "torch_dtype", None), property) else "torch_dtype"
        setattr(config, key, str(self.dtype).split(".")[1])
        if eval_metrics and all(isinstance(eval_metrics.get(k), float) and math.isfinite(eval_metrics[k])
                                for k in ("eval_reward_mean", "eval_reward_std")):
            config.rmfast_reward_mean = eval_metrics["eval_reward_mean"]
            config.rmfast_reward_std = eval_metrics["eval_reward_std"]
        if self.score_bias is not None:
            config.rmfast_score_bias = self.score_bias
        if self.tie_nu is not None:
            config.rmfast_tie_nu = self.tie_nu
        if self.attributes:  # the scalar reward: this combination of the labels (the attributes)
            config.rmfast_attribute_weights = [float(w) for w in self.attributes[1]]
        # where the reward is read (rmfast.data.tokenize.LengthPolicy): what a scorer of this export must do
        setattr(config, EOS_AFTER_TEMPLATE, self.eos_after_template)
        config.save_pretrained(self.tmp)
        t.tokenizer.save_pretrained(self.tmp)
        info = {"eval": eval_metrics or {}, "pad_token_added": t.grown}
        (self.tmp / "rmfast.json").write_text(json_text(info, indent=2))
        _publish(self.tmp, self.out)
        return self.out

    def abort(self):
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_export(backbone_config, state, tokenizer, out_dir, eval_metrics=None, dtype=None, lora=None,
                 max_shard_size=MAX_SHARD_SIZE, consume=False, eos_after_template=False, attributes=None):
    """state: RewardModel state dict (backbone.* and head.*; PEFT keys when lora=(r, alpha)) → HF
    sequence-classification folder out_dir. dtype: the weights' dtype (default: the first tensor's).
    consume: pop tensors from state as they are written (the caller's dict shrinks; less memory)."""
    export = _Export(backbone_config, tokenizer, out_dir, dtype, lora, max_shard_size, eos_after_template, attributes)
    try:
        for keys in _layers(list(state)):
            export.feed({k: state.pop(k) if consume else state[k] for k in keys})
        return export.finish(eval_metrics)
    except BaseException:
        export.abort()
        raise


def _gathered(tensors):
    """A context in which ZeRO-3-partitioned parameters hold their full data, read-only (all ranks enter it
    with the same list; nothing is gathered for plain tensors)."""
    params = [p for p in tensors if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    # modifier_rank=None: nothing is written back, so leaving the context only frees the full copies
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _agree(error, distributed):
    """Every rank learns whether rank 0 failed and raises if so, instead of waiting in a collective."""
    message = [f"{type(error).__name__}: {error}" if error is not None else None]
    if distributed:
        import torch.distributed as dist

        dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise RuntimeError(f"export failed on rank 0: {message[0]}")


def export_model(model, tokenizer, out_dir, eval_metrics=None, dtype=None, lora=None, max_shard_size=MAX_SHARD_SIZE,
                 eos_after_template=False, attributes=None):
    """Write the HF export of a RewardModel; every rank calls it, rank 0 writes (returns the folder; the
    other ranks None). Under ZeRO-3 the parameters are gathered one layer at a time (a tensor, or a LoRA
    layer), so a rank holds its partition plus one layer, and rank 0 the shard being written besides.
    Partitioned parameters are recognised by themselves (no ZeRO stage to pass).
    lora: (r, alpha) when the backbone carries PEFT LoRA adapters; they are merged into the weights."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    tensors = model.state_dict(keep_vars=True)  # the parameters themselves: nothing is copied or gathered
    config = model.backbone.get_base_model().config if lora else model.backbone.config
    dtype = dtype or next(iter(tensors.values())).dtype
    export, error = None, None
    if rank == 0:
        try:
            export = _Export(config, tokenizer, out_dir, dtype, lora, max_shard_size, eos_after_template, attributes)
        except Exception as e:  # noqa: BLE001 - every rank must hear of it before the gathers start
            error = e
    _agree(error, distributed)
    for keys in _layers(list(tensors)):
        with _gathered([tensors[k] for k in keys]):
            if export is not None:
                try:
                    export.feed({k: tensors[k].detach().to("cpu", copy=True) for k in keys})
                except Exception as e:  # noqa: BLE001 - keep gathering, so that no other rank waits forever
                    error, export = e, export.abort()
    if export is not None:
        try:
            out = export.finish(eval_metrics)
        except Exception as e:  # noqa: BLE001
            error, export = e, export.abort()
    _agree(error, distributed)
    return out if export is not None else None


def load_checkpoint_state(checkpoint_dir):
    """A RewardModel state dict (fp32, whole) from an rmfast checkpoint folder of any ZeRO stage."""
    from .checkpoint import vet

    path = Path(checkpoint_dir)
    vet(path)  # zero_to_fp32 unpickles the optimizer files: nothing but plain data may be in them
    states = sorted(path.glob("*model_states.pt"))
    zero_files = list(path.glob("*optim_states.pt"))
    stage = 0
    if states:
        meta = torch.load(states[0], map_location="cpu", weights_only=True)
        stage = (meta.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0)
        if stage == 0 or not zero_files:
            return {k: v.float() for k, v in meta["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)


def _last_eval(out_root: Path):
    """The last evaluation record of a run's metrics.jsonl (None without one)."""
    metrics_file = RunFolder(out_root).metrics
    if not metrics_file.exists():
        return None
    evals = [json.loads(x) for x in metrics_file.read_text().splitlines() if "eval_reward_mean" in x]
    return evals[-1] if evals else None


def main(argv=None):
    """rmfast-export: a Hugging Face model from an rmfast checkpoint."""

    from .errors import ArgumentParser

    parser = ArgumentParser(prog="rmfast-export", description=main.__doc__)
    parser.add_argument("run", help="a training output dir (its latest checkpoint), a checkpoints dir, or a step "
                                    "folder")
    parser.add_argument("--out", required=True, help="where to write the Hugging Face folder")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                        help="the export's weights (default: the run's model.dtype, as rmfast-train exports)")
    parser.add_argument("--max-shard-size", type=float, default=MAX_SHARD_SIZE / 1024**3,
                        help="GiB per safetensors file (default %(default)s)")
    args = parser.parse_args(argv)
    from .errors import run as run_tool

    return run_tool("rmfast-export", lambda: _export_run(Path(args.run), args))


def _export_run(run, args):
    """rmfast-export's body: the checkpoint of `run`, refused unless complete and beside its run's files."""
    from transformers import AutoConfig, AutoTokenizer

    from .checkpoint import MARKER, resolve
    from .config import attributes_of
    from .model import DTYPES

    if not run.exists():
        raise FileNotFoundError(f"{run}: no such folder (give a training output dir, its checkpoints dir or a "
                                f"step folder)")
    if RunFolder(run).checkpoints.exists():
        checkpoint = resolve(RunFolder(run).checkpoints, "latest")
        out_root = run
    else:
        checkpoint = resolve(run, "latest") if (run / "latest").exists() else run
        out_root = checkpoint.parent.parent
    if not (checkpoint / MARKER).exists():
        raise UserError(f"{checkpoint} is not a complete checkpoint (no {MARKER} marker: its save was "
                        f"interrupted); export an earlier one")
    folder = RunFolder(out_root)
    for needed in (runfolder.BACKBONE, runfolder.TOKENIZER):
        if not (out_root / needed).is_dir():
            raise UserError(f"{out_root} has no {needed}/ folder, which rmfast-train writes beside its checkpoints "
                            f"(is it an rmfast run, copied whole?)")
    state = load_checkpoint_state(checkpoint)
    run_config = json.loads(folder.config.read_text()) if folder.config.exists() else {}
    model_config = run_config.get("model", {})
    lora = (model_config["lora_r"], model_config["lora_alpha"], model_config.get("lora_rslora", False)) \
        if model_config.get("lora_r") else None
    tokenizer = AutoTokenizer.from_pretrained(folder.tokenizer)
    config = AutoConfig.from_pretrained(folder.backbone)
    # consume: each layer leaves the state once written, so memory falls as the shards go out
    # a run saved before the convention was recorded appended EOS after chat templates
    eos_after_template = run_config.get("data", {}).get("eos_after_template", True)
    dtype = args.dtype or model_config.get("dtype") or "bf16"  # the run's own, as its end-of-training export
    attributes = attributes_of(run_config.get("data", {}).get("attributes"),
                               run_config.get("train", {}).get("attribute_weights"))
    path = write_export(config, state, tokenizer, args.out, _last_eval(out_root), DTYPES[dtype], lora=lora,
                        max_shard_size=int(args.max_shard_size * 1024**3), consume=True,
                        eos_after_template=eos_after_template, attributes=attributes)
    print(f"exported {checkpoint} to {path}")


if __name__ == "__main__":
    sys.exit(main())
