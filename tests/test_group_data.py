"""Group data: every row shape parses (scored, ranked, conversational, UltraFeedback, RewardBench 2, pairs),
every bad row is reported with file:line and its reason, ties and merged responses are counted, and the
length policy and the prompt follow the pair path (K = 2 tokenizes exactly as a pair)."""

import json

import numpy as np
import pytest

from rmfast.data import REASONS, DataConfig, DataError, generate_groups, generate_pairs, load_data
from rmfast.data import tokenize as pair_tokenize
from rmfast.data.formats import BadRow
from rmfast.data.group_tokens import fit_group_length, tokenize_groups
from rmfast.data.groups import ULTRAFEEDBACK, Group, comparisons, parse_group_row
from rmfast.data.loader import load_groups
from rmfast.data.tokens import TokenizedGroups
from rmfast.data.tokenizers import train_bpe_tokenizer

MSG = lambda role, text: {"role": role, "content": text}  # noqa: E731


@pytest.fixture(scope="module")
def tokenizer():
    texts = [r["prompt"] + r["chosen"] for r in generate_pairs(200, style="explicit")]
    return train_bpe_tokenizer(texts, vocab_size=600)


@pytest.fixture
def cfg(tmp_path):
    def make(**kw):
        kw.setdefault("cache_dir", str(tmp_path / "cache"))
        return DataConfig(**kw)

    return make


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- row shapes

SHAPES = {  # row, columns → (format, K, scores, tag)
    "scored": ({"prompt": "Q: 2+2?", "responses": [" 4", " 5", " 3"], "scores": [9, 1, 2.5]}, None,
               ("explicit", 3, [9, 1, 2.5], None)),
    "ranked": ({"prompt": "Q: 2+2?", "responses": [" 5", " 4", " 3"], "ranking": [1, 2, 0]}, None,
               ("explicit", 3, [0, 2, 1], None)),
    "conversational": ({"prompt": [MSG("user", "2+2?")], "responses": [[MSG("assistant", "4")],
                        [MSG("assistant", "5")]], "scores": [1, 0]}, None, ("conversational", 2, [1, 0], None)),
    "ultrafeedback": ({"instruction": "Say hi.", "source": "x", "completions": [
                        {"model": "a", "response": "Hi!", "overall_score": 8.5},
                        {"model": "b", "response": "No.", "overall_score": 2.0},
                        {"model": "c", "response": "Hello.", "overall_score": 7}]}, ULTRAFEEDBACK,
                      ("explicit", 3, [8.5, 2.0, 7.0], None)),
    "rewardbench2": ({"id": "7", "prompt": "2+2?", "chosen": ["4"], "rejected": ["5", "3", "22"],
                      "subset": "Math", "num_correct": 1}, None, ("explicit", 4, [1, 0, 0, 0], "Math")),
    "pair-explicit": ({"prompt": "Q:", "chosen": " yes", "rejected": " no"}, None, ("explicit", 2, [1, 0], None)),
    "pair-implicit": ({"chosen": "Human: hi Assistant: hello", "rejected": "Human: hi Assistant: go"}, None,
                      ("implicit", 2, [1, 0], None)),
    "pair-conversational": ({"prompt": [MSG("user", "hi")], "chosen": [MSG("assistant", "hello")],
                             "rejected": [MSG("assistant", "go")]}, None, ("conversational", 2, [1, 0], None)),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_row_shape_parses(shape):
    row, columns, (fmt, K, scores, tag) = SHAPES[shape]
    group = parse_group_row("f.jsonl:1", row, columns=columns)
    assert (group.format, len(group.responses), group.scores, group.tag) == (fmt, K, scores, tag)
    assert group.location == "f.jsonl:1"


def test_a_ranking_lists_response_indices_best_first():
    group = parse_group_row("x", {"prompt": "q", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]})
    pairs, _, _ = comparisons(group.scores)
    assert sorted(map(tuple, pairs.tolist())) == [(0, 1), (2, 0), (2, 1)]  # c > a > b


def test_rewardbench2_chosen_beat_every_rejected_which_are_unordered():
    row = SHAPES["rewardbench2"][0]
    pairs, diff, ties = comparisons(parse_group_row("x", row).scores)
    assert pairs.tolist() == [[0, 1], [0, 2], [0, 3]] and ties == 3 and diff.tolist() == [1, 1, 1]


# ---------------------------------------------------------------- bad rows

