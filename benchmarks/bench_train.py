"""End-to-end reward-model training throughput on the HH-RLHF sample, one process.

Every contender trains the same small Llama (a fresh copy from one seed) with AdamW on the same pairs, the
same number of pairs per step and the same steps:
  dschat          DeepSpeed-Chat step 2: pad every sequence to 512, value head on every token, per-pair
                  loss over the span from the first differing token
  trl             TRL's RewardTrainer: pad to the batch's longest sequence, eager last-token loss
  rmfast-padded   rmfast, [2P, L] padded to the batch's longest, fused loss
  rmfast-packed   rmfast, sequences packed end to end (segment attention on CPU; varlen or flex on CUDA)
  rmfast-prefix   rmfast, prefix_shared: the shared prompt computed once (attention as for packed)
  rmfast-trainer  rmfast-prefix through the real Trainer (DeepSpeed engine, batches built ahead, metrics):
                  what `rmfast-train` runs, on the same batches

It reports pairs/s (all timed steps' pairs over their total time), token positions computed per pair against the unique
tokens per pair (prompt once, both responses), and peak memory (each contender runs in its own process;
peak RSS minus the RSS before its first step); CSV + PNG + a Markdown table in
benchmarks/results/. The tokenizer is a byte-level BPE trained on the sample itself.

    python benchmarks/bench_train.py [--data ../shared/data/hh-rlhf-harmless-sample.jsonl.gz]
"""

import argparse
import csv
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loss import _rss_bytes, dschat_loss, machine_description  # noqa: E402

from rmfast import attention, layouts  # noqa: E402
from rmfast.data import DataConfig, load_data  # noqa: E402
from rmfast.data.tokenizers import train_bpe_tokenizer  # noqa: E402
from rmfast.model import RewardModel  # noqa: E402
from rmfast.nn import RewardHead  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-sample.jsonl.gz"
CONTENDERS = ("dschat", "trl", "rmfast-padded", "rmfast-packed", "rmfast-prefix", "rmfast-trainer")


def build_model(vocab, pad_id, seed, hidden, layers):
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=1024,
                      pad_token_id=pad_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    backbone = LlamaModel(cfg)
    head = RewardHead(hidden)
    return RewardModel(backbone, head)


def make_step(name, model, pad_id, device="cpu", how="segments"):
    """A function(pairs, indices) → (loss, positions, tokens) for one bare-loop contender."""
    if name == "dschat":
        def step(pairs, idx):  # every sequence padded to 512
            b = layouts.padded(pairs, idx, pad_id, pad_to_multiple_of=512).to(device)
            hidden = model.hidden_states(b)
            return dschat_loss(hidden, model.head.weight, b.input_ids, pad_id=pad_id), b.positions, b.tokens
        return step
    if name == "trl":
        def step(pairs, idx):
            b = layouts.padded(pairs, idx, pad_id).to(device)
            hidden = model.hidden_states(b)
            rows = hidden.reshape(-1, hidden.shape[-1])[torch.cat([b.chosen_index, b.rejected_index])]
            r = F.linear(rows, model.head.weight.unsqueeze(0)).squeeze(-1).float()
            rc, rr = r.split(len(idx))
            return -F.logsigmoid(rc - rr).mean(), b.positions, b.tokens
        return step
    layout = {"rmfast-padded": "padded", "rmfast-packed": "packed", "rmfast-prefix": "prefix_shared"}[name]
    model.set_attention(how if layout != "padded" else "dense")

    def step(pairs, idx):  # packed layouts in one row: segment / flex attention pays nothing for it, no padding
        b = layouts.make(layout, pairs, idx, pad_id, max_tokens=layouts.ONE_ROW).to(device)
        out = model(b)
        return out.loss, b.positions, b.tokens
    return step


def model_dtype(args):
    return torch.bfloat16 if args.device == "cuda" and args.dtype == "bf16" else torch.float32


