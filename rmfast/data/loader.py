"""Loading preference data end to end: read → validate → render → tokenize (cached) → mix → split.

Bad rows: with ``on_bad_row="error"`` (the default) loading stops before training with every bad row's
``file:line`` and reason (the first few listed, all counted); with ``"skip"`` they are skipped and counted
by reason in the returned report, which the caller prints before training starts."""

import functools
import hashlib
import json
import os
import shutil
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from . import sources
from .formats import FORMATS, REASONS, BadRow, parse_row
from .group_tokens import GroupCounts, tokenize_groups
from .groups import parse_group_row, source_kind
from .tokenize import LengthPolicy, tokenize_pairs_parallel
from .tokens import TokenizedGroups, read_arrays
from ..errors import UserError

CACHE_VERSION = 4  # 2: no pickled arrays; 3: pairs and groups in one form; 4: a folder of .npy, memory-mapped
BAD_ROW_MODES = ("error", "skip")


class DataError(UserError):
    """Bad input found before training: the message lists where and why."""


@dataclass
class Source:
    """One data source. path: file, folder, `datasets` directory or hub name. weight: how much of it to
    use — 1 all of it, 0.5 a seeded half, 2 all of it twice."""

    path: str
    weight: float = 1.0
    split: str = "train"

    @staticmethod
    def parse(spec):
        """'PATH' or 'PATH@WEIGHT' (e.g. data/hh.jsonl@0.5)."""
        if isinstance(spec, Source):
            return spec
        if isinstance(spec, dict):
            return Source(**spec)
        path, _, weight = str(spec).rpartition("@") if "@" in str(spec) else (str(spec), "", "")
        try:
            return Source(path, float(weight) if weight else 1.0)
        except ValueError:
            return Source(str(spec))