BAD = [  # id, bad line, reason
    ("one-response", {"prompt": "q", "responses": ["a"], "scores": [1]}, "few_responses"),
    ("scores-length", {"prompt": "q", "responses": ["a", "b"], "scores": [1]}, "bad_scores"),
    ("scores-not-finite", '{"prompt": "q", "responses": ["a", "b"], "scores": [1, NaN]}', "bad_scores"),
    ("scores-not-numbers", {"prompt": "q", "responses": ["a", "b"], "scores": [1, "high"]}, "bad_scores"),
    ("ranking-repeats", {"prompt": "q", "responses": ["a", "b"], "ranking": [0, 0]}, "bad_ranking"),
    ("ranking-out-of-range", {"prompt": "q", "responses": ["a", "b"], "ranking": [1, 2]}, "bad_ranking"),
    ("both", {"prompt": "q", "responses": ["a", "b"], "scores": [1, 0], "ranking": [0, 1]}, "ambiguous_preference"),
    ("no-preference", {"prompt": "q", "responses": ["a", "b"]}, "missing_field"),
    ("empty-response", {"prompt": "q", "responses": ["a", "  "], "scores": [1, 0]}, "empty_response"),
    ("not-text", {"prompt": "q", "responses": ["a", 3], "scores": [1, 0]}, "not_text"),
    ("no-rejected", {"prompt": "q", "chosen": ["a"], "rejected": [], "subset": "s"}, "few_responses"),
]


def bad_file(tmp_path, line):
    good = {"prompt": "Q: hi", "responses": [" hello", " go away", " hi"], "scores": [2, 0, 1]}
    return write(tmp_path / "groups.jsonl", [good, line, good])


@pytest.mark.parametrize("line,reason", [pytest.param(line, reason, id=i) for i, line, reason in BAD])
def test_a_bad_row_stops_loading_with_file_line_and_reason(tmp_path, tokenizer, cfg, line, reason):
    path = bad_file(tmp_path, line)
    with pytest.raises(DataError) as info:
        load_groups(str(path), tokenizer, cfg())
    assert f"{path}:2" in str(info.value) and REASONS[reason] in str(info.value)


@pytest.mark.parametrize("line,reason", [pytest.param(line, reason, id=i) for i, line, reason in BAD])
def test_a_bad_row_is_skipped_and_counted(tmp_path, tokenizer, cfg, line, reason):
    groups, report, counts = load_groups(str(bad_file(tmp_path, line)), tokenizer, cfg(on_bad_row="skip"))
    assert len(groups) == 2 and report.bad == {reason: 1} and report.rows == 3
    assert counts.comparisons == report.pairs == 6


def test_a_mapped_column_that_is_missing_names_the_mapping():
    row = {"instruction": "hi", "completions": [{"response": "a"}, {"response": "b"}]}
    with pytest.raises(BadRow, match="overall_score"):
        parse_group_row("x", row, columns=ULTRAFEEDBACK)


# ---------------------------------------------------------------- tokenization: ties, merges, the prompt


def test_ties_give_no_comparison_and_identical_responses_are_merged_and_counted(tokenizer):
    groups = [Group("a:1", "explicit", "Q: hi", [" hello", " hello", " bye"], [3.0, 1.0, 0.0]),
              Group("a:2", "explicit", "Q: hi", [" x", " y", " z"], [1.0, 1.0, 0.0])]
    tokenized, counts = tokenize_groups(groups, tokenizer, pair_tokenize.LengthPolicy(64))
    assert counts.merged == 1 and tokenized.scores[0].tolist() == [2.0, 0.0]  # the merged score: their mean
    assert counts.ties == 1 and counts.comparisons == 1 + 2 and counts.groups == 2


def test_a_group_left_with_one_response_is_dropped_and_one_of_ties_kept(tokenizer):
    groups = [Group("a:1", "explicit", "Q", [" same", " same"], [1.0, 0.0]),
              Group("a:2", "explicit", "Q", [" a", " a", " b"], [2.0, 0.0, 1.0]),  # merged: " a" 1, " b" 1
              Group("a:3", "explicit", "Q", [" x", " y", " z"], [2.0, 2.0, 2.0])]
    tokenized, counts = tokenize_groups(groups, tokenizer, pair_tokenize.LengthPolicy(64))
    assert counts.dropped == {"fewer_than_two_responses": 1}
    assert len(tokenized) == 2 and counts.ties == 1 + 3 and counts.comparisons == 0


def test_groups_of_only_ties_train_under_davidson_and_are_set_aside_by_the_others(tmp_path, tokenizer, cfg):
    from rmfast import layouts
    from rmfast.engine import with_comparisons

    rows = [{"prompt": "Q: hi", "responses": [" hello", " go away", " hi"], "scores": [2, 0, 1]},
            {"prompt": "Q: yo", "responses": [" a", " b"], "scores": [1, 1]},
            {"prompt": "Q: tie", "chosen": [" x", " y"], "rejected": [], "subset": "Ties"}]
    groups, report, counts = load_groups(str(write(tmp_path / "t.jsonl", rows)), tokenizer, cfg())
    assert len(groups) == 3 and counts.ties == 2 and report.bad == {}
    kept, aside = with_comparisons(groups)
    assert len(kept) == 1 and aside == 2
    kept, aside = with_comparisons(groups, ties=True)
    assert len(kept) == 3 and aside == 0
    batch = layouts.padded(kept, range(3), 0, ties=True)
    assert batch.ties == 2 and batch.pairs == 3 + 2


