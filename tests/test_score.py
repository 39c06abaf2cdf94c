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


def test_a_device_this_machine_lacks_is_refused_first(exported, tmp_path, capsys, monkeypatch):
    root, path, _ = exported
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    import rmfast.score as score

    monkeypatch.setattr(score.Scorer, "__init__", lambda *a: pytest.fail("the model was loaded"))
    args = [str(path), str(root / "pairs.jsonl"), "--out", str(tmp_path / "s.jsonl"), "--device", "cuda"]
    assert score_main(args) == 2 and "no CUDA GPU" in capsys.readouterr().err


def read_jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_pairs_are_scored_as_transformers_scores_them(exported, tmp_path, capsys):
    root, path, rows = exported
    out = tmp_path / "pairs.jsonl"
    assert score_main([str(path), str(root / "pairs.jsonl"), "--out", str(out), "--token-budget", "200"]) == 0
    assert "Loading weights" not in capsys.readouterr().err  # transformers' bar is not shown
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


# ---- groups: a reward per response, the prompt computed once ----

def _group_rows(rows):
    """Rows of 3 responses from the pair rows: RewardBench 2's shape (one chosen, two rejected), with
    a subset tag, and the plain shape without scores (best-of-N over sampled responses)."""
    rb2, plain = [], []
    for i, r in enumerate(rows):
        third = rows[(i + 1) % len(rows)]["rejected"]
        rb2.append({"prompt": r["prompt"], "chosen": [r["chosen"]], "rejected": [r["rejected"], third],
                    "subset": "math" if i % 2 else "focus"})
        plain.append({"prompt": r["prompt"], "responses": [r["rejected"], r["chosen"], third]})
    return rb2, plain


def test_groups_are_scored_as_transformers_scores_each_response(exported, tmp_path):
    root, path, rows = exported
    rb2, plain = _group_rows(rows)
    write_jsonl(plain, tmp_path / "plain.jsonl")
    out = tmp_path / "plain-scores.jsonl"
    assert score_main([str(path), str(tmp_path / "plain.jsonl"), "--out", str(out), "--token-budget", "300"]) == 0
    got = read_jsonl(out)
    assert len(got) == len(rows) and got[0]["location"].endswith("plain.jsonl:1")
    want = np.stack([hf_scores(path, [g["prompt"] + x for x in g["responses"]]) for g in plain])
    np.testing.assert_allclose([g["rewards"] for g in got], want, atol=1e-4)
    assert [g["best"] for g in got] == list(want.argmax(1))
    assert "comparisons" not in got[0]  # no scores given: no metrics


def test_rewardbench2_groups_give_per_subset_accuracy_and_best_of_n(exported, tmp_path):
    from rmfast.group_metrics import rank_metrics

    root, path, rows = exported
    rb2, _ = _group_rows(rows)
    write_jsonl(rb2, tmp_path / "rb2.jsonl")
    out, summary = tmp_path / "rb2-scores.jsonl", tmp_path / "summary.json"
    assert score_main([str(path), str(tmp_path / "rb2.jsonl"), "--out", str(out), "--summary", str(summary)]) == 0
    got, summary = read_jsonl(out), json.loads(summary.read_text())
    want = np.stack([hf_scores(path, [g["prompt"] + x for x in g["chosen"] + g["rejected"]]) for g in rb2])
    np.testing.assert_allclose([g["rewards"] for g in got], want, atol=1e-4)
    for subset in ("focus", "math"):
        mine = [w for w, g in zip(want, rb2) if g["subset"] == subset]
        wins = [float(w[0] > w[1:].max()) for w in mine]  # one chosen: best-of-N is "chosen beats every rejected"
        correct = sum(int(w[0] > w[1]) + int(w[0] > w[2]) for w in mine)
        m = summary["subsets"][subset]
        assert m["groups"] == len(mine) and m["comparisons"] == 2 * len(mine)
        assert m["best_of_n"] == pytest.approx(np.mean(wins))
        assert m["comparison_accuracy"] == pytest.approx(correct / (2 * len(mine)))
    assert summary["subset_mean_best_of_n"] == pytest.approx(
        np.mean([summary["subsets"][s]["best_of_n"] for s in ("focus", "math")]))
    assert {g["subset"] for g in got} == {"focus", "math"}
    # a reward tie at the top splits the credit: 1 / the number tied when a best response is among them
    assert rank_metrics([2.0, 2.0, 0.0, 1.0], [1, 0, 0, 0])["best_of_n"] == 0.5
    assert rank_metrics([2.0, 2.0, 2.0, 1.0], [0, 0, 1, 0])["best_of_n"] == pytest.approx(1 / 3)
    assert rank_metrics([1.0, 2.0, 0.0], [1, 0, 0])["best_of_n"] == 0.0
    assert rank_metrics([1.0, 2.0], [1, 1]) is None  # all tied: nothing to measure


