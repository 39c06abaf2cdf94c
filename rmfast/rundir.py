"""The run folder (train.output_dir) holds one run: a lock for as long as it trains, a refusal to start a
new run over an earlier one, and what a resume must find unchanged."""

import fcntl
import json
import os
import shutil
from pathlib import Path

from . import paths, runfolder
from .config import data_kind
from .errors import UserError

LOCK = ".rmfast.lock"
# written into the folder when a run claims it: what tells an rmfast run folder from any other folder
MARKER = ".rmfast-run"
# what rmfast-train writes into a run folder, and all that --train.overwrite deletes
OWNED = runfolder.OWNED

# what a resumed run must share with the run that saved the checkpoint: NEVER cannot change at all (the
# saved weights, optimizer shards or vocabulary would not fit); the rest only with resume_allow_changes
NEVER = ("architecture", "tokenizer", "lora", "world_size", "data.kind", "data.eos_after_template", "train.objective",
         "data.attributes")
ALLOWED = ("model.name_or_path", "data.train", "data.max_length", "train.layout", "train.pairs_per_batch",
           "train.token_budget", "train.grad_accum", "train.attribute_weights")
# what a checkpoint saved before a key was recorded held: groups came later, so such a run trained on pairs
# and before the reward-token convention was recorded, EOS was appended after a chat template's end too
SAVED_DEFAULTS = {"data.kind": "pairs", "data.eos_after_template": True, "train.objective": "bradley_terry",
                  "data.attributes": [], "train.attribute_weights": []}


class RunDirError(UserError):
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


def is_run(out: Path):
    """out holds an rmfast run: its marker, or (a run from before the marker) a config.json that is an
    rmfast-train config naming this folder as its output_dir."""
    if (out / MARKER).is_file():
        return True
    try:
        config = json.loads((out / "config.json").read_text())
        named = Path(os.path.expanduser(config["train"]["output_dir"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(config.get("model"), dict) and isinstance(config.get("data"), dict) and \
        (out.resolve() == named.resolve() if named.exists() else named.name == out.name)


def check_inputs(out: Path, inputs):
    """Refuse an output folder that is the model (or tokenizer) folder, or is or lies inside a data source
    folder (the run's files would be read as data). inputs: (what, path) pairs."""
    for what, path in inputs:
        src = paths.local(path)
        if src is None or not src.is_dir():
            continue
        if out.exists() and paths.same(out, src):
            raise RunDirError(f"train.output_dir {out} is {what} {path}; a run would write over it: choose "
                              f"another --train.output_dir")
        if what.startswith("data") and paths.inside(out, src):
            raise RunDirError(f"train.output_dir {out} is inside {what} {path}; the run's files would be read "
                              f"as data rows: choose a folder outside it")


def _overwrite_plan(out: Path, earlier, inputs):
    """The paths overwrite deletes, every one checked before any is deleted: rmfast's own entries only, no
    link (rmfast never made one, and deleting through it would reach elsewhere), nothing that holds an
    input. Raises RunDirError naming the first problem."""
    for what, path in inputs:
        src = paths.local(path)
        if src is not None and paths.inside(src, out):
            raise RunDirError(f"--train.overwrite: {out} holds {what} {path}; rmfast will not clear a folder "
                              f"that holds its own inputs: choose another --train.output_dir")
    plan = []
    for name in earlier:
        path = out / name
        if path.is_symlink():
            raise RunDirError(f"--train.overwrite: {path} is a link to {os.readlink(path)}, which rmfast did not "
                              f"make; nothing was deleted: remove the link yourself or choose another "
                              f"--train.output_dir")
        plan.append(path)
    return plan


def claim(out: Path, resume, overwrite, inputs=()):
    """Lock `out` for a run and make sure it holds no other run: a folder with an earlier run is refused
    unless the run resumes it or `overwrite` clears it (only what rmfast-train wrote there). A folder that
    is not an rmfast run is never cleared; neither is the model's folder, a data source, or a folder that
    holds either. inputs: (what, path) pairs — the model, tokenizer and data sources."""
    check_inputs(out, inputs)
    new_folder = not out.exists()
    had_lock = (out / LOCK).exists()
    handle = lock(out)

    def refuse(message):
        handle.close()
        if new_folder:
            shutil.rmtree(out, ignore_errors=True)
        elif not had_lock:
            (out / LOCK).unlink(missing_ok=True)
        raise RunDirError(message)

    earlier = [name for name in OWNED if os.path.lexists(out / name)]
    if earlier and not resume:
        listing = ", ".join(n + ("/" if (out / n).is_dir() else "") for n in earlier)
        if not is_run(out):
            refuse(f"{out} is not an rmfast run folder (no {MARKER}) but holds {listing}, which a run would write "
                   f"over; nothing was deleted: choose a new or empty --train.output_dir")
        if not overwrite:
            refuse(f"{out} already holds a run ({listing}); continue it with --train.resume latest, start over "
                   f"with --train.overwrite true (deletes that run), or choose another --train.output_dir")
        try:
            plan = _overwrite_plan(out, earlier, inputs)
        except RunDirError as exc:
            refuse(str(exc))
        for path in plan:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if not (out / MARKER).exists():
        tmp = out / f".{MARKER}.tmp"
        tmp.write_text(json.dumps({"rmfast": "run folder"}) + "\n")
        os.replace(tmp, out / MARKER)
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
        "lora": [m.lora_r, m.lora_alpha, sorted(m.lora_target_modules)] + (["rslora"] if m.lora_rslora else [])
        if m.lora_r else None,
        "model.name_or_path": m.name_or_path, "data.train": data_fps, "data.max_length": config.data.max_length,
        "train.layout": t.layout, "train.pairs_per_batch": t.pairs_per_batch, "train.token_budget": t.token_budget,
        "train.grad_accum": t.grad_accum, "data.kind": data_kind(config),
        "data.eos_after_template": bool(getattr(config.data, "eos_after_template", False)),
        "train.objective": t.objective,
        "data.attributes": list(getattr(config.data, "attributes", None) or []),
        "train.attribute_weights": [float(w) for w in t.attribute_weights],
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
