"""Preference data: sources, formats, bad rows, tokenization cache, length policy, shared prefix."""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from rmfast.data import REASONS, DataConfig, DataError, Source, generate_pairs, load_data, shared_prefix
from rmfast.data import tokenize as tokenize_module
from rmfast.data.tokenizers import train_bpe_tokenizer

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-sample.jsonl.gz"
ROWS = [
    {"prompt": "\n\nHuman: What is 2 plus 2?\n\nAssistant:", "chosen": " 2 plus 2 is 4.",
     "rejected": " 2 plus 2 is 5."},
    {"prompt": "\n\nHuman: Say hi.\n\nAssistant:", "chosen": " Hi!", "rejected": " No.", "margin": 1.5},
]


@pytest.fixture(scope="session")
def tokenizer():
    texts = [r["prompt"] + r["chosen"] for r in generate_pairs(300, style="explicit")]
    if HH.exists():
        texts += [json.loads(line)["chosen"] for line in gzip.open(HH, "rt")]
    return train_bpe_tokenizer(texts, vocab_size=3000)


@pytest.fixture
def cfg(tmp_path):
    def make(*train, **kw):
        kw.setdefault("cache_dir", str(tmp_path / "cache"))
        return DataConfig(train=[str(t) for t in train], **kw)

    return make


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def both_sides(data):
    """Every pair's chosen then rejected sequence, pair by pair."""
    return [data.sequence(i, k) for i in range(len(data)) for k in (0, 1)]


def shared_lengths(data):
    """Tokens each pair's two sequences share (the prompt of its group of two), int64 [n]."""
    return np.array([len(p) for p in data.prompt], np.int64)


def longest_side(data):
    """The longer of each pair's two whole sequences, int64 [n]."""
    return np.array([max(len(data.sequence(i, 0)), len(data.sequence(i, 1))) for i in range(len(data))], np.int64)


def assert_is_shared_prefix(data, i):
    """Pair i's prompt is exactly its two sequences' shared prefix, each keeping a token of its own."""
    c, r = data.sequence(i, 0), data.sequence(i, 1)
    assert len(data.prompt[i]) == shared_prefix(c, r)
    assert list(c[: len(data.prompt[i])]) == list(r[: len(data.prompt[i])]) == list(data.prompt[i])
    assert list(data.scores[i]) == [1.0, 0.0]


# ---------------------------------------------------------------- formats and sources


def test_explicit_rows_keep_prompt_and_margin(tmp_path, tokenizer, cfg):
    train, _, report = load_data(cfg(write(tmp_path / "a.jsonl", ROWS)), tokenizer)
    assert len(train) == 2 and report.pairs == 2
    prompt_ids = tokenizer(ROWS[0]["prompt"])["input_ids"]
    assert list(train.sequence(0, 0)[: len(prompt_ids)]) == prompt_ids
    # the pair's prompt is the shared prefix: at least the prompt's tokens (" 2 plus 2 is" is shared too)
    assert len(train.prompt[0]) >= len(prompt_ids)
    assert list(train.prompt[0][: len(prompt_ids)]) == prompt_ids
    for i in range(len(train)):
        assert_is_shared_prefix(train, i)
    assert np.isnan(train.margin[0]) and train.margin[1] == 1.5
    assert train.locations[1].endswith("a.jsonl:2")


def test_implicit_rows_use_the_shared_prefix_as_prompt(tmp_path, tokenizer, cfg):
    rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in ROWS]
    train, _, _ = load_data(cfg(write(tmp_path / "a.jsonl", rows)), tokenizer)
    for i in range(len(train)):
        assert_is_shared_prefix(train, i)
        prompt_ids = tokenizer(ROWS[i]["prompt"])["input_ids"]
        assert list(train.sequence(i, 0)[: len(prompt_ids)]) == prompt_ids
        assert len(train.prompt[i]) >= len(prompt_ids)
    assert all(shared_lengths(train) > 5)


