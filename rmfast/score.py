"""rmfast-score: score data with a trained (exported) reward model.

  rmfast-score MODEL_DIR pairs.jsonl --out scores.jsonl        # pairs: rewards, margin, accuracy
  rmfast-score MODEL_DIR groups.jsonl --out scores.jsonl       # groups: a reward per response, the best one
  rmfast-score MODEL_DIR texts.jsonl --out scores.parquet      # rows with a `text` (or `messages`) field

Pairs and groups are read like training data (same formats, checks and --on-bad-row) and scored with the
prefix-shared layouts: a group's prompt is computed once for all its responses. A group row is a prompt
and N responses (`responses`, with `scores` or a `ranking` when known; RewardBench 2's `chosen` / `rejected`
lists; UltraFeedback with --columns ultrafeedback); with scores or a ranking, comparison accuracy, top-1,
Kendall tau and best-of-N credit are reported, per `subset` too; RewardBench, RewardBench 2 and RM-Bench
rows also get the leaderboard's own numbers (--benchmark; rmfast.leaderboards). Single sequences are
packed. Batches hold up to --token-budget tokens. --normalize subtracts the export's eval reward mean and
divides by its std.
"""

import argparse
import functools
import json
import sys
from pathlib import Path

import numpy as np
import torch

from . import attention, layouts
from .data import DataError, load_data
from .data.groups import source_kind
from .data.loader import Source
from .data.options import add_data_options, data_config
from .data.tokenize import LengthPolicy
from .data.sampler import PairSampler
from .data.sources import iter_rows
from .metrics import json_text
from .model import RewardModel
from .errors import UserError


