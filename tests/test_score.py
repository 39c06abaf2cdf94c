"""rmfast-score: pairs and single texts scored with an exported model, as plain transformers scores them."""

import json

import numpy as np
import pytest
import torch

from rmfast.data import generate_pairs
from rmfast.data.synthetic import write_jsonl
from rmfast.data.tokenizers import train_bpe_tokenizer
from rmfast.export import write_export
from rmfast.score import main as score_main
from helpers import build


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    rows = generate_pairs(30, seed=4, style="explicit")
    tok = train_bpe_tokenizer([r["prompt"] + r["chosen"] for r in rows], vocab_size=96)
    model = build(None, "llama", vocab=len(tok))
    path = write_export(model.backbone.config, model.state_dict(), tok, root / "export",
                        {"eval_reward_mean": 0.5, "eval_reward_std": 2.0})
    write_jsonl(rows, root / "pairs.jsonl")
    write_jsonl([{"text": r["prompt"] + r["chosen"]} for r in rows], root / "texts.jsonl")
    return root, path, rows


def hf_scores(path, texts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t)["input_ids"] + [tok.eos_token_id]
            out.append(model(input_ids=torch.tensor([ids])).logits.item())
    return np.array(out)


def read_jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_pairs_are_scored_as_transformers_scores_them(exported, tmp_path):
    root, path, rows = exported
    out = tmp_path / "pairs.jsonl"
    assert score_main([str(path), str(root / "pairs.jsonl"), "--out", str(out), "--token-budget", "200"]) == 0
    got = read_jsonl(out)
    assert len(got) == 30 and got[0]["location"].endswith("pairs.jsonl:1")
    chosen = hf_scores(path, [r["prompt"] + r["chosen"] for r in rows])
    rejected = hf_scores(path, [r["prompt"] + r["rejected"] for r in rows])
    np.testing.assert_allclose([g["chosen_reward"] for g in got], chosen, atol=1e-4)
    np.testing.assert_allclose([g["rejected_reward"] for g in got], rejected, atol=1e-4)
    assert [g["correct"] for g in got] == list(chosen > rejected)


@pytest.mark.parametrize("options", [["--attention", "dense"], ["--attention", "flex"], ["--dtype", "bf16"]],
                         ids=["dense", "flex", "bf16"])
def test_pairs_scored_with_another_attention_or_dtype(exported, tmp_path, options):
    root, path, rows = exported
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    assert score_main([str(path), str(root / "pairs.jsonl"), "--out", str(ref)]) == 0
    assert score_main([str(path), str(root / "pairs.jsonl"), "--out", str(out)] + options) == 0
    a, b = read_jsonl(ref), read_jsonl(out)
    tol = 5e-2 if "bf16" in options else 1e-5
    for key in ("chosen_reward", "rejected_reward"):
        got, want = np.array([x[key] for x in b]), np.array([x[key] for x in a])
        np.testing.assert_allclose(got, want, atol=tol * (1 + np.abs(want).max()))


def test_single_texts_normalized_to_parquet(exported, tmp_path):
    import pyarrow.parquet as pq

    root, path, rows = exported
    out = tmp_path / "texts.parquet"
    assert score_main([str(path), str(root / "texts.jsonl"), "--out", str(out), "--normalize"]) == 0
    table = pq.read_table(out).to_pylist()
    expected = (hf_scores(path, [r["prompt"] + r["chosen"] for r in rows]) - 0.5) / 2.0
    np.testing.assert_allclose([t["reward"] for t in table], expected, atol=1e-4)


def test_bad_rows_stop_or_are_skipped(exported, tmp_path):
    root, path, rows = exported
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": 3}) + "\n")
    assert score_main([str(path), str(bad), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert score_main([str(path), str(bad), "--out", str(tmp_path / "x.jsonl"), "--on-bad-row", "skip"]) == 0
    assert len(read_jsonl(tmp_path / "x.jsonl")) == 1
