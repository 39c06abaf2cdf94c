"""Training on ranked groups of K responses: comparisons per second, one process per contender.

Groups are built from the HH-RLHF sample's real texts: each group is one HH prompt and K HH responses (the
row's chosen and rejected answers, then the answers of the next rows, read after the same prompt), with
random scores, so each group of 4 gives 6 comparisons. Every contender trains the same small Llama as
bench_train.py (a fresh copy from one seed) with AdamW on the same groups, the same groups per step and the
same steps; the pair contenders train on the groups' comparisons expanded into pairs (a group of K gives
K(K-1)/2 pairs, all in the step of their group):
  dschat          DeepSpeed-Chat step 2 on the expanded pairs: every sequence padded to 512
  trl             TRL's RewardTrainer on the expanded pairs: padded to the batch's longest sequence
  rmfast-prefix   rmfast prefix_shared on the expanded pairs: each pair's prompt computed once
  rmfast-groups   rmfast prefix_shared groups: each group's prompt once and each response once, every
                  comparison of the group through the fused loss

It reports comparisons/s (all timed steps' comparisons over their total time), token positions computed
per group against the unique tokens per group (the prompt once, each response once), and peak memory (peak
RSS minus the RSS before the first step); CSV, PNG and a Markdown table in benchmarks/results/.

    python benchmarks/bench_groups.py [--k 4] [--groups 4] [--steps 12]
"""

import argparse
import csv
import gzip
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loss import machine_description  # noqa: E402
from bench_train import DEFAULT_DATA, RESULTS, build_model, make_step, plot, setup, train_steps  # noqa: E402

from rmfast.data.group_tokens import tokenize_groups  # noqa: E402
from rmfast.data.groups import parse_group_row  # noqa: E402
from rmfast.data.tokenize import LengthPolicy  # noqa: E402
from rmfast.data.tokens import TokenizedGroups  # noqa: E402
from rmfast.data.tokenizers import train_bpe_tokenizer  # noqa: E402
from rmfast import layouts  # noqa: E402
from rmfast.layouts import ONE_ROW  # noqa: E402

CONTENDERS = ("dschat", "trl", "rmfast-prefix", "rmfast-groups")
MARK = "\n\nAssistant:"


def split(text):
    """An HH conversation as (prompt up to and with its last "Assistant:", the answer after it)."""
    at = text.rfind(MARK) + len(MARK)
    return text[:at], text[at:]


def hh_groups(rows, k, seed):
    """Group rows from HH rows: row i's prompt with its chosen and rejected answers, then the answers of
    rows i+1, i+2, ... until there are k distinct non-empty ones; scores drawn at random (no ties)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, row in enumerate(rows):
        prompt, _ = split(row["chosen"])
        answers = []
        for j in range(i, i + 4 * k):
            for key in ("chosen", "rejected"):
                answer = split(rows[j % len(rows)][key])[1]
                if answer.strip() and answer not in answers and len(answers) < k:
                    answers.append(answer)
        if prompt.strip() and len(answers) == k:
            out.append({"prompt": prompt, "responses": answers, "scores": rng.permutation(k).tolist()})
    return out


def expand(groups, indices):
    """The comparisons of groups `indices` as pairs (groups of two, better as chosen), group after group, each
    pair's shared prefix as the pair tokenizer finds it."""
    chosen, rejected = [], []
    for g in indices:
        pairs, _ = groups.comparisons(g)
        for b, w in pairs:
            chosen.append(groups.sequence(g, b))
            rejected.append(groups.sequence(g, w))
    return TokenizedGroups.of_pairs(chosen, rejected, locations=[f"comparison {i}" for i in range(len(chosen))])


def load(args):
    rows = [json.loads(line) for line in gzip.open(args.data, "rt")]
    tok = train_bpe_tokenizer([r["chosen"] for r in rows], vocab_size=args.vocab)
    parsed = [parse_group_row(f"hh:{i}", row) for i, row in enumerate(hh_groups(rows, args.k, args.seed))]
    groups, counts = tokenize_groups(parsed, tok, LengthPolicy(512))
    return tok, groups, counts


def run(name, groups, order, args, tok):
    """Train contender `name` for warmup + steps steps of args.groups groups each. Returns its figures."""
    model, optimizer, how = setup(args, len(tok), tok.pad_token_id)
    steps = [order[s * args.groups:(s + 1) * args.groups] for s in range(args.warmup + args.steps)]
    if name == "rmfast-groups":
        model.set_attention(how)

        def step(g):
            b = layouts.prefix_shared(groups, g, tok.pad_token_id, max_tokens=ONE_ROW).to(args.device)
            return model(b).loss, b.positions, b.pairs
        batches = steps
    else:  # the comparisons as pairs, built before the clock as a data loader would
        batches = [expand(groups, g) for g in steps]
        pair_step = make_step(name, model, tok.pad_token_id, args.device, how)

        def step(pairs):
            loss, positions, _ = pair_step(pairs, list(range(len(pairs))))
            return loss, positions, len(pairs)
    times, figures, losses, peak = train_steps(step, batches, optimizer, args.warmup, args.device)
    positions, comparisons = (sum(f[i] for f in figures) for i in (0, 1))
    return {"contender": name, "comparisons_per_s": round(comparisons / sum(times), 3),
            "step_s": round(sum(times) / len(times), 4), "step_s_median": round(statistics.median(times), 4),
            "positions_per_group": round(positions / (args.groups * len(times)), 1),
            "positions_per_comparison": round(positions / comparisons, 1),
            "peak_mb": round(peak / 2**20, 1), "first_loss": round(losses[0], 4)}