def _device(name):
    """The device to score on; one that this machine lacks is refused before any model is loaded."""
    from .errors import UserError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device (cpu, cuda, cuda:1, auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA GPU that torch can use; score with --device cpu "
                        f"(or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def eos_after_template(model_dir, config):
    """The export's reward-token convention (rmfast.export.EOS_AFTER_TEMPLATE): as recorded; an rmfast export
    that predates the record appended EOS after chat templates; any other model reads where the template ends."""
    from .export import EOS_AFTER_TEMPLATE

    recorded = getattr(config, EOS_AFTER_TEMPLATE, None)
    if recorded is not None:
        return bool(recorded)
    return (Path(model_dir) / "rmfast.json").is_file()


class Scorer:
    """An exported reward model ready to score token sequences and pairs."""

    def __init__(self, model_dir, device="auto", dtype="fp32", attention_kind="auto"):
        from transformers import AutoConfig, AutoTokenizer

        self.device = _device(device)
        check_reward_model(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = RewardModel.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        config = AutoConfig.from_pretrained(model_dir)
        self.mean = getattr(config, "rmfast_reward_mean", None)
        self.std = getattr(config, "rmfast_reward_std", None)
        self.bias = getattr(config, "rmfast_score_bias", 0.0) or 0.0
        # an attribute head (num_labels = A): the labels' names, and the bias of each kept in the config
        self.attributes = [config.id2label[i] for i in range(config.num_labels)] \
            if getattr(config, "rmfast_attribute_weights", None) else []
        if self.attributes:
            self.attribute_bias = np.asarray(self.bias if isinstance(self.bias, list) else [0.0] * len(self.attributes),
                                             np.float32)
            self.bias = float(np.dot(self.attribute_bias, self.model.head.combination.cpu().numpy()))
        self.eos_after_template = eos_after_template(model_dir, config)
        kind = getattr(self.model.backbone.config, "model_type", "")
        if kind in attention.SUPPORTED and kind not in attention.DENSE_ONLY:
            self.model.set_attention(attention.resolve_attention(
                self.model.backbone.config, attention_kind, self.device.type,
                next(self.model.parameters()).dtype, training=False))
        elif attention_kind not in ("auto", "dense"):
            raise UserError(f"attention {attention_kind!r} is not supported for {kind} models; use auto or dense")
        self.row_tokens = attention.row_tokens(self.model.attention, self.device.type)

    def normalize(self, rewards):
        if self.mean is None or not self.std:
            raise UserError("--normalize: this model's config has no rmfast_reward_mean/std (export it with rmfast)")
        return (rewards - self.mean) / self.std

    def _rewards(self, batch, index):
        return self._outputs(batch, index)[0]

    def _outputs(self, batch, index):
        """(rewards [n], attributes [n, A] or None: an attribute head's), numpy float32."""
        batch, index = batch.to(self.device), index.to(self.device)
        if not self.attributes:
            return (self.model.rewards(batch, index) + self.bias).float().cpu().numpy(), None
        with torch.no_grad():
            attrs = self.model(batch, attributes_at=index)
        attrs = attrs.float().cpu().numpy() + self.attribute_bias
        return attrs @ self.model.head.combination.float().cpu().numpy(), attrs

    def score_groups(self, groups, indices, with_attributes=False):
        """Rewards of every response of groups `indices` (a TokenizedGroups; a pair is a group of two, chosen
        first), one [K] array per group, each prompt computed once (prefix_shared). with_attributes: (those,
        one [K, A] array of attributes per group) for an attribute head."""
        batch = layouts.prefix_shared(groups, indices, self.tokenizer.pad_token_id, max_tokens=self.row_tokens)
        r, attrs = self._outputs(batch, batch.response_index)
        split = np.cumsum([len(groups.responses[i]) for i in indices])[:-1]
        if with_attributes:
            return np.split(r, split), (np.split(attrs, split) if attrs is not None else [None] * len(indices))
        return np.split(r, split)

    def score_sequences(self, seqs):
        batch = layouts.pack_sequences(seqs, self.tokenizer.pad_token_id, max_tokens=self.row_tokens)
        return self._rewards(batch, batch.response_index)


def check_reward_model(model_dir):
    """Refuse a folder that is not a whole one-label reward model (a bare backbone would be scored with an
    untrained head), naming what is missing."""
    path = Path(model_dir)
    what = "give an rmfast export (rmfast-train's OUTPUT_DIR/export, or rmfast-export --out DIR)"
    if not (path / "config.json").is_file():
        raise UserError(f"{model_dir}: not a model folder (no config.json); {what}")
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not any((path / w).is_file() for w in weights):
        raise UserError(f"{model_dir}: no weights (model.safetensors); a half-written export? {what}")
    if not any((path / t).is_file() for t in ("tokenizer.json", "tokenizer_config.json")):
        raise UserError(f"{model_dir}: no tokenizer files; {what}")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{model_dir}/config.json is not valid JSON ({exc.msg}); {what}") from None
    archs = config.get("architectures") or []
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)  # transformers saves id2label
    attributes = len(config.get("rmfast_attribute_weights") or []) == labels  # an rmfast attribute head
    if not any(a.endswith("ForSequenceClassification") for a in archs) or (labels != 1 and not attributes):
        seq = any(a.endswith("ForSequenceClassification") for a in archs)
        this = f"{', '.join(archs)} with {labels} labels" if seq else f"a bare backbone ({', '.join(archs) or '?'})"
        raise UserError(f"{model_dir}: not a reward model (a one-label *ForSequenceClassification; this one is "
                        f"{this}), so its head would be untrained; {what}")


def _token_batches(costs, budget):
    return list(PairSampler(costs, token_budget=budget, shuffle=False, group_by_length=True).global_batches(0))


def sequence_ids(tokenizer, max_length, text=None, messages=None, chat_template=None, eos_after_template=False,
                 rendered=False):
    """The token ids of one single sequence as rmfast-score reads it, and whether the length policy cut it.
    A plain `text` is tokenized with the tokenizer's special tokens and gets EOS after it; `messages` are
    rendered by the chat template, and a `rendered` text (one that already holds its special tokens) is
    tokenized as it is: both get EOS after them only with eos_after_template (the export's convention). Over
    max_length, the end is kept: the reward is read at the last token."""
    if messages is not None:
        text = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=chat_template)
        rendered = True
    seq = tokenizer(text, add_special_tokens=not rendered)["input_ids"]
    eos = tokenizer.eos_token_id
    appends = LengthPolicy(max(max_length, 2), eos_after_template=eos_after_template).appends_eos(rendered)
    if appends and eos is not None and (not seq or seq[-1] != eos):
        seq = seq + [eos]
    if len(seq) <= max_length:
        return seq, False
    return seq[: max_length - 1] + seq[-1:], True