def test_conversational_rows_render_with_the_chat_template(tmp_path, tokenizer, cfg):
    rows = generate_pairs(5, seed=1)
    train, _, _ = load_data(cfg(write(tmp_path / "c.jsonl", rows)), tokenizer)
    text = tokenizer.decode(train.sequence(0, 0))
    # exactly what apply_chat_template renders (ChatML ends its turn with <|im_end|>\n), nothing after it
    rendered = tokenizer.apply_chat_template(rows[0]["prompt"] + rows[0]["chosen"], tokenize=False)
    assert text == rendered and text.startswith("<s><|im_start|>user\n") and text.endswith("<|im_end|>\n")
    assert train.sequence(0, 0).tolist() == tokenizer.apply_chat_template(rows[0]["prompt"] + rows[0]["chosen"],
                                                                     return_dict=True)["input_ids"]
    prompt = tokenizer.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, tokenize=False)
    # the shared prefix holds the whole rendered prompt (and whatever the two answers also share)
    assert_is_shared_prefix(train, 0)
    assert tokenizer.decode(train.prompt[0]).startswith(prompt)
    prompt_ids = tokenizer.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, return_dict=True)
    assert list(train.sequence(0, 0)[: len(prompt_ids["input_ids"])]) == prompt_ids["input_ids"]
    assert len(train.prompt[0]) >= len(prompt_ids["input_ids"])
    # the convention of runs before it was recorded: EOS after the template's end
    train, _, _ = load_data(cfg(write(tmp_path / "c.jsonl", rows), eos_after_template=True), tokenizer)
    assert tokenizer.decode(train.sequence(0, 0)) == rendered + "</s>"


def test_conversational_without_chat_template_says_how_to_fix(tmp_path, tokenizer, cfg):
    bare = train_bpe_tokenizer(["hello world"] * 10, vocab_size=300, chat_template=None)
    with pytest.raises(ValueError, match="chat template"):
        load_data(cfg(write(tmp_path / "c.jsonl", generate_pairs(3))), bare)


def test_column_mapping(tmp_path, tokenizer, cfg):
    rows = [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in ROWS]
    config = cfg(write(tmp_path / "m.jsonl", rows), columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    train, _, _ = load_data(config, tokenizer)
    prompt_ids = tokenizer(ROWS[0]["prompt"])["input_ids"]  # the prompt came from the "q" column
    assert len(train) == 2 and len(train.prompt[0]) >= len(prompt_ids) > 0
    assert list(train.sequence(0, 0)[: len(prompt_ids)]) == prompt_ids


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "json", "json-object", "csv", "parquet", "folder", "datasets"])
def test_every_source_kind_loads_the_same_pairs(tmp_path, tokenizer, cfg, kind):
    import datasets

    rows = [dict(r, margin=r.get("margin", 0.0)) for r in ROWS]
    if kind == "jsonl":
        path = write(tmp_path / "d.jsonl", rows)
    elif kind == "jsonl.gz":
        path = tmp_path / "d.jsonl.gz"
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    elif kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows, indent=2))
    elif kind == "json-object":
        path = tmp_path / "d.json"
        path.write_text(json.dumps({"data": rows}))
    elif kind == "csv":
        path = tmp_path / "d.csv"
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif kind == "folder":
        path = tmp_path / "folder"
        path.mkdir()
        write(path / "a.jsonl", rows[:1])
        write(path / "b.jsonl", rows[1:])
    else:
        path = tmp_path / "ds"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    train, _, report = load_data(cfg(path), tokenizer)
    assert report.bad == {} and len(train) == 2
    expected = tokenizer(ROWS[1]["prompt"] + ROWS[1]["chosen"])["input_ids"] + [tokenizer.eos_token_id]
    assert list(train.sequence(1, 0)) == expected
    assert list(train.margin) == [0.0, 1.5]


def test_hub_name_without_network_fails_with_advice(tokenizer, cfg, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the libraries read those at import, which an earlier test may have done: without this a lookup that no
    # network answers waits out its retries (20 s)
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="local folder"):
        load_data(cfg("no-such-org/no-such-dataset"), tokenizer)


def test_missing_path_is_reported(tokenizer, cfg):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_data(cfg("/nonexistent/data.jsonl"), tokenizer)