def run_trainer(pairs, order, args, tok, rows):
    """The rmfast-trainer contender: what `rmfast-train` runs (DeepSpeed engine, the Trainer's batches built
    ahead, metrics), prefix_shared, on the same batches as the bare loops: the pairs of `order` written in
    that order, and a sampler that takes them in order."""
    from rmfast import config as config_module
    from rmfast.data.sampler import PairSampler
    from rmfast.data.synthetic import write_jsonl
    from rmfast.engine import Trainer, close_distributed

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    model = build_model(len(tok), tok.pad_token_id, args.seed, args.hidden, args.layers)
    model.backbone.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    write_jsonl([rows[i] for i in order], work / "pairs.jsonl")
    steps = args.warmup + args.steps
    config = config_module.build(overrides={
        "model.name_or_path": str(work / "model"),
        "model.dtype": "bf16" if model_dtype(args) == torch.bfloat16 else "fp32",
        "data.train": [str(work / "pairs.jsonl")], "data.max_length": 512, "data.cache_dir": str(work / "cache"),
        "train.output_dir": str(work / "run"), "train.layout": "prefix_shared", "train.attention": args.attention,
        "train.pairs_per_batch": args.pairs, "train.max_steps": steps, "train.lr": 1e-4, "train.warmup_ratio": 0.0,
        "train.log_every": 1, "train.export": False, "train.tensorboard": False, "train.seed": args.seed})
    trainer = Trainer(config, log=lambda _: None)
    trainer.sampler = PairSampler(trainer.train_pairs.chosen_lengths, pairs_per_batch=args.pairs, shuffle=False,
                                  group_by_length=False)
    trainer.load_state_dict({"step": 0, "sampler": trainer.sampler.state_dict(), "world_size": 1})
    gc.collect()
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes("VmRSS:")
    trainer.train()
    peak = (torch.cuda.max_memory_allocated() if cuda else _rss_bytes("VmHWM:")) - base
    close_distributed()  # as rmfast-train does: a group alive at exit can abort the process
    records = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    timed = records[args.warmup:]
    # each record's window runs from the previous record to this one: the whole step, host work included
    total = sum(args.pairs / r["pairs_per_s"] for r in timed)
    return {"contender": "rmfast-trainer", "pairs_per_s": round(args.pairs * len(timed) / total, 3),
            "step_s": round(total / len(timed), 4),
            "step_s_median": round(statistics.median(args.pairs / r["pairs_per_s"] for r in timed), 4),
            "positions_per_pair": round(statistics.mean(r["positions_per_pair"] for r in timed), 1),
            "tokens_per_pair": round(sum(r["tokens_per_s"] / r["pairs_per_s"] for r in timed) / len(timed), 1),
            "peak_mb": round(max(peak, 0) / 2**20, 1), "first_loss": round(records[0]["loss"], 4)}


