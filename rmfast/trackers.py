"""Experiment trackers: TensorBoard, Weights & Biases, MLflow and Trackio behind one small interface
(Tracker: log(step, scalars), close()), each used only where its library is installed and only on rank 0.
MetricsLog (metrics.py) hands every record to them under Hugging Face Trainer's names (train/loss,
eval/accuracy); metrics.jsonl keeps rmfast's own keys.

Adding a tracker is one Tracker subclass and a line in TRACKERS. The environment variables read here are the
trackers' own (docs/training.md, Metrics): WANDB_PROJECT, WANDB_DIR, MLFLOW_TRACKING_URI, TRACKIO_PROJECT."""

import importlib.util
import json
import os
from pathlib import Path

from .errors import UserError
from .runfolder import RunFolder

CHOICES = ("tensorboard", "wandb", "mlflow", "trackio", "none")
DEFAULT = ["tensorboard"]

# metrics.jsonl key → the name trackers get: an eval_x key is eval/x, any other is train/x (as transformers'
# Trainer rewrites its logs), these three spelled as the Trainer spells them
RENAMED = {"lr": "learning_rate", "pairs_per_s": "pairs_per_second", "tokens_per_s": "tokens_per_second"}


def tracker_name(key):
    """'loss' → 'train/loss', 'lr' → 'train/learning_rate', 'eval_accuracy' → 'eval/accuracy'."""
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    return "train/" + RENAMED.get(key, key)


def scalars(record):
    """The numbers of a metrics record (a dict with a "step") under tracker names; text and the step left out."""
    return {tracker_name(k): v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """One experiment tracker, opened on rank 0 for a run folder with the run's config (a nested dict):
    log(step, {name: number}) for each record, close() once at the end."""

    def log(self, step, values):
        raise NotImplementedError

    def close(self):
        pass


class TensorBoard(Tracker):
    """OUTPUT_DIR/tensorboard; the config as a text entry (TensorBoard's hparams need a metric to pair with)."""

    package = "tensorboard"

    def __init__(self, out, config):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(RunFolder(out).tensorboard), flush_secs=30)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def log(self, step, values):
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self):
        self.writer.close()  # flushes the event file


class Wandb(Tracker):
    """A W&B run named after the run folder, its files in OUTPUT_DIR/wandb (WANDB_DIR elsewhere); offline with
    WANDB_MODE=offline (wandb reads it)."""

    package = "wandb"

    def __init__(self, out, config):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rmfast"), name=Path(out).name,
                              dir=os.environ.get("WANDB_DIR", str(out)), config=config)

    def log(self, step, values):
        self.run.log(values, step=step)

    def close(self):
        self.run.finish()


class Mlflow(Tracker):
    """An MLflow run named after the run folder, in MLFLOW_TRACKING_URI or else a local store,
    OUTPUT_DIR/mlflow.db (SQLite: MLflow 3 refuses new file stores); the config as params ("train.lr")."""

    package = "mlflow"

    def __init__(self, out, config):
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(local_mlflow_uri(out))
        mlflow.start_run(run_name=Path(out).name)
        params = list(flatten(config).items())
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per call
            mlflow.log_params(dict(params[i:i + 100]))

    def log(self, step, values):
        self.mlflow.log_metrics(values, step=step)

    def close(self):
        self.mlflow.end_run()


class Trackio(Tracker):
    """A Trackio run named after the run folder in project TRACKIO_PROJECT (rmfast); Trackio is local first:
    its SQLite database is in TRACKIO_DIR (~/.cache/huggingface/trackio), where `trackio show` finds it."""

    package = "trackio"

    def __init__(self, out, config):
        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "rmfast"), name=Path(out).name,
                     config=flatten(config))

    def log(self, step, values):
        self.trackio.log(values, step=step)

    def close(self):
        self.trackio.finish()


TRACKERS = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": Mlflow, "trackio": Trackio}


def local_mlflow_uri(out):
    return f"sqlite:///{RunFolder(out).mlflow_db.resolve()}"


def flatten(config):
    """{"train": {"lr": 1e-5}} → {"train.lr": 1e-5}: a config's sections, one level."""
    return {f"{section}.{name}": value for section, fields in config.items() for name, value in fields.items()}


def installed(name):
    return importlib.util.find_spec(TRACKERS[name].package) is not None


def selected(report_to, tensorboard=None):
    """The trackers a run uses: report_to without "none", with tensorboard added by train.tensorboard true and
    removed by false (None: as report_to says)."""
    names = [n for n in report_to if n != "none"]
    if tensorboard is False:
        names = [n for n in names if n != "tensorboard"]
    elif tensorboard and "tensorboard" not in names:
        names.insert(0, "tensorboard")
    return list(dict.fromkeys(names))


def check(report_to, tensorboard=None):
    """Refuse, in one line, a tracker asked for by name whose library is not installed (the default
    tensorboard is only noted when the run opens its trackers, as before there was a choice)."""
    if "none" in report_to and len(set(report_to)) > 1:
        raise UserError(f"train.report_to: none means no tracker; give it alone, got {report_to}")
    default = list(report_to) == DEFAULT
    missing = [n for n in selected(report_to, tensorboard)
               if not installed(n) and not (n == "tensorboard" and default)]
    if missing:
        raise UserError(f"train.report_to: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                        f"installed: pip install {' '.join(TRACKERS[n].package for n in missing)}")
    if "mlflow" in report_to and not os.environ.get("MLFLOW_TRACKING_URI") and not all(
            importlib.util.find_spec(m) for m in ("sqlalchemy", "alembic")):
        raise UserError("train.report_to: mlflow's local store (OUTPUT_DIR/mlflow.db) needs sqlalchemy and alembic, "
                        "which mlflow-skinny leaves out: pip install sqlalchemy alembic (or set MLFLOW_TRACKING_URI "
                        "to a tracking server)")


def open_trackers(config, out, rank, log):
    """The run's trackers (rank 0; other ranks get none). The default tensorboard, when absent, is noted in a
    line and skipped; any other tracker was checked when the config was built (check)."""
    if rank != 0:
        return []
    t = config.train
    trackers = []
    for name in selected(t.report_to, t.tensorboard):
        if not installed(name):
            log(f"{name} is not installed: metrics go to metrics.jsonl only (pip install {TRACKERS[name].package}, "
                f"or pass --train.report_to none to silence this)")
            continue
        trackers.append(TRACKERS[name](out, config.to_dict()))
    return trackers
