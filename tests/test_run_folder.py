"""Nothing of a user's is lost: --train.overwrite clears only an rmfast run's own files, no command writes over
its inputs, an export never lands where a save or resume would delete it, and paths mean what a shell means."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from rmfast import checkpoint, config as config_module, errors, rundir
from rmfast.export import check_target
from rmfast.score import main as score_main


def model_folder(path: Path):
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "tokenizer.json").write_text("{}")
    return path


def tree(path: Path):
    """Every file and folder below path, with file contents: what must not change."""
    return {str(p.relative_to(path)): (p.read_text() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def claim(out, overwrite=True, resume=None, inputs=()):
    rundir.claim(out, resume, overwrite, list(inputs)).close()


def a_run(out: Path):
    """A folder as rmfast-train leaves it."""
    claim(out, overwrite=False)
    (out / "config.json").write_text(json.dumps({"model": {}, "data": {}, "train": {"output_dir": str(out)}}))
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    for name in ("checkpoints/step-1", "export", "tokenizer", "backbone"):
        (out / name).mkdir(parents=True)
    return out


# ---------------------------------------------------------------- overwrite


@pytest.mark.parametrize("where", ["a user's folder", "the home folder"])
def test_overwrite_never_clears_a_folder_that_is_not_a_run(tmp_path, where, monkeypatch):
    folder = tmp_path / "home" if where == "the home folder" else tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text('{"mine": true}')
    (folder / "export").mkdir()
    (folder / "export" / "report.pdf").write_text("keep")
    before = tree(folder)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    out = "~" if where == "the home folder" else str(folder)
    cfg = config_module.build(overrides={"train.output_dir": out})
    with pytest.raises(rundir.RunDirError) as caught:
        claim(Path(cfg.train.output_dir))
    message = str(caught.value)
    assert "not an rmfast run folder" in message and "config.json, export/" in message
    assert "--train.overwrite" not in message  # the refusal never recommends the destructive fix
    assert tree(folder) == before and not (folder / rundir.LOCK).exists()


def test_overwrite_clears_only_what_rmfast_wrote(tmp_path):
    out = a_run(tmp_path / "run")
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    claim(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([rundir.MARKER, rundir.LOCK, "notes.txt", "data"])
    assert (out / "notes.txt").read_text() == "mine"


def test_a_run_from_before_the_marker_is_still_a_run(tmp_path):
    out = a_run(tmp_path / "run")
    (out / rundir.MARKER).unlink()
    claim(out)
    assert not (out / "checkpoints").exists() and (out / rundir.MARKER).exists()


def test_the_model_folder_is_refused_as_a_run_folder(tmp_path):
    model = model_folder(tmp_path / "model")
    before = tree(model)
    for overwrite in (False, True):
        with pytest.raises(rundir.RunDirError, match="is the model folder"):
            claim(model, overwrite, inputs=[("the model folder", model)])
    assert tree(model) == before


@pytest.mark.parametrize("holds", ["the model folder", "data.train source"])
def test_overwrite_refuses_a_run_folder_that_holds_an_input(tmp_path, holds):
    out = a_run(tmp_path / "run")
    inside = model_folder(out / "export" / "base") if holds == "the model folder" else out / "checkpoints" / "d.jsonl"
    if holds != "the model folder":
        inside.write_text("{}\n")
    before = tree(out)
    with pytest.raises(rundir.RunDirError, match=f"holds {holds}"):
        claim(out, inputs=[(holds, inside)])
    assert tree(out) == before


def test_a_run_folder_in_a_data_folder_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text("{}\n")
    for out in (data, data / "run"):
        with pytest.raises(rundir.RunDirError, match="data.train source"):
            claim(out, overwrite=False, inputs=[("data.train source", data)])
    assert sorted(p.name for p in data.iterdir()) == ["a.jsonl"]


def test_a_link_in_the_run_is_refused_before_anything_is_deleted(tmp_path):
    out = a_run(tmp_path / "run")
    elsewhere = tmp_path / "big-disk"
    (elsewhere / "step-9").mkdir(parents=True)
    import shutil

    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints").symlink_to(elsewhere)
    before, there = tree(out), tree(elsewhere)
    with pytest.raises(rundir.RunDirError, match="is a link to"):
        claim(out)
    assert tree(out) == before and tree(elsewhere) == there


def test_paths_expand_home_and_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SCRATCH", "/scratch/me")
    cfg = config_module.build(overrides={"train.output_dir": "~/x", "data.train": ["$SCRATCH/a.jsonl@0.5", "org/name"],
                                         "model.name_or_path": "${SCRATCH}/model"})
    assert cfg.train.output_dir == str(tmp_path / "x")
    assert cfg.data.train == ["/scratch/me/a.jsonl@0.5", "org/name"]
    assert cfg.model.name_or_path == "/scratch/me/model"


# ---------------------------------------------------------------- outputs never land on inputs


@pytest.mark.parametrize("alias", ["same", "hard link", "symlink"])
def test_score_never_writes_over_its_input(tmp_path, alias, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    out = {"same": data, "hard link": tmp_path / "hard.jsonl", "symlink": tmp_path / "sym.jsonl"}[alias]
    if alias == "hard link":
        os.link(data, out)
    elif alias == "symlink":
        out.symlink_to(data)
    status = score_main([str(tmp_path / "no-model"), str(data), "--out", str(out)])
    assert status == errors.USAGE and "the same file" in capsys.readouterr().err
    assert data.read_text() == '{"prompt": "a", "chosen": "b", "rejected": "c"}\n'


def test_score_output_inside_a_data_folder_is_refused(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text("{}\n")
    status = score_main([str(tmp_path / "m"), str(tmp_path / "data"), "--out", str(tmp_path / "data" / "s.jsonl")])
    assert status == errors.USAGE and "inside the source" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["a.jsonl"]


def test_an_export_into_a_runs_checkpoints_is_refused(tmp_path):
    out = a_run(tmp_path / "run")
    (out / "checkpoints" / "latest").write_text("step-1")
    for target in (out / "checkpoints" / "step-7", out / "checkpoints" / "step-1" / "hf"):
        with pytest.raises(errors.UserError, match="a run's checkpoint folder"):
            check_target(target)
    check_target(out / "export")  # an earlier export is replaced as before


# ---------------------------------------------------------------- a save deletes only its own


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    if dist.is_initialized():
        yield
        return
    store = tmp_path_factory.mktemp("store") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class _Engine:
    """What save_checkpoint asks of a DeepSpeed engine."""

    def save_checkpoint(self, root, tag, save_latest):
        torch.save({"w": torch.zeros(2)}, Path(root) / tag / "mp_rank_00_model_states.pt")


def test_a_save_deletes_only_a_folder_rmfast_wrote(tmp_path, process_group):
    root = tmp_path / "checkpoints"
    interrupted = root / "step-2"
    interrupted.mkdir(parents=True)
    torch.save({}, interrupted / "mp_rank_00_model_states.pt")  # a save from before the marker, cut short
    checkpoint.save_checkpoint(_Engine(), root, 2, {"step": 2}, 0)
    assert checkpoint.checkpoint_tags(root) == ["step-2"] and (root / "step-2" / checkpoint.SAVING).exists()
    foreign = root / "step-3"
    foreign.mkdir()
    (foreign / "model.safetensors").write_text("an export someone put here")
    with pytest.raises(errors.CheckpointError, match="was not written by rmfast's save"):
        checkpoint.save_checkpoint(_Engine(), root, 3, {"step": 3}, 0)
    assert (foreign / "model.safetensors").read_text() == "an export someone put here"