def _read_sequences(sources, tokenizer, max_length, on_bad_row, chat_template=None, eos_after_template=False):
    """Single sequences: rows with a `text` string or a `messages` list (rendered by the chat template, EOS
    after it only with eos_after_template). Returns (ids, locations, bad)."""
    ids, locations, bad = [], [], []
    for source in sources:
        for raw in iter_rows(source):
            problem = raw.reason
            if problem is None:
                if isinstance(raw.data.get("text"), str) and raw.data["text"].strip():
                    seq, _ = sequence_ids(tokenizer, max_length, text=raw.data["text"])
                elif isinstance(raw.data.get("messages"), list) and raw.data["messages"]:
                    seq, _ = sequence_ids(tokenizer, max_length, messages=raw.data["messages"],
                                          chat_template=chat_template, eos_after_template=eos_after_template)
                else:
                    problem = "no non-empty `text` string or `messages` list"
            if problem is not None:
                bad.append(f"{raw.location}: {problem}")
                continue
            ids.append(seq)
            locations.append(raw.location)
    if bad and on_bad_row == "error":
        raise DataError(f"{len(bad)} bad row(s):\n  " + "\n  ".join(bad[:10]) +
                        "\nFix them, or pass --on-bad-row skip.")
    return ids, locations, bad


def _write(records, out):
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), out)
    else:
        with open(out, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")


def main(argv=None):
    from .errors import ArgumentParser

    parser = ArgumentParser(prog="rmfast-score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an exported reward model folder (rmfast-export / rmfast-train's export/)")
    parser.add_argument("sources", nargs="+", help="files, folders or datasets dirs of pairs or of single texts")
    parser.add_argument("--out", required=True, help="output .jsonl or .parquet")
    parser.add_argument("--token-budget", type=int, default=16384, help="tokens per forward")
    parser.add_argument("--normalize", action="store_true", help="(r - eval mean) / eval std from the export")
    parser.add_argument("--summary", help="also write the metrics of pairs or groups to this JSON file")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="weights and activations (fp32 scores exactly; bf16 is faster on a GPU)")
    parser.add_argument("--attention", default="auto", choices=list(attention.ATTENTIONS),
                        help="attention of the packed batches (auto: varlen on CUDA in bf16/fp16 when available, "
                             "else flex on CUDA; segments on CPU)")
    parser.add_argument("--benchmark", default="auto", choices=["auto", "none"] + list(BENCHMARKS),
                        help="also report a leaderboard's official numbers by its own rules (rmfast.leaderboards): "
                             "rewardbench (pairs with a subset), rewardbench2 (chosen/rejected lists with a subset), "
                             "rm-bench (3 chosen and 3 rejected per row, a domain); auto: when the rows' shape and "
                             "subset names say which")
    add_data_options(parser, kinds=["pairs", "groups", "texts"])
    args = parser.parse_args(argv)
    from .errors import run

    def body():
        from .paths import refuse_writing_over

        inputs = [("the model folder", args.model)] + [("the source", Source.parse(x).path) for x in args.sources]
        refuse_writing_over(args.out, inputs, "--out")
        _device(args.device)  # before the model is read
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar is no news to a scorer's user
        if args.summary:
            refuse_writing_over(args.summary, inputs + [("--out", args.out)], "--summary")
        scorer = Scorer(args.model, args.device, args.dtype, args.attention)
        source = Source.parse(args.sources[0])
        kind = args.kind if args.kind != "auto" else source_kind(source.path, source.split, args.columns) or "texts"
        if args.benchmark in BENCHMARKS and BENCHMARKS[args.benchmark][1] != kind:
            name, want = BENCHMARKS[args.benchmark]
            raise UserError(f"--benchmark {args.benchmark}: {name} scores {want} rows; these are read as {kind}")
        score = {"pairs": _score_pairs, "groups": _score_groups, "texts": _score_texts}[kind]
        records, summary = score(scorer, args)
        records.sort(key=lambda x: _order(x["location"]))
        if args.summary:
            Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
            Path(args.summary).write_text(json_text(summary, indent=2) + "\n")
        _write(records, args.out)
        print(f"wrote {args.out}", file=sys.stderr)

    return run("rmfast-score", body)


