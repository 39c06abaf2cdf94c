"""Runs, resume and safety: one run per output folder (locked, never mixed with an earlier run), no file a
user or another process can place is ever unpickled, resume checks what must not change, and every user
mistake ends in one clear message with no traceback."""

import errno
import gzip
import json
import os
import subprocess
import sys

import numpy as np
from pathlib import Path
import pytest
import torch

from helpers import clean_env, command
from rmfast import checkpoint, errors, rundir



def args_for(setup, out, **overrides):
    base = {"model.name_or_path": setup / "model", "model.dtype": "fp32", "data.train": setup / "train.jsonl",
            "data.eval": setup / "eval.jsonl", "data.cache_dir": setup / "cache", "train.output_dir": out,
            "train.pairs_per_batch": 4, "train.max_steps": 2, "train.log_every": 1, "train.export": False,
            "train.tensorboard": False}
    base.update(overrides)
    return [x for k, v in base.items() for x in (f"--{k}", str(v))]


def rmfast_train(setup, out, **overrides):
    return subprocess.run(command(1) + args_for(setup, out, **overrides), capture_output=True, text=True,
                          env=clean_env(), timeout=600)


def tool(module, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=clean_env(), timeout=600)


@pytest.fixture(scope="module")
def finished(engine_setup, tmp_path_factory):
    """A finished two-step run with its checkpoint and export."""
    out = tmp_path_factory.mktemp("safety") / "run"
    res = rmfast_train(engine_setup, out, **{"train.export": True})
    assert res.returncode == 0, res.stderr[-3000:]
    return out


