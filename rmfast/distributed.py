"""The process group: joined from a launcher's variables (deepspeed, torchrun) or made for one process,
with one collective timeout on every group, and left after a run that succeeded."""

import contextlib
import datetime
import importlib
import io
import os
import socket

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from . import rundir


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_OWN_ENV = {}  # the launcher variables init_distributed set itself (no launcher), for close_distributed
_OWN_DEFAULTS = {}  # torch's default group timeouts init_distributed replaced, to put back


def init_distributed(timeout_s=None):
    """Join the launcher's process group (deepspeed / torchrun set RANK etc.), or make a one-process
    group when started without a launcher. timeout_s: how long a collective may wait for the other ranks
    before it fails (None: torch's default). Returns (rank, world_size, device)."""

    import deepspeed

    if "RANK" not in os.environ:  # no launcher: rendezvous with ourselves (avoids DeepSpeed's MPI probe)
        own = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
        if "MASTER_PORT" not in os.environ:
            own["MASTER_PORT"] = str(_free_port())
        for key in own:
            _OWN_ENV.setdefault(key, os.environ.get(key))  # what was there before, to put back
        os.environ.update(own)
    if not dist.is_initialized():
        if timeout_s:
            # the groups DeepSpeed makes later (data parallel: the gradients' all-reduce) take torch's default
            # timeout, 30 minutes for gloo, 10 for NCCL, not the world group's: they get this one too
            for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
                _OWN_DEFAULTS.setdefault(name, getattr(c10d, name))
                setattr(c10d, name, datetime.timedelta(seconds=timeout_s))
        # DeepSpeed's shared-memory all-reduce serves only its inference all-reduce, never training: on CPU
        # it is a C++ build of about two minutes at a machine's first run (and a lock every other rank and run
        # waits on), so it is not built (the module by name: `import deepspeed.comm.torch as m` binds the torch
        # package that module re-exports)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        # DeepSpeed's errors are raised, not printed; what it prints at start is not the user's
        with contextlib.redirect_stdout(io.StringIO()):
            kw = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", **kw)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def close_distributed():
    """Leave the process group after the last collective (every rank, on success only: a rank that failed
    may leave others inside a collective, and destroying the group then can hang). A process that exits with
    its group alive can abort at interpreter shutdown: gloo's threads call std::terminate ("terminate called
    without an active exception", SIGABRT) after a run that succeeded, and NCCL warns. The variables
    init_distributed set for a launcher-less run are put back as they were, and DeepSpeed's own references to
    the groups go too (deepspeed.comm's destroy), so a later launcher-less init in this process starts afresh.
    (Under a launcher, torch cannot rendezvous a second time in the same process: the store keeps the first
    group's addresses.)"""
    import deepspeed.comm

    if deepspeed.comm.is_initialized():
        deepspeed.comm.destroy_process_group()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, before in _OWN_ENV.items():
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
    _OWN_ENV.clear()
    for name, before in _OWN_DEFAULTS.items():
        setattr(c10d, name, before)
    _OWN_DEFAULTS.clear()


def on_rank0(rank, fn):
    """fn() on rank 0, its ValueError raised on every rank (so that no rank waits for the others forever)."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except ValueError as exc:
            error = str(exc)
    if dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise rundir.RunDirError(error)
    return result