def _score_pairs(scorer, args):
    """One record per pair (rewards, margin, correct; a tie row: tie instead of correct), read like training
    data into groups of two and scored as every group is (Scorer.score_groups). Accuracy is over strict pairs."""
    from tqdm.auto import tqdm

    config = data_config(args, eos_after_template=scorer.eos_after_template)
    pairs, _, report = load_data(config, scorer.tokenizer)
    for line in report.lines():
        print(f"data: {line}", file=sys.stderr)
    costs = pairs.lengths("prefix_shared")
    subsets = _subsets(args.sources, args.columns.get("subset", "subset"))
    records = []
    for batch in tqdm(_token_batches(costs, max(args.token_budget, int(costs.max()))), desc="scoring pairs",
                      unit="batch"):
        rewards = np.stack(scorer.score_groups(pairs, batch))  # [n, 2]: chosen, rejected
        if args.normalize:
            rewards = scorer.normalize(rewards)
        for i, (rc, rr) in zip(batch, rewards):
            records.append({"location": pairs.locations[i], "chosen_reward": float(rc), "rejected_reward": float(rr),
                            "margin": float(rc - rr)})
            if pairs.scores[i][0] == pairs.scores[i][1]:
                records[-1]["tie"] = True
            else:
                records[-1]["correct"] = bool(rc > rr)
            if pairs.locations[i] in subsets:
                records[-1]["subset"] = subsets[pairs.locations[i]]

    def metrics(rs):
        strict = [x["correct"] for x in rs if "correct" in x]
        out = {"pairs": len(rs), "accuracy": float(np.mean(strict)) if strict else float("nan"),
               "mean_margin": float(np.mean([x["margin"] for x in rs]))}
        if len(strict) < len(rs):
            out["ties"] = len(rs) - len(strict)
        return out

    summary = metrics(records)
    print(f"{len(records)} pairs: accuracy {summary['accuracy']:.4f}, mean margin {summary['mean_margin']:.4f}",
          file=sys.stderr)
    names = sorted({x["subset"] for x in records if "subset" in x})
    if names:
        summary["subsets"] = {n: metrics([x for x in records if x.get("subset") == n]) for n in names}
        for n, m in summary["subsets"].items():
            print(f"  {n}: accuracy {m['accuracy']:.4f} ({m['pairs']} pairs)", file=sys.stderr)
        summary["subset_mean_accuracy"] = float(np.mean([m["accuracy"] for m in summary["subsets"].values()]))
        print(f"mean accuracy over {len(names)} subsets: {summary['subset_mean_accuracy']:.4f}", file=sys.stderr)
    _add_leaderboard(summary, args, "pairs", records)
    return records, summary


def _subsets(specs, column):
    """{location: the row's `column` value as a string} for the rows of the sources that have one."""
    return {loc: str(f["subset"]) for loc, f in _row_fields(specs, {"subset": column}).items() if "subset" in f}


def _row_fields(specs, columns):
    """{location: {name: value}} of the rows of the sources, for each name whose column (columns[name]) the
    row has, not None; a list's length stands for the list (`chosen`, `rejected`: how many responses)."""
    out = {}
    for spec in specs:
        source = Source.parse(spec)
        for raw in iter_rows(source.path, source.split):
            if isinstance(raw.data, dict):
                got = {name: len(v) if isinstance(v, list) else v for name, column in columns.items()
                       if (v := raw.data.get(column)) is not None}
                if got:
                    out[raw.location] = got
    return out


