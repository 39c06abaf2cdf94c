"""End-to-end reward-model training throughput on the HH-RLHF sample, one process.

Every contender trains the same small Llama (a fresh copy from one seed) with AdamW on the same pairs, the
same number of pairs per step and the same steps:
  dschat          DeepSpeed-Chat step 2: pad every sequence to 512, value head on every token, per-pair
                  loss over the span from the first differing token
  trl             TRL's RewardTrainer: pad to the batch's longest sequence, eager last-token loss
  rmfast-padded   rmfast, [2P, L] padded to the batch's longest, fused loss
  rmfast-packed   rmfast, sequences packed end to end (segment attention on CPU; varlen or flex on CUDA)
  rmfast-prefix   rmfast, prefix_shared: the shared prompt computed once (attention as for packed)
  rmfast-trainer  rmfast-prefix through the real Trainer (DeepSpeed engine, batches built ahead in a worker):
                  what `rmfast-train` runs, on the same batches, step by step (Trainer.train_step): no
                  evaluation and no checkpoint at the end. On CUDA, one more step after the timed ones counts
                  the host syncs of a step (torch.cuda.set_sync_debug_mode) and where they come from, such as
                  DeepSpeed's bf16 optimizer wrapper at ZeRO-0

It reports pairs/s (all timed steps' pairs over their total time), token positions computed per pair against the unique
tokens per pair (prompt once, both responses), and peak memory (CPU: each contender runs in its own process, peak
RSS minus the RSS before its first step; CUDA: the contenders run one after another in one process, the
allocator's peak above its start); CSV + PNG + a Markdown table in benchmarks/results/. The tokenizer is a
byte-level BPE trained on the sample itself, once: the data are tokenized once for every contender. A contender
that fails gets a FAILED line and the others still run.

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
        def step(pairs, idx):  # every sequence padded to 512, chosen rows first then rejected (DeepSpeed-Chat's order)
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
    ahead in a worker thread), prefix_shared, on the same batches as the bare loops: the pairs of `order`
    written in that order, and a sampler that takes them in order. Driven step by step with
    Trainer.train_step (no evaluation, no metrics file, no checkpoint at the end); on CUDA, one more step
    after the timed ones counts its host syncs."""
    from concurrent.futures import ThreadPoolExecutor

    from rmfast import config as config_module
    from rmfast.data.sampler import PairSampler
    from rmfast.data.synthetic import write_jsonl
    from rmfast.engine import Trainer, close_distributed
    from rmfast.metrics import Window

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    model = build_model(len(tok), tok.pad_token_id, args.seed, args.hidden, args.layers)
    model.backbone.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    del model
    write_jsonl([rows[i] for i in order], work / "pairs.jsonl")
    cuda = args.device == "cuda"
    steps = args.warmup + args.steps
    config = config_module.build(overrides={
        "model.name_or_path": str(work / "model"),
        "model.dtype": "bf16" if model_dtype(args) == torch.bfloat16 else "fp32",
        "data.train": [str(work / "pairs.jsonl")], "data.max_length": 512, "data.cache_dir": str(work / "cache"),
        "train.output_dir": str(work / "run"), "train.layout": "prefix_shared", "train.attention": args.attention,
        "train.pairs_per_batch": args.pairs, "train.max_steps": steps + cuda, "train.lr": 1e-4,
        "train.warmup_ratio": 0.0, "train.log_every": 10**6, "train.eval_every": 0, "train.save_every": 0,
        "train.export": False, "train.tensorboard": False, "train.seed": args.seed})
    def in_order(config, groups, layout, rank, world):  # the pairs as written: the bare loops' batches
        return PairSampler(groups.lengths("packed"), pairs_per_batch=args.pairs, shuffle=False,
                           group_by_length=False)

    trainer = Trainer(config, log=lambda _: None, make_sampler=in_order)
    figures = []

    def tap(gen):  # each micro-batch's positions and tokens, as the bare loops count them
        for item in gen:
            figures.append((item[1].positions, item[1].tokens))
            yield item

    pool = ThreadPoolExecutor(1, thread_name_prefix="rmfast-batches")
    batches = tap(trainer.micro_batches(pool))
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes("VmRSS:")
    trainer.engine.train()
    times, losses = [], []
    for s in range(steps):
        window = Window(trainer.device)
        t0 = time.perf_counter()
        trainer.train_step(batches, window)
        if cuda:
            torch.cuda.synchronize()
        if s >= args.warmup:
            times.append(time.perf_counter() - t0)
        trainer.step += 1
        if s == 0:
            losses.append(float(window.reduce(1)["loss"]))
    peak = (torch.cuda.max_memory_allocated() if cuda else _rss_bytes("VmHWM:")) - base
    syncs = count_host_syncs(lambda: trainer.train_step(batches, Window(trainer.device))) if cuda else None
    batches.close()
    pool.shutdown(wait=False, cancel_futures=True)
    close_distributed()  # as rmfast-train does: a group alive at exit can abort the process
    timed = figures[args.warmup:steps]
    total = sum(times)
    row = {"contender": "rmfast-trainer", "pairs_per_s": round(args.pairs * len(times) / total, 3),
           "step_s": round(total / len(times), 4), "step_s_median": round(statistics.median(times), 4),
           "positions_per_pair": round(sum(f[0] for f in timed) / (args.pairs * len(timed)), 1),
           "tokens_per_pair": round(sum(f[1] for f in timed) / (args.pairs * len(timed)), 1),
           "peak_mb": round(max(peak, 0) / 2**20, 1), "first_loss": round(losses[0], 4)}
    if syncs is not None:
        row["host_syncs_per_step"], row["host_sync_sites"] = syncs
    return row


