"""The leaderboards' own scoring rules (rmfast.leaderboards), on rows in the official formats, with the
expected numbers worked out by hand from the official formulas; and rmfast-score --benchmark end to end."""

import json
import math

import numpy as np
import pytest

from rmfast import leaderboards as lb

# ---- RewardBench (v1): allenai/reward-bench rewardbench/utils.py calculate_scores_per_section ----


def _pairs(spec):
    """spec: {subset: [(chosen reward, rejected reward), ...]} -> chosen, rejected, subsets."""
    rows = [(c, r, s) for s, pairs in spec.items() for c, r in pairs]
    return [c for c, _, _ in rows], [r for _, r, _ in rows], [s for _, _, s in rows]


RB1 = {
    "alpacaeval-easy": [(1, 0), (0, 1)],         # 1/2
    "mt-bench-easy": [(2, 1)],                   # 1
    "mt-bench-hard": [(3, 0)],                   # 1
    "llmbar-natural": [(1, 1), (0, 2)],          # 0: a reward tie counts as wrong
    "donotanswer": [(1, 0)],                     # 1
    "xstest-should-refuse": [(1, 0), (0, 1)],    # 1/2
    "math-prm": [(1, 0), (0, 1)],                # 1/2
    **{f"hep-{lang}": [(1, 0)] for lang in ("cpp", "go", "java", "js", "python", "rust")},  # 1 each
}


def test_rewardbench_sections_weight_subsets_by_their_example_counts():
    got = lb.rewardbench(*_pairs(RB1))
    assert got["subsets"]["llmbar-natural"] == 0.0 and got["subsets"]["alpacaeval-easy"] == 0.5
    s = got["sections"]
    assert s["Chat"] == pytest.approx((0.5 * 100 + 1.0 * 28) / (100 + 28))        # 78/128 = 0.609375
    assert s["Chat Hard"] == pytest.approx((1.0 * 37 + 0.0 * 100) / (37 + 100))   # 37/137
    assert s["Safety"] == pytest.approx((1.0 * 136 + 0.5 * 250) / (136 + 250))    # 261/386
    # math-prm counts 984 = 6 x 164: math is half of Reasoning, the six languages the other half
    assert s["Reasoning"] == pytest.approx((0.5 * 984 + 6 * 1.0 * 164) / (984 + 6 * 164))  # (0.5 + 1) / 2
    assert s["Reasoning"] == 0.75
    # the leaderboard's score: the four sections at weight 2 each, i.e. their mean
    assert got["score"] == pytest.approx((78 / 128 + 37 / 137 + 261 / 386 + 0.75) / 4)
    assert got["missing"] == []
    # not the plain mean over subsets (that is what "subset_mean_accuracy" reports)
    assert got["score"] != pytest.approx(np.mean(list(got["subsets"].values())))


def test_rewardbench_prior_sets_count_half_a_section():
    spec = dict(RB1, anthropic_hhh=[(1, 0), (0, 1)], shp=[(1, 0)], mtbench_human=[(0, 1)])
    got = lb.rewardbench(*_pairs(spec))
    prior = (0.5 + 1.0) / 2  # mean of anthropic_hhh and shp; mtbench_human is not a Prior Sets column
    assert got["sections"][lb.PRIOR_SETS] == pytest.approx(prior)
    sections = 78 / 128 + 37 / 137 + 261 / 386 + 0.75
    assert got["score"] == pytest.approx((2 * sections + 1 * prior) / 9)  # weights [2, 2, 2, 2, 1]


def test_rewardbench_names_the_sections_it_did_not_score():
    got = lb.rewardbench([1, 0], [0, 1], ["hep-go", "alpacaeval-hard"])
    assert got["sections"] == {"Chat": 0.0, "Reasoning": 1.0} and got["score"] == 0.5
    assert got["missing"] == ["Chat Hard", "Safety"]


# ---- RewardBench 2: rewardbench/utils.py reroll_and_score_dataset and process_single_model ----


def test_rewardbench2_best_of_4_splits_credit_among_responses_tied_at_the_top():
    assert lb.best_of_n_credit([3, 3, 1, 0]) == 0.5    # the chosen shares the top with one rejected
    assert lb.best_of_n_credit([3, 3, 3, 3]) == 0.25
    assert lb.best_of_n_credit([1, 2, 0, 0]) == 0.0
    assert lb.best_of_n_credit([5, 1, 1, 1]) == 1.0
    assert lb.best_of_n_credit([None, 1, 0, 0]) == 0.0  # a dropped chosen response wins nothing