class _Marker:
    """A pickle payload that creates a file when unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


# ---------------------------------------------------------------- one run per folder


@pytest.mark.slow
def test_a_new_run_into_a_folder_holding_a_run_is_refused(engine_setup, finished, tmp_path):
    before = sorted(p.name for p in (finished / "checkpoints").iterdir())
    res = rmfast_train(engine_setup, finished)
    assert res.returncode == 2 and "already holds a run" in res.stderr and "--train.resume latest" in res.stderr
    assert "Traceback" not in res.stderr
    assert sorted(p.name for p in (finished / "checkpoints").iterdir()) == before  # nothing touched


@pytest.mark.slow
def test_overwrite_starts_over_with_only_the_new_run(engine_setup, tmp_path):
    out = tmp_path / "run"
    assert rmfast_train(engine_setup, out, **{"train.max_steps": 3}).returncode == 0
    res = rmfast_train(engine_setup, out, **{"train.overwrite": True})
    assert res.returncode == 0, res.stderr[-2000:]
    assert checkpoint.checkpoint_tags(out / "checkpoints") == ["step-2"]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2 and steps.count(2) == 2  # the train record and the final eval of step 2


@pytest.mark.slow
def test_a_second_run_while_one_trains_is_refused(engine_setup, tmp_path):
    out = tmp_path / "busy"
    held = rundir.lock(out)  # what a running rmfast-train holds
    try:
        res = rmfast_train(engine_setup, out)
    finally:
        held.close()
    assert res.returncode == 2 and "is in use by a running rmfast-train" in res.stderr
    assert f"pid {os.getpid()}" in res.stderr


@pytest.mark.slow
def test_resume_cuts_metrics_back_to_the_checkpoint(engine_setup, tmp_path):
    out = tmp_path / "run"
    assert rmfast_train(engine_setup, out, **{"train.max_steps": 4, "train.save_every": 2}).returncode == 0
    # back to step 2 (as after a crash there), then continue to step 4: each step recorded once
    (out / "checkpoints" / "latest").write_text("step-2")
    res = rmfast_train(engine_setup, out, **{"train.max_steps": 4, "train.resume": "latest"})
    assert res.returncode == 0, res.stderr[-2000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


# ---------------------------------------------------------------- nothing unpickled


@pytest.mark.slow
def test_a_crafted_rng_file_is_never_unpickled(engine_setup, finished, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    tag = (out / "checkpoints" / "latest").read_text()
    marker = tmp_path / "pwned"
    torch.save({"python": _Marker(marker)}, out / "checkpoints" / tag / "rng_rank0.pt")
    res = rmfast_train(engine_setup, out, **{"train.max_steps": 3, "train.resume": "latest"})
    assert not marker.exists()
    assert res.returncode == 1 and "which is not plain data; not loading it" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_crafted_tokenization_cache_is_never_unpickled(engine_setup, tmp_path):
    from rmfast.data import DataConfig, load_data
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(engine_setup / "model")
    config = DataConfig(train=[str(engine_setup / "eval.jsonl")], cache_dir=str(tmp_path / "cache"))
    first, _, _ = load_data(config, tok, progress=False)
    first = first.subset(range(len(first)))
    first.locations = list(first.locations)  # copied: the test rewrites the files it maps in place
    marker = tmp_path / "pwned"
    crafted = 0
    for entry in (tmp_path / "cache").iterdir():  # a whole, valid-looking entry but for its pickled arrays
        for name in ("locations", "tags"):
            n = len(np.load(entry / f"{name}.npy", allow_pickle=False))
            np.save(entry / f"{name}.npy", np.array([_Marker(marker)] * n, dtype=object), allow_pickle=True)
        crafted += 1
    assert crafted == 1
    again, _, _ = load_data(config, tok, progress=False)  # the crafted file is ignored, the data tokenized again
    assert not marker.exists()

    def sequences(data):
        return [data.sequence(i, k) for i in range(len(data)) for k in (0, 1)]

    assert len(again) == len(first) > 0 and again.locations == first.locations
    assert all(np.array_equal(a, b) for a, b in zip(sequences(again), sequences(first)))


@pytest.mark.slow
def test_latest_naming_a_path_outside_the_run_is_refused(engine_setup, finished, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "checkpoints" / "latest").write_text("../../elsewhere/checkpoints/step-2")
    res = rmfast_train(engine_setup, out, **{"train.max_steps": 3, "train.resume": "latest"})
    assert res.returncode == 2 and "not a checkpoint of this folder" in res.stderr


def test_resume_finds_the_newest_complete_checkpoint_without_latest(tmp_path):
    root = tmp_path / "checkpoints"
    for tag in ("step-2", "step-4", "step-6"):
        (root / tag).mkdir(parents=True)
    (root / "step-2" / checkpoint.MARKER).write_text("")
    (root / "step-4" / checkpoint.MARKER).write_text("")  # step-6: interrupted, no marker
    assert checkpoint.resolve(root, "latest") == root / "step-4"


# ---------------------------------------------------------------- what a resume checks


@pytest.mark.slow
def test_resume_with_another_batch_size_is_refused_unless_allowed(engine_setup, finished, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    changed = {"train.max_steps": 3, "train.resume": "latest", "train.pairs_per_batch": 2}
    res = rmfast_train(engine_setup, out, **changed)
    assert res.returncode == 2
    assert "train.pairs_per_batch: 4 then, 2 now (allowed with --train.resume_allow_changes true)" in res.stderr
    res = rmfast_train(engine_setup, out, **changed, **{"train.resume_allow_changes": True})
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.slow
def test_resume_with_lora_added_is_refused_even_when_changes_are_allowed(engine_setup, finished, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    res = rmfast_train(engine_setup, out, **{"train.max_steps": 3, "train.resume": "latest", "model.lora_r": 4,
                                             "train.resume_allow_changes": True})
    assert res.returncode == 2 and "lora: null then" in res.stderr and "(never allowed)" in res.stderr


# ---------------------------------------------------------------- one clear line, no traceback


def test_disk_full_and_torch_write_failures_are_named():
    status, message = errors.describe(OSError(errno.ENOSPC, "No space left on device", "/x/ckpt.pt"))
    assert status == 1 and message.startswith("no space left on device writing /x/ckpt.pt")
    status, message = errors.describe(RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64"))
    assert status == 1 and "full disk" in message


def test_only_a_users_mistake_exits_2():
    """A user's mistake (UserError, DataError, a missing file) exits 2 with its message alone; a ValueError
    from inside torch or a library is a failure: exit 1, its type named, the way to see where."""
    from rmfast.data.loader import DataError

    assert errors.describe(errors.UserError("--data.train x: no such file")) == (2, "--data.train x: no such file")
    assert errors.describe(DataError("rows.jsonl:3: no chosen"))[0] == 2
    assert errors.describe(FileNotFoundError(2, "No such file", "x.jsonl"))[0] == 2
    status, message = errors.describe(ValueError("expected a 2-D tensor, got 3-D"))
    assert status == 1 and message == "ValueError: expected a 2-D tensor, got 3-D (RMFAST_DEBUG=1 shows where)"
    res = errors.run("rmfast-x", lambda: torch.ones(2, 3) @ torch.ones(2, 3))  # a shape bug, not the user's
    assert res == 1


def test_a_failure_on_another_rank_is_said_once_with_its_rank(capsys):
    """Rank 0 says everything; rank 5 says its own failure with its rank, and keeps quiet on a user's mistake
    (every rank meets the same one, and rank 0 says it)."""
    def fail():
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def mistake():
        raise errors.UserError("--data.train x.jsonl: no such file")

    assert errors.run("rmfast-train", fail, rank=5) == 1
    assert capsys.readouterr().err == ("rmfast-train: rank 5: RuntimeError: CUDA out of memory. Tried to allocate "
                                       "2.00 GiB (RMFAST_DEBUG=1 shows where)\n")
    assert errors.run("rmfast-train", mistake, rank=5) == 2 and capsys.readouterr().err == ""
    assert errors.run("rmfast-train", mistake, rank=0) == 2
    assert capsys.readouterr().err == "rmfast-train: --data.train x.jsonl: no such file\n"


def test_a_checkpoint_that_cannot_be_written_says_what_is_intact(monkeypatch, tmp_path):
    class Engine:
        def save_checkpoint(self, root, tag, save_latest):
            raise OSError(errno.ENOSPC, "No space left on device", f"{root}/{tag}/mp_rank_00_model_states.pt")

    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    root = tmp_path / "checkpoints"
    (root / "step-2").mkdir(parents=True)
    (root / "step-2" / checkpoint.MARKER).write_text("")
    with pytest.raises(errors.CheckpointError, match="no space left on device.*step-2, is intact"):
        checkpoint.save_checkpoint(Engine(), root, 4, {}, rank=0)


def _truncated_gz(tmp, setup):
    data = gzip.compress((setup / "train.jsonl").read_bytes())
    path = tmp / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    return path


BAD_TRAIN_INPUTS = {
    # name: (overrides or a function of (tmp, setup) giving them, exit status, words the message must hold)
    "truncated gz": (lambda tmp, s: {"data.train": _truncated_gz(tmp, s)}, 2, ["cut.jsonl.gz", "breaks off"]),
    "grad_accum 0": ({"train.grad_accum": 0}, 2, ["train.grad_accum must be ≥ 1"]),
    "log_every 0": ({"train.log_every": 0}, 2, ["train.log_every must be ≥ 1"]),
    "model path missing": (lambda tmp, s: {"model.name_or_path": tmp / "nothing"}, 2, ["no such folder"]),
    "output_dir is a file": (lambda tmp, s: {"train.output_dir": _file(tmp / "a-file")}, 2, ["cannot be used"]),
    "yaml syntax": (lambda tmp, s: {"config": _text(tmp / "c.yaml", "train:\n  lr: [1, 2\n")}, 2,
                    ["not valid YAML", "line"]),
    "yaml wrong type": (lambda tmp, s: {"config": _text(tmp / "c.yaml", "train:\n  lr: fast\n")}, 2,
                        ["train.lr must be float"]),
}


def _file(path):
    path.write_text("")
    return path


def _text(path, text):
    path.write_text(text)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_TRAIN_INPUTS))
def test_bad_training_inputs_end_in_a_message_without_traceback(engine_setup, tmp_path, case):
    overrides, status, words = BAD_TRAIN_INPUTS[case]
    overrides = overrides(tmp_path, engine_setup) if callable(overrides) else overrides
    config = overrides.pop("config", None)
    cmd = command(1) + ([str(config)] if config else []) + args_for(engine_setup, tmp_path / "out", **overrides)
    res = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=600)
    assert res.returncode == status, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and all(w in res.stderr for w in words), res.stderr[-2000:]


@pytest.mark.slow
def test_bad_inputs_to_score_and_export_end_in_a_message_without_traceback(engine_setup, finished, tmp_path):
    import shutil

    pairs = engine_setup / "eval.jsonl"
    cases = []
    (tmp_path / "empty").mkdir()
    cases.append((["rmfast.score", tmp_path / "empty", pairs, "--out", tmp_path / "s.jsonl"], ["no config.json"]))
    half = tmp_path / "half"
    shutil.copytree(finished / "export", half)
    (half / "model.safetensors").unlink()
    cases.append((["rmfast.score", half, pairs, "--out", tmp_path / "s.jsonl"], ["no weights"]))
    cases.append((["rmfast.score", engine_setup / "model", pairs, "--out", tmp_path / "s.jsonl"],
                  ["not a reward model", "bare backbone"]))
    run = tmp_path / "run"
    shutil.copytree(finished, run, ignore=shutil.ignore_patterns("export"))
    shutil.rmtree(run / "tokenizer")
    cases.append((["rmfast.export", run, "--out", tmp_path / "e"], ["tokenizer"]))
    for args, words in cases:
        res = tool(*args)
        assert res.returncode == 2, (args, res.stderr[-2000:])
        assert "Traceback" not in res.stderr and all(w in res.stderr for w in words), (args, res.stderr[-2000:])


@pytest.mark.slow
def test_a_corrupt_checkpoint_file_is_named(engine_setup, finished, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    tag = (out / "checkpoints" / "latest").read_text()
    for path in (out / "checkpoints" / tag).glob("*model_states.pt"):
        path.write_bytes(path.read_bytes()[:100])
    res = rmfast_train(engine_setup, out, **{"train.max_steps": 3, "train.resume": "latest"})
    # the scan before DeepSpeed loads it finds the file broken, and names it
    assert res.returncode == 1 and f"{tag}/mp_rank_00_model_states.pt cannot be read" in res.stderr
    assert "Traceback" not in res.stderr


# ---------------------------------------------------------------- what a person sees in a terminal


@pytest.mark.slow
def test_a_terminal_shows_the_bar_and_log_lines_apart_without_library_noise(engine_setup, tmp_path):
    import fcntl
    import pty
    import select
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    proc = subprocess.Popen(command(1) + args_for(engine_setup, tmp_path / "run", **{"train.max_steps": 6,
                                                                                      "train.eval_every": 2}),
                            stdin=follower, stdout=follower, stderr=follower, env=clean_env(), close_fds=True)
    os.close(follower)
    raw = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 600)
        try:
            chunk = os.read(leader, 65536) if ready else b""
        except OSError:  # the child closed the terminal
            chunk = b""
        if not chunk:
            break
        raw += chunk
    assert proc.wait(timeout=60) == 0, raw.decode(errors="replace")[-3000:]
    text = raw.decode(errors="replace")
    screen = [_visible(line) for line in text.replace("\r\n", "\n").split("\n")]
    evals = [line for line in screen if "eval at step" in line]
    assert len(evals) == 4 and all(line.startswith("eval at step") for line in evals), screen
    assert "training:" in text  # the bar was drawn
    for noise in ("Setting accelerator", "No CUDA runtime", "built successfully", "Loading weights",
                  "Writing model shards", "FutureWarning"):
        assert noise not in text, noise


def _visible(line):
    """What a terminal line shows once its carriage returns have overwritten it."""
    shown = ""
    for part in line.split("\r"):
        shown = part + shown[len(part):]
    return shown.rstrip()


@pytest.mark.slow
def test_a_crafted_deepspeed_file_is_never_unpickled_by_export(finished, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    tag = (run / "checkpoints" / "latest").read_text()
    marker = tmp_path / "pwned"
    torch.save({"optimizer": _Marker(marker)}, run / "checkpoints" / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    res = tool("rmfast.export", run, "--out", tmp_path / "e")
    assert not marker.exists()
    assert res.returncode == 1 and "not plain data" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_export_refuses_an_incomplete_checkpoint(finished, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    tag = (run / "checkpoints" / "latest").read_text()
    (run / "checkpoints" / tag / checkpoint.MARKER).unlink()
    res = tool("rmfast.export", run / "checkpoints" / tag, "--out", tmp_path / "e")
    assert res.returncode == 2 and "not a complete checkpoint" in res.stderr
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_ctrl_c_names_the_last_checkpoint_and_how_to_resume(engine_setup, tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    # a shell's background job (make test &, nohup … &) inherits SIGINT ignored, and Python then keeps it
    # ignored: the run is given the default disposition, as a terminal's Ctrl-C finds it
    proc = subprocess.Popen(command(1) + args_for(engine_setup, out, **{"train.max_steps": 400, "train.save_every": 2}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not checkpoint.checkpoint_tags(out / "checkpoints"):
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "rmfast-train: interrupted; the last complete checkpoint is" in err and "--train.resume latest" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_data_mistakes_say_what_the_data_has_and_which_flag_helps(engine_setup, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rmfast.data import DataConfig, DataError, load_data
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(engine_setup / "model")
    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([{"question": "q", "good": "a", "bad": "b"}]), folder / "x.parquet")
    (folder / "notes.txt").write_text("not data")
    with pytest.raises(DataError) as info:
        load_data(DataConfig(train=[str(folder)], cache_dir=str(tmp_path / "c")), tok, progress=False)
    message = str(info.value)
    assert "the row has 'bad', 'good', 'question'" in message and "--data.columns" in message
    assert "--data.on_bad_row skip" in message
    assert "skipping 1 file(s) that are not data (notes.txt)" in capsys.readouterr().err


def test_only_the_last_keep_last_checkpoints_are_kept(monkeypatch, tmp_path):
    class Engine:
        def save_checkpoint(self, root, tag, save_latest):
            (Path(root) / tag).mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        checkpoint.save_checkpoint(Engine(), root, step, {}, rank=0, keep_last=2)
    assert checkpoint.checkpoint_tags(root) == ["step-6", "step-8"]
    assert (root / "latest").read_text() == "step-8"


def test_a_resume_on_the_other_data_kind_is_refused():
    # data.kind is in what a checkpoint records; one saved before it was recorded trained on pairs
    saved = {"architecture": {"model_type": "llama"}, "tokenizer": "t", "lora": None, "world_size": 1,
             "data.eos_after_template": True, "train.objective": "bradley_terry", "data.attributes": [],
             "train.attribute_weights": []}
    rundir.check_resume(dict(saved), {**saved, "data.kind": "pairs"}, "step-4", False)
    with pytest.raises(rundir.RunDirError, match=r'data.kind: "pairs" then, "groups" now \(never allowed\)'):
        rundir.check_resume(dict(saved), {**saved, "data.kind": "groups"}, "step-4", True)
    with pytest.raises(rundir.RunDirError, match=r'data.kind: "groups" then, "pairs" now'):
        rundir.check_resume({**saved, "data.kind": "groups"}, {**saved, "data.kind": "pairs"}, "step-4", True)


def test_a_checkpoint_from_before_the_reward_token_convention_resumes_only_as_it_was_trained():
    # such a run appended EOS after chat templates; resuming it otherwise would move its reward token
    saved = {"architecture": {"model_type": "llama"}, "tokenizer": "t", "lora": None, "world_size": 1,
             "data.kind": "pairs", "train.objective": "bradley_terry", "data.attributes": [],
             "train.attribute_weights": []}
    now = {**saved, "data.eos_after_template": False}
    with pytest.raises(rundir.RunDirError, match=r"data.eos_after_template: true then, false now \(never allowed\)"):
        rundir.check_resume(dict(saved), now, "step-4", True)
    rundir.check_resume(dict(saved), {**now, "data.eos_after_template": True}, "step-4", False)


# ---------------------------------------------------------------- a frozen or dead rank


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGSTOP", "SIGKILL"])
def test_a_frozen_or_dead_rank_ends_the_run_saying_what_is_intact(engine_setup, tmp_path, signal_name):
    """Rank 1 frozen (SIGSTOP) or killed after its first checkpoint: the run ends within the collective timeout, not
    DeepSpeed's half hour, with a line naming the step and the last complete checkpoint."""
    import signal
    import time

    import psutil

    out = tmp_path / "run"
    args = command(2) + args_for(engine_setup, out, **{"train.max_steps": 10**6, "train.save_every": 5,
                                                        "train.collective_timeout": 15, "train.eval_every": 0})
    launcher = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not checkpoint.checkpoint_tags(out / "checkpoints"):
            time.sleep(0.5)
            assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        victim = next(p for p in psutil.Process(launcher.pid).children(recursive=True)
                      if p.environ().get("RANK") == "1")
        os.kill(victim.pid, getattr(signal, signal_name))
        stopped_at = time.monotonic()
        _, err = launcher.communicate(timeout=240)
        took = time.monotonic() - stopped_at
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode != 0 and took < 120, (took, err[-3000:])
    said = [line for line in err.splitlines() if line.startswith("rmfast-train: rank 0:")]
    assert said, err[-3000:]
    expected = "stopped answering" if signal_name == "SIGSTOP" else "(died|stopped by the launcher)"
    import re

    assert re.search(expected, said[0]) and re.search(r"at step \d+", said[0]), said
    assert "the last complete checkpoint is" in said[0] and "checkpoints/step-" in said[0], said