def count_host_syncs(step):
    """(host syncs, 'file:line ×n' of the busiest sites) during step(): torch.cuda.set_sync_debug_mode
    warns at each synchronizing CUDA call, attributed to the Python line that made it."""
    import warnings
    from collections import Counter

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    sites = Counter(f"{'/'.join(Path(w.filename).parts[-2:])}:{w.lineno}" for w in caught
                    if "synchroniz" in str(w.message).lower())
    n = sum(sites.values())
    return n, "; ".join(f"{site} ×{k}" for site, k in sites.most_common(6))


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


def prepare(args):
    """The sample's rows, its tokenizer and its tokenized pairs, built once: a child process (--prepared)
    loads the tokenizer saved here and the pairs from the tokenization cache instead of training and
    tokenizing again."""
    import gzip

    from transformers import PreTrainedTokenizerFast

    rows = [json.loads(line) for line in gzip.open(args.data, "rt")]
    work = Path(args.prepared) if args.prepared else Path(tempfile.mkdtemp(prefix="bench_train_data_"))
    if args.prepared:
        tok = PreTrainedTokenizerFast.from_pretrained(work / "tokenizer")
    else:
        tok = train_bpe_tokenizer([r["chosen"] for r in rows], vocab_size=args.vocab)
        tok.save_pretrained(work / "tokenizer")
    pairs, _, _ = load_data(DataConfig(train=[args.data], max_length=512, cache_dir=str(work / "cache")), tok,
                            progress=False)
    return rows, tok, pairs, work


def run_one(name, pairs, order, args, tok, rows):
    if name == "rmfast-trainer":
        return run_trainer(pairs, order, args, tok, rows)
    return run(name, pairs, order, args, len(tok), tok.pad_token_id)


