"""benchmarks/bench_groups.py kept working: HH texts into groups, the comparisons expanded into pairs for
the pair contenders, and a tiny run of every contender writing its CSV, Markdown and PNG."""

import csv
import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-sample.jsonl.gz"
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"the HH-RLHF sample is not at {DATA}")


@needs_data
def test_hh_groups_and_their_expanded_pairs():
    from bench_groups import expand, hh_groups, split

    from rmfast.data.group_tokens import tokenize_groups
    from rmfast.data.groups import parse_group_row
    from rmfast.data.tokenize import LengthPolicy
    from rmfast.data.tokenizers import train_bpe_tokenizer

    rows = [json.loads(line) for line in gzip.open(DATA, "rt")][:40]
    groups = hh_groups(rows, 4, seed=0)
    assert len(groups) == 40
    for g, row in zip(groups, rows):
        assert g["prompt"] == split(row["chosen"])[0] and len(set(g["responses"])) == 4
        assert sorted(g["scores"]) == [0, 1, 2, 3]
        assert split(row["chosen"])[1] in g["responses"] and split(row["rejected"])[1] in g["responses"]
    tok = train_bpe_tokenizer([r["chosen"] for r in rows], vocab_size=400)
    tokenized, counts = tokenize_groups([parse_group_row(f"hh:{i}", g) for i, g in enumerate(groups)], tok,
                                        LengthPolicy(512))
    pairs = expand(tokenized, [0, 3])
    assert len(pairs) == 12  # 6 comparisons per group of 4
    first = tokenized.comparisons(0)[0][0]
    np.testing.assert_array_equal(pairs.sequence(0, 0), tokenized.sequence(0, first[0]))
    np.testing.assert_array_equal(pairs.sequence(0, 1), tokenized.sequence(0, first[1]))
    assert all(len(pairs.prompt[i]) >= len(tokenized.prompt[0]) for i in range(6))  # the prompt at least is shared


@needs_data
@pytest.mark.slow
def test_a_tiny_run_writes_every_contender(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_groups.py"), "--steps", "1", "--groups", "2",
                          "--hidden", "64", "--layers", "1", "--vocab", "400", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "bench_groups_cpu.csv")))
    assert [r["contender"] for r in rows] == ["dschat", "trl", "rmfast-prefix", "rmfast-groups"]
    by = {r["contender"]: r for r in rows}
    assert float(by["rmfast-groups"]["positions_over_unique"]) == 1.0  # the prompt once, each response once
    assert float(by["dschat"]["positions_per_comparison"]) == 1024.0  # both sequences padded to 512
    # the same first loss: the same model, the same comparisons, the same Bradley–Terry loss
    assert by["trl"]["first_loss"] == by["rmfast-prefix"]["first_loss"] == by["rmfast-groups"]["first_loss"]
    assert (tmp_path / "bench_groups_cpu.png").stat().st_size > 0
    assert "| rmfast-groups |" in (tmp_path / "bench_groups_cpu.md").read_text()