def test_hh_sample_loads_with_no_bad_rows_and_prefix_reaching_last_assistant_turn(tokenizer, cfg):
    if not HH.exists():
        pytest.fail(f"{HH} is missing: the shared data folder must sit beside the repository")
    train, _, report = load_data(cfg(HH, max_length=4096), tokenizer)
    assert report.rows == 1500 and report.pairs == 1500 and not report.bad
    rows = [json.loads(line) for line in gzip.open(HH, "rt")]
    reached = 0
    for i, row in enumerate(rows):
        text = row["chosen"]
        head = text[: text.rindex("\n\nAssistant:") + len("\n\nAssistant:")]
        reached += int(len(train.prompt[i]) >= len(tokenizer(head)["input_ids"]))
    assert reached / len(rows) >= 0.99


# ---------------------------------------------------------------- bad rows

BAD = {
    "malformed_json": ('{"chosen": "a", "rejected": ', "malformed JSON"),
    "missing_field": ('{"chosen": "a"}', "missing field"),
    "null_field": ('{"chosen": "a", "rejected": null}', "null field"),
    "not_text": ('{"chosen": "a", "rejected": 5}', "not a string"),
    "empty_text": ('{"chosen": "  ", "rejected": "b"}', "empty chosen or rejected"),
    "identical": ('{"chosen": "same", "rejected": "same"}', "chosen identical to rejected"),
    "unknown_role": ('{"chosen": [{"role": "wizard", "content": "x"}], '
                     '"rejected": [{"role": "assistant", "content": "y"}]}', "unknown message role"),
    "undecodable": (b'{"chosen": "caf\xe9", "rejected": "b"}', "undecodable bytes"),
    "bad_margin": ('{"chosen": "a", "rejected": "b", "margin": "big"}', "margin is not a finite number"),
}


def bad_file(tmp_path, line):
    good = json.dumps({"chosen": "Human: hi Assistant: hello", "rejected": "Human: hi Assistant: go away"})
    path = tmp_path / "bad.jsonl"
    body = line if isinstance(line, bytes) else line.encode()
    path.write_bytes(good.encode() + b"\n" + body + b"\n" + good.encode() + b"\n")
    return path


@pytest.mark.parametrize("reason", list(BAD))
def test_bad_row_stops_with_file_line_and_reason(tmp_path, tokenizer, cfg, reason):
    line, message = BAD[reason]
    path = bad_file(tmp_path, line)
    with pytest.raises(DataError) as info:
        load_data(cfg(path), tokenizer)
    assert f"{path}:2" in str(info.value) and message in str(info.value)
    assert "--on-bad-row skip" in str(info.value)


@pytest.mark.parametrize("reason", list(BAD))
def test_bad_row_skipped_and_counted(tmp_path, tokenizer, cfg, reason):
    train, _, report = load_data(cfg(bad_file(tmp_path, BAD[reason][0]), on_bad_row="skip"), tokenizer)
    assert len(train) == 2 and report.bad == {reason: 1} and report.rows == 3
    assert any(f"bad ({REASONS[reason]}): 1" in line for line in report.lines())


def test_empty_file_is_a_bad_source(tmp_path, tokenizer, cfg):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty file"):
        load_data(cfg(empty), tokenizer)
    good = write(tmp_path / "good.jsonl", ROWS)
    train, _, report = load_data(cfg(empty, good, on_bad_row="skip"), tokenizer)
    assert len(train) == 2 and report.bad == {"empty_file": 1}


# ---------------------------------------------------------------- cache


def test_second_load_does_no_tokenization(tmp_path, tokenizer, cfg, monkeypatch):
    config = cfg(write(tmp_path / "a.jsonl", generate_pairs(50, style="explicit")))
    first, _, report1 = load_data(config, tokenizer)
    assert not report1.cached

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(tokenize_module, "tokenize_pairs", fail)
    import rmfast.data.loader as loader

    monkeypatch.setattr(loader, "tokenize_pairs_parallel", fail)
    second, _, report2 = load_data(config, tokenizer)
    assert report2.cached
    assert len(first) == len(second) == 50
    assert all(np.array_equal(a, b) for a, b in zip(both_sides(first), both_sides(second)))
    assert np.array_equal(shared_lengths(first), shared_lengths(second)) and first.locations == second.locations
    assert np.array_equal(first.margin, second.margin, equal_nan=True)


