"""The run folder's layout, spelled once: what rmfast-train writes into train.output_dir, found by every
tool that reads a run (rmfast-export, the resume, the trackers) through one object."""

from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.json"          # the resolved config
METRICS = "metrics.jsonl"       # a record per logged step and per evaluation
CHECKPOINTS = "checkpoints"     # step-N/ folders and `latest`
EXPORT = "export"               # the Hugging Face model written at the end of a run
TOKENIZER = "tokenizer"         # the run's tokenizer (with its pad token and chat template), for rmfast-export
BACKBONE = "backbone"           # the backbone's config, for rmfast-export
TENSORBOARD = "tensorboard"     # trackers' local files
WANDB = "wandb"
MLFLOW_DB = "mlflow.db"
# everything rmfast-train writes into a run folder, and all that --train.overwrite deletes
OWNED = (CONFIG, METRICS, CHECKPOINTS, EXPORT, TENSORBOARD, WANDB, MLFLOW_DB, TOKENIZER, BACKBONE)


@dataclass(frozen=True)
class RunFolder:
    """train.output_dir and the paths in it."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / CONFIG)
    metrics = property(lambda self: self.root / METRICS)
    checkpoints = property(lambda self: self.root / CHECKPOINTS)
    export = property(lambda self: self.root / EXPORT)
    tokenizer = property(lambda self: self.root / TOKENIZER)
    backbone = property(lambda self: self.root / BACKBONE)
    tensorboard = property(lambda self: self.root / TENSORBOARD)
    wandb = property(lambda self: self.root / WANDB)
    mlflow_db = property(lambda self: self.root / MLFLOW_DB)
