"""What the package declares is what it needs: every third-party module rmfast imports is a declared
dependency (or an extra's), and the dev extra is the list `make setup` installs."""

import ast
import re
import sys
import tomllib

import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# import name → distribution name, where they differ
DIST = {"yaml": "pyyaml", "flash_attn": "flash-attn", "prometheus_client": "prometheus_client"}
# imported only where present (optional kernels), or shipped with another dependency
OPTIONAL = {"flash_attn", "triton", "starlette", "pydantic"}


def names(requirements):
    return {re.split(r"[<>=!\[ ;]", r.strip(), maxsplit=1)[0].lower().replace("_", "-") for r in requirements
            if r.strip() and not r.strip().startswith("#")}


def test_every_third_party_import_is_declared():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = names(meta["dependencies"]) | {n for extra in meta["optional-dependencies"].values()
                                              for n in names(extra)}
    imported = set()
    for path in (ROOT / "rmfast").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "rmfast"} - OPTIONAL
    missing = {m for m in third_party if DIST.get(m, m).lower().replace("_", "-") not in declared}
    assert not missing, f"imported but not declared: {sorted(missing)}"


def test_the_dev_extra_is_what_make_setup_installs():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dev = names(meta["optional-dependencies"]["dev"])
    listed = names((ROOT / "requirements-dev.txt").read_text().splitlines()) - {"numpy"}
    assert dev == listed
    assert any(r.startswith("ruff==") for r in meta["optional-dependencies"]["dev"])  # one linter version


WITHOUT_TRAIN = """
import sys
sys.modules["deepspeed"] = None  # as if the `train` extra were not installed
sys.modules["peft"] = None
sys.path.insert(0, sys.argv[1])
import pathlib
import torch
from helpers import build
from rmfast import pairwise_reward_loss
from rmfast.cli import main as train_main
from rmfast.data import generate_pairs
from rmfast.data.synthetic import write_jsonl
from rmfast.data.tokenizers import train_bpe_tokenizer
from rmfast.export import write_export
from rmfast.score import main as score_main
import rmfast.serve.app  # noqa: F401

root = pathlib.Path(sys.argv[2])
h = torch.randn(6, 4, requires_grad=True)
pairwise_reward_loss(h, torch.randn(4), torch.tensor([0, 1]), torch.tensor([2, 3])).loss.backward()
rows = generate_pairs(6, seed=4, style="explicit")
tok = train_bpe_tokenizer([r["prompt"] + r["chosen"] for r in rows], vocab_size=96)
model = build(None, "llama", vocab=len(tok))
path = write_export(model.backbone.config, model.state_dict(), tok, root / "export")
write_jsonl(rows, root / "pairs.jsonl")
assert score_main([str(path), str(root / "pairs.jsonl"), "--out", str(root / "s.jsonl")]) == 0
print("scored", len((root / "s.jsonl").read_text().splitlines()))
print("train", train_main(["--model.name_or_path", str(path), "--data.train", str(root / "pairs.jsonl"),
                           "--train.output_dir", str(root / "run")]))
"""


@pytest.mark.slow  # a process of its own
def test_the_loss_scorer_and_server_work_without_deepspeed_and_peft(tmp_path):
    """DeepSpeed and PEFT are the `train` extra: without them the fused loss, rmfast-score and rmfast-serve
    work, and rmfast-train says in one line what to install (exit 2)."""
    import subprocess

    res = subprocess.run([sys.executable, "-c", WITHOUT_TRAIN, str(ROOT / "tests"), str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split()[-4:] == ["scored", "6", "train", "2"], res.stdout
    assert ("rmfast-train: rmfast-train trains on DeepSpeed, which is not installed: pip install 'rmfast[train]' "
            "(or pip install deepspeed)") in res.stderr
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not names(meta["dependencies"]) & {"deepspeed", "peft"}
    assert names(meta["optional-dependencies"]["train"]) == {"deepspeed", "peft"}