def setup(args, vocab, pad_id):
    """A fresh model (the seed's), its AdamW and the attention packed layouts get: what every bare-loop
    contender starts from."""
    dtype = model_dtype(args)
    model = build_model(vocab, pad_id, args.seed, args.hidden, args.layers).to(args.device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, optimizer, attention.resolve_attention(model.backbone.config, args.attention, args.device, dtype)


def train_steps(step, batches, optimizer, warmup, device):
    """Train on each of `batches`: step(batch) → (loss, *figures), then backward and the optimizer step.
    Returns (seconds of each step after the first `warmup`, their figures, every step's loss, peak bytes
    above the start: CUDA memory, or the process's peak RSS on CPU, so run each contender in a fresh process)."""
    cuda = device == "cuda"
    times, figures, losses = [], [], []
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes("VmRSS:")
    for s, batch in enumerate(batches):
        t0 = time.perf_counter()
        loss, *figure = step(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        if s >= warmup:
            times.append(elapsed)
            figures.append(figure)
        losses.append(float(loss.detach()))
    peak = (torch.cuda.max_memory_allocated() if cuda else _rss_bytes("VmHWM:")) - base
    return times, figures, losses, max(peak, 0)


def run(name, pairs, order, args, vocab, pad_id):
    model, optimizer, how = setup(args, vocab, pad_id)
    step = make_step(name, model, pad_id, args.device, how)
    batches = [order[s * args.pairs:(s + 1) * args.pairs] for s in range(args.warmup + args.steps)]
    times, figures, losses, peak = train_steps(lambda idx: step(pairs, idx), batches, optimizer, args.warmup,
                                               args.device)
    positions, tokens = (sum(f[i] for f in figures) for i in (0, 1))
    # every contender trains on the same batches, so total time over the timed steps is the fair measure
    # (a median would pick a different batch, of a different length, for each contender)
    mean = sum(times) / len(times)
    return {"contender": name, "pairs_per_s": round(args.pairs / mean, 3), "step_s": round(mean, 4),
            "step_s_median": round(statistics.median(times), 4),
            "positions_per_pair": round(positions / (args.pairs * len(times)), 1),
            "tokens_per_pair": round(tokens / (args.pairs * len(times)), 1),
            "peak_mb": round(peak / 2**20, 1), "first_loss": round(losses[0], 4)}


def plot(rows, path, title, rate="pairs", per="pair"):
    """Two panels: rows' `{rate}_per_s`, and their `positions_per_{per}` against `unique_tokens_per_{per}`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["contender"] for r in rows]
    a.bar(names, [r[f"{rate}_per_s"] for r in rows], color="tab:blue")
    a.set_ylabel(f"{rate} / s")
    a.set_title("training throughput")
    b.bar(names, [r[f"positions_per_{per}"] for r in rows], color="tab:orange", label="computed")
    b.plot(names, [r[f"unique_tokens_per_{per}"] for r in rows], "k_", markersize=30, label="unique tokens")
    b.set_ylabel(f"token positions per {per}")
    b.set_title(f"work per {per}")
    b.legend()
    for ax in (a, b):
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step, for every contender")
    parser.add_argument("--steps", type=int, default=32,
                        help="timed steps (32 × 8 pairs: about the sample's average lengths)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="model dtype on CUDA")
    parser.add_argument("--attention", default="auto", choices=["auto", "segments", "flex", "varlen"],
                        help="packed layouts' attention (auto: as rmfast-train picks it: varlen on CUDA in bf16 "
                             "when a varlen kernel is present, else flex on CUDA; segments on CPU)")
    parser.add_argument("--tag", default=None, help="results file suffix (default: the device)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    import gzip

    rows = [json.loads(line) for line in gzip.open(args.data, "rt")]
    tok = train_bpe_tokenizer([r["chosen"] for r in rows], vocab_size=args.vocab)
    with tempfile.TemporaryDirectory() as cache:
        pairs, _, report = load_data(DataConfig(train=[args.data], max_length=512, cache_dir=cache), tok,
                                     progress=False)
    order = np.random.default_rng(args.seed).permutation(len(pairs))[: (args.warmup + args.steps) * args.pairs].tolist()
    timed = order[args.warmup * args.pairs:]
    c, r, s = pairs.chosen_lengths[timed], pairs.rejected_lengths[timed], pairs.shared[timed].astype(np.int64)
    unique = float((c + r - s).mean())
    probe = build_model(len(tok), tok.pad_token_id, 0, args.hidden, args.layers)
    n_params = sum(p.numel() for p in probe.parameters())
    how = attention.resolve_attention(probe.backbone.config, args.attention, args.device, model_dtype(args))
    if how == "varlen":
        how = f"varlen ({attention.varlen_kernel()[0]})"
    args.tag = args.tag or args.device
    machine = machine_description(args.device)
    if args.one:  # a child process: one contender, its result as one JSON line
        result = (run_trainer(pairs, order, args, tok, rows) if args.one == "rmfast-trainer"
                  else run(args.one, pairs, order, args, len(tok), tok.pad_token_id))
        print("RESULT " + json.dumps(result), flush=True)
        return
    print(f"machine: {machine}\nmodel: Llama, {n_params / 1e6:.1f}M parameters; {len(pairs)} pairs, "
          f"{args.pairs} per step, {args.steps} timed steps; unique tokens per pair {unique:.1f}; packed "
          f"layouts' attention: {how}", flush=True)
    rows = []
    for name in args.contenders.split(","):
        # each contender in a fresh process: no allocator state carried over, and its peak RSS is its own
        child = subprocess.run([sys.executable, __file__, "--one", name] + (argv if argv is not None else sys.argv[1:]),
                               capture_output=True, text=True, check=True)
        row = json.loads(next(x for x in child.stdout.splitlines() if x.startswith("RESULT "))[7:])
        row["unique_tokens_per_pair"] = round(unique, 1)
        rows.append(row)
        print(f"  {name:<15} {row['pairs_per_s']:8.2f} pairs/s  {row['positions_per_pair']:7.1f} positions/pair  "
              f"{row['peak_mb']:8.1f} MB  first loss {row['first_loss']}", flush=True)
    base = {r["contender"]: r["pairs_per_s"] for r in rows}
    best = base.get("rmfast-prefix")
    for r in rows:
        r["prefix_speedup"] = round(best / r["pairs_per_s"], 2) if best else ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"bench_train_{args.tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["machine", "params_m"] + list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({"machine": machine, "params_m": round(n_params / 1e6, 2), **r})
    title = f"HH-RLHF sample, Llama {n_params / 1e6:.1f}M, {args.pairs} pairs/step; {machine}"
    plot(rows, out / f"bench_train_{args.tag}.png", title)
    head = "| contender | pairs/s | prefix_shared speed-up | positions/pair | unique tokens/pair | peak MB |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['contender']} | {r['pairs_per_s']:.2f} | {r['prefix_speedup']}× | "
                     f"{r['positions_per_pair']:.1f} | {r['unique_tokens_per_pair']:.1f} | {r['peak_mb']:.0f} |")
    command = "python benchmarks/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / f"bench_train_{args.tag}.md").write_text(
        f"# bench_train ({args.tag})\n\ncommand: `{command.strip()}`  \nmachine: {machine}  \n"
        f"model: Llama, {n_params / 1e6:.1f}M parameters, BPE vocabulary {len(tok)} trained on the sample; "
        f"{args.pairs} pairs per step, pairs/s over {args.steps} timed steps (the same batches for every "
        f"contender) after {args.warmup} warm-up steps; "
        f"max_length 512; packed layouts' attention: {how}.\n\n" + "\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