@dataclass
class DataConfig:
    train: list = field(default_factory=list)
    eval: list = field(default_factory=list)
    eval_fraction: float = 0.0  # a seeded split of train when no eval source is given
    format: str = "auto"
    columns: dict = field(default_factory=dict)
    max_length: int = 1024
    overlong: str = "truncate"
    min_prompt_tokens: int = 16
    chat_template: Optional[str] = None
    on_bad_row: str = "error"
    cache_dir: Optional[str] = None  # default: ~/.cache/rmfast/tokenized (RMFAST_CACHE overrides)
    seed: int = 0
    num_proc: int = 0  # tokenization processes; 0: several from 20,000 pairs up, else one
    eos_after_template: bool = False  # see LengthPolicy
    attributes: list = field(default_factory=list)  # attribute columns (a number per response); rows read as groups

    def __post_init__(self):
        if self.format not in FORMATS:
            raise UserError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.on_bad_row not in BAD_ROW_MODES:
            raise UserError(f"on_bad_row must be one of {', '.join(BAD_ROW_MODES)}, got {self.on_bad_row!r}")
        if not isinstance(self.columns, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                         for k, v in self.columns.items()):
            raise UserError(f"columns must be a JSON object from rmfast's column names to yours, e.g. "
                            f"{{\"chosen\": \"good\", \"responses\": \"answers\"}}; got {self.columns!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise UserError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if not isinstance(self.attributes, list) or not all(isinstance(a, str) and a for a in self.attributes) \
                or len(set(self.attributes)) != len(self.attributes):
            raise UserError(f"attributes must be distinct column names, e.g. helpfulness correctness; got "
                            f"{self.attributes!r}")
        if self.chat_template and os.path.isfile(self.chat_template):
            self.chat_template = Path(self.chat_template).read_text()

    def policy(self):
        return LengthPolicy(self.max_length, self.overlong, self.min_prompt_tokens, self.eos_after_template)


@dataclass
class DataReport:
    """What loading found: rows read, bad rows by reason (with examples), truncated and dropped pairs."""

    rows: int = 0
    pairs: int = 0
    bad: Counter = field(default_factory=Counter)
    bad_examples: list = field(default_factory=list)
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    cached: bool = False
    groups: Optional[Counter] = None  # group sources: groups, comparisons, ties, merged, responses_dropped
    ties: int = 0  # pair rows marked as ties

    def merge(self, other):
        self.rows += other.rows
        self.pairs += other.pairs
        self.bad.update(other.bad)
        self.bad_examples += other.bad_examples[: max(0, 10 - len(self.bad_examples))]
        self.truncated += other.truncated
        self.dropped.update(other.dropped)
        self.cached = self.cached and other.cached
        self.ties += other.ties
        if other.groups is not None:
            self.groups = (self.groups or Counter()) + other.groups + Counter()  # + Counter(): keeps zeros out

    def lines(self):
        tail = f"{self.truncated} truncated, {sum(self.dropped.values())} dropped, {sum(self.bad.values())} bad"
        if self.groups is None:
            out = [f"{self.rows} rows read, {self.pairs} pairs kept; {tail}"]
        else:
            g = self.groups
            out = [f"{self.rows} rows read, {g['groups']} groups kept ({self.pairs} comparisons); {tail}",
                   f"{g['ties']} tied response pairs (no comparison), {g['merged']} identical responses merged, "
                   f"{g['responses_dropped']} responses dropped as too long"]
            if g["attribute_values"] or g["attribute_missing"]:
                out.append(f"attributes: {g['attribute_values']} values read, {g['attribute_missing']} missing "
                           f"(masked in the loss)")
        if self.ties:
            out.append(f"{self.ties} of the pairs are ties (the davidson objective trains on them; the others set "
                       f"them aside)")
        for reason, n in sorted(self.dropped.items()):
            out.append(f"  dropped ({reason.replace('_', ' ')}): {n}")
        for reason, n in self.bad.most_common():
            out.append(f"  bad ({REASONS[reason]}): {n}")
        return out


def cache_root(config: DataConfig):
    if config.cache_dir:
        return Path(config.cache_dir)
    return Path(os.environ.get("RMFAST_CACHE", Path.home() / ".cache" / "rmfast")) / "tokenized"


def tokenizer_fingerprint(tokenizer):
    """Identifies what the tokenizer does: its full serialized model and special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer)).encode())
    h.update(json.dumps({"cls": type(tokenizer).__name__, "bos": tokenizer.bos_token_id,
                         "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
                         "template": getattr(tokenizer, "chat_template", None)}, sort_keys=True).encode())
    return h.hexdigest()


def _cache_key(source: Source, tokenizer_fp, config: DataConfig, kind="pairs"):
    ignored = ("train", "eval", "eval_fraction", "cache_dir", "seed", "num_proc")  # they don't change the tokens
    options = {k: v for k, v in asdict(config).items() if k not in ignored}
    payload = {"version": CACHE_VERSION, "data": sources.fingerprint(source.path, source.split),
               "tokenizer": tokenizer_fp, "options": options}
    if kind != "pairs":
        payload["kind"] = kind
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def read_pairs(source: Source, config: DataConfig):
    """Read and validate one source. Returns (pairs, report) — bad rows are counted, never silently lost.
    Group rows (a prompt with K responses) read as pairs are named as such, with the option that reads them."""
    pairs, report = read_rows(source, config, parse_row)
    if report.bad["missing_field"] and (not pairs or config.on_bad_row == "error"):
        if source_kind(source.path, source.split, config.columns) == "groups":
            raise DataError(f"{source.path} holds groups (a prompt with several responses), not pairs: train on it "
                            f"with --data.kind groups (data.kind: groups in a config)")
    return pairs, report


def read_rows(source: Source, config: DataConfig, parse):
    """Read one source's rows through parse(location, data, format, columns), which raises BadRow for a
    bad one. Returns (parsed rows, DataReport) — bad rows are counted with file:line and reason."""
    report = DataReport()
    pairs = []
    for raw in sources.iter_rows(source.path, source.split):
        if raw.reason != "empty_file":
            report.rows += 1
        try:
            if raw.reason:
                raise BadRow(raw.reason, raw.detail)
            pairs.append(parse(raw.location, raw.data, config.format, config.columns))
        except BadRow as bad:
            report.bad[bad.reason] += 1
            if len(report.bad_examples) < 10:
                report.bad_examples.append(f"{raw.location}: {bad}")
    return pairs, report


def load_source(source: Source, tokenizer, config: DataConfig, tokenizer_fp=None, progress=True, kind="pairs"):
    """One source, its rows read as pairs or groups (`kind`, what the rows are) and tokenized into the one
    form, TokenizedGroups (a pair is a group of two; the report's `groups` holds group counts); from the
    on-disk cache when the same data, tokenizer and options were seen. Returns (TokenizedGroups, DataReport)."""
    tokenize_source = tokenize_group_source if kind == "groups" else _tokenize_pair_source
    tokenizer_fp = tokenizer_fp or tokenizer_fingerprint(tokenizer)
    root = cache_root(config)
    key = _cache_key(source, tokenizer_fp, config, kind)
    entry, stale = root / key, False
    if entry.is_dir():
        try:
            tokenized, report = _read_entry(entry, len(tokenizer))
        except (ValueError, OSError, KeyError, TypeError, EOFError) as exc:
            cache_warning(root, f"ignoring its entry {key} ({type(exc).__name__}: {exc}) and tokenizing again")
            # a bad entry is replaced; one that could not be read for now (too many open files, no memory
            # to map it) is left to the runs that can read it
            stale = not isinstance(exc, OSError) or isinstance(exc, (FileNotFoundError, EOFError))
        else:
            _check_bad(report, config, source.path)
            return tokenized, report
    tokenized, report = tokenize_source(source, tokenizer, config, progress)
    meta = {"source": source.path, "rows": report.rows, "pairs": report.pairs, "bad": dict(report.bad),
            "bad_examples": report.bad_examples, "truncated": report.truncated, "dropped": dict(report.dropped),
            "groups": dict(report.groups) if report.groups is not None else None, "ties": report.ties}
    try:  # one folder renamed into place: a reader sees the whole entry or none of it; a cache is optional
        root.mkdir(parents=True, exist_ok=True)
        if stale:
            shutil.rmtree(entry)
        tokenized.save(entry, extra={META: json.dumps(meta, indent=1)})
    except OSError as exc:
        cache_warning(root, f"cannot write to it ({exc.strerror or exc})")
        return tokenized, report
    try:  # read back memory-mapped: this rank then holds the data as the others will, in pages they share
        return _read_entry(entry, len(tokenizer))[0], report
    except (ValueError, OSError, KeyError, TypeError, EOFError):
        return tokenized, report


META = "meta.json"


def _read_entry(entry, vocab):
    """(TokenizedGroups memory-mapped from a cache folder, DataReport); ValueError & co. for a bad entry."""
    meta = json.loads((entry / META).read_text())
    report = DataReport(meta["rows"], meta["pairs"], Counter(meta["bad"]), meta["bad_examples"],
                        meta["truncated"], Counter(meta["dropped"]), cached=True,
                        groups=Counter(meta["groups"]) if meta.get("groups") is not None else None,
                        ties=meta.get("ties", 0))
    arrays = read_arrays(entry)
    check_cache_arrays(arrays, vocab)
    return TokenizedGroups.of_arrays(arrays), report


_WARNED = set()


def cache_warning(root, what):
    """One line per cache folder and process: a cache problem never stops a run."""
    if str(root) in _WARNED:
        return
    _WARNED.add(str(root))
    print(f"rmfast: tokenization cache {root}: {what}; going on without the cache (choose another folder with "
          f"data.cache_dir / --cache-dir or RMFAST_CACHE)", file=sys.stderr)


def check_cache_arrays(arrays, vocab):
    """A cache file's arrays agree on how many groups they hold, with token ids below `vocab` and offsets
    that stay inside their arrays; ValueError naming the first array that does not (a truncated or foreign
    file)."""
    counts = {}
    for name in ("prompt", "responses", "scores", "origin", "locations", "tags"):
        data, offsets = arrays[name], arrays[f"{name}_offsets"]
        if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(data) \
                or np.any(np.diff(offsets) < 0):
            raise ValueError(f"{name}_offsets do not index {name}")
        counts[name] = len(offsets) - 1
        if name in ("prompt", "responses") and len(data) and (data.min() < 0 or data.max() >= vocab):
            raise ValueError(f"{name} holds token ids outside the tokenizer's {vocab}")
    for name in ("sizes", "weight", "margin", "tagged"):
        counts[name] = len(arrays[name])
    width = int(arrays["attributes_width"][0]) if len(arrays["attributes_width"]) == 1 else None
    if width is None:
        raise ValueError("attributes_width is not one number")
    if width >= 0:
        offsets = arrays["attributes_offsets"]
        if offsets.ndim != 1 or len(offsets) != len(arrays["sizes"]) + 1 or offsets[0] != 0 \
                or offsets[-1] != len(arrays["attributes"]) or np.any(np.diff(offsets) != arrays["sizes"] * width):
            raise ValueError("attributes_offsets do not index attributes")
    sizes, n = arrays["sizes"], counts["prompt"]
    if not all(counts[k] == n for k in ("sizes", "weight", "margin", "locations", "tags", "tagged", "scores",
                                         "origin")) \
            or int(sizes.sum()) != counts["responses"] or np.any(sizes < 0) \
            or np.any(np.diff(arrays["scores_offsets"]) != sizes):
        raise ValueError(f"array lengths {counts} disagree with each other")


def progress_bar(progress, total, name, unit):
    """A tqdm bar for tokenizing `total` rows of `name` (None without progress; hidden off a terminal and
    under 2,000 rows)."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"tokenizing {Path(name).name}", unit=unit,
                disable=not sys.stderr.isatty() or total < 2000)


def _tokenize_pair_source(source: Source, tokenizer, config: DataConfig, progress=True):
    """Read, validate and tokenize one source of pairs (no cache). Returns (TokenizedGroups of two,
    DataReport)."""
    pairs, report = read_pairs(source, config)
    _check_bad(report, config, source.path)
    bar = progress_bar(progress, len(pairs), source.path, "pair")
    num_proc = config.num_proc or (min(8, os.cpu_count() or 1) if len(pairs) >= 20000 else 1)
    tokenized, counts = tokenize_pairs_parallel(pairs, tokenizer, config.policy(), config.chat_template, num_proc, bar)
    if bar is not None:
        bar.close()
    report.pairs = len(tokenized)
    report.truncated = counts["truncated"]
    report.ties = counts["ties"]
    report.dropped = Counter({k[len("dropped_"):]: v for k, v in counts.items() if k.startswith("dropped_") and v})
    return tokenized, report


def _check_bad(report: DataReport, config: DataConfig, name):
    if not report.bad or config.on_bad_row == "skip":
        return
    total = sum(report.bad.values())
    listing = "\n".join(f"  {e}" for e in report.bad_examples)
    more = f"\n  … and {total - len(report.bad_examples)} more" if total > len(report.bad_examples) else ""
    counts = ", ".join(f"{REASONS[r]}: {n}" for r, n in report.bad.most_common())
    raise DataError(f"{name}: {total} bad row(s) ({counts}):\n{listing}{more}\n"
                    f"Fix them, or skip them (they are counted and reported): rmfast-train --data.on_bad_row skip, "
                    f"rmfast-score --on-bad-row skip.")


def _weighted(data, weight, rng):
    """`data` (TokenizedGroups) repeated `weight` times: whole copies, then a seeded share of one more."""
    if weight < 0:
        raise UserError(f"a source weight must be ≥ 0, got {weight}")
    whole = int(weight)
    idx = [np.arange(len(data))] * whole
    frac = weight - whole
    if frac > 0:
        idx.append(np.sort(rng.permutation(len(data))[: int(round(frac * len(data)))]))
    return data.subset(np.concatenate(idx) if idx else np.zeros(0, np.int64))


def load_data(config: DataConfig, tokenizer, progress=True, kind="pairs"):
    """Train and eval data for a config, its rows read as pairs or groups (`kind`) into the one tokenized form
    (TokenizedGroups), each source cached, weighted (PATH@WEIGHT) and split (eval sources, else a seeded
    eval_fraction of each train source). Returns (train, eval or None, DataReport)."""
    if not config.train:
        raise UserError("no training data: give at least one source (a file, folder, datasets dir or hub name)")
    if config.attributes:
        kind = "groups"  # attribute rows: a prompt and one or more responses
    cls = TokenizedGroups
    rng = np.random.default_rng(config.seed)
    tokenizer_fp = tokenizer_fingerprint(tokenizer)
    report = DataReport(cached=True)
    train_parts, eval_parts = [], []
    for spec in config.train:
        source = Source.parse(spec)
        data, rep = load_source(source, tokenizer, config, tokenizer_fp, progress, kind)
        report.merge(rep)
        if config.eval_fraction and not config.eval:
            order = rng.permutation(len(data))
            n_eval = int(round(config.eval_fraction * len(data)))
            eval_parts.append(data.subset(np.sort(order[:n_eval])))
            data = data.subset(np.sort(order[n_eval:]))
        train_parts.append(_weighted(data, source.weight, rng))
    for spec in config.eval:
        data, rep = load_source(Source.parse(spec), tokenizer, config, tokenizer_fp, progress, kind)
        report.merge(rep)
        eval_parts.append(data)
    train = cls.concat(train_parts)
    if len(train) == 0:
        raise DataError(f"no training {kind} left after validation and the length policy:\n" +
                        "\n".join(report.lines()))
    if config.attributes and train.attributes is not None \
            and not any(np.isfinite(np.asarray(a)).any() for a in train.attributes):
        first = Source.parse(config.train[0])
        row = next((r.data for r in sources.iter_rows(first.path, first.split) if isinstance(r.data, dict)), {})
        raise DataError(f"no values of the attribute columns {', '.join(config.attributes)} in the training data "
                        f"(every one is missing); the rows of {first.path} have the columns {', '.join(row)}: name "
                        f"yours with --data.attributes, or map them with --data.columns '{{\"NAME\": \"yours\"}}'")
    return train, (cls.concat(eval_parts) if eval_parts else None), report


def read_groups(source, config):
    """Read and validate one source's group rows (rmfast.data.loader.Source, DataConfig: format, columns,
    attributes: with attribute columns a row needs no order, and one response is a group of one). Returns
    (groups, DataReport) — bad rows are counted with file:line and reason, never silently lost."""
    if not config.attributes:
        return read_rows(source, config, parse_group_row)
    return read_rows(source, config, functools.partial(parse_group_row, preference=False,
                                                       attributes=tuple(config.attributes)))


def tokenize_group_source(source, tokenizer, config, progress=True):
    """Read, validate and tokenize one source of groups (no cache; rmfast.data.loader.load_source caches
    it). Returns (TokenizedGroups, DataReport with its `groups` counts)."""
    groups, report = read_groups(source, config)
    _check_bad(report, config, source.path)
    bar = progress_bar(progress, len(groups), source.path, "group")
    tokenized, counts = tokenize_groups(groups, tokenizer, config.policy(), config.chat_template, progress=bar,
                                        scoring=bool(config.attributes))
    if bar is not None:
        bar.close()
    report.pairs = counts.comparisons
    report.truncated = counts.truncated
    report.dropped.update(counts.dropped)
    report.groups = Counter(groups=counts.groups, comparisons=counts.comparisons, ties=counts.ties,
                            merged=counts.merged, responses_dropped=counts.dropped_responses_too_long)
    if tokenized.attributes is not None:
        values = np.concatenate([a.reshape(-1) for a in tokenized.attributes]) if len(tokenized) else np.zeros(0)
        report.groups["attribute_values"] = int(np.isfinite(values).sum())
        report.groups["attribute_missing"] = int((~np.isfinite(values)).sum())
    return tokenized, report


def load_groups(source, tokenizer, config, progress=True):
    """One source of group rows, validated (on_bad_row as for pairs: error stops with file:line and reason)
    and tokenized, from the cache when seen before. Returns (TokenizedGroups, DataReport, GroupCounts)."""
    tokenized, report = load_source(Source.parse(source), tokenizer, config, progress=progress, kind="groups")
    g = report.groups
    counts = GroupCounts(g["groups"], g["comparisons"], g["ties"], g["merged"], report.truncated,
                         g["responses_dropped"], dict(report.dropped))
    return tokenized, report, counts