def test_groups_keep_every_response_as_read(exported, tmp_path):
    """Identical responses are computed once but each gets its reward; UltraFeedback rows through
    --columns ultrafeedback; a bad row stops the run or is skipped."""
    root, path, rows = exported
    r = rows[0]
    rated = [(r["chosen"], 9.0), (r["rejected"], 3.0), (r["chosen"], 8.0)]
    uf = [{"instruction": r["prompt"], "completions": [{"response": x, "overall_score": s} for x, s in rated]},
          {"instruction": r["prompt"], "completions": [{"response": r["chosen"]}]}]
    write_jsonl(uf, tmp_path / "uf.jsonl")
    out = tmp_path / "uf-scores.jsonl"
    base = [str(path), str(tmp_path / "uf.jsonl"), "--out", str(out), "--columns", "ultrafeedback"]
    assert score_main(base) == 2  # the second row has no overall_score
    assert score_main(base + ["--on-bad-row", "skip"]) == 0
    got = read_jsonl(out)
    assert len(got) == 1 and len(got[0]["rewards"]) == 3
    c, rj = hf_scores(path, [r["prompt"] + r["chosen"], r["prompt"] + r["rejected"]])
    np.testing.assert_allclose(got[0]["rewards"], [c, rj, c], atol=1e-4)
    assert got[0]["comparisons"] == 3  # 9 > 3, 9 > 8, 8 > 3 — the identical pair scores a reward tie


def test_pairs_with_a_subset_column_give_per_subset_accuracy(exported, tmp_path):
    root, path, rows = exported
    tagged = [dict(r, subset="even" if i % 2 == 0 else "odd") for i, r in enumerate(rows)]
    write_jsonl(tagged, tmp_path / "tagged.jsonl")
    out, summary = tmp_path / "tagged-scores.jsonl", tmp_path / "summary.json"
    assert score_main([str(path), str(tmp_path / "tagged.jsonl"), "--out", str(out), "--summary", str(summary)]) == 0
    got, summary = read_jsonl(out), json.loads(summary.read_text())
    correct = hf_scores(path, [r["prompt"] + r["chosen"] for r in rows]) > \
        hf_scores(path, [r["prompt"] + r["rejected"] for r in rows])
    assert [g["subset"] for g in got] == [t["subset"] for t in tagged]
    assert summary["subsets"]["even"]["accuracy"] == pytest.approx(correct[0::2].mean())
    assert summary["subsets"]["odd"]["accuracy"] == pytest.approx(correct[1::2].mean())
    assert summary["accuracy"] == pytest.approx(correct.mean()) and summary["pairs"] == len(rows)
    # groups with a subset column (not RewardBench 2's shape) are split by it too
    groups = [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]], "scores": [1, 0],
               "subset": t["subset"]} for r, t in zip(rows, tagged)]
    write_jsonl(groups, tmp_path / "groups.jsonl")
    assert score_main([str(path), str(tmp_path / "groups.jsonl"), "--out", str(out), "--summary",
                       str(tmp_path / "g.json")]) == 0
    by_subset = json.loads((tmp_path / "g.json").read_text())["subsets"]
    assert by_subset["even"]["comparison_accuracy"] == pytest.approx(correct[0::2].mean())


# ---- the reward token: where plain transformers reads it, for chat and plain text ----

LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>"
                   "assistant<|end_header_id|>\n\n{% endif %}")


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_chat_rows_score_as_plain_transformers_scores_apply_chat_template(tmp_path, template):
    """Conversational pairs, groups and message rows: rmfast-score equals a plain
    AutoModelForSequenceClassification on tokenizer.apply_chat_template(messages), nothing added; plain text
    rows get EOS (as TRL trains). The export records the convention, and its tokenizer carries the template
    (a run's data.chat_template, here Llama-3's)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rmfast.engine import carrying_template
    from rmfast.export import EOS_AFTER_TEMPLATE

    rows = generate_pairs(8, seed=5)  # conversational
    tok = train_bpe_tokenizer([m["content"] for r in rows for m in r["prompt"] + r["chosen"]], vocab_size=160)
    model = build(None, "llama", vocab=len(tok))
    with carrying_template(tok, LLAMA3_TEMPLATE if template == "llama3" else None):
        path = write_export(model.backbone.config, model.state_dict(), tok, tmp_path / "export")
    assert tok.chat_template != LLAMA3_TEMPLATE  # the run's tokenizer itself is left as it was
    assert json.loads((path / "config.json").read_text())[EOS_AFTER_TEMPLATE] is False
    hf_tok = AutoTokenizer.from_pretrained(path)
    assert ("<|eot_id|>" in hf_tok.chat_template) == (template == "llama3")
    hf = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()

    def plain(messages):  # the one line a transformers user writes
        with torch.no_grad():
            return hf(**hf_tok.apply_chat_template(messages, return_dict=True, return_tensors="pt")).logits[0, 0].item()

    write_jsonl(rows, tmp_path / "pairs.jsonl")
    groups = [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"], rows[i - 1]["rejected"]]}
              for i, r in enumerate(rows)]
    write_jsonl(groups, tmp_path / "groups.jsonl")
    write_jsonl([{"messages": r["prompt"] + r["chosen"]} for r in rows], tmp_path / "messages.jsonl")
    for name in ("pairs", "groups", "messages"):
        assert score_main([str(path), str(tmp_path / f"{name}.jsonl"), "--out", str(tmp_path / f"{name}-s.jsonl")]) == 0
    got = read_jsonl(tmp_path / "pairs-s.jsonl")
    np.testing.assert_allclose([g["chosen_reward"] for g in got], [plain(r["prompt"] + r["chosen"]) for r in rows],
                               atol=1e-4)
    np.testing.assert_allclose([g["rejected_reward"] for g in got],
                               [plain(r["prompt"] + r["rejected"]) for r in rows], atol=1e-4)
    got = read_jsonl(tmp_path / "groups-s.jsonl")
    np.testing.assert_allclose([g["rewards"] for g in got],
                               [[plain(g["prompt"] + x) for x in g["responses"]] for g in groups], atol=1e-4)
    got = read_jsonl(tmp_path / "messages-s.jsonl")
    np.testing.assert_allclose([g["reward"] for g in got], [plain(r["prompt"] + r["chosen"]) for r in rows],
                               atol=1e-4)
    # plain text: text + EOS
    write_jsonl([{"text": "2 plus 2 is 4"}], tmp_path / "texts.jsonl")
    assert score_main([str(path), str(tmp_path / "texts.jsonl"), "--out", str(tmp_path / "texts-s.jsonl")]) == 0
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([hf_tok("2 plus 2 is 4")["input_ids"] + [hf_tok.eos_token_id]])).logits
    assert read_jsonl(tmp_path / "texts-s.jsonl")[0]["reward"] == pytest.approx(want.item(), abs=1e-4)


def test_an_export_from_before_the_convention_keeps_scoring_as_it_was_trained(tmp_path):
    """An rmfast export without the record was trained with EOS after the chat template: the scorer appends it;
    a model that is no rmfast export reads where the template ends."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rmfast.export import EOS_AFTER_TEMPLATE

    rows = generate_pairs(4, seed=6)
    tok = train_bpe_tokenizer([m["content"] for r in rows for m in r["prompt"] + r["chosen"]], vocab_size=140)
    model = build(None, "llama", vocab=len(tok))
    path = write_export(model.backbone.config, model.state_dict(), tok, tmp_path / "export")
    config = json.loads((path / "config.json").read_text())
    del config[EOS_AFTER_TEMPLATE]
    (path / "config.json").write_text(json.dumps(config))
    write_jsonl([{"messages": r["prompt"] + r["chosen"]} for r in rows], tmp_path / "m.jsonl")
    hf_tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()

    def plain(messages, eos):
        ids = hf_tok.apply_chat_template(messages, return_dict=True)["input_ids"]
        ids += [hf_tok.eos_token_id] if eos else []
        with torch.no_grad():
            return hf(input_ids=torch.tensor([ids])).logits.item()

    for rmfast_export in (True, False):
        if not rmfast_export:
            (path / "rmfast.json").unlink()
        out = tmp_path / f"s-{rmfast_export}.jsonl"
        assert score_main([str(path), str(tmp_path / "m.jsonl"), "--out", str(out)]) == 0
        want = [plain(r["prompt"] + r["chosen"], eos=rmfast_export) for r in rows]
        np.testing.assert_allclose([g["reward"] for g in read_jsonl(out)], want, atol=1e-4)