# --benchmark NAME: (what the README calls it, the kind of rows it scores)
BENCHMARKS = {"rewardbench": ("RewardBench", "pairs"), "rewardbench2": ("RewardBench 2", "groups"),
              "rm-bench": ("RM-Bench", "groups")}


def _add_leaderboard(summary, args, kind, records):
    """summary["benchmark"]: the leaderboard's own numbers for these records (rmfast.leaderboards), with
    --benchmark NAME or, with auto, when the rows' shape and subset names say which; printed too."""
    if args.benchmark == "none":
        return
    columns = {k: args.columns.get(k, k) for k in ("subset", "id", "domain", "chosen", "rejected")}
    fields = _row_fields(args.sources, columns)
    rows = [fields.get(r["location"], {}) for r in records]
    name = args.benchmark if args.benchmark != "auto" else detect_benchmark(kind, rows)
    if name is None:
        return
    result = leaderboard(name, records, rows)
    summary["benchmark"] = dict(name=name, **result)
    for line in leaderboard_lines(name, result):
        print(line, file=sys.stderr)


def detect_benchmark(kind, rows):
    """The benchmark these rows are unambiguously from (their kind, shape and subset names), or None. rows:
    the fields _row_fields read, one dict per scored record."""
    from .leaderboards import REWARDBENCH2_SUBSETS, REWARDBENCH_EXAMPLE_COUNTS, REWARDBENCH_PREF_SETS

    if not rows:
        return None
    subsets = {r.get("subset") for r in rows}
    if kind == "pairs":
        known = set(REWARDBENCH_EXAMPLE_COUNTS) | set(REWARDBENCH_PREF_SETS)
        return "rewardbench" if subsets <= known and subsets & set(REWARDBENCH_EXAMPLE_COUNTS) else None
    if all(r.get("domain") is not None and r.get("chosen") == 3 and r.get("rejected") == 3 for r in rows):
        return "rm-bench"
    if subsets <= set(REWARDBENCH2_SUBSETS) and all("chosen" in r and "rejected" in r for r in rows):
        return "rewardbench2"
    return None


def leaderboard(name, records, rows):
    """The numbers of benchmark `name` (a key of BENCHMARKS) for scored records (rmfast-score's output
    rows) and the rows' fields (_row_fields), by rmfast.leaderboards' functions."""
    from . import leaderboards

    where = ", ".join(r["location"] for r, f in zip(records, rows) if f.get("subset") is None)
    if name != "rm-bench" and where:
        raise UserError(f"--benchmark {name}: rows without a `subset`: {where[:300]}")
    if name == "rewardbench":
        return leaderboards.rewardbench([r["chosen_reward"] for r in records],
                                        [r["rejected_reward"] for r in records], [f["subset"] for f in rows])
    bad = [r["location"] for r, f in zip(records, rows) if "chosen" not in f or "rejected" not in f
           or (name == "rm-bench" and (f["chosen"], f["rejected"]) != (3, 3))]
    if bad:
        want = "3 chosen and 3 rejected responses" if name == "rm-bench" else "`chosen` and `rejected` lists"
        raise UserError(f"--benchmark {name}: rows without {want}: {', '.join(bad)[:300]}")
    if name == "rewardbench2":
        try:
            return leaderboards.rewardbench2([r["rewards"] for r in records], [f["chosen"] for f in rows],
                                             [f["subset"] for f in rows], [f.get("id") for f in rows])
        except ValueError as exc:
            raise UserError(f"--benchmark rewardbench2: {exc}") from None
    domains = [f.get("domain") for f in rows]
    return leaderboards.rmbench([r["rewards"][:3] for r in records], [r["rewards"][3:] for r in records],
                                None if all(d is None for d in domains) else domains)


