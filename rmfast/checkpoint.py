"""Checkpoints: DeepSpeed's engine checkpoint (weights, optimizer, scheduler) plus rmfast's own state —
step, sampler position and every rank's RNG — under ``checkpoints/step-N``.

``latest`` names the newest complete checkpoint. It is written (atomically, by rename) only after every
rank has finished writing and a ``COMPLETE`` marker exists, so a crash in the middle of a save leaves the
previous ``latest`` in place, pointing at a checkpoint that loads."""

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from .errors import UserError

MARKER = "COMPLETE"


def _rng_state():
    """Every generator's state as tensors and plain values, so that it loads with weights_only=True."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(words, dtype=torch.int64), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state):
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_atomic(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# written into step-N before anything else of a save: a folder without it is not deleted by rmfast
SAVING = ".rmfast-save"
# what a checkpoint folder holds when rmfast-train's save from before the SAVING marker wrote it
_SAVE_FILES = re.compile(r"(mp_rank_\d+_model_states\.pt|(bf16_|fp16_)?zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt"
                         r"|zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt|rng_rank\d+\.pt|rmfast_state\.json"
                         r"|\.rmfast_state\.json\.tmp|COMPLETE|\.COMPLETE\.tmp)")


def rmfast_wrote(folder: Path):
    """folder is a checkpoint rmfast's save wrote (its marker, or only the files an earlier save writes)."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    if (folder / SAVING).exists():
        return True
    return all(_SAVE_FILES.fullmatch(p.name) and p.is_file() for p in folder.iterdir())


def checkpoint_tags(root: Path):
    """Complete checkpoints under root, oldest first."""
    if not root.exists():
        return []
    tags = [p.name for p in root.iterdir()
            if p.is_dir() and re.fullmatch(r"step-\d+", p.name) and (p / MARKER).exists()]
    return sorted(tags, key=lambda t: int(t.split("-")[1]))


def save_checkpoint(engine, root: Path, step, state, rank, keep_last=2):
    """Save a DeepSpeed engine and `state` (a JSON-able dict: the trainer's own state) as root/step-N; every
    rank calls it. Returns the tag."""
    tag = f"step-{step}"
    error = None
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        stale = root / tag
        if os.path.lexists(stale):  # an earlier, interrupted save of the same step, or something else
            if rmfast_wrote(stale):
                shutil.rmtree(stale)
            else:
                error = (f"{stale} is in the way of this run's checkpoint and was not written by rmfast's save "
                         f"(no {SAVING} marker); nothing was deleted: move it out of {root} and resume")
        if error is None:
            (root / tag).mkdir()
            _write_atomic(root / tag / SAVING, "")  # first of all: what cleanup may delete is marked as ours
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        from .errors import CheckpointError

        raise CheckpointError(error)
    try:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
        torch.save(_rng_state(), root / tag / f"rng_rank{rank}.pt")
        dist.barrier()
        if rank == 0:
            _write_atomic(root / tag / "rmfast_state.json", json.dumps(state))
            _write_atomic(root / tag / MARKER, "")
            _write_atomic(root / "latest", tag)
    except (OSError, RuntimeError) as exc:
        from .errors import CheckpointError, describe

        intact = checkpoint_tags(root)
        raise CheckpointError(f"could not write checkpoint {root / tag}: {describe(exc)[1]}. "
                              + (f"The last complete one, {root / intact[-1]}, is intact." if intact
                                 else "No complete checkpoint exists yet.")) from exc
    if rank == 0:  # only the run's own checkpoints are here (rundir.claim), and only complete ones are kept
        for old in checkpoint_tags(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(root / old, ignore_errors=True)
    dist.barrier()
    return tag


def _latest(root: Path):
    """The checkpoint `root/latest` names — a step-N folder inside root, nothing else (its text is never
    followed as a path) — or, without a `latest`, the newest complete checkpoint; None if there is none."""
    latest = root / "latest"
    if latest.exists():
        tag = latest.read_text().strip()
        if not re.fullmatch(r"step-\d+", tag):
            raise UserError(f"{latest} names {tag!r}, not a checkpoint of this folder (step-N); delete it, or "
                            f"resume from a checkpoint folder: --train.resume {root}/step-N")
        return root / tag
    tags = checkpoint_tags(root)
    return root / tags[-1] if tags else None


def resolve(root: Path, where):
    """A checkpoint folder from 'latest' or a path (a step folder, or a checkpoints folder)."""
    path = root if where == "latest" else Path(where)
    if where == "latest" or (path / "latest").exists() or (not (path / MARKER).exists() and checkpoint_tags(path)):
        found = _latest(path)
        if found is None:
            raise FileNotFoundError(f"--train.resume {where}: no complete checkpoint in {path}; nothing to "
                                    f"resume from")
        return found
    return path


# The plain-data classes DeepSpeed pickles into its own checkpoint files (loss scalers, ZeRO's stage enum,
# fragment addresses). Anything else in a checkpoint file is refused before DeepSpeed unpickles it.
DEEPSPEED_CLASSES = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
}


def vet(path: Path):
    """Refuse a checkpoint whose .pt files name anything beyond tensors, plain values and DEEPSPEED_CLASSES:
    DeepSpeed loads its files with pickle, which would run code a crafted file names. The scan reads the
    pickles' opcodes without running them. RMFAST_TRUST_CLASSES (comma-separated names, read here) adds to
    the list, for a DeepSpeed version that saves another class."""
    from .errors import CheckpointError

    extra = os.environ.get("RMFAST_TRUST_CLASSES", "")
    allowed = DEEPSPEED_CLASSES | {c.strip() for c in extra.split(",") if c.strip()}
    for file in sorted(path.glob("*.pt")):
        try:
            names = set(torch.serialization.get_unsafe_globals_in_checkpoint(file))
        except Exception as exc:  # noqa: BLE001 — whatever breaks the scan, the file is not loaded
            raise CheckpointError(f"{file} cannot be read ({type(exc).__name__}: {exc})") from None
        if names - allowed:
            raise CheckpointError(f"{file} names {', '.join(sorted(names - allowed))}, which is not plain data; "
                                  f"not loading it (unpickling it could run code). If DeepSpeed itself saved it, "
                                  f"allow the class with RMFAST_TRUST_CLASSES=<name>")


def read_state(path: Path):
    """The trainer state saved in a complete checkpoint folder."""
    if not (path / MARKER).exists():
        raise FileNotFoundError(f"{path} is not a complete rmfast checkpoint (no {MARKER} marker)")
    return json.loads((path / "rmfast_state.json").read_text())


def load_checkpoint(engine, path: Path, rank):
    """Load weights, optimizer and scheduler into a DeepSpeed engine, and this rank's RNG state."""
    from .errors import CheckpointError

    vet(path)
    try:
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
        if load_path is None:
            raise RuntimeError("DeepSpeed found nothing to load")
        _set_rng_state(torch.load(path / f"rng_rank{rank}.pt", weights_only=True))
    except (OSError, RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as exc:
        others = [t for t in checkpoint_tags(path.parent) if t != path.name]
        hint = f"; resume from another: --train.resume {path.parent / others[-1]}" if others else ""
        raise CheckpointError(f"{path} cannot be loaded ({type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}){hint}") from exc