def test_several_processes_give_the_same_tokens(tmp_path, tokenizer, cfg):
    path = write(tmp_path / "a.jsonl", generate_pairs(1200, seed=9))
    one, _, _ = load_data(cfg(path, num_proc=1, cache_dir=str(tmp_path / "c1")), tokenizer)
    two, _, _ = load_data(cfg(path, num_proc=2, cache_dir=str(tmp_path / "c2")), tokenizer)
    assert len(one) == len(two) and one.locations == two.locations
    assert np.array_equal(shared_lengths(one), shared_lengths(two))
    assert all(np.array_equal(a, b) for a, b in zip(both_sides(one), both_sides(two)))


def test_cache_is_keyed_by_data_options_and_tokenizer(tmp_path, tokenizer, cfg):
    path = write(tmp_path / "a.jsonl", generate_pairs(20, style="explicit"))
    assert not load_data(cfg(path), tokenizer)[2].cached
    assert load_data(cfg(path), tokenizer)[2].cached
    assert not load_data(cfg(path, max_length=40), tokenizer)[2].cached
    other = train_bpe_tokenizer(["some other text"] * 20, vocab_size=400)
    assert not load_data(cfg(path), other)[2].cached
    write(path, generate_pairs(21, style="explicit"))
    os.utime(path, ns=(1, 10**18))
    train, _, report = load_data(cfg(path), tokenizer)
    assert not report.cached and len(train) == 21


def _mapped(array):
    """Whether a numpy array reads a memory-mapped file (through however many views)."""
    import mmap

    while array is not None and not isinstance(array, mmap.mmap):
        array = array.base
    return array is not None


def test_cached_data_is_memory_mapped_and_shared_not_copied(tmp_path, tokenizer, cfg):
    """A cache entry is read in place: its token arrays are views of the mapped files (every rank of a node maps
    the same pages), and splitting, weighting and mixing sources make new row indices, not copies. The rows
    equal the freshly tokenized ones, as lists and as mapped views alike."""
    a = write(tmp_path / "a.jsonl", generate_pairs(40, style="explicit", seed=1))
    b = write(tmp_path / "b.jsonl", generate_pairs(30, style="explicit", seed=2))
    config = cfg(f"{a}@1.5", b, eval_fraction=0.25)
    uncached, _, _ = load_data(cfg(f"{a}@1.5", b, eval_fraction=0.25, cache_dir=str(tmp_path / "other")), tokenizer)
    train, evals, report = load_data(config, tokenizer)
    assert not report.cached
    again, evals_again, report = load_data(config, tokenizer)
    assert report.cached
    for data in (train, again, evals, evals_again):
        assert all(_mapped(p) for p in data.prompt) and all(_mapped(r) for rs in data.responses for r in rs)
    entry = next(p for p in (tmp_path / "cache").iterdir() if p.is_dir() and json.loads(
        (p / "meta.json").read_text())["source"] == str(a))
    assert {p.name for p in entry.iterdir()} >= {"meta.json", "prompt.npy", "responses.npy"}
    assert len(train) == len(again) == 30 + 15 + 22 and len(evals) == 10 + 8
    for x, y in ((train, again), (evals, evals_again)):
        assert list(x.locations) == list(y.locations) and x.locations == y.locations
        assert all(np.array_equal(p, q) for p, q in zip(both_sides(x), both_sides(y)))
        assert list(x.tags) == [None] * len(x)
    # the same rows as a load that tokenized in memory (its cache in another folder, read back mapped too)
    assert all(np.array_equal(p, q) for p, q in zip(both_sides(uncached), both_sides(again)))
    np.testing.assert_array_equal(uncached.margin, again.margin)