def leaderboard_lines(name, result):
    """What rmfast-score prints of a leaderboard's numbers."""
    title = BENCHMARKS[name][0]
    score = "n/a" if result["score"] is None else f"{result['score']:.4f}"
    lines = []
    if name == "rewardbench":
        lines.append(f"{title}: " + ", ".join(f"{k} {v:.4f}" for k, v in result["sections"].items()) +
                     f"; score {score}")
    elif name == "rewardbench2":
        parts = ", ".join(f"{k} {'n/a' if v is None else f'{v:.4f}'}" for k, v in result["subsets"].items())
        lines.append(f"{title}: {parts}; score {score}")
        if "ties" in result:
            t = result["ties"]
            lines.append(f"  Ties: ref accuracy {t['ref_accuracy']:.4f}, tied accuracy {t['tied_accuracy']:.4f}, "
                         f"correctness preferred {t['correctness_preferred']:.4f} (hard "
                         f"{t['correctness_preferred_hard']:.4f}) over {t['prompts']} prompts")
    else:
        for domain, m in result["domains"].items():
            lines.append(f"  {domain}: easy {m['easy']:.4f}, normal {m['normal']:.4f}, hard {m['hard']:.4f}, "
                         f"score {m['score']:.4f} ({m['rows']} rows)")
        lines.append(f"{title}: easy {result['easy']:.4f}, normal {result['normal']:.4f}, hard "
                     f"{result['hard']:.4f}; score {score}")
    if result["missing"]:
        lines.append(f"  not the leaderboard's score: no rows of {', '.join(result['missing'])}")
    return lines


def _read_groups(args, tokenizer, eos_after_template=False):
    """Group rows of every source, validated (rows without scores or ranking, and single responses, are
    taken: they are scored) and tokenized. Returns (TokenizedGroups, {location: the row's scores or None})."""
    from .data.group_tokens import tokenize_groups
    from .data.groups import parse_group_row
    from .data.tokens import TokenizedGroups
    from .data.loader import _check_bad, read_rows

    config = data_config(args, eos_after_template=eos_after_template)
    parts, scores = [], {}
    for spec in args.sources:
        source = Source.parse(spec)
        rows, report = read_rows(source, config, functools.partial(parse_group_row, preference=False))
        _check_bad(report, config, source.path)
        groups, counts = tokenize_groups(rows, tokenizer, config.policy(), config.chat_template, scoring=True)
        print(f"data: {source.path}: {report.rows} rows read, {len(groups)} groups, {sum(report.bad.values())} bad "
              f"rows skipped; {counts.truncated} truncated, {counts.merged} identical responses merged, "
              f"{counts.dropped_responses_too_long} responses dropped as too long", file=sys.stderr)
        scores.update({g.location: g.scores for g in rows})
        parts.append(groups)
    groups = TokenizedGroups.concat(parts)
    if len(groups) == 0:
        raise DataError(f"{', '.join(map(str, args.sources))}: no groups to score")
    return groups, scores


def _group_record(groups, i, rewards, scores, attributes=None, names=()):
    """One output record: the reward of every response as read (None where the length policy dropped it;
    identical responses share theirs), the best one's index, the group's metrics when it has scores, and an
    attribute head's attributes ({name: a value per response as read})."""
    from .group_metrics import rank_metrics

    origin = groups.origin[i]
    per_response = [float(rewards[o]) if o >= 0 else None for o in origin]
    kept = np.flatnonzero(origin >= 0)
    record = {"location": groups.locations[i], "rewards": per_response,
              "best": int(kept[np.argmax(rewards[origin[kept]])])}
    if attributes is not None:
        record["attributes"] = {name: [float(attributes[o, a]) if o >= 0 else None for o in origin]
                                for a, name in enumerate(names)}
    if groups.tags[i] is not None:
        record["subset"] = groups.tags[i]
    if scores is not None:
        metrics = rank_metrics(rewards[origin[kept]], np.asarray(scores)[kept])
        if metrics is not None:
            record.update(metrics)
    return record


