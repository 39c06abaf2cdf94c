"""What the package declares is what it needs: every third-party module rmfast imports is a declared
dependency (or an extra's), and the dev extra is the list `make setup` installs."""

import ast
import re
import sys
import tomllib
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
