"""Experiment trackers (--train.report_to): Hugging Face names, rank 0 only, the config as hyperparameters,
a clear refusal for a tracker that is not installed, train.tensorboard as before; stub modules for the
interface, and TensorBoard, W&B (offline), MLflow (local store) and Trackio (local) for real where installed."""

import importlib.machinery
import json
import os
import sqlite3
import subprocess
import sys
import time
import types

import pytest

from rmfast import config as config_module
from rmfast import rundir
from rmfast.errors import UserError
from rmfast.metrics import MetricsLog
from rmfast.trackers import local_mlflow_uri, open_trackers, scalars, selected, tracker_name

TRAIN = {"step": 10, "loss": 0.5, "accuracy": 0.75, "pairs": 64, "tokens": 4096, "pairs_per_s": 12.5,
         "tokens_per_s": 800.0, "positions_per_pair": 40.0, "lr": 1e-5}
EVAL = {"step": 10, "eval_pairs": 100, "eval_loss": 0.4, "eval_accuracy": 0.8, "eval_margin": 1.5}


def build(**overrides):
    return config_module.build(None, {"model.name_or_path": "m", "data.train": ["a.jsonl"], **overrides})


def stub(monkeypatch, name, **functions):
    """A module `name` in sys.modules whose functions record their calls in module.calls."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # what importlib.util.find_spec returns
    module.calls = []

    def recorder(fn_name, result):
        def fn(*args, **kwargs):
            module.calls.append((fn_name, args, kwargs))
            return result(module) if callable(result) else result
        return fn

    for fn_name, result in functions.items():
        setattr(module, fn_name, recorder(fn_name, result))
    monkeypatch.setitem(sys.modules, name, module)
    return module


class Recorder:
    def __init__(self):
        self.logged, self.closed = [], False

    def log(self, step, values):
        self.logged.append((step, values))

    def close(self):
        self.closed = True


@pytest.mark.parametrize("key,name", [
    ("loss", "train/loss"), ("accuracy", "train/accuracy"), ("lr", "train/learning_rate"),
    ("pairs_per_s", "train/pairs_per_second"), ("tokens_per_s", "train/tokens_per_second"),
    ("positions_per_pair", "train/positions_per_pair"), ("pairs", "train/pairs"), ("eval_loss", "eval/loss"),
    ("eval_accuracy", "eval/accuracy"), ("eval_top1_accuracy", "eval/top1_accuracy"),
    ("eval_kendall_tau", "eval/kendall_tau"),
])
def test_trackers_get_transformers_names(key, name):
    assert tracker_name(key) == name


def test_only_numbers_reach_trackers_and_the_step_is_not_one():
    assert scalars({"step": 3, "eval": "no eval set"}) == {}
    assert scalars({"step": 3, "loss": 0.5, "complete": True}) == {"train/loss": 0.5}


def test_metrics_jsonl_keeps_its_keys_while_trackers_get_hf_names(tmp_path):
    tracker = Recorder()
    metrics = MetricsLog(tmp_path / "metrics.jsonl", 0, log=lambda _: None, trackers=[tracker])
    for record in (TRAIN, EVAL, {"step": 0, "eval": "no eval set"}):
        metrics.write(record)
    metrics.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [TRAIN, EVAL, {"step": 0, "eval": "no eval set"}]
    assert [step for step, _ in tracker.logged] == [10, 10]  # the record without numbers is not sent
    assert tracker.logged[0][1]["train/learning_rate"] == 1e-5 and tracker.logged[0][1]["train/loss"] == 0.5
    assert set(tracker.logged[1][1]) == {"eval/pairs", "eval/loss", "eval/accuracy", "eval/margin"}
    assert tracker.closed


def test_other_ranks_open_no_tracker_and_send_nothing(tmp_path, monkeypatch):
    wandb = stub(monkeypatch, "wandb", init=types.SimpleNamespace(log=None, finish=None))
    assert open_trackers(build(**{"train.report_to": ["wandb"]}), tmp_path, 1, print) == []
    assert wandb.calls == []
    tracker = Recorder()
    metrics = MetricsLog(tmp_path / "metrics.jsonl", 1, trackers=[tracker])
    metrics.write(TRAIN)
    metrics.close()
    assert tracker.logged == [] and not tracker.closed and not (tmp_path / "metrics.jsonl").exists()


def test_wandb_gets_a_run_under_the_output_dir_the_config_and_each_record(tmp_path, monkeypatch):
    for var in ("WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    run = types.SimpleNamespace(logged=[], finished=False)
    run.log = lambda values, step: run.logged.append((step, values))
    run.finish = lambda: setattr(run, "finished", True)
    wandb = stub(monkeypatch, "wandb", init=run)
    config = build(**{"train.report_to": ["wandb"], "train.lr": 3e-5})
    metrics = MetricsLog(tmp_path / "metrics.jsonl", 0, trackers=open_trackers(config, tmp_path, 0, print))
    metrics.write(TRAIN)
    metrics.write(EVAL)
    metrics.close()
    (_, args, kwargs), = wandb.calls
    assert kwargs["project"] == "rmfast" and kwargs["name"] == tmp_path.name and kwargs["dir"] == str(tmp_path)
    assert kwargs["config"]["train"]["lr"] == 3e-5
    assert [(step, sorted(values)[:2]) for step, values in run.logged] == [
        (10, ["train/accuracy", "train/learning_rate"]), (10, ["eval/accuracy", "eval/loss"])]
    assert run.finished


@pytest.mark.parametrize("uri", [None, "http://tracking.example:5000"])
def test_mlflow_logs_params_and_metrics_in_a_local_store_unless_a_uri_is_set(tmp_path, monkeypatch, uri):
    if uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("sqlalchemy", "alembic"):  # what the local store needs, present or not here
        stub(monkeypatch, name)
    mlflow = stub(monkeypatch, "mlflow", set_tracking_uri=None, start_run=None, log_params=None, log_metrics=None,
                  end_run=None)
    trackers = open_trackers(build(**{"train.report_to": ["mlflow"], "train.lr": 3e-5}), tmp_path, 0, print)
    metrics = MetricsLog(tmp_path / "metrics.jsonl", 0, trackers=trackers)
    metrics.write(TRAIN)
    metrics.close()
    calls = {name: (args, kwargs) for name, args, kwargs in mlflow.calls}
    assert ("set_tracking_uri" in calls) == (uri is None)
    if uri is None:
        assert calls["set_tracking_uri"][0] == (f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}",)
    assert calls["start_run"][1] == {"run_name": tmp_path.name}
    params = {k: v for name, args, _ in mlflow.calls if name == "log_params" for k, v in args[0].items()}
    assert params["train.lr"] == 3e-5 and params["train.report_to"] == ["mlflow"]
    assert calls["log_metrics"][0][0]["train/loss"] == 0.5 and calls["log_metrics"][1] == {"step": 10}
    assert [name for name, _, _ in mlflow.calls][-1] == "end_run"


def test_trackio_gets_a_run_with_the_config_and_each_record(tmp_path, monkeypatch):
    monkeypatch.delenv("TRACKIO_PROJECT", raising=False)
    trackio = stub(monkeypatch, "trackio", init=None, log=None, finish=None)
    metrics = MetricsLog(tmp_path / "metrics.jsonl", 0,
                         trackers=open_trackers(build(**{"train.report_to": ["trackio"]}), tmp_path, 0, print))
    metrics.write(EVAL)
    metrics.close()
    (init, init_args, init_kw), (log, log_args, log_kw), (finish, _, _) = trackio.calls
    assert (init, log, finish) == ("init", "log", "finish")
    assert init_kw["project"] == "rmfast" and init_kw["name"] == tmp_path.name
    assert init_kw["config"]["train.report_to"] == ["trackio"]
    assert log_args[0]["eval/accuracy"] == 0.8 and log_kw == {"step": 10}


@pytest.mark.parametrize("report_to", [["wandb"], ["mlflow"], ["trackio"], ["tensorboard", "wandb"]])
def test_a_tracker_asked_for_that_is_not_installed_is_refused_in_one_line(monkeypatch, report_to):
    for name in report_to:
        monkeypatch.setitem(sys.modules, name, None)  # import fails: not installed
    with pytest.raises(UserError) as caught:
        build(**{"train.report_to": report_to})
    missing = " and ".join(report_to)
    assert str(caught.value) == (f"train.report_to: {missing} {'is' if len(report_to) == 1 else 'are'} not "
                                 f"installed: pip install {' '.join(report_to)}")


def test_rmfast_train_refuses_it_before_loading_anything(monkeypatch, capsys, tmp_path):
    from rmfast import cli

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--model.name_or_path", str(tmp_path / "nowhere"), "--data.train", "a.jsonl",
                  "--report_to", "wandb", "--verbose"])
    assert exit_.value.code == 2
    assert "train.report_to: wandb is not installed: pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()


def test_mlflow_local_store_without_sqlalchemy_is_refused(monkeypatch):
    stub(monkeypatch, "mlflow")
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(UserError, match="mlflow's local store .* needs sqlalchemy and alembic"):
        build(**{"train.report_to": ["mlflow"]})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    build(**{"train.report_to": ["mlflow"]})


def test_the_default_tensorboard_when_absent_is_a_notice(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    notes = []
    for overrides in ({}, {"train.tensorboard": True}):  # as configs written before report_to say it
        assert open_trackers(build(**overrides), tmp_path, 0, notes.append) == []
    assert notes == ["tensorboard is not installed: metrics go to metrics.jsonl only (pip install tensorboard, "
                     "or pass --train.report_to none to silence this)"] * 2


@pytest.mark.parametrize("report_to,tensorboard,used", [
    (["tensorboard"], None, ["tensorboard"]),
    (["tensorboard"], False, []),
    (["wandb"], True, ["tensorboard", "wandb"]),
    (["tensorboard", "wandb"], False, ["wandb"]),
    (["none"], None, []),
    (["none"], True, ["tensorboard"]),
    ([], None, []),
])
def test_train_tensorboard_adds_or_removes_tensorboard(report_to, tensorboard, used):
    assert selected(report_to, tensorboard) == used


@pytest.mark.parametrize("text", ["report_to: [none]\n", "report_to: none\n", "train:\n  report_to: [none]\n",
                                  "train:\n  report_to: none\n"])
def test_report_to_in_yaml_as_transformers_writes_it(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name_or_path: m\ndata:\n  train: [a.jsonl]\n" + text)
    assert config_module.build(str(path)).train.report_to == ["none"]


def test_flags_take_report_to_under_both_names():
    import argparse

    parser = argparse.ArgumentParser()
    config_module.add_arguments(parser)
    for flag in ("--report_to", "--train.report_to"):
        args = parser.parse_args(["--model.name_or_path", "m", "--data.train", "a.jsonl", flag, "none"])
        assert config_module.build(None, config_module.overrides_from(args)).train.report_to == ["none"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--train.report_to", "comet"])
    with pytest.raises(UserError, match="none means no tracker"):
        build(**{"train.report_to": ["none", "tensorboard"]})


def test_report_to_is_not_part_of_the_resume_identity():
    backbone = types.SimpleNamespace(to_dict=lambda: {"model_type": "llama"})
    ids = [rundir.identity(build(**overrides), backbone, "tokenizer", [], 1)
           for overrides in ({}, {"train.report_to": ["none"]}, {"train.tensorboard": False})]
    assert ids[0] == ids[1] == ids[2]


def test_tensorboard_gets_hf_names(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = MetricsLog(tmp_path / "metrics.jsonl", 0, trackers=open_trackers(build(), tmp_path, 0, print))
    metrics.write(TRAIN)
    metrics.write({**TRAIN, "step": 20, "loss": 0.25})
    metrics.write({**EVAL, "step": 20})
    metrics.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(10, 0.5), (20, 0.25)]
    assert events.Scalars("train/learning_rate")[0].value == pytest.approx(1e-5)
    assert [(e.step, e.value) for e in events.Scalars("eval/accuracy")] == [(20, pytest.approx(0.8))]
    assert "loss" not in events.Tags()["scalars"]


def test_wandb_offline_writes_its_run_under_the_output_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    trackers = open_trackers(build(**{"train.report_to": ["wandb"]}), tmp_path, 0, print)
    metrics = MetricsLog(tmp_path / "metrics.jsonl", 0, trackers=trackers)
    metrics.write(TRAIN)
    metrics.write(EVAL)
    metrics.close()
    run_file, = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    names = (b"train/loss", b"train/learning_rate", b"eval/accuracy", b'"report_to":["wandb"]')
    deadline = time.monotonic() + 30
    while not all(n in run_file.read_bytes() for n in names) and time.monotonic() < deadline:
        time.sleep(0.2)  # wandb's service writes the file after finish() returns
    data = run_file.read_bytes()  # protobuf records: names and the config's JSON appear as they are
    assert all(n in data for n in names)


def test_mlflow_local_store_holds_the_metrics_and_params(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    trackers = open_trackers(build(**{"train.report_to": ["mlflow"], "train.lr": 3e-5}), tmp_path, 0, print)
    run_id = mlflow.active_run().info.run_id
    metrics = MetricsLog(tmp_path / "metrics.jsonl", 0, trackers=trackers)
    metrics.write(TRAIN)
    metrics.write({**TRAIN, "step": 20, "loss": 0.25})
    metrics.close()
    client = mlflow.MlflowClient(local_mlflow_uri(tmp_path))
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(10, 0.5), (20, 0.25)]
    run = client.get_run(run_id)
    assert run.data.params["train.lr"] == "3e-05" and run.info.status == "FINISHED"


def test_trackio_logs_locally(tmp_path):
    pytest.importorskip("trackio")
    # Trackio reads TRACKIO_DIR when it is imported: its own process
    script = """if True:
        import sys
        from pathlib import Path
        from rmfast import config
        from rmfast.metrics import MetricsLog
        from rmfast.trackers import open_trackers
        c = config.build(None, {"model.name_or_path": "m", "data.train": ["a.jsonl"], "train.report_to": ["trackio"]})
        out = Path(sys.argv[1])
        metrics = MetricsLog(out / "metrics.jsonl", 0, trackers=open_trackers(c, out, 0, print))
        metrics.write({"step": 10, "loss": 0.5, "lr": 1e-5})
        metrics.close()
    """
    out = tmp_path / "run-a"
    out.mkdir()
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "TRACKIO_PROJECT": "rmfast-test"}
    subprocess.run([sys.executable, "-c", script, str(out)], env=env, check=True, capture_output=True, timeout=120)
    db = sqlite3.connect(tmp_path / "trackio" / "rmfast-test.db")
    (run_name, step, logged), = db.execute("select run_name, step, metrics from metrics").fetchall()
    assert run_name == "run-a" and step == 10 and json.loads(logged) == {"train/loss": 0.5,
                                                                         "train/learning_rate": 1e-5}