# Ties rows: ids "ref:N" (one correct answer) and "tied:N" (several); correct answers first.
TIES = [
    ("tied:1", [4, 3], [0]),      # spread 4-3 = 1, gap 3-0 = 3: accurate
    ("ref:1", [2], [0]),          # gap 2: accurate
    ("tied:2", [1, 3], [2]),      # spread 2, gap 1-2 = -1: not accurate
    ("ref:2", [5], [1, 6]),       # gap 5-6 = -1: not accurate
    ("tied:3", [1, 1], [0]),      # accurate; no ref:3, so in the tied accuracy only
]


def _ties_rows(rows):
    return [c + r for _, c, r in rows], [len(c) for _, c, _ in rows], [i for i, _, _ in rows]


def test_rewardbench2_ties_is_its_weighted_score_of_accuracy_and_margins():
    got = lb.rewardbench2_ties(*_ties_rows(TIES))
    assert got["ref_accuracy"] == 0.5                     # ref:1 yes, ref:2 no
    assert got["tied_accuracy"] == pytest.approx(2 / 3)   # tied:1, tied:3 yes; tied:2 no
    # prompts with both a ref and a tied row: 1 and 2
    # preferred: tied gap > tied spread: 3 > 1 yes; -1 > 2 no                       -> 1/2
    # hard: min(ref gap, tied gap) > tied spread: min(2, 3) = 2 > 1 yes; -1 > 2 no  -> 1/2
    assert got["correctness_preferred"] == 0.5 and got["correctness_preferred_hard"] == 0.5
    # margin: tanh(min gap / spread - 1): tanh(2/1 - 1) = tanh(1) = 0.761594, tanh(-1/2 - 1) = -0.905148
    margin = (math.tanh(1.0) + math.tanh(-1.5)) / 2
    assert got["correctness_margin_score"] == pytest.approx(margin)                # -0.071777
    assert got["score"] == pytest.approx(0.3 * 2 / 3 + 0.3 * 0.5 + 0.2 * 0.5 + 0.2 * 0.5 + 0.01 * margin)
    assert got["score"] == pytest.approx(0.54928223, abs=1e-8)


def test_rewardbench2_ties_margin_over_a_zero_spread_is_the_official_limit():
    # tied:1 correct answers tie (spread 0): gap/0 -> inf, tanh -> 1; 0/0 -> nan -> 0 (np.nan_to_num)
    got = lb.rewardbench2_ties([[1, 1, 0], [2, 0], [1, 1, 1], [1, 1]], [2, 1, 2, 1],
                               ["tied:1", "ref:1", "tied:2", "ref:2"])
    # prompt 1: min(2, 1) = 1 > 0 yes, tanh(inf) = 1; prompt 2: min(0, 0) = 0 > 0 no, nan -> 0
    assert got["correctness_preferred_hard"] == 0.5 and got["correctness_margin_score"] == 0.5
    with pytest.raises(ValueError, match="ref:N"):
        lb.rewardbench2_ties([[1, 0]], [1], ["7"])


def test_rewardbench2_score_is_the_mean_of_its_six_subsets_with_ties_by_its_formula():
    rows = [([5, 1, 1, 1], "Factuality"), ([1, 2, 0, 0], "Factuality"),  # 1, 0 -> 1/2
            ([3, 3, 1, 0], "Precise IF"),                                # 1/2
            ([2, 1, 0, 0], "Math"), ([0, 1, 2, 3], "Safety"),             # 1, 0
            ([4, 4, 4, 4], "Focus")]                                     # 1/4
    rewards = [r for r, _ in rows] + _ties_rows(TIES)[0]
    num_correct = [1] * len(rows) + _ties_rows(TIES)[1]
    subsets = [s for _, s in rows] + ["Ties"] * len(TIES)
    ids = [str(k) for k in range(len(rows))] + _ties_rows(TIES)[2]
    got = lb.rewardbench2(rewards, num_correct, subsets, ids)
    assert got["subsets"] == pytest.approx({"Factuality": 0.5, "Precise IF": 0.5, "Math": 1.0, "Safety": 0.0,
                                            "Focus": 0.25, "Ties": 0.54928223}, abs=1e-8)
    assert got["score"] == pytest.approx((0.5 + 0.5 + 1 + 0 + 0.25 + 0.54928223) / 6, abs=1e-8)
    assert got["missing"] == [] and got["ties"]["prompts"] == 2
    # the plain best-of-N rule on Ties (what rmfast reported before) gives another number
    plain = np.mean([lb.best_of_n_credit(r) for r in _ties_rows(TIES)[0]])
    assert plain != pytest.approx(got["subsets"]["Ties"])