def test_ragged_rows_read_like_lists():
    """The mapped form's row sequences: take (repeats), concat over several parts, nested rows, text, absent
    entries, slices and negative indices give what the same operations on lists give."""
    from rmfast.data.tokens import Ragged, TokenizedGroups

    rng = np.random.default_rng(0)

    def groups(n, seed):
        r = np.random.default_rng(seed)
        return TokenizedGroups([r.integers(0, 50, r.integers(0, 5)).astype(np.int32) for _ in range(n)],
                               [[r.integers(0, 50, r.integers(1, 4)).astype(np.int32) for _ in range(r.integers(2, 5))]
                                for _ in range(n)],
                               [r.random(1).astype(np.float32) for _ in range(n)],
                               locations=[f"f{seed}.jsonl:{i} é" for i in range(n)],
                               tags=[None if i % 3 else f"s{i}" for i in range(n)])

    lists = [groups(7, 1), groups(5, 2)]
    mapped = [TokenizedGroups.of_arrays(g.arrays()) for g in lists]
    assert isinstance(mapped[0].responses, Ragged)
    pick = [rng.integers(0, 12, 20), rng.integers(0, 12, 3)]

    def rows(g):
        return ([p.tolist() for p in g.prompt], [[r.tolist() for r in rs] for rs in g.responses],
                [s.tolist() for s in g.scores], list(g.locations), list(g.tags), [o.tolist() for o in g.origin])

    for idx in pick:
        want = TokenizedGroups.concat(lists).subset(idx)
        got = TokenizedGroups.concat(mapped).subset(idx)
        assert isinstance(got.prompt, Ragged) and len(got.prompt.parts) == 2
        assert rows(got) == rows(want) and got.locations == list(want.locations)
        assert got.tags[-1] == want.tags[-1] and got.prompt[-1].tolist() == want.prompt[-1].tolist()
        assert [x.tolist() for x in got.prompt[1:4]] == [x.tolist() for x in want.prompt[1:4]]
        np.testing.assert_array_equal(got.sizes, want.sizes)  # counted from the offsets, no row built
        for layout in ("padded", "packed", "prefix_shared"):
            np.testing.assert_array_equal(got.lengths(layout), want.lengths(layout))
    with pytest.raises(IndexError):
        mapped[0].prompt[7]
    empty = TokenizedGroups.concat([mapped[0].subset([])])
    assert len(empty) == 0 and list(empty.prompt) == []


def _spoil(kind):
    """Ways a cache entry goes bad: each must be noticed, named once, and the data tokenized again."""
    def spoil(root):
        entry = next(p for p in root.iterdir() if p.is_dir())
        meta = entry / "meta.json"
        if kind == "truncated metadata":
            meta.write_text(meta.read_text()[:25])
        elif kind == "truncated data":
            data = entry / "responses.npy"
            data.write_bytes(data.read_bytes()[:200])
        elif kind == "a missing array":
            (entry / "origin.npy").unlink()
        else:
            name = "responses_offsets" if kind == "offsets out of range" else "responses"
            array = np.load(entry / f"{name}.npy")
            if kind == "offsets out of range":
                array[-1] += 1000
            else:  # ids out of range
                array[3] = 10**6
            np.save(entry / f"{name}.npy", array)
    return spoil


@pytest.mark.parametrize("kind", ["truncated metadata", "truncated data", "a missing array", "offsets out of range",
                                  "ids out of range"])
def test_a_bad_cache_entry_is_named_once_and_tokenized_again(tmp_path, tokenizer, cfg, capsys, kind, monkeypatch):
    import rmfast.data.loader as loader

    monkeypatch.setattr(loader, "_WARNED", set())
    config = cfg(write(tmp_path / "a.jsonl", generate_pairs(30, style="explicit")))
    first, _, _ = load_data(config, tokenizer)
    first = [np.array(x) for x in both_sides(first)]  # copied: the test spoils the files it maps in place
    _spoil(kind)(tmp_path / "cache")
    capsys.readouterr()
    again, _, report = load_data(config, tokenizer)
    err = capsys.readouterr().err
    assert not report.cached and err.count("tokenization cache") == 1 and str(tmp_path / "cache") in err
    assert "RMFAST_CACHE" in err and "data.cache_dir" in err
    assert len(first) == 60 and len(again) == 30
    assert all(np.array_equal(a, b) for a, b in zip(first, both_sides(again)))
    assert load_data(config, tokenizer)[2].cached  # written again, whole


@pytest.mark.parametrize("kind", ["a file", "full disk"])
def test_a_cache_that_cannot_be_written_never_stops_loading(tmp_path, tokenizer, cfg, capsys, kind, monkeypatch):
    import errno

    import rmfast.data.loader as loader

    monkeypatch.setattr(loader, "_WARNED", set())
    path = write(tmp_path / "a.jsonl", generate_pairs(30, style="explicit"))
    if kind == "a file":
        (tmp_path / "cache").write_text("not a folder")
    else:
        def full(file, array, allow_pickle=True):
            Path(file).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(np, "save", full)
    for _ in range(2):
        train, _, report = load_data(cfg(path, eval_fraction=0.0), tokenizer)
        assert len(train) == 30 and not report.cached
    err = capsys.readouterr().err
    assert err.count("tokenization cache") == 1 and "going on without the cache" in err
    if kind == "full disk":  # no partial file left behind for a later run to read
        assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == []


# ---------------------------------------------------------------- length policy and shared prefix


def test_eos_is_appended_once(tmp_path, tokenizer, cfg):
    rows = [{"chosen": "a b c</s>", "rejected": "a b d"}]
    train, _, _ = load_data(cfg(write(tmp_path / "e.jsonl", rows)), tokenizer)
    eos = tokenizer.eos_token_id
    for ids in (train.sequence(0, 0), train.sequence(0, 1)):
        assert ids[-1] == eos and list(ids).count(eos) == 1


def test_truncation_cuts_prompt_from_the_left_first(tokenizer):
    policy = tokenize_module.LengthPolicy(max_length=12, min_prompt_tokens=3)
    bos, eos = 1, 2
    prompt = [bos] + list(range(100, 110))  # 11 prompt tokens
    c, r = prompt + [7, 8, eos], prompt + [9, eos]
    c2, r2, p2, truncated = tokenize_module.fit_length(c, r, 11, policy, bos)
    assert truncated and len(c2) == 12 and c2[0] == bos and c2[-1] == eos
    assert c2[-3:] == [7, 8, eos] and r2[-2:] == [9, eos]  # responses untouched
    assert c2[:p2] == r2[:p2] and p2 == 9


def test_truncation_then_cuts_responses_from_the_right_keeping_eos(tokenizer):
    policy = tokenize_module.LengthPolicy(max_length=10, min_prompt_tokens=3)
    bos, eos = 1, 2
    prompt = [bos, 100, 101, 102, 103]
    c, r = prompt + list(range(20, 30)) + [eos], prompt + [5, eos]
    c2, r2, p2, truncated = tokenize_module.fit_length(c, r, 5, policy, bos)
    assert c2 == [bos, 101, 102, 103, 20, 21, 22, 23, 24, eos]  # prompt kept 3 (+BOS), then right cut
    assert r2 == [bos, 101, 102, 103, 5, eos] and p2 == 4


def test_overlong_pairs_dropped_by_flag_and_counted(tmp_path, tokenizer, cfg):
    rows = generate_pairs(40, style="explicit", seed=3)
    path = write(tmp_path / "l.jsonl", rows)
    full, _, _ = load_data(cfg(path, max_length=4096), tokenizer)
    limit = int(np.median(longest_side(full)))
    over = int(np.sum(longest_side(full) > limit))
    dropped, _, report = load_data(cfg(path, max_length=limit, overlong="drop"), tokenizer)
    assert len(dropped) == 40 - over and report.dropped == {"too_long": over}
    kept, _, report = load_data(cfg(path, max_length=limit, min_prompt_tokens=4), tokenizer)
    assert len(kept) == 40 and report.truncated == over
    assert over > 0 and longest_side(kept).max() <= limit
    assert all(ids[-1] == tokenizer.eos_token_id for ids in both_sides(kept))


def test_truncation_that_leaves_identical_sides_drops_the_pair(tmp_path, tokenizer, cfg):
    late = {"prompt": "Q:", "chosen": " one two three four five six seven eight nine ten A",
            "rejected": " one two three four five six seven eight nine ten B"}
    early = {"prompt": "Q:", "chosen": " yes", "rejected": " no"}
    train, _, report = load_data(cfg(write(tmp_path / "i.jsonl", [late, early]), max_length=6,
                                     min_prompt_tokens=1), tokenizer)
    assert len(train) == 1 and report.dropped == {"identical_after_truncation": 1}
    with pytest.raises(DataError, match="no training pairs"):
        load_data(cfg(write(tmp_path / "j.jsonl", [late]), max_length=6, min_prompt_tokens=1), tokenizer)


@pytest.mark.parametrize("a,b,expected", [
    ([1, 2, 3, 4], [1, 2, 3, 5], 3),
    ([1, 2, 3], [1, 2, 3, 4, 5], 2),  # one side is a prefix of the other: it keeps its last token
    ([1, 2], [1, 2], 1),
    ([7], [8, 9], 0),
    ([5, 6], [5], 0),
])
def test_shared_prefix_leaves_each_side_a_token(a, b, expected):
    assert shared_prefix(a, b) == expected


