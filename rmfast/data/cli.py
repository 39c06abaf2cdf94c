"""``rmfast-data``: look at a preference dataset before training on it, or write synthetic data.

    rmfast-data inspect data/train.jsonl [more sources…] [--tokenizer DIR] [--max-length 1024]
    rmfast-data synth --pairs 2000 --out data/arith.jsonl [--style conversational]
    rmfast-data synth --groups 4 --pairs 500 --out data/groups.jsonl   # 500 ranked groups of 4 answers
    rmfast-data synth --attributes --pairs 500 --out data/rated.jsonl  # HelpSteer2-shaped rated answers
    rmfast-data inspect data/rated.jsonl --attributes helpfulness correctness verbosity
"""

import argparse
import sys

import numpy as np

from ..errors import ArgumentParser
from .groups import source_kind
from .loader import DataConfig, DataError, Source, load_source, read_groups, read_pairs
from .options import add_data_options, data_config
from .synthetic import ATTRIBUTES, generate_attribute_rows, generate_pairs, write_jsonl
from .synthetic_groups import generate_groups


def _texts(value):
    """The texts of a prompt or response: a string, or a list of {role, content} messages."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [m["content"] for m in value]


def _tokenizer(args, sources, groups=False, attributes=()):
    if args.tokenizer:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(args.tokenizer), args.tokenizer
    from .tokenizers import train_bpe_tokenizer

    texts = []
    for spec in sources if groups else ():
        rows, _ = read_groups(spec, DataConfig(train=[spec.path], format=args.format, columns=args.columns,
                                               on_bad_row="skip", attributes=list(attributes)))
        for g in rows[:5000]:
            texts += _texts(g.prompt) + [t for r in g.responses for t in _texts(r)]
    for spec in () if groups else sources:
        pairs, _ = read_pairs(spec, DataConfig(train=[spec.path], format=args.format, columns=args.columns,
                                               on_bad_row="skip"))
        for p in pairs[:5000]:
            if p.format == "conversational":
                texts += [m["content"] for m in (p.prompt or []) + p.chosen + p.rejected]
            else:
                texts += [(p.prompt or "") + p.chosen, p.rejected]
    if not texts:
        raise DataError("no readable pairs to train a tokenizer on; pass --tokenizer DIR")
    tok = train_bpe_tokenizer(texts, vocab_size=args.vocab_size)
    return tok, f"byte-level BPE ({args.vocab_size} tokens) trained on these rows (pass --tokenizer for yours)"


def _percentiles(x):
    if len(x) == 0:
        return "-"
    p = np.percentile(x, [0, 50, 90, 99, 100])
    return "  ".join(f"{name} {v:,.0f}" for name, v in zip(("min", "p50", "p90", "p99", "max"), p))


def describe(args, groups):
    """Group sizes, lengths, the shared prompt, token positions per comparison in each layout, margins (a pair
    is a group of two: one comparison)."""
    sizes = groups.sizes
    values, n = np.unique(sizes, return_counts=True)
    C, as_pairs = 0, 0  # as_pairs: each comparison as its own prefix-shared pair (prompt + both responses)
    for i in range(len(groups)):
        rs = [len(r) for r in groups.responses[i]]
        for b, w in groups.comparisons(i)[0]:
            C += 1
            as_pairs += len(groups.prompt[i]) + rs[b] + rs[w]
    pairs = bool(np.all(sizes == 2))
    unit = "pair" if pairs else "comparison"
    if not pairs:
        print("  responses per group: " + ", ".join(f"{v}: {c} groups" for v, c in zip(values, n)))
    prompt = np.array([len(p) for p in groups.prompt])
    whole = [len(groups.prompt[i]) + len(r) for i in range(len(groups)) for r in groups.responses[i]]
    longest = np.array([len(p) + max(len(r) for r in rs) for p, rs in zip(groups.prompt, groups.responses)])
    print(f"  tokens, sequence: {_percentiles(whole)}  (prompt + response)")
    if C == 0 and np.all(sizes == 1):  # rated single responses: nothing shared, nothing compared
        _describe_attributes(args, groups)
        return
    print(f"  shared prefix:    {_percentiles(prompt)}  ({(prompt / np.maximum(longest, 1)).mean():.0%} of the "
          f"longest sequence on average; {np.mean(prompt == 0):.1%} of {'pairs' if pairs else 'groups'} share "
          f"nothing)")
    per = len(groups) if pairs else max(C, 1)  # a pair (a tie too) or a comparison
    cost = {layout: groups.lengths(layout).sum() / per for layout in ("padded", "packed", "prefix_shared")}
    fixed = f"padded to {args.max_length}: {2 * args.max_length:,}; " if pairs else ""
    print(f"  token positions per {unit}: {fixed}padded (every response its own row, to the "
          f"{'pair' if pairs else 'group'}'s longest): {cost['padded']:,.1f}; packed: "
          f"{cost['packed']:,.1f}; prefix shared (the prompt once): {cost['prefix_shared']:,.1f}"
          + ("" if pairs else f"; each comparison as its own prefix-shared pair: {as_pairs / max(C, 1):,.1f}"))
    with_margin = np.isfinite(groups.margin)
    if with_margin.any():
        print(f"  margins: {with_margin.mean():.0%} of {unit}s, mean {groups.margin[with_margin].mean():.3g}")
    _describe_attributes(args, groups)


def _describe_attributes(args, groups):
    if groups.attributes is not None and len(groups):
        values = np.concatenate([np.asarray(a, np.float64) for a in groups.attributes])
        for a, name in enumerate(args.attributes):
            x = values[:, a]
            have = x[np.isfinite(x)]
            spread = f"mean {have.mean():.3g}, min {have.min():.3g}, max {have.max():.3g}" if len(have) else "no values"
            print(f"  attribute {name}: {len(have):,} of {len(x):,} responses ({len(x) - len(have):,} missing); "
                  f"{spread}")


def inspect(args):
    sources = [Source.parse(s) for s in args.sources]
    auto = args.kind == "auto" and any(source_kind(s.path, s.split, args.columns) == "groups" for s in sources)
    kind = "groups" if args.kind == "groups" or auto or args.attributes else "pairs"
    tokenizer, tok_desc = _tokenizer(args, sources, kind == "groups", args.attributes)
    config = data_config(args, cache_dir=args.cache_dir, attributes=list(args.attributes))
    print(f"tokenizer: {tok_desc}")
    total_bad = 0
    for source in sources:
        data, report = load_source(source, tokenizer, config, kind=kind)
        print(f"\n{source.path}" + (" (groups)" if kind == "groups" else ""))
        for line in report.lines():
            print(f"  {line}")
        for example in report.bad_examples:
            print(f"    e.g. {example}")
        total_bad += sum(report.bad.values())
        if len(data):
            describe(args, data)
    if total_bad and args.strict:
        raise DataError(f"--strict: {total_bad} bad row(s) (listed above)")
    return 0


def synth(args):
    if args.attributes:
        rows = generate_attribute_rows(args.pairs, seed=args.seed, responses=max(args.groups, 1),
                                       missing=args.missing, max_operand=args.max_operand)
        path = write_jsonl(rows, args.out)
        print(f"wrote {len(rows)} rows of {max(args.groups, 1)} rated response(s) ({', '.join(ATTRIBUTES)}, 0-4) "
              f"to {path}")
        return 0
    if args.groups:
        if args.style == "implicit":
            raise DataError("--groups writes conversational or explicit groups, not implicit ones")
        rows = generate_groups(args.pairs, k=args.groups, seed=args.seed, max_operand=args.max_operand,
                               ops=args.ops.split(","), max_history=args.max_history, style=args.style,
                               shape=args.shape)
        path = write_jsonl(rows, args.out)
        print(f"wrote {len(rows)} {args.style} groups of {args.groups} responses ({args.shape}) to {path}")
        return 0
    rows = generate_pairs(args.pairs, seed=args.seed, max_operand=args.max_operand, ops=args.ops.split(","),
                          max_history=args.max_history, style=args.style, difficulty=args.difficulty)
    path = write_jsonl(rows, args.out)
    print(f"wrote {len(rows)} {args.style} pairs to {path}")
    return 0


def main(argv=None):
    parser = ArgumentParser(prog="rmfast-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="pairs, lengths, truncation, bad rows and shared-prefix statistics")
    p.add_argument("sources", nargs="+", help="files, folders, datasets dirs or hub names (PATH or PATH@WEIGHT)")
    p.add_argument("--tokenizer", help="a transformers tokenizer folder (default: train a small BPE on the data)")
    p.add_argument("--vocab-size", type=int, default=8000, help="vocabulary of the BPE trained without --tokenizer")
    p.add_argument("--cache-dir", help="tokenization cache (default ~/.cache/rmfast/tokenized)")
    p.add_argument("--strict", action="store_true", help="exit with status 2 (as for any bad data) when a row is bad")
    p.add_argument("--attributes", nargs="+", default=[], metavar="NAME",
                   help="attribute columns (a number per response), as rmfast-train's --data.attributes: rows read "
                        "as groups, each attribute's values and missing ones counted")
    add_data_options(p, kinds=["pairs", "groups"], on_bad_row="skip")
    p.set_defaults(func=inspect)
    s = sub.add_parser("synth", help="write learnable synthetic arithmetic preference pairs as JSON Lines")
    s.add_argument("--pairs", type=int, default=2000, help="rows to write (groups with --groups)")
    s.add_argument("--groups", type=int, default=0, metavar="K",
                   help="write groups of K answers instead of pairs: the right one and K-1 wrong ones, ranked by "
                        "how far they are from the truth (rmfast.data.generate_groups)")
    s.add_argument("--shape", default="ranking", choices=["ranking", "scores"],
                   help="with --groups: a ranking (response indices best first) or scores (−|error|)")
    s.add_argument("--out", required=True)
    s.add_argument("--style", default="conversational", choices=["conversational", "explicit", "implicit"])
    s.add_argument("--max-operand", type=int, default=9)
    s.add_argument("--ops", default="plus", help="comma-separated: plus, minus, times")
    s.add_argument("--max-history", type=int, default=3, help="earlier chat turns before the question: 0 to this")
    s.add_argument("--difficulty", default="hard", choices=["hard", "easy"],
                   help="hard: wrong answers off by 1-3; easy: off by 7-12")
    s.add_argument("--attributes", action="store_true",
                   help="HelpSteer2-shaped rows instead: a question, one answer (K with --groups, scored by "
                        "helpfulness) and helpfulness / correctness / verbosity 0-4 that follow from the text "
                        "(rmfast.data.generate_attribute_rows)")
    s.add_argument("--missing", type=float, default=0.0, help="with --attributes: the share of values left null")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=synth)
    args = parser.parse_args(argv)
    from ..errors import run

    return run("rmfast-data", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