def write_results(rows, args, machine, n_params, unique, argv):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = {r["contender"]: r["comparisons_per_s"] for r in rows}
    mine = base.get("rmfast-groups")
    for r in rows:
        r["groups_speedup"] = round(mine / r["comparisons_per_s"], 2) if mine else ""
        r["unique_tokens_per_group"] = round(unique, 1)
        r["positions_over_unique"] = round(r["positions_per_group"] / unique, 3)
    with open(out / f"bench_groups_{args.tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["machine", "params_m", "k"] + list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({"machine": machine, "params_m": round(n_params / 1e6, 2), "k": args.k, **r})
    plot(rows, out / f"bench_groups_{args.tag}.png",
         f"HH-RLHF texts in groups of {args.k}, Llama {n_params / 1e6:.1f}M, {args.groups} groups/step; {machine}",
         rate="comparisons", per="group")
    lines = ["| contender | comparisons/s | rmfast-groups speed-up | positions/group | × unique tokens | "
             "positions/comparison | peak MB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['contender']} | {r['comparisons_per_s']:.2f} | {r['groups_speedup']}× | "
                     f"{r['positions_per_group']:.1f} | {r['positions_over_unique']:.3f} | "
                     f"{r['positions_per_comparison']:.1f} | {r['peak_mb']:.0f} |")
    command = "python benchmarks/bench_groups.py " + " ".join(argv)
    comparisons = args.k * (args.k - 1) // 2
    (out / f"bench_groups_{args.tag}.md").write_text(
        f"# bench_groups ({args.tag})\n\ncommand: `{command.strip()}`  \nmachine: {machine}  \n"
        f"model: Llama, {n_params / 1e6:.1f}M parameters, BPE vocabulary {args.vocab} trained on the sample; "
        f"groups of {args.k} HH responses after one HH prompt, random scores ({comparisons} comparisons a "
        f"group); {args.groups} groups ({args.groups * comparisons} comparisons) per step, comparisons/s over "
        f"{args.steps} timed steps (the same groups for every contender) after {args.warmup} warm-up step(s); "
        f"max_length 512; unique tokens per group (prompt once, each response once): {unique:.1f}.\n\n"
        + "\n".join(lines) + "\n")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--k", type=int, default=4, help="responses per group")
    parser.add_argument("--groups", type=int, default=4, help="groups per step, for every contender")
    parser.add_argument("--steps", type=int, default=12, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="model dtype on CUDA")
    parser.add_argument("--attention", default="auto", choices=["auto", "segments", "flex", "varlen"])
    parser.add_argument("--tag", default=None, help="results file suffix (default: the device)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.tag = args.tag or args.device
    torch.manual_seed(args.seed)
    tok, groups, counts = load(args)
    need = (args.warmup + args.steps) * args.groups
    if len(groups) < need:
        raise SystemExit(f"{len(groups)} groups from {args.data}; {need} needed: lower --steps or --groups")
    order = np.random.default_rng(args.seed).permutation(len(groups))[:need].tolist()
    if args.one:  # a child process: one contender, its result as one JSON line
        print("RESULT " + json.dumps(run(args.one, groups, order, args, tok)), flush=True)
        return
    timed = order[args.warmup * args.groups:]
    unique = float(groups.lengths("prefix_shared")[timed].mean())
    n_params = sum(p.numel() for p in build_model(len(tok), tok.pad_token_id, 0, args.hidden, args.layers).parameters())
    machine = machine_description(args.device)
    print(f"machine: {machine}\nmodel: Llama, {n_params / 1e6:.1f}M parameters; {len(groups)} groups of {args.k} "
          f"({counts.comparisons} comparisons, {counts.merged} identical responses merged), {args.groups} per step, "
          f"{args.steps} timed steps; unique tokens per group {unique:.1f}", flush=True)
    rows = []
    for name in args.contenders.split(","):
        child = subprocess.run([sys.executable, __file__, "--one", name] + argv, capture_output=True, text=True)
        if child.returncode != 0:
            raise SystemExit(f"{name} failed:\n{child.stderr[-3000:]}")
        rows.append(json.loads(next(x for x in child.stdout.splitlines() if x.startswith("RESULT "))[7:]))
        r = rows[-1]
        print(f"  {name:<14} {r['comparisons_per_s']:8.2f} comparisons/s  {r['positions_per_group']:7.1f} "
              f"positions/group  {r['peak_mb']:8.1f} MB  first loss {r['first_loss']}", flush=True)
    print("\n" + "\n".join(write_results(rows, args, machine, n_params, unique, argv)))


if __name__ == "__main__":
    main()