def _score_groups(scorer, args):
    """One record per group (a reward per response, the best index, the group's metrics), prefix-shared
    groups: each prompt computed once. Prints and returns the metrics, overall and per subset."""
    from tqdm.auto import tqdm

    groups, scores = _read_groups(args, scorer.tokenizer, scorer.eos_after_template)
    costs = groups.lengths("prefix_shared")
    records = []
    for batch in tqdm(_token_batches(costs, max(args.token_budget, int(costs.max()))), desc="scoring groups",
                      unit="batch"):
        rewards_of, attributes_of = scorer.score_groups(groups, batch, with_attributes=True)
        for i, rewards, attributes in zip(batch, rewards_of, attributes_of):
            if args.normalize:
                rewards = scorer.normalize(rewards)
            records.append(_group_record(groups, i, rewards, scores[groups.locations[i]], attributes,
                                         scorer.attributes))
    summary = group_summary(records)
    for line in group_summary_lines(summary, int(groups.sizes.sum())):
        print(line, file=sys.stderr)
    _add_leaderboard(summary, args, "groups", records)
    return records, summary


METRIC_KEYS = ("comparisons", "correct", "kendall_tau", "top1", "best_of_n")


def group_summary(records):
    """Metrics over scored group records: overall, per subset, and the mean of the subsets' best-of-N (the
    plain rule for every subset; RewardBench 2's official numbers, its Ties formula included, come from
    --benchmark rewardbench2: rmfast.leaderboards)."""
    from .group_metrics import summarize

    def metrics(rs):
        return summarize([{k: r[k] for k in METRIC_KEYS} if "comparisons" in r else None for r in rs])

    summary = {"groups": len(records), "overall": metrics(records)}
    subsets = sorted({r["subset"] for r in records if "subset" in r})
    if subsets:
        summary["subsets"] = {s: metrics([r for r in records if r.get("subset") == s]) for s in subsets}
        scored = [m["best_of_n"] for m in summary["subsets"].values() if m["groups"]]
        summary["subset_mean_best_of_n"] = float(np.mean(scored)) if scored else None
    return summary


def group_summary_lines(summary, responses):
    lines = [f"{summary['groups']} groups, {responses} responses scored (each prompt computed once)"]

    def describe(m):
        return (f"comparison accuracy {m['comparison_accuracy']:.4f} ({m['comparisons']} comparisons), top-1 "
                f"{m['top1_accuracy']:.4f}, Kendall tau {m['kendall_tau']:.4f}, best-of-N {m['best_of_n']:.4f} "
                f"({m['groups']} groups)")

    if summary["overall"]["groups"]:
        lines.append(describe(summary["overall"]))
    for name, m in summary.get("subsets", {}).items():
        lines.append(f"  {name}: " + (describe(m) if m["groups"] else "no scores or ranking"))
    if summary.get("subset_mean_best_of_n") is not None:
        lines.append(f"mean best-of-N over {len(summary['subsets'])} subsets: {summary['subset_mean_best_of_n']:.4f}")
    return lines


def _score_texts(scorer, args):
    """One record per single sequence (rows with `text` or `messages`), packed batches."""
    from tqdm.auto import tqdm

    seqs, locations, bad = _read_sequences(args.sources, scorer.tokenizer, args.max_length, args.on_bad_row,
                                           data_config(args).chat_template, scorer.eos_after_template)
    if bad:
        print(f"skipped {len(bad)} bad row(s)", file=sys.stderr)
    if not seqs:
        raise DataError(f"{', '.join(map(str, args.sources))}: no rows with a `text` or `messages` field to score")
    costs = np.array([len(s) for s in seqs])
    records = []
    for batch in tqdm(_token_batches(costs, max(args.token_budget, int(costs.max()))), desc="scoring", unit="batch"):
        rewards = scorer.score_sequences([seqs[i] for i in batch])
        if args.normalize:
            rewards = scorer.normalize(rewards)
        for i, r in zip(batch, rewards):
            records.append({"location": locations[i], "reward": float(r)})
    print(f"{len(records)} sequences scored", file=sys.stderr)
    return records, {"sequences": len(records)}


def _order(location):
    head, _, tail = location.rpartition(":")
    digits = "".join(ch for ch in tail if ch.isdigit())
    return (head, int(digits) if digits else 0)


if __name__ == "__main__":
    sys.exit(main())