# ---------------------------------------------------------------- mixing, split, synthetic data, CLI


def test_source_weights_and_seeded_eval_split(tmp_path, tokenizer, cfg):
    a = write(tmp_path / "a.jsonl", generate_pairs(40, style="explicit", seed=1))
    b = write(tmp_path / "b.jsonl", generate_pairs(40, style="explicit", seed=2))
    train, _, _ = load_data(cfg(f"{a}@2", f"{b}@0.5"), tokenizer)
    assert len(train) == 80 + 20
    assert Source.parse(f"{a}@0.25") == Source(str(a), 0.25)
    t1, e1, _ = load_data(cfg(a, eval_fraction=0.25, seed=5), tokenizer)
    t2, e2, _ = load_data(cfg(a, eval_fraction=0.25, seed=5), tokenizer)
    assert len(e1) == 10 and len(t1) == 30 and e1.locations == e2.locations
    assert not set(e1.locations) & set(t1.locations)
    _, e3, _ = load_data(cfg(a, eval_fraction=0.25, seed=6), tokenizer)
    assert e3.locations != e1.locations


def test_eval_from_its_own_source(tmp_path, tokenizer, cfg):
    a = write(tmp_path / "a.jsonl", generate_pairs(10, style="explicit", seed=1))
    b = write(tmp_path / "b.jsonl", generate_pairs(4, style="explicit", seed=2))
    train, ev, _ = load_data(DataConfig(train=[str(a)], eval=[str(b)], cache_dir=str(tmp_path / "c")), tokenizer)
    assert len(train) == 10 and len(ev) == 4


@pytest.mark.parametrize("style", ["conversational", "explicit", "implicit"])
def test_synthetic_pairs_are_decidable_from_the_text(style):
    rows = generate_pairs(200, seed=7, style=style)
    assert rows == generate_pairs(200, seed=7, style=style) and rows != generate_pairs(200, seed=8, style=style)
    for row in rows:
        if style == "conversational":
            chosen, rejected = row["chosen"][-1]["content"], row["rejected"][-1]["content"]
        elif style == "explicit":
            chosen, rejected = row["chosen"], row["rejected"]
        else:  # the final answer follows the last "Assistant:"
            chosen, rejected = (row[k].rsplit("Assistant:", 1)[1] for k in ("chosen", "rejected"))
        expr, result = chosen.rsplit("=", 1) if "=" in chosen else chosen.rsplit(" is ", 1)
        a, op, b = expr.split()[-3:]
        assert op == "plus" and int(result.strip(" .")) == int(a) + int(b)
        assert rejected != chosen
    prompt_turns = [len(r["prompt"]) for r in generate_pairs(200, seed=7)]
    assert min(prompt_turns) == 1 and max(prompt_turns) == 7


def test_rmfast_data_cli_synth_and_inspect(tmp_path, capsys):
    from rmfast.data import cli as data_cli

    out = tmp_path / "syn.jsonl"
    assert data_cli.main(["synth", "--pairs", "60", "--out", str(out)]) == 0
    bad = bad_file(tmp_path, BAD["identical"][0])
    capsys.readouterr()
    status = data_cli.main(["inspect", str(out), str(bad), "--cache-dir", str(tmp_path / "c"), "--strict",
                            "--vocab-size", "500"])
    res = capsys.readouterr()
    assert status == 2 and "--strict: 1 bad row(s)" in res.err, res.err
    assert "60 rows read, 60 pairs kept" in res.out
    assert "bad (chosen identical to rejected): 1" in res.out and f"{bad}:2" in res.out
    assert "shared prefix:" in res.out and "token positions per pair" in res.out


