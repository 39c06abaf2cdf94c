"""The run folder (train.output_dir) holds one run: a lock for as long as it trains, a refusal to start a
new run over an earlier one, and what a resume must find unchanged."""

import fcntl
import json
import os
import shutil
from pathlib import Path

from .config import data_kind

LOCK = ".rmfast.lock"
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "export", "tensorboard")

# what a resumed run must share with the run that saved the checkpoint: NEVER cannot change at all (the
# saved weights, optimizer shards or vocabulary would not fit); the rest only with resume_allow_changes
NEVER = ("architecture", "tokenizer", "lora", "world_size", "data.kind")
ALLOWED = ("model.name_or_path", "data.train", "data.max_length", "train.layout", "train.pairs_per_batch",
           "train.token_budget", "train.grad_accum")
# what a checkpoint saved before a key was recorded held: groups came later, so such a run trained on pairs
SAVED_DEFAULTS = {"data.kind": "pairs"}


class RunDirError(ValueError):
    """The output folder cannot take this run: the message says why and what to do."""


def lock(out: Path):
    """Hold the run folder's lock until the process exits (the kernel drops it on any exit, a crash or
    SIGKILL included, so no stale lock survives). Returns the open lock file; keep a reference to it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK, "a+")
    except OSError as exc:
        raise RunDirError(f"train.output_dir {out} cannot be used: {exc.strerror or exc}; choose a folder that "
                          f"can be written") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunDirError(f"{out} is in use by a running rmfast-train ({holder}); wait for it to finish or "
                          f"choose another --train.output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


def claim(out: Path, resume, overwrite):
    """Lock `out` for a run and make sure it holds no other run: a folder with an earlier run is refused
    unless the run resumes it or `overwrite` clears it (its checkpoints, metrics, TensorBoard and export)."""
    handle = lock(out)
    earlier = [name for name in RUN_FILES if (out / name).exists()]
    if earlier and not resume:
        if not overwrite:
            handle.close()
            raise RunDirError(f"{out} already holds a run ({', '.join(earlier)}); continue it with --train.resume "
                              f"latest, start over with --train.overwrite true, or choose another --train.output_dir")
        for name in earlier:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return handle


def cut_metrics(path: Path, step):
    """Keep only the records of steps up to `step` (a resumed run writes the later ones again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def identity(config, backbone_config, tokenizer_fp, data_fps, world_size):
    """What a checkpoint records of its run, to compare a resume with (JSON-able)."""
    m, t = config.model, config.train
    arch = {k: v for k, v in backbone_config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    return _as_json({
        "architecture": arch, "tokenizer": tokenizer_fp, "world_size": world_size,
        "lora": [m.lora_r, m.lora_alpha, sorted(m.lora_target_modules)] if m.lora_r else None,
        "model.name_or_path": m.name_or_path, "data.train": data_fps, "data.max_length": config.data.max_length,
        "train.layout": t.layout, "train.pairs_per_batch": t.pairs_per_batch, "train.token_budget": t.token_budget,
        "train.grad_accum": t.grad_accum, "data.kind": data_kind(config),
    })


def _as_json(value):
    """As it reads back from the checkpoint's JSON (tuples become lists), so that equal runs compare equal."""
    return json.loads(json.dumps(value, default=str))


def check_resume(saved, now, where, allow_changes):
    """Refuse a resume whose run differs from the saved one, listing every difference."""
    if saved is None:  # a checkpoint from before identities were saved: nothing to compare
        return
    saved = {**SAVED_DEFAULTS, **saved}
    never = [k for k in NEVER if saved.get(k) != now.get(k)]
    allowed = [k for k in ALLOWED if saved.get(k) != now.get(k)]
    if not never and (not allowed or allow_changes):
        return
    lines = [f"cannot resume {where}: the run that saved it differs from this one:"]
    for k in never:
        lines.append(f"  {k}: {_short(saved.get(k))} then, {_short(now.get(k))} now (never allowed"
                     + (": resume with the same number of ranks)" if k == "world_size" else ")"))
    for k in allowed:
        lines.append(f"  {k}: {_short(saved.get(k))} then, {_short(now.get(k))} now "
                     f"(allowed with --train.resume_allow_changes true)")
    raise RunDirError("\n".join(lines))


def _short(value):
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