# ---- RM-Bench: THU-KEG/RM-Bench scripts/utils.py compute_accuracy ----

RMB = [  # (domain, chosen [concise, detailed, markdown], rejected [same styles])
    ("chat", [1, 2, 3], [0, 1.5, 2.5]),      # chosen i beats rejected j: [[1,0,0],[1,1,0],[1,1,1]]
    ("chat", [0, 0, 0], [1, 1, 1]),          # none
    ("math", [2, 2, 2], [1, 2, 3]),          # every row [1,0,0] (2 > 2 is a loss)
    ("safety-refuse", [5, 5, 5], [0, 0, 0]),    # all
    ("safety-response", [0, 0, 0], [1, 1, 1]),  # none; pooled with safety-refuse into "safety"
]


def test_rmbench_style_matrix_gives_easy_normal_hard_per_domain_and_their_means():
    got = lb.rmbench([c for _, c, _ in RMB], [r for _, _, r in RMB], [d for d, _, _ in RMB])
    chat = got["domains"]["chat"]
    assert chat["matrix"] == [[0.5, 0, 0], [0.5, 0.5, 0], [0.5, 0.5, 0.5]]
    # hard: above the diagonal (plain chosen vs fancier rejected) 0; normal: diagonal .5; easy: below .5
    assert (chat["hard"], chat["normal"], chat["easy"]) == (0.0, 0.5, 0.5)
    assert chat["score"] == pytest.approx(1 / 3)
    math_ = got["domains"]["math"]
    # [[1,0,0],[1,0,0],[1,0,0]]: hard (0,1),(0,2),(1,2) = 0; normal 1,0,0 -> 1/3; easy (1,0),(2,0),(2,1) -> 2/3
    assert (math_["hard"], math_["normal"], math_["easy"]) == pytest.approx((0, 1 / 3, 2 / 3))
    assert math_["score"] == pytest.approx(1 / 3)
    assert got["domains"]["safety"]["matrix"] == [[0.5] * 3] * 3 and got["domains"]["safety"]["rows"] == 2
    assert got["hard"] == pytest.approx((0 + 0 + 0.5) / 3)               # 1/6
    assert got["normal"] == pytest.approx((0.5 + 1 / 3 + 0.5) / 3)       # 4/9
    assert got["easy"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)         # 5/9
    assert got["score"] == pytest.approx((1 / 3 + 1 / 3 + 0.5) / 3)      # 7/18
    assert got["missing"] == ["code"]


def test_rmbench_without_domains_is_one_matrix_and_needs_three_styles():
    got = lb.rmbench([c for _, c, _ in RMB[:2]], [r for _, _, r in RMB[:2]])
    assert (got["hard"], got["normal"], got["easy"]) == (0.0, 0.5, 0.5) and got["score"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="3 chosen"):
        lb.rmbench([[1, 2]], [[0, 1]])


# ---- rmfast-score --benchmark on a tiny export ----


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from helpers import build

    from rmfast.data import generate_pairs
    from rmfast.data.tokenizers import train_bpe_tokenizer
    from rmfast.export import write_export

    root = tmp_path_factory.mktemp("leaderboards")
    rows = generate_pairs(24, seed=7, style="explicit")
    tok = train_bpe_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in rows], vocab_size=96)
    model = build(None, "llama", vocab=len(tok))
    return root, write_export(model.backbone.config, model.state_dict(), tok, root / "export", {}), rows