def test_every_tool_reads_rows_with_the_same_data_options(tmp_path, capsys):
    """rmfast-data inspect takes --columns as rmfast-score and rmfast-train do, and the three share one
    default for every data option."""
    import argparse

    from rmfast import score
    from rmfast.data import cli as data_cli
    from rmfast.data.loader import DataConfig

    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({"q": f"2 + {i} =", "good": f" {2 + i}", "bad": f" {3 + i}"}) + "\n"
                               for i in range(12)))
    tok = tmp_path / "tok"
    from rmfast.data.tokenizers import train_bpe_tokenizer

    train_bpe_tokenizer([f"2 + {i} = {i}" for i in range(50)], vocab_size=120).save_pretrained(tok)
    argv = ["inspect", str(renamed), "--tokenizer", str(tok), "--cache-dir", str(tmp_path / "c")]
    assert data_cli.main(argv + ["--columns", '{"prompt": "q", "chosen": "good", "rejected": "bad"}']) == 0
    assert "12 rows read, 12 pairs kept" in capsys.readouterr().out
    assert data_cli.main(argv + ["--strict"]) == 2  # without the mapping every row is bad

    def defaults(parser_of):
        actions = {a.dest: a.default for a in parser_of._actions}
        return {k: actions[k] for k in ("format", "max_length", "overlong", "chat_template", "columns")}

    score_parser, inspect_parser = argparse.ArgumentParser(), argparse.ArgumentParser()
    from rmfast.data.options import add_data_options

    add_data_options(score_parser, ["pairs", "groups", "texts"])
    add_data_options(inspect_parser, ["pairs", "groups"])
    d = DataConfig()
    assert defaults(score_parser) == defaults(inspect_parser) == {
        "format": d.format, "max_length": d.max_length, "overlong": d.overlong, "chat_template": None, "columns": {}}
    for main in (score.main, data_cli.main):  # the tools' own --help
        with pytest.raises(SystemExit):
            main(["--help"] if main is score.main else ["inspect", "--help"])
        shown = " ".join(capsys.readouterr().out.split())
        assert "--columns" in shown and f"(default: {d.max_length}, as rmfast-train)" in shown


def test_a_hub_dataset_by_its_full_name(tokenizer, cfg, monkeypatch):
    """org/name?split=…&name=…&revision=… reaches datasets.load_dataset as split, configuration and revision
    (allenai/reward-bench-2 has only a test split), and the revision is part of the cache key; a plain
    org/name keeps the fingerprint it always had."""
    import datasets

    from rmfast.data import sources

    calls = []

    def load_dataset(repo, **kw):
        calls.append((repo, kw))
        return [{"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    spec = "allenai/reward-bench-2?split=test&name=default&revision=abc123"
    train, _, report = load_data(cfg(spec), tokenizer)
    assert len(train) == 1 and calls == [("allenai/reward-bench-2", {"split": "test", "name": "default",
                                                                     "revision": "abc123"})]
    assert train.locations[0] == "allenai/reward-bench-2[test]#row 1"
    assert sources.fingerprint(spec) != sources.fingerprint(spec.replace("abc123", "def456"))
    assert sources.fingerprint("org/data") == "hub:org/data:train"  # as recorded by earlier runs
    with pytest.raises(ValueError, match="unknown option 'splt'; a hub name takes split, name, revision"):
        load_data(cfg("org/data?splt=test"), tokenizer)


def test_bare_hub_model_ids_are_taken_and_paths_that_are_no_folder_refused():
    from rmfast.engine import check_model_path

    for ok in ("gpt2", "Qwen/Qwen3-0.6B"):
        check_model_path(ok, "--model.name_or_path")
    for bad in ("./missing", "/no/such/model", "a/b/c"):
        with pytest.raises(ValueError, match="no such folder"):
            check_model_path(bad, "--model.name_or_path")


def test_parquet_is_read_in_batches_not_whole(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rmfast.data import sources

    rows = [{"prompt": f"q{i}", "chosen": f" a{i}", "rejected": f" b{i}"} for i in range(20000)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet", row_group_size=3000)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("the whole table was read"))
    seen = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        for batch in real(self, *args, **kwargs):
            seen.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    got = list(sources.iter_rows(str(tmp_path / "x.parquet")))
    assert [r.data for r in got] == rows
    assert got[0].location.endswith("x.parquet:row 1") and got[-1].location.endswith("x.parquet:row 20000")
    assert len(seen) > 1 and max(seen) <= 8192


def test_data_is_tokenized_once_per_node():
    # global rank 0 first; then the first rank of every other node (its cache may be node-local); then the rest
    from rmfast.engine import load_phase

    ranks = [(r, r % 4) for r in range(8)]  # two nodes of four
    assert [load_phase(r, local) for r, local in ranks] == [0, 2, 2, 2, 1, 2, 2, 2]