@pytest.mark.parametrize("eos_after_template", [False, True])
def test_each_response_is_prompt_then_its_own_tokens_ending_where_the_template_ends(tokenizer, eos_after_template):
    """A conversation's tokens are exactly apply_chat_template's (the reward is read where a plain transformers
    caller reads it); eos_after_template, the convention of earlier runs, appends EOS after them."""
    row = SHAPES["conversational"][0]
    group = parse_group_row("x", row)
    policy = pair_tokenize.LengthPolicy(256, eos_after_template=eos_after_template)
    tokenized, _ = tokenize_groups([group], tokenizer, policy)
    for k, response in enumerate(row["responses"]):
        text = tokenizer.apply_chat_template(row["prompt"] + response, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids[-1] != tokenizer.eos_token_id  # the template does not end in EOS: the two conventions differ
        assert tokenized.sequence(0, k).tolist() == ids + ([tokenizer.eos_token_id] if eos_after_template else [])
    prompt_text = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(tokenized.prompt[0]).startswith(prompt_text)


@pytest.mark.parametrize("max_length", [4096, 40, 12])
def test_pairs_tokenize_as_groups_of_two_exactly_as_the_pair_path(tmp_path, tokenizer, cfg, max_length):
    rows = [dict(r, margin=None) for r in generate_pairs(12, style="explicit", seed=3)]
    rows += generate_pairs(12, style="conversational", seed=4)
    path = write(tmp_path / "pairs.jsonl", rows)
    config = cfg(train=[str(path)], max_length=max_length, min_prompt_tokens=4)
    pairs, _, _ = load_data(config, tokenizer)
    groups, _, counts = load_groups(str(path), tokenizer, config)
    # the pair path's whole chosen and rejected sequences, made groups of two: the shared prefix the prompt
    expected = TokenizedGroups.of_pairs([pairs.sequence(i, 0) for i in range(len(pairs))],
                                        [pairs.sequence(i, 1) for i in range(len(pairs))], pairs.margin,
                                        pairs.locations)
    assert len(groups) == len(pairs) == len(expected) == counts.comparisons
    for g in range(len(groups)):
        for got in (groups, pairs):
            assert got.prompt[g].tolist() == expected.prompt[g].tolist()
            assert [r.tolist() for r in got.responses[g]] == [r.tolist() for r in expected.responses[g]]
            assert got.scores[g].tolist() == [1.0, 0.0]
    assert groups.locations == pairs.locations
    # the pair's margin comes along as the group's (NaN where the row had none)
    margins = [np.nan if r.get("margin") is None else r["margin"] for r in rows]
    assert np.isnan(margins[:12]).all() and not np.isnan(margins[12:]).any()
    kept = [int(loc.rsplit(":", 1)[1]) - 1 for loc in groups.locations]
    np.testing.assert_array_equal(groups.margin, np.array([margins[i] for i in kept], np.float32))
    np.testing.assert_array_equal(groups.margin, pairs.margin)


def test_truncation_cuts_the_prompt_from_the_left_then_responses_from_the_right():
    policy = pair_tokenize.LengthPolicy(max_length=10, min_prompt_tokens=3)
    bos, eos = 1, 2
    prompt = [bos, 100, 101, 102, 103]
    seqs = [prompt + list(range(20, 30)) + [eos], prompt + [5, eos], prompt + [6, 7, eos]]
    out, kept, truncated = fit_group_length(seqs, 5, policy, bos)
    assert truncated and kept == [0, 1, 2]
    assert out == [[bos, 101, 102, 103, 20, 21, 22, 23, 24, eos], [bos, 101, 102, 103, 5, eos],
                   [bos, 101, 102, 103, 6, 7, eos]]  # the same prompt tokens cut from all; EOS kept
    dropped, kept, _ = fit_group_length(seqs, 5, pair_tokenize.LengthPolicy(10, "drop"), bos)
    assert kept == [1, 2] and dropped == seqs[1:]  # 'drop' drops the overlong responses only


@pytest.mark.parametrize("seed", range(20))
def test_with_two_responses_the_length_policy_is_fit_length(seed):
    rng = np.random.default_rng(seed)
    p = [1] + list(rng.integers(3, 50, rng.integers(0, 20)))
    c, r = (p + list(rng.integers(3, 50, rng.integers(1, 15))) + [2] for _ in range(2))
    policy = pair_tokenize.LengthPolicy(max_length=int(rng.integers(4, 30)), min_prompt_tokens=int(rng.integers(0, 5)))
    c2, r2, _, truncated = pair_tokenize.fit_length(c, r, len(p), policy, 1)
    assert fit_group_length([c, r], len(p), policy, 1) == ([c2, r2], [0, 1], truncated)


# ---------------------------------------------------------------- synthetic groups


@pytest.mark.parametrize("style", ["conversational", "explicit"])
@pytest.mark.parametrize("k", [2, 4, 6])
def test_synthetic_groups_rank_answers_by_their_distance_from_the_truth(style, k):
    rows = generate_groups(20, k=k, style=style, seed=1)
    ranked = generate_groups(20, k=k, style=style, seed=1, shape="ranking")
    for row, other in zip(rows, ranked):
        group = parse_group_row("x", row)
        assert len(group.responses) == k and len(set(group.scores)) == k and max(group.scores) == 0.0
        assert other["ranking"] == sorted(range(k), key=lambda i: -group.scores[i])  # the same order, ranked


def test_synthetic_groups_load_and_share_their_prompt(tmp_path, tokenizer, cfg):
    path = write(tmp_path / "groups.jsonl", generate_groups(30, k=4))
    groups, report, counts = load_groups(str(path), tokenizer, cfg())
    assert len(groups) == 30 and counts.comparisons == 30 * 6 and counts.ties == 0 and not report.bad
    whole = sum(len(groups.sequence(g, i)) for g in range(30) for i in range(4))
    assert sum(len(p) for p in groups.prompt) * 3 > whole / 2  # most tokens are prompt, computed once


def test_groups_are_cached_like_pairs(tmp_path, tokenizer, cfg):
    """The second load reads the cache: the same groups (tags, merged responses and their origin kept),
    the same counts; a pair load of the same file does not take the group cache file."""
    rows = [{"prompt": "Q: hi", "chosen": [" hello", " hi"], "rejected": [" go away", " hello"], "subset": "s1"},
            {"prompt": "Q: yo", "responses": [" a", " b", " c"], "ranking": [2, 0, 1]}]
    path = write(tmp_path / "groups.jsonl", rows)
    config = cfg()
    first, report1, counts1 = load_groups(str(path), tokenizer, config)
    second, report2, counts2 = load_groups(str(path), tokenizer, config)
    assert not report1.cached and report2.cached and counts1 == counts2 and counts1.merged == 1
    assert len(list((tmp_path / "cache").iterdir())) == 1
    a, b = first, second
    assert a.locations == b.locations and a.tags == b.tags == ["s1", None]
    assert [x.tolist() for x in a.prompt] == [x.tolist() for x in b.prompt]
    assert [[r.tolist() for r in rs] for rs in a.responses] == [[r.tolist() for r in rs] for rs in b.responses]
    assert [s.tolist() for s in a.scores] == [s.tolist() for s in b.scores]
    assert [o.tolist() for o in a.origin] == [o.tolist() for o in b.origin] == [[0, 1, 2, 0], [0, 1, 2]]
    np.testing.assert_array_equal(a.weight, b.weight)
    # " hello" chosen and rejected: merged, scored 0.5, between " hi" (1) and " go away" (0): 3 + 3 comparisons
    assert report2.lines()[0] == report1.lines()[0] == "2 rows read, 2 groups kept (6 comparisons); 0 truncated, " \
                                                        "0 dropped, 0 bad"
    pair_path = write(tmp_path / "pairs.jsonl", [{"prompt": "Q: hi", "chosen": " hello", "rejected": " bye"}])
    load_groups(str(pair_path), tokenizer, config)
    load_data(DataConfig(train=[str(pair_path)], cache_dir=config.cache_dir), tokenizer)
    assert len(list((tmp_path / "cache").iterdir())) == 3  # a pair file read as groups and as pairs


# ---------------------------------------------------------------- the other kind, and mappings, named


def test_group_rows_read_as_pairs_name_the_kind_option(tmp_path, tokenizer, cfg):
    path = write(tmp_path / "g.jsonl", generate_groups(5, k=3, seed=0))
    with pytest.raises(DataError) as caught:
        load_data(cfg(train=[str(path)]), tokenizer)
    message = str(caught.value)
    assert "holds groups" in message and "--data.kind groups" in message and len(message.splitlines()) == 1


def test_a_mapped_responses_column_is_named_when_missing():
    row = {"prompt": "Q", "completions": ["a", "b"], "scores": [1, 0]}
    with pytest.raises(BadRow, match="no 'answers' \\(the responses column\\)"):
        parse_group_row("f.jsonl:1", row, columns={"responses": "answers"})


@pytest.mark.parametrize("columns", [["chosen", "good"], {"chosen": 3}, "chosen"])
def test_columns_that_are_not_a_mapping_are_refused_in_one_line(columns):
    with pytest.raises(ValueError, match="columns must be a JSON object"):
        DataConfig(train=["x.jsonl"], columns=columns)