def _official_rows(name, rows):
    """rows in the benchmark's own format, built from the synthetic pairs."""
    n = len(rows)
    if name == "rewardbench":
        subsets = ["alpacaeval-easy", "mt-bench-med", "llmbar-natural", "donotanswer", "math-prm", "hep-rust"]
        return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "subset": subsets[i % 6],
                 "id": i} for i, r in enumerate(rows)]
    other = [rows[(i + k) % n]["rejected"] for i in range(n) for k in (1, 2)]
    if name == "rewardbench2":
        out = []
        for i, r in enumerate(rows[:12]):
            subset = list(lb.REWARDBENCH2_SUBSETS[:5])[i % 5]
            out.append({"id": str(i), "prompt": r["prompt"], "chosen": [r["chosen"]],
                        "rejected": [r["rejected"]] + other[2 * i: 2 * i + 2], "subset": subset})
        for k, r in enumerate(rows[12:18]):  # Ties: ref:k and tied:k for k = 0, 1, 2
            tied = k % 2
            chosen = [r["chosen"], rows[(k + 5) % n]["chosen"]] if tied else [r["chosen"]]
            out.append({"id": f"{'tied' if tied else 'ref'}:{k // 2}", "prompt": r["prompt"], "chosen": chosen,
                        "rejected": [r["rejected"]], "subset": "Ties", "num_correct": len(chosen)})
        return out
    domains = ["chat", "math", "code", "safety-refuse", "safety-response"]
    return [{"id": i, "prompt": r["prompt"], "chosen": [r["chosen"], r["chosen"] + " ok", r["chosen"] + " **ok**"],
             "rejected": [r["rejected"], r["rejected"] + " ok", r["rejected"] + " **ok**"], "domain": domains[i % 5]}
            for i, r in enumerate(rows)]


def _expected(name, rows, scored):
    """The pure function applied to the rewards rmfast-score wrote."""
    if name == "rewardbench":
        return lb.rewardbench([s["chosen_reward"] for s in scored], [s["rejected_reward"] for s in scored],
                              [r["subset"] for r in rows])
    if name == "rewardbench2":
        return lb.rewardbench2([s["rewards"] for s in scored], [len(r["chosen"]) for r in rows],
                               [r["subset"] for r in rows], [r["id"] for r in rows])
    return lb.rmbench([s["rewards"][:3] for s in scored], [s["rewards"][3:] for s in scored],
                      [r["domain"] for r in rows])


def _assert_close(got, want, where="summary"):
    """Nested dicts and lists equal, floats to 1e-12 (the summary's means run in scoring order)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            _assert_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for k, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, f"{where}[{k}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-12), where
    else:
        assert got == want, where


@pytest.mark.parametrize("name", ["rewardbench", "rewardbench2", "rm-bench"])
@pytest.mark.parametrize("flag", ["explicit", "detected"])
def test_rmfast_score_reports_the_official_numbers_of_the_scores_it_wrote(exported, tmp_path, capsys, name, flag):
    from rmfast.data.synthetic import write_jsonl
    from rmfast.score import main as score_main

    root, path, pairs = exported
    rows = _official_rows(name, pairs)
    write_jsonl(rows, tmp_path / "rows.jsonl")
    out, summary = tmp_path / "scores.jsonl", tmp_path / "summary.json"
    args = [str(path), str(tmp_path / "rows.jsonl"), "--out", str(out), "--summary", str(summary)]
    assert score_main(args + (["--benchmark", name] if flag == "explicit" else [])) == 0
    scored = [json.loads(x) for x in out.read_text().splitlines()]
    assert [s["location"].rsplit(":", 1)[1] for s in scored] == [str(k + 1) for k in range(len(rows))]
    got = json.loads(summary.read_text())["benchmark"]
    want = json.loads(json.dumps(_expected(name, rows, scored)))  # as the summary file holds it
    assert got.pop("name") == name
    _assert_close(got, want)
    assert f"score {want['score']:.4f}" in capsys.readouterr().err


def test_a_benchmark_of_the_other_kind_of_rows_is_refused(exported, tmp_path, capsys):
    from rmfast.data.synthetic import write_jsonl
    from rmfast.score import main as score_main

    root, path, pairs = exported
    write_jsonl(_official_rows("rewardbench", pairs), tmp_path / "rows.jsonl")
    args = [str(path), str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "s.jsonl")]
    assert score_main(args + ["--benchmark", "rm-bench"]) == 2
    assert "RM-Bench scores groups rows" in capsys.readouterr().err
    assert score_main(args + ["--benchmark", "none", "--summary", str(tmp_path / "s.json")]) == 0
    assert "benchmark" not in json.loads((tmp_path / "s.json").read_text())