def run_contender(name, pairs, order, args, tok, rows, work, argv):
    """One contender's result row, in this process (CUDA) or a fresh one (CPU: its peak RSS is its own);
    a failure becomes a row with its error instead of ending the benchmark."""
    isolate = args.isolate == "yes" or (args.isolate == "auto" and args.device == "cpu")
    try:
        if not isolate:
            try:
                return run_one(name, pairs, order, args, tok, rows)
            finally:
                gc.collect()
                if args.device == "cuda":
                    torch.cuda.empty_cache()
        child = subprocess.run([sys.executable, __file__, "--one", name, "--prepared", str(work)] + argv,
                               capture_output=True, text=True)
        found = [x for x in child.stdout.splitlines() if x.startswith("RESULT ")]
        if child.returncode or not found:
            tail = (child.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"exit {child.returncode}: {tail}")
        return json.loads(found[0][7:])
    except Exception as exc:  # noqa: BLE001 - the other contenders still run
        import traceback

        traceback.print_exc()
        return {"contender": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step, for every contender (GPU: 32-64)")
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
    parser.add_argument("--isolate", default="auto", choices=["auto", "yes", "no"],
                        help="each contender in a fresh process (auto: on CPU, where peak RSS is per process; "
                             "on CUDA they share one process and its start-up)")
    parser.add_argument("--tag", default=None, help="results file suffix (default: the device)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--prepared", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    unknown = set(args.contenders.split(",")) - set(CONTENDERS)
    if unknown:
        parser.error(f"--contenders: unknown {', '.join(sorted(unknown))}; choose from {', '.join(CONTENDERS)}")
    torch.manual_seed(args.seed)

    rows, tok, pairs, work = prepare(args)
    order = np.random.default_rng(args.seed).permutation(len(pairs))[: (args.warmup + args.steps) * args.pairs].tolist()
    if args.one:  # a child process: one contender, its result as one JSON line
        print("RESULT " + json.dumps(run_one(args.one, pairs, order, args, tok, rows)), flush=True)
        return
    timed = order[args.warmup * args.pairs:]
    unique = float(pairs.lengths("prefix_shared")[timed].mean())
    probe = build_model(len(tok), tok.pad_token_id, 0, args.hidden, args.layers)
    n_params = sum(p.numel() for p in probe.parameters())
    how = attention.resolve_attention(probe.backbone.config, args.attention, args.device, model_dtype(args))
    del probe
    if how == "varlen":
        how = f"varlen ({attention.varlen_kernel()[0]})"
    args.tag = args.tag or args.device
    machine = machine_description(args.device)
    print(f"machine: {machine}\nmodel: Llama, {n_params / 1e6:.1f}M parameters; {len(pairs)} pairs, "
          f"{args.pairs} per step, {args.steps} timed steps; unique tokens per pair {unique:.1f}; packed "
          f"layouts' attention: {how}", flush=True)
    results = []
    for name in args.contenders.split(","):
        row = run_contender(name, pairs, order, args, tok, rows, work, argv)
        row["unique_tokens_per_pair"] = round(unique, 1)
        results.append(row)
        if "error" in row:
            print(f"  {name:<15} FAILED: {row['error']}", flush=True)
        else:
            print(f"  {name:<15} {row['pairs_per_s']:8.2f} pairs/s  {row['positions_per_pair']:7.1f} positions/pair  "
                  f"{row['peak_mb']:8.1f} MB  first loss {row['first_loss']}", flush=True)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    ok = [r for r in results if "error" not in r]
    best = next((r["pairs_per_s"] for r in ok if r["contender"] == "rmfast-prefix"), None)
    for r in ok:
        r["prefix_speedup"] = round(best / r["pairs_per_s"], 2) if best else ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fields = ["machine", "params_m"] + list(dict.fromkeys(k for r in results for k in r))
    with open(out / f"bench_train_{args.tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        for r in results:
            w.writerow({"machine": machine, "params_m": round(n_params / 1e6, 2), **r})
    title = f"HH-RLHF sample, Llama {n_params / 1e6:.1f}M, {args.pairs} pairs/step; {machine}"
    if ok:
        plot(ok, out / f"bench_train_{args.tag}.png", title)
    head = "| contender | pairs/s | prefix_shared speed-up | positions/pair | unique tokens/pair | peak MB |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['contender']} | FAILED: {r['error'].replace('|', '/')} | | | | |")
            continue
        speedup = f"{r['prefix_speedup']}×" if r["prefix_speedup"] != "" else ""
        lines.append(f"| {r['contender']} | {r['pairs_per_s']:.2f} | {speedup} | "
                     f"{r['positions_per_pair']:.1f} | {r['unique_tokens_per_pair']:.1f} | {r['peak_mb']:.0f} |")
    syncs = next((r for r in ok if "host_syncs_per_step" in r), None)
    notes = ""
    if syncs:
        notes = (f"\nrmfast-trainer: {syncs['host_syncs_per_step']} host syncs per step (one step after the timed "
                 f"ones, torch.cuda.set_sync_debug_mode); busiest sites: {syncs['host_sync_sites'] or 'none'}.\n")
    command = "python benchmarks/bench_train.py " + " ".join(argv)
    (out / f"bench_train_{args.tag}.md").write_text(
        f"# bench_train ({args.tag})\n\ncommand: `{command.strip()}`  \nmachine: {machine}  \n"
        f"model: Llama, {n_params / 1e6:.1f}M parameters, BPE vocabulary {len(tok)} trained on the sample; "
        f"{args.pairs} pairs per step, pairs/s over {args.steps} timed steps (the same batches for every "
        f"contender) after {args.warmup} warm-up steps; "
        f"max_length 512; packed layouts' attention: {how}.\n\n" + "\n".join(lines) + "\n" + notes)
    print("\n" + "\n".join(lines) + notes)
    if len(ok) < len(results):
        sys.exit(1)


if __name__ == "__main__":
    main()
